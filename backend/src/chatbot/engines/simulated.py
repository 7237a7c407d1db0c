"""The ``simulated`` engine: a timing model of one vLLM + LMCache GPU replica.

For load tests of the API tier and for capacity planning only: it is never a default, and
no cache or TTFT claim is ever made from it. It answers with real text tokens (three-letter
words, deterministic per prompt) through the same events as the real engines, on a timeline
that a GPU replica would keep:

- a request waits while ``max_sequences`` are running (vLLM's ``--max-num-seqs``), in a
  queue of at most ``queue_size``, then
- its first token comes after the prefill of its uncached tokens, plus the copy of the
  cached tokens that LMCache held in CPU RAM back to the GPU (``GpuModel``), and
- the other tokens follow at ``decode_tokens_per_s``, one a decode step.

The prefix cache is keyed as the real ones are, by the KV cache's own keys
(``chatbot.kvcache.keys``): chained hashes of 256-token chunks (LMCache's ``chunk_size``),
the public part of the prompt unsalted and shared by every user, the rest salted with the
request's ``cache_salt``. Two tiers: the GPU's own prefix cache (reported as
``live``) and LMCache's CPU RAM (``ram``), each least-recently-used within a token budget.
So ``usage.cached_tokens`` and ``cache_tier`` follow from the workload.

Tokens are counted cheaply, without a tokenizer: one token per 4 characters of the rendered
prompt (about what Llama 3's tokenizer gives on English), and every generated token is a
space and a three-letter word, 4 characters, so an answer re-read in the next prompt counts
as many tokens as it had when generated.

Nothing burns CPU while the "GPU computes": each stream sleeps until the absolute time its
next token is due (one timer, no task of its own). A consumer that reads late gets every
token that is due by then in one delta, as vLLM's output collector merges a slow reader's
outputs.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from array import array
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from chatbot.engines.base import (
    Engine,
    EngineEvent,
    Finished,
    FinishReason,
    Generation,
    GenerationRequest,
    TokenDelta,
)
from chatbot.kvcache.counters import LookupCounters
from chatbot.kvcache.keys import PromptKey, chunk_hashes, owner_digest
from chatbot.models.cache import CacheStats, CacheTier, LookupStats, TierStats
from chatbot.models.domain import ChatMessage, Timing, Usage
from chatbot.models.errors import ContextLengthExceeded, EngineOverloaded, ServiceUnavailable

CHARS_PER_TOKEN = 4
"""The token count's approximation: English text runs about 4 characters a token."""
CHUNK_TOKENS = 256
"""LMCache's default ``chunk_size`` (deploy/lmcache.yaml): KV is stored and found in whole
chunks."""
_VOCABULARY = (
    "the and for are but not you all any can had her was one our out day get has him his "
    "how man new now old see two way who boy did its let put say she too use big end far "
    "few got low map net own run set sun top try war yes yet air art bed car cup dog eye"
)
WORDS = tuple(_VOCABULARY.split())
"""The simulated model's vocabulary: every token is one of these after a space."""


