"""Continuous batching on the real model: a sequence decoded in a batch with others reads
its own history only, users answered together share steps, and a prefix that comes from
another sequence (shared by reference), from RAM or from disk continues exactly as a cold
prefill would."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt
import pytest

from chatbot.engines import chat_format
from chatbot.engines.base import Finished, GenerationRequest, SamplingParams, TokenDelta
from chatbot.engines.embedded import EmbeddedEngine, state_namespace
from chatbot.engines.llama_context import BatchItem, LlamaContext
from chatbot.kvcache import KVCache
from chatbot.kvcache.keys import common_prefix_length
from chatbot.kvcache.tiers import DiskTier, RamTier
from chatbot.models.cache import CacheTier
from chatbot.models.domain import BatchStats, ChatMessage, Usage
from chatbot.models.errors import EngineOverloaded
from tests.waiting import engine_running

GREEDY_16 = SamplingParams(max_tokens=16, temperature=0.0, top_p=1.0)
SYSTEM = ChatMessage(role="system", content="You are a helpful assistant.")
QUESTIONS = [
    "Tell me about the history of the city of Rome.",
    "What do dogs like to eat?",
    "How do I boil an egg?",
    "Why is the sky blue?",
    "Name three planets of the solar system.",
]
GIB = 1024**3


def engine(
    model_path: Path,
    *,
    parallel: int,
    kv_cache: KVCache | None,
    queue_size: int = 8,
    context_tokens: int = 2048,
    pool_tokens: int = 8192,
    side_read: bool = True,
) -> EmbeddedEngine:
    return EmbeddedEngine(
        model_path,
        model_id="test",
        context_tokens=context_tokens,
        batch_tokens=256,
        threads=2,
        parallel=parallel,
        pool_tokens=pool_tokens,
        queue_size=queue_size,
        few_shot=True,
        kv_cache=kv_cache,
        side_read=side_read,
    )


def ram_cache(model_path: Path) -> KVCache:
    return KVCache(namespace=state_namespace(model_path), chunk_tokens=64, ram_bytes=GIB)


async def ask(
    running: EmbeddedEngine,
    messages: Sequence[ChatMessage],
    user: str,
    sampling: SamplingParams = GREEDY_16,
    session: str = "",
) -> tuple[str, Usage]:
    request = GenerationRequest(
        messages=(SYSTEM, *messages),
        sampling=sampling,
        cache_salt=user,
        public_messages=1,
        session=session,
    )
    pieces: list[str] = []
    usage: Usage | None = None
    async with await running.submit(request) as generation:
        async for event in generation:
            if isinstance(event, TokenDelta):
                pieces.append(event.text)
            elif isinstance(event, Finished):
                usage = event.usage
    assert usage is not None
    return "".join(pieces), usage


def user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


NEAR_TIE = 0.25
"""Logits: a top-2 gap below this may flip between two correct computations.