@dataclass(frozen=True, slots=True)
class GpuModel:
    """What one GPU replica costs, for Llama-3.1-8B-shaped bf16 on one H100 80 GB.

    The prefill and copy figures were measured on an H100 (the architecture notes'
    measurements, restated in specs/001-lmcache-chatbot/research.md §18); the rest are
    published figures, named where they are used. The simulated engine and
    ``benchmarks/capacity.py`` both read this one object.
    """

    # Full prefill measured at 1k / 4k / 16k tokens: 38 / 138 / 614 ms (GPU probe). The three
    # points fit exactly a + b*n + c*n^2: a fixed cost, a cost per token (weights), and
    # attention, quadratic in the tokens attended to.
    prefill_fixed_s: float = 6.356e-3
    prefill_s_per_token: float = 31.22e-6
    attention_s_per_token_pair: float = 4.222e-10
    # 32 layers x 8 KV heads x 128 dims x (K, V) x 2 bytes (GPU probe: 128 KiB per token).
    kv_bytes_per_token: int = 128 * 1024
    # Pinned host -> GPU copy, GPU probe: ~54 GB/s, i.e. 2.43 µs per token of KV.
    load_s_per_token: float = 128 * 1024 / 54e9
    # A stream's decode rate under load (benchmarks/capacity.py derives a step's time from
    # the bandwidth below); 40 tokens/s is a replica decoding ~128 sequences of ~2k tokens
    # each at once.
    decode_tokens_per_s: float = 40.0
    # H100 SXM HBM3: 3.35 TB/s (NVIDIA's datasheet); decode reaches about 70 % of it
    # (an assumption: memory-bound kernels rarely do better).
    hbm_bytes_per_s: float = 3.35e12 * 0.7
    # 8.03 B parameters x 2 bytes (bf16): read once per decode step.
    weight_bytes: float = 16.06e9
    # 80 GB x vLLM's --gpu-memory-utilization 0.9 (deploy/), less the weights and ~2 GB of
    # activations: ~54 GB, i.e. ~412k tokens of KV for running sequences and the prefix cache.
    kv_budget_bytes: float = 80e9 * 0.9 - 16.06e9 - 2e9
    # vLLM's --max-num-seqs: sequences decoded together.
    max_sequences: int = 256
    # LMCache's max_local_cpu_size in deploy/lmcache.yaml: 64 GiB, 512k tokens.
    cpu_cache_bytes: float = 64 * 1024**3

    def prefill_s(self, cached: int, uncached: int) -> float:
        """Computing ``uncached`` tokens after ``cached`` ones already in GPU memory: the
        new tokens attend to the whole prefix."""
        if uncached <= 0:
            return 0.0
        total = cached + uncached
        return (
            self.prefill_fixed_s
            + self.prefill_s_per_token * uncached
            + self.attention_s_per_token_pair * (total * total - cached * cached)
        )

    def load_s(self, tokens: int) -> float:
        """Copying ``tokens`` of KV from CPU RAM to the GPU."""
        return self.load_s_per_token * tokens

    @property
    def gpu_cache_tokens(self) -> int:
        return int(self.kv_budget_bytes // self.kv_bytes_per_token)

    @property
    def cpu_cache_tokens(self) -> int:
        return int(self.cpu_cache_bytes // self.kv_bytes_per_token)


def count_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def _render(message: ChatMessage) -> str:
    # Each message renders the same whatever follows it, so turn k+1's prompt extends turn
    # k's; padded to whole tokens, so each message starts on a token boundary.
    text = f"<{message.role}>\n{message.content.strip()}\n"
    return text + " " * (-len(text) % CHARS_PER_TOKEN)


_GENERATION_PROMPT = "<assistant>\n"


@dataclass(frozen=True, slots=True)
class _Prompt:
    text: str
    public_chars: int
    owner: bytes

    @property
    def tokens(self) -> int:
        return count_tokens(self.text)


_NAMESPACE = b"simulated"


def _chunk_hashes(text: str, public_chars: int, owner: bytes) -> list[bytes]:
    """The chain hash at the end of every full chunk of ``text``: a chunk wholly inside
    the public part is unsalted, any other carries its owner.

    The KV cache's keys hash token ids; here each character stands for one (its code point,
    copied in one pass by the UTF-32 codec), so a chunk of ``CHUNK_TOKENS`` tokens is
    ``CHARS_PER_TOKEN`` times as many characters and equal hashes still mean equal text."""
    code_points = array("i", text.encode("utf-32-le"))
    key = PromptKey(code_points, public_tokens=public_chars, owner=owner)
    return chunk_hashes(key, namespace=_NAMESPACE, chunk_tokens=CHUNK_TOKENS * CHARS_PER_TOKEN)


class _Lru:
    """Chunk hashes held by one tier, least recently used first, within a token budget."""

    def __init__(self, budget_tokens: int) -> None:
        self.capacity = budget_tokens // CHUNK_TOKENS
        self.chunks: OrderedDict[bytes, None] = OrderedDict()
        self.stores = 0
        self.evictions = 0

    def __contains__(self, h: bytes) -> bool:
        return h in self.chunks

    def touch(self, h: bytes) -> None:
        self.chunks.move_to_end(h)

    def put(self, h: bytes) -> None:
        if self.capacity <= 0:
            return
        if h in self.chunks:
            self.chunks.move_to_end(h)
            return
        self.chunks[h] = None
        self.stores += 1
        while len(self.chunks) > self.capacity:
            self.chunks.popitem(last=False)
            self.evictions += 1


@dataclass(frozen=True, slots=True)
class _Hit:
    gpu_tokens: int
    cpu_tokens: int

    @property
    def tokens(self) -> int:
        return self.gpu_tokens + self.cpu_tokens

    @property
    def tier(self) -> CacheTier | None:
        if self.cpu_tokens:
            return CacheTier.RAM
        return CacheTier.LIVE if self.gpu_tokens else None


class PrefixCache:
    """The replica's KV: the GPU's prefix cache, and LMCache's CPU RAM behind it."""

    def __init__(self, *, gpu_tokens: int, cpu_tokens: int, kv_bytes_per_token: int) -> None:
        self._chunk_bytes = CHUNK_TOKENS * kv_bytes_per_token
        self.gpu = _Lru(gpu_tokens)
        self.cpu = _Lru(cpu_tokens)
        self._counters = LookupCounters()

    def lookup(self, prompt: _Prompt) -> _Hit:
        """The longest run of leading chunks some tier holds; what came from CPU RAM is now
        on the GPU too. At least one token is always left to compute."""
        gpu = cpu = 0
        for h in _chunk_hashes(prompt.text, prompt.public_chars, prompt.owner):
            if h in self.gpu:
                self.gpu.touch(h)
                gpu += CHUNK_TOKENS
            elif h in self.cpu:
                self.cpu.touch(h)
                self.gpu.put(h)
                cpu += CHUNK_TOKENS
            else:
                break
        excess = max(0, gpu + cpu - (prompt.tokens - 1))
        cpu_cut = min(cpu, excess)
        hit = _Hit(gpu - (excess - cpu_cut), cpu - cpu_cut)
        hits = {CacheTier.LIVE: hit.gpu_tokens, CacheTier.RAM: hit.cpu_tokens}
        self._counters.count(prompt.owner, prompt.tokens, hits)
        return hit

    def store(self, text: str, public_chars: int, owner: bytes) -> None:
        """After a generation: the prompt and the answer's whole chunks stay on the GPU,
        and LMCache keeps a copy in CPU RAM (``kv_role: kv_both`` stores as it computes)."""
        for h in _chunk_hashes(text, public_chars, owner):
            self.gpu.put(h)
            self.cpu.put(h)

    def stats(self) -> CacheStats:
        total = self._counters.total
        tiers = {
            CacheTier.LIVE: self._tier(CacheTier.LIVE, self.gpu),
            CacheTier.RAM: self._tier(CacheTier.RAM, self.cpu),
            CacheTier.DISK: TierStats(budget_bytes=0),
        }
        return CacheStats(
            chunk_tokens=CHUNK_TOKENS,
            lookups=total.lookups,
            requested_tokens=total.requested_tokens,
            hit_tokens=total.hit_tokens,
            hit_rate=total.hit_rate,
            tiers=tiers,
        )

    def _tier(self, tier: CacheTier, lru: _Lru) -> TierStats:
        count = self._counters.tiers[tier]
        return TierStats(
            hits=count.hits,
            hit_tokens=count.hit_tokens,
            entries=len(lru.chunks),
            bytes=len(lru.chunks) * self._chunk_bytes,
            budget_bytes=lru.capacity * self._chunk_bytes,
            stores=lru.stores,
            evictions=lru.evictions,
        )

    def owner_stats(self, owner: bytes) -> LookupStats:
        return self._counters.owner(owner)


class SimulatedEngine(Engine):
    def __init__(
        self,
        *,
        model_id: str = "simulated-8b",
        context_tokens: int,
        queue_size: int,
        answer_tokens: int,
        gpu: GpuModel | None = None,
        gpu_cache_tokens: int | None = None,
        cpu_cache_tokens: int | None = None,
    ) -> None:
        """``gpu``: the timing model (its ``max_sequences`` and ``decode_tokens_per_s``
        included). ``answer_tokens``: how long every answer is, unless ``max_tokens`` cuts
        it. Cache budgets default to the model's GPU and CPU memory."""
        self.model_id = model_id
        self.gpu = gpu or GpuModel()
        self._context_tokens = context_tokens
        self._queue_size = queue_size
        self._answer_tokens = answer_tokens
        self.cache = PrefixCache(
            gpu_tokens=self.gpu.gpu_cache_tokens if gpu_cache_tokens is None else gpu_cache_tokens,
            cpu_tokens=self.gpu.cpu_cache_tokens if cpu_cache_tokens is None else cpu_cache_tokens,
            kv_bytes_per_token=self.gpu.kv_bytes_per_token,
        )
        self._ready = False
        self.slots = SequenceSlots(self.gpu.max_sequences)

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def context_tokens(self) -> int:
        return self._context_tokens

    @property
    def queue_depth(self) -> int:
        return self.slots.waiting

    @property
    def running(self) -> int:
        """Generations holding a sequence slot."""
        return self.slots.running

    async def start(self) -> None:
        self._ready = True

    async def aclose(self) -> None:
        self._ready = False
        self.slots.refuse_waiting(ServiceUnavailable("the server is shutting down"))

    def cache_stats(self) -> CacheStats | None:
        return self.cache.stats()

    def user_cache_stats(self, cache_salt: str) -> LookupStats | None:
        return self.cache.owner_stats(owner_digest(cache_salt))

    def prompt(self, request: GenerationRequest) -> _Prompt:
        public = "".join(_render(m) for m in request.messages[: request.public_messages])
        rest = "".join(_render(m) for m in request.messages[request.public_messages :])
        return _Prompt(
            public + rest + _GENERATION_PROMPT, len(public), owner_digest(request.cache_salt)
        )

    async def submit(self, request: GenerationRequest) -> Generation:
        if not self._ready:
            raise ServiceUnavailable("the engine is not started")
        prompt = self.prompt(request)
        if prompt.tokens >= self._context_tokens:
            raise ContextLengthExceeded(
                f"the prompt is {prompt.tokens} tokens; the context holds {self._context_tokens}"
            )
        if self.slots.full and self.slots.waiting >= self._queue_size:
            raise EngineOverloaded(
                f"the engine queue is full ({self._queue_size} waiting)", retry_after=1
            )
        answer = min(self._answer_tokens, request.sampling.max_tokens)
        reason: FinishReason = "length" if answer < self._answer_tokens else "stop"
        generation = _SimulatedGeneration(self.slots, self.cache, self.gpu, prompt, answer, reason)
        self.slots.admit(generation)
        return generation


class SequenceSlots:
    """The GPU's sequence slots (vLLM's ``--max-num-seqs``), and the generations waiting
    for one, first come, first served."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.running = 0
        self._waiting: deque[_SimulatedGeneration] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def full(self) -> bool:
        return self.running >= self.size

    def admit(self, generation: _SimulatedGeneration) -> None:
        """A slot for ``generation`` now, or once those before it have had theirs."""
        if not self.full and not self._waiting:
            self._grant(generation)
        else:
            self._waiting.append(generation)

    def withdraw(self, generation: _SimulatedGeneration) -> None:
        """``generation`` no longer waits for a slot."""
        if generation in self._waiting:
            self._waiting.remove(generation)

    def release(self, generation: _SimulatedGeneration) -> None:
        """``generation``'s slot, if it holds one, goes to the next in line."""
        if not generation.holding:
            return
        generation.holding = False
        self.running -= 1
        while self._waiting and not self.full:
            self._grant(self._waiting.popleft())

    def refuse_waiting(self, error: Exception) -> None:
        """Every generation still waiting fails with ``error``."""
        while self._waiting:
            generation = self._waiting.popleft()
            if not generation.slot.done():
                generation.slot.set_exception(error)

    def _grant(self, generation: _SimulatedGeneration) -> None:
        self.running += 1
        generation.holding = True
        generation.slot.set_result(None)


class _SimulatedGeneration(Generation):
    def __init__(
        self,
        slots: SequenceSlots,
        cache: PrefixCache,
        gpu: GpuModel,
        prompt: _Prompt,
        answer_tokens: int,
        finish_reason: FinishReason,
    ) -> None:
        self.slots = slots
        self.cache = cache
        self.gpu = gpu
        self.prompt = prompt
        self.answer_tokens = answer_tokens
        self.finish_reason = finish_reason
        self._loop = asyncio.get_running_loop()
        self.slot: asyncio.Future[None] = self._loop.create_future()
        self.holding = False
        """Holds one of the engine's sequence slots."""
        self._submitted = self._loop.time()
        self._wake: asyncio.Future[None] | None = None
        self._produced = 0
        self._seed = 0
        self._started = False
        self._closed = False

    def closed(self) -> bool:
        """Closed by the consumer, possibly while it held a token."""
        return self._closed

    def __aiter__(self) -> AsyncIterator[EngineEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[EngineEvent]:
        await self.slot
        if self._closed:
            return
        self._started = True
        started = self._loop.time()
        hit = self.cache.lookup(self.prompt)
        gpu = self.gpu
        prefill = gpu.load_s(hit.cpu_tokens) + gpu.prefill_s(
            hit.tokens, self.prompt.tokens - hit.tokens
        )
        first_at = started + prefill
        interval = 1 / gpu.decode_tokens_per_s
        digest = hashlib.blake2b(self.prompt.text.encode(), digest_size=4).digest()
        self._seed = int.from_bytes(digest, "big")
        try:
            while self._produced < self.answer_tokens:
                due = first_at + self._produced * interval
                if not await self._sleep_until(due):
                    return
                # Every token due by now, in one delta: a consumer that fell behind catches up.
                elapsed = self._loop.time() - first_at
                ready = max(self._produced + 1, int(elapsed / interval) + 1)
                ready = min(self.answer_tokens, ready)
                text = "".join(self._word(i) for i in range(self._produced, ready))
                self._produced = ready
                yield TokenDelta(text)
                if self.closed():
                    return
            ended = first_at + (self.answer_tokens - 1) * interval
            yield Finished(
                usage=Usage(
                    prompt_tokens=self.prompt.tokens,
                    cached_tokens=hit.tokens,
                    completion_tokens=self._produced,
                    cache_tier=hit.tier,
                ),
                timing=Timing.measured(
                    submitted=self._submitted,
                    admitted=started,
                    prefilled=first_at,
                    first_token=first_at,
                    ended=ended,
                ),
                finish_reason=self.finish_reason,
            )
        finally:
            self._finish()

    def _word(self, i: int) -> str:
        return " " + WORDS[(self._seed + 7 * i + i * i) % len(WORDS)]

    async def _sleep_until(self, when: float) -> bool:
        """Sleep on one timer until ``when``; False if closed meanwhile."""
        if when > self._loop.time():
            wake = self._wake = self._loop.create_future()
            timer = self._loop.call_at(when, _set_done, wake)
            try:
                await wake
            finally:
                timer.cancel()
                self._wake = None
        return not self._closed

    def _finish(self) -> None:
        """Give the sequence slot back and keep the KV computed: the prompt and what was
        said of the answer."""
        if self._started:
            self._started = False
            answer = "".join(self._word(i) for i in range(self._produced)).strip()
            text = self.prompt.text + answer + "\n"
            self.cache.store(text, self.prompt.public_chars, self.prompt.owner)
        self.slots.release(self)

    async def aclose(self) -> None:
        self._closed = True
        self.slots.withdraw(self)
        _set_done(self.slot)  # a waiting stream wakes up, sees it is closed, and ends
        if self._wake is not None:
            _set_done(self._wake)
        self._finish()


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