Bit-for-bit equality is not to be had from llama.cpp on the CPU: one query row goes through
a flash-attention kernel that splits the KV over the threads, several rows through one that
does not (``ggml_compute_forward_flash_attn_ext_f16``), both with an f16 accumulator, so the
same tokens evaluated in another batch, or as an answer rather than a prompt, give slightly
different KV. Any leak between sequences, or a wrong restore, changes far more than that."""


class Teacher:
    """A context of ``sequences`` sequences, and greedy answers forced token by token."""

    def __init__(self, model_path: Path, sequences: int) -> None:
        self.context = LlamaContext(
            model_path, sequences=sequences, pool_tokens=8192, batch_tokens=512, threads=2
        )

    def close(self) -> None:
        self.context.close()

    def prompt(self, messages: Sequence[ChatMessage]) -> list[int]:
        rendered = chat_format.render([SYSTEM, *messages], few_shot=True)
        context = self.context
        return chat_format.prompt_tokens(rendered, bos=context.bos(), tokenize=context.tokenize)[0]

    def logits(self, output: int) -> npt.NDArray[np.float32]:
        row = llama_cpp.llama_get_logits_ith(self.context.ctx, output)
        return np.ctypeslib.as_array(row, shape=(self.context.vocab_size,)).copy()

    def prefill(self, seq: int, tokens: Sequence[int], start: int = 0) -> None:
        """Evaluate ``tokens[start:]`` into ``seq``, which holds ``tokens[:start]``."""
        rest = tokens[start:]
        for first in range(0, len(rest), 512):
            chunk = rest[first : first + 512]
            self.context.decode(
                [BatchItem(t, start + first + i, seq, False) for i, t in enumerate(chunk)]
            )

    def answer(self, seqs: Sequence[int], prompts: Sequence[list[int]], steps: int = 16) -> Any:
        """Greedy answers of ``seqs``, which hold their prompts but the last token, decoded
        together: (the logits of each step, the tokens chosen) per sequence."""
        batch = [BatchItem(p[-1], len(p) - 1, s, True) for s, p in zip(seqs, prompts, strict=True)]
        history: list[list[npt.NDArray[np.float32]]] = [[] for _ in seqs]
        chosen: list[list[int]] = [[] for _ in seqs]
        for k in range(steps):
            self.context.decode(batch)
            for i in range(len(seqs)):
                history[i].append(self.logits(i))
                chosen[i].append(int(history[i][-1].argmax()))
            batch = [
                BatchItem(chosen[i][-1], len(p) + k, s, True)
                for i, (s, p) in enumerate(zip(seqs, prompts, strict=True))
            ]
        return history, chosen


def same_choices(reference: Sequence[npt.NDArray[np.float32]], answer: Sequence[int]) -> int:
    """Asserts ``answer`` picks the reference's top token wherever that is not a near tie;
    returns how many steps were decided."""
    decided = 0
    for k, (logits, token) in enumerate(zip(reference, answer, strict=True)):
        top2 = np.sort(logits)[-2:]
        if top2[1] - top2[0] >= NEAR_TIE:
            assert int(logits.argmax()) == token, f"step {k}"
            decided += 1
    return decided


def test_a_sequence_decoded_with_others_reads_only_its_own_history(model_path: Path) -> None:
    """Each prompt's greedy answer decoded alone, then all five decoded in one batch (teacher-
    forced on the answers alone): the same choice at every step that is not a near tie."""
    teacher = Teacher(model_path, sequences=len(QUESTIONS))
    try:
        prompts = [teacher.prompt([user(q)]) for q in QUESTIONS]
        alone = []
        for seq, tokens in enumerate(prompts):
            teacher.prefill(seq, tokens[:-1])
            alone.append(teacher.answer([seq], [tokens]))
        for seq, tokens in enumerate(prompts):
            teacher.context.keep_first(seq, len(tokens) - 1)
        seqs = list(range(len(prompts)))
        batch = [BatchItem(p[-1], len(p) - 1, s, True) for s, p in zip(seqs, prompts, strict=True)]
        decided = 0
        for k in range(16):
            teacher.context.decode(batch)
            for seq in seqs:
                (history,), _ = alone[seq]
                decided += same_choices([history[k]], [int(teacher.logits(seq).argmax())])
            batch = [
                BatchItem(alone[s][1][0][k], len(p) + k, s, True)
                for s, p in zip(seqs, prompts, strict=True)
            ]
        assert decided >= 0.8 * 16 * len(prompts), "the check must cover most steps"
    finally:
        teacher.close()


def test_a_shared_restored_or_kept_prefix_answers_like_a_cold_prefill(model_path: Path) -> None:
    """A second turn whose first turn's KV (its prompt, and its answer as decoded) is kept
    in place, restored from a saved state into another sequence, or whose public prefix is
    shared by reference, answers as a cold prefill of the whole second turn does."""
    teacher = Teacher(model_path, sequences=4)
    context = teacher.context
    try:
        first = teacher.prompt([user(QUESTIONS[0])])
        teacher.prefill(0, first[:-1])
        _, (answer,) = teacher.answer([0], [first])
        reply = "".join(context.piece(t).decode() for t in answer)
        second = teacher.prompt(
            [user(QUESTIONS[0]), ChatMessage(role="assistant", content=reply), user("And Paris?")]
        )
        held = first + answer[:-1]  # the last token chosen was never evaluated
        kept = common_prefix_length(held, second)
        assert kept > len(first), "the second turn starts with the first turn and its answer"
        saved = context.export_state(0)

        teacher.prefill(1, second[:-1])  # cold
        context.import_state(2, saved)  # restored from a saved state
        assert context.keep_first(2, kept)
        teacher.prefill(2, second[:-1], start=kept)
        assert context.keep_first(0, kept)  # kept in place
        teacher.prefill(0, second[:-1], start=kept)
        shared = common_prefix_length(second, teacher.prompt([user(QUESTIONS[1])]))
        context.share(1, 3, shared)  # the public prefix, by reference
        teacher.prefill(3, second[:-1], start=shared)

        (cold, *reused), _ = teacher.answer([1, 2, 0, 3], [second] * 4)
        for logits in reused:
            decided = same_choices(cold, [int(step.argmax()) for step in logits])
            assert decided >= 12
    finally:
        teacher.close()


def test_users_answered_together_share_steps(model_path: Path) -> None:
    async def run() -> tuple[list[tuple[str, Usage]], BatchStats]:
        together = engine(model_path, parallel=len(QUESTIONS), kv_cache=None)
        await together.start()
        try:
            answers = await asyncio.gather(
                *(ask(together, [user(q)], f"u{i}") for i, q in enumerate(QUESTIONS))
            )
            stats = together.batch_stats()
        finally:
            await together.aclose()
        assert stats is not None
        return answers, stats

    answers, stats = asyncio.run(run())
    assert all(text for text, _ in answers)
    generated = sum(usage.completion_tokens for _, usage in answers)
    assert stats.decode_tokens >= generated - len(QUESTIONS)
    # An answers' step carries a token of every answering sequence: the answers, started a
    # few steps apart as their prompts were read, shared most of them.
    assert stats.answer_steps < stats.decode_tokens / 2


def test_each_tier_serves_a_conversation_back(model_path: Path, tmp_path: Path) -> None:
    """Over the engine: the pinned public prefix is shared with a new user, a conversation
    continues in its resident sequence, comes back from RAM after losing its sequence, and
    from disk after a restart."""
    first = [user(QUESTIONS[0])]

    async def run() -> None:
        def disk_cache() -> KVCache:
            return KVCache(
                namespace=state_namespace(model_path),
                chunk_tokens=64,
                disk_bytes=GIB,
                disk_dir=tmp_path,
            )

        one = engine(model_path, parallel=1, kv_cache=ram_cache(model_path))
        await one.start()
        await one.warm((SYSTEM,))
        try:
            answer, usage = await ask(one, first, "alice")
            assert usage.cache_tier is CacheTier.LIVE  # the pinned prefix
            turn2 = [*first, ChatMessage(role="assistant", content=answer), user("And Paris?")]
            public = usage.cached_tokens
            # One sequence: Bob's turn takes it, and Alice comes back from RAM.
            _, usage = await ask(one, [user(QUESTIONS[1])], "bob")
            assert (usage.cache_tier, usage.cached_tokens) == (CacheTier.LIVE, public)
            text, usage = await ask(one, turn2, "alice")
            assert (usage.cache_tier, bool(text)) == (CacheTier.RAM, True)
            assert usage.cached_tokens > public
        finally:
            await one.aclose()

        two = engine(model_path, parallel=2, kv_cache=disk_cache())
        await two.start()
        try:
            await ask(two, first, "alice")
            await ask(two, [user(QUESTIONS[1])], "bob")
            _, usage = await ask(two, turn2, "alice")
            assert usage.cache_tier is CacheTier.LIVE  # still resident
        finally:
            await two.aclose()  # saves what RAM holds to disk
        restarted = engine(model_path, parallel=1, kv_cache=disk_cache())
        await restarted.start()
        try:
            _, usage = await ask(restarted, turn2, "alice")
            assert usage.cache_tier is CacheTier.DISK
        finally:
            await restarted.aclose()

    asyncio.run(run())


def test_a_cancelled_request_frees_its_sequence_for_the_next(model_path: Path) -> None:
    long = SamplingParams(max_tokens=1000, temperature=0.0, top_p=1.0)

    async def run() -> None:
        running = engine(model_path, parallel=1, kv_cache=None, queue_size=1)
        await running.start()
        try:
            request = GenerationRequest(
                messages=(SYSTEM, user("Count from one to five hundred, in words.")),
                sampling=long,
                cache_salt="alice",
            )
            generation = await running.submit(request)
            short = SamplingParams(max_tokens=4, temperature=0.0, top_p=1.0)
            waiting = await running.submit(
                GenerationRequest(messages=request.messages, sampling=short, cache_salt="bob")
            )
            # One running, one waiting: the queue is full.
            with pytest.raises(EngineOverloaded, match="queue is full"):
                await running.submit(request)
            async for event in generation:
                assert isinstance(event, TokenDelta)
                break
            await generation.aclose()
            # The waiting request gets the sequence and answers.
            async with waiting:
                events = [event async for event in waiting]
            assert isinstance(events[-1], Finished)
            assert not engine_running(running)
        finally:
            await running.aclose()

    asyncio.run(run())


def test_saves_and_loads_run_on_the_caches_thread_never_in_a_step(
    model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every read and write of a saved state's bytes (RAM, spill to disk, load from disk)
    happens on the cache's I/O thread: none on the engine's worker thread, whose steps
    the streaming users wait on."""
    threads: dict[str, set[str]] = {}
    for tier in (RamTier, DiskTier):
        for name in ("put", "get"):
            method = getattr(tier, name)

            def recorded(self: Any, *args: Any, _m: Any = method, _n: str = name) -> Any:
                threads.setdefault(f"{type(self).__name__}.{_n}", set()).add(
                    threading.current_thread().name
                )
                return _m(self, *args)

            monkeypatch.setattr(tier, name, recorded)

    async def run() -> None:
        # RAM holds about one conversation's state: the next one spills it to disk.
        cache = KVCache(
            namespace=state_namespace(model_path),
            chunk_tokens=64,
            ram_bytes=6 * 1024**2,
            disk_bytes=GIB,
            disk_dir=tmp_path,
        )
        running = engine(model_path, parallel=1, kv_cache=cache)
        await running.start()
        try:
            alice = [user(QUESTIONS[0])]
            text, _ = await ask(running, alice, "alice")
            for i, name in enumerate(("bob", "carol")):
                await ask(running, [user(QUESTIONS[i + 1])], name)
            turn2 = [*alice, ChatMessage(role="assistant", content=text), user("And why?")]
            _, usage = await ask(running, turn2, "alice")
            assert usage.cache_tier is CacheTier.DISK
        finally:
            await running.aclose()

    asyncio.run(run())
    assert {"RamTier.put", "DiskTier.put", "DiskTier.get"} <= threads.keys(), threads
    for operation, names in threads.items():
        assert all(n.startswith("kv-io") for n in names), (operation, names)
