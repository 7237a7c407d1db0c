"""Continuous batching: the embedded engine's worker thread serves every user at once.

One llama.cpp context holds ``sequences`` sequences. A request runs on one of them, and
each step is one ``llama_decode`` over a batch of:

1. the next token of every sequence that is answering, then
2. within what is left of the step's token budget, a chunk of the prompt of each sequence
   being admitted, shortest rest first (chunked prefill: a long prompt delays the others'
   next tokens by one chunk, not by its whole length, and a follow-up question of a few
   tokens does not wait behind another user's pasted document).

Then every sequence that produced logits samples from its own llama.cpp sampler chain;
end-of-generation, stop strings and ``max_tokens`` end a request on its own, and a
cancelled request is dropped before the next step.

The KV cache, per sequence:

- A sequence that has answered stays resident, idle: the conversation's next turn
  continues there, with nothing copied (the live tier).
- A new request takes the longest prefix it may use from any resident sequence: its own
  conversation's in place, or another's public prefix (system prompt, documents, few-shot
  examples) shared by reference with ``seq_cp``. The public prefix is computed once, at
  start-up, into a pinned sequence that is never evicted.
- The tiered store (``chatbot.kvcache``) then loads a saved state into the sequence if it
  serves more; after each answer the sequence's state is saved there. When every sequence
  is taken, the least recently used idle one is evicted: its state is already saved.

Requests wait in a FIFO queue for a sequence; the engine bounds that queue.
"""

from __future__ import annotations

import codecs
import logging
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from chatbot.engines.base import (
    EngineEvent,
    Finished,
    FinishReason,
    SamplingParams,
    TokenDelta,
)
from chatbot.engines.llama_context import BatchItem, LlamaContext, LlamaError, PoolFull, Sampler
from chatbot.engines.stops import StopScanner
from chatbot.kvcache import KVCache, PromptKey, Reuse
from chatbot.kvcache.keys import shareable_prefix
from chatbot.models.cache import CacheTier
from chatbot.models.domain import BatchStats, Timing, Usage
from chatbot.models.errors import EngineFailure, ServiceUnavailable

logger = logging.getLogger(__name__)

PINNED_SEQUENCES = 4
"""Sequences beyond ``sequences`` that hold public prefixes computed at start-up."""

Emit = Callable[[EngineEvent | BaseException | None], None]
"""Hands an event to the request's consumer, from the worker thread; None ends the stream."""


class Phase(Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(eq=False)
class Job:
    """One request, as the worker thread sees it."""

    key: PromptKey
    sampling: SamplingParams
    stops: tuple[str, ...]
    emit: Emit
    submitted_at: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    pin: bool = False
    """Compute the prompt into a pinned sequence and answer nothing (the public prefix)."""
    # Progress, kept by the scheduler.
    phase: Phase = Phase.WAITING
    slot: _Slot | None = None
    admitted_at: float = 0.0
    reuse: Reuse = field(default_factory=lambda: Reuse(0, None))
    sampler: Sampler | None = None
    next_token: int = -1
    completion: list[int] = field(default_factory=list)
    text: _AnswerText | None = None
    first_sample_at: float | None = None
    max_new: int = 0


@dataclass(eq=False)
class _Slot:
    """A sequence of the context and what it holds (the tokens whose KV is in the pool)."""

    seq_id: int
    tokens: array[int] = field(default_factory=lambda: array("i"))
    public_tokens: int = 0
    owner: bytes = b""
    job: Job | None = None
    used_at: int = 0
    pinned: bool = False
    borrowed: int = 0
    """Leading tokens whose cells a pinned sequence holds too: they cost the pool nothing."""

    @property
    def key(self) -> PromptKey:
        return PromptKey(self.tokens, self.public_tokens, self.owner)


class _SequenceView:
    """One slot's sequence, as ``chatbot.kvcache`` drives it."""

    def __init__(self, context: LlamaContext, slot: _Slot) -> None:
        self._context = context
        self._slot = slot

    def held_tokens(self) -> Sequence[int]:
        return self._slot.tokens

    def truncate(self, n_tokens: int) -> bool:
        if n_tokens > len(self._slot.tokens):
            return False
        if not self._context.keep_first(self._slot.seq_id, n_tokens):
            return False
        del self._slot.tokens[n_tokens:]
        return True

    def export_state(self) -> bytearray:
        return self._context.export_state(self._slot.seq_id)

    def import_state(self, payload: bytearray, tokens: Sequence[int]) -> bool:
        if self._context.import_state(self._slot.seq_id, payload):
            self._slot.tokens = array("i", tokens)
            return True
        self._slot.tokens = array("i")
        return False


class _AnswerText:
    """Turns sampled tokens into streamed text: UTF-8 across token boundaries, stop
    strings, and whitespace held until something follows it (so an answer ends without the
    blank line the model writes before the next turn, and starts without a leading space)."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._scanner = StopScanner(stops)
        self._held_space = ""
        self.first_text_at: float | None = None

    @property
    def stopped(self) -> bool:
        return self._scanner.stopped

    def feed(self, piece: bytes) -> str:
        text = self._held_space + self._scanner.feed(self._decoder.decode(piece))
        if self.first_text_at is None:
            text = text.lstrip()
        body = text.rstrip()
        self._held_space = text[len(body) :]
        return self._out(body)

    def flush(self) -> str:
        tail = (self._scanner.flush() + self._decoder.decode(b"", final=True)).rstrip()
        if self.first_text_at is None:
            tail = tail.lstrip()
        return self._out(self._held_space + tail if tail else "")

    def _out(self, text: str) -> str:
        if text and self.first_text_at is None:
            self.first_text_at = time.perf_counter()
        return text


class Scheduler:
    """Owns the context; ``run`` is the worker thread's loop. ``submit``, ``withdraw``,
    ``wake`` and ``stats`` may be called from any thread."""

    def __init__(
        self,
        context: LlamaContext,
        *,
        sequences: int,
        sequence_tokens: int,
        kv_cache: KVCache | None,
    ) -> None:
        """``sequence_tokens``: the most one sequence holds, prompt and answer. The context's
        KV pool is shared: a request is admitted once the pool has room for all it may
        hold, so that no answer ever finds the pool full."""
        if context.pool_tokens < sequence_tokens:
            raise ValueError(
                f"a KV pool of {context.pool_tokens} tokens cannot hold one sequence of "
                f"{sequence_tokens}"
            )
        self._context = context
        self._sequence_tokens = sequence_tokens
        self._kv_cache = kv_cache
        self._slots = [_Slot(i) for i in range(sequences)]
        self._pins = [_Slot(sequences + i, pinned=True) for i in range(PINNED_SEQUENCES)]
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []  # in admission order
        self._lock = threading.Condition()
        self._stopping = False
        self._steps = 0
        self._batch_tokens = 0
        self._decode_tokens = 0

    # -- any thread ---------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._stopping:
                raise ServiceUnavailable("the server is shutting down")
            self._waiting.append(job)
            self._lock.notify()

    def withdraw(self, job: Job) -> bool:
        """Take back a job still waiting for a sequence; False once it has one."""
        with self._lock:
            if job in self._waiting:
                self._waiting.remove(job)
                return True
            return False

    def wake(self) -> None:
        """A running job was cancelled: let the loop see it now rather than after a wait."""
        with self._lock:
            self._lock.notify()

    def stop(self) -> list[Job]:
        """Ask the loop to end after this step; returns the jobs that never started."""
        with self._lock:
            self._stopping = True
            never_started = list(self._waiting)
            self._waiting.clear()
            self._lock.notify()
            return never_started

    def counts(self) -> tuple[int, int]:
        """(running, waiting) requests; a public prefix being computed is not one."""
        with self._lock:
            return sum(1 for job in self._running if not job.pin), len(self._waiting)

    def stats(self) -> BatchStats:
        with self._lock:
            return BatchStats(
                running=sum(1 for job in self._running if not job.pin),
                waiting=len(self._waiting),
                steps=self._steps,
                batch_tokens=self._batch_tokens,
                decode_tokens=self._decode_tokens,
            )

    def resident_sequences(self) -> int:
        return len(self._resident())

    # -- the worker thread -------------------------------------------------------------------

    def run(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._waiting and not self._running:
                    self._lock.wait()
                if self._stopping:
                    break
            try:
                self._drop_cancelled()
                self._admit()
                self._step()
            except Exception:
                logger.exception("the engine failed while generating")
                self._fail(list(self._running))
        for job in list(self._running):
            job.emit(ServiceUnavailable("the server is shutting down"))
            self._release(job, save=True)

    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self._waiting:
                    return
                job = self._waiting[0]
                slot = self._choose_slot(job)
                if slot is None or not self._make_room(job, slot):
                    return
                self._waiting.popleft()
                self._running.append(job)
            self._start(job, slot)

    def _choose_slot(self, job: Job) -> _Slot | None:
        """The sequence ``job`` runs on: the idle one holding most of its prompt for its
        owner (its conversation, continued in place), else an empty one, else the least
        recently used idle one."""
        free = [slot for slot in (self._pins if job.pin else self._slots) if slot.job is None]
        if job.pin:
            free = [slot for slot in free if not slot.tokens]
        if not free:
            return None
        if self._kv_cache is not None and not job.pin:
            own = [s for s in free if s.tokens and s.owner == job.key.owner]
            best = max(own, key=lambda s: shareable_prefix(s.key, job.key), default=None)
            if best is not None and shareable_prefix(best.key, job.key) > job.key.public_tokens:
                return best
        return min(free, key=lambda s: (bool(s.tokens), s.used_at))

    def _make_room(self, job: Job, slot: _Slot) -> bool:
        """Whether the pool can hold all that ``job`` may write into ``slot``, evicting
        idle sequences, least recently used first, as needed. Cells shared with a pinned
        preamble are counted once, other shared cells once per sequence: the estimate errs
        on the safe side, but for a saved state loaded into cells of its own, for which
        ``_decode`` makes room."""
        job.max_new = min(job.sampling.max_tokens, self._sequence_tokens - len(job.key.tokens))
        limit = len(job.key.tokens) - 1
        pinned = max((min(shareable_prefix(p.key, job.key), limit) for p in self._pins), default=0)
        need = len(job.key.tokens) + job.max_new - pinned
        idle = sorted(
            (s for s in self._slots if s.job is None and s.tokens and s is not slot),
            key=lambda s: s.used_at,
        )
        running = sum(_reserved(j) for j in self._running)
        held = sum(len(s.tokens) - s.borrowed for s in (*self._pins, *idle))
        while running + held + need > self._context.pool_tokens:
            if not idle:
                return False
            held -= len(idle[0].tokens) - idle[0].borrowed
            self._evict(idle.pop(0))
        return True

    def _evict(self, slot: _Slot) -> None:
        self._context.clear(slot.seq_id)
        slot.tokens = array("i")
        slot.borrowed = 0

    def _start(self, job: Job, slot: _Slot) -> None:
        """Give ``job`` its sequence, holding as much of its prompt as any tier can."""
        context = self._context
        key = job.key
        job.slot, slot.job = slot, job
        job.admitted_at = time.perf_counter()
        job.phase = Phase.PREFILL
        live = self._take_resident_prefix(slot, key) if self._kv_cache is not None else 0
        if live == 0:
            context.clear(slot.seq_id)
            slot.borrowed = 0
        slot.tokens = array("i", key.tokens[:live])
        slot.owner, slot.public_tokens = key.owner, key.public_tokens
        if job.pin:
            job.reuse = Reuse(live, CacheTier.LIVE if live else None)
            return
        if self._kv_cache is not None:
            job.reuse = self._kv_cache.prepare(_SequenceView(context, slot), key, live)
            if job.reuse.tier is not CacheTier.LIVE:
                slot.borrowed = 0  # a saved state was loaded into cells of its own
        job.sampler = context.sampler(
            temperature=job.sampling.temperature, top_p=job.sampling.top_p, seed=job.sampling.seed
        )
        job.sampler.accept(key.tokens)
        job.text = _AnswerText(job.stops)

    def _take_resident_prefix(self, slot: _Slot, key: PromptKey) -> int:
        """Leave in ``slot``'s sequence the longest prefix of ``key`` that a resident
        sequence holds and ``key``'s owner may use: its own, kept in place, or another's,
        shared by reference. At least one prompt token is left to evaluate."""
        limit = len(key.tokens) - 1
        held = {s: min(shareable_prefix(s.key, key), limit) for s in self._resident()}
        in_place = held.get(slot, 0)
        source = max(held, key=held.__getitem__, default=None)
        if source is None or held[source] <= in_place:
            if in_place and self._context.keep_first(slot.seq_id, in_place):
                slot.borrowed = min(slot.borrowed, in_place)
                return in_place
            slot.borrowed = 0
            return 0
        n = held[source]
        self._context.share(source.seq_id, slot.seq_id, n)
        slot.borrowed = n if source.pinned else min(source.borrowed, n)
        return n

    def _resident(self) -> list[_Slot]:
        return [slot for slot in (*self._slots, *self._pins) if slot.tokens]

    def _step(self) -> None:
        items: list[BatchItem] = []
        outputs: list[tuple[Job, int]] = []
        chunks: list[tuple[Job, Sequence[int]]] = []
        for job in self._running:
            if job.phase is Phase.DECODE:
                assert job.slot is not None
                items.append(BatchItem(job.next_token, len(job.slot.tokens), job.slot.seq_id, True))
                outputs.append((job, len(items) - 1))
                chunks.append((job, (job.next_token,)))
        decode_tokens = len(items)
        budget = self._context.batch_tokens - len(items)
        prefilling = [job for job in self._running if job.phase is Phase.PREFILL]
        for job in sorted(prefilling, key=_prompt_left):
            if budget <= 0:
                break
            assert job.slot is not None
            start = len(job.slot.tokens)
            chunk = job.key.tokens[start : start + budget]
            ends = start + len(chunk) == len(job.key.tokens)
            for i, token in enumerate(chunk):
                wants = ends and i == len(chunk) - 1 and not job.pin
                items.append(BatchItem(token, start + i, job.slot.seq_id, wants))
            if ends and not job.pin:
                outputs.append((job, len(items) - 1))
            chunks.append((job, chunk))
            budget -= len(chunk)
        if not items:
            return
        try:
            self._decode(items)
        except LlamaError:
            logger.exception("llama_decode failed")
            self._fail([job for job, _ in chunks])
            return
        with self._lock:
            self._steps += 1
            self._batch_tokens += len(items)
            self._decode_tokens += decode_tokens
        for job, chunk in chunks:
            assert job.slot is not None
            job.slot.tokens.extend(chunk)
            if job.pin and len(job.slot.tokens) == len(job.key.tokens):
                self._finish(job, "stop")
        for job, output in outputs:
            assert job.sampler is not None
            self._sampled(job, job.sampler.sample(self._context, output))

    def _decode(self, items: list[BatchItem]) -> None:
        """One ``llama_decode``. Admission keeps the pool from filling, but a saved state
        loaded into a sequence takes cells of its own where the reservation counted shared
        ones: then idle sequences make room, least recently used first."""
        idle = sorted(
            (s for s in self._slots if s.job is None and s.tokens), key=lambda s: s.used_at
        )
        while True:
            try:
                self._context.decode(items)
                return
            except PoolFull:
                if not idle:
                    raise
                logger.warning("the KV pool is full: evicting an idle sequence")
                self._evict(idle.pop(0))

    def _sampled(self, job: Job, token: int) -> None:
        assert job.text is not None
        if job.first_sample_at is None:
            job.first_sample_at = time.perf_counter()
        job.phase = Phase.DECODE
        if self._context.is_end_of_generation(token):
            self._finish(job, "stop")
            return
        job.completion.append(token)
        text = job.text.feed(self._context.piece(token))
        if text:
            job.emit(TokenDelta(text))
        if job.text.stopped:
            self._finish(job, "stop")
        elif len(job.completion) >= job.max_new:
            self._finish(job, "length")
        else:
            job.next_token = token

    def _finish(self, job: Job, reason: FinishReason) -> None:
        if job.text is not None:
            tail = job.text.flush()
            if tail:
                job.emit(TokenDelta(tail))
        ended = time.perf_counter()
        first_text_at = job.text.first_text_at if job.text is not None else None
        prefill_end = job.first_sample_at or ended
        timing = Timing(
            queue_ms=_ms(job.admitted_at - job.submitted_at),
            prefill_ms=_ms(prefill_end - job.admitted_at),
            ttft_ms=_ms((first_text_at or ended) - job.submitted_at),
            total_ms=_ms(ended - job.submitted_at),
        )
        usage = Usage(
            prompt_tokens=len(job.key.tokens),
            cached_tokens=job.reuse.tokens,
            completion_tokens=len(job.completion),
            cache_tier=job.reuse.tier,
        )
        job.emit(Finished(usage=usage, timing=timing, finish_reason=reason))
        self._release(job, save=True)

    def _drop_cancelled(self) -> None:
        for job in [job for job in self._running if job.cancelled.is_set()]:
            self._release(job, save=True)

    def _release(self, job: Job, *, save: bool) -> None:
        """End ``job``'s stream and leave its sequence resident and idle, its state saved."""
        with self._lock:
            self._running.remove(job)
        job.emit(None)
        if job.sampler is not None:
            job.sampler.close()
        slot = job.slot
        if slot is None:
            return
        slot.job = None
        slot.used_at = self._steps
        if save and self._kv_cache is not None and not job.pin:
            try:
                self._kv_cache.commit(_SequenceView(self._context, slot), job.key)
            except Exception:
                logger.exception("saving the KV state failed")
                self._context.clear(slot.seq_id)
                slot.tokens = array("i")

    def _fail(self, jobs: list[Job]) -> None:
        """The context failed under ``jobs``: their sequences' contents are unknown."""
        for job in jobs:
            if job not in self._running:
                continue
            job.emit(EngineFailure("the model failed while generating"))
            self._release(job, save=False)
            if job.slot is not None:
                self._evict(job.slot)


def _reserved(job: Job) -> int:
    """Cells ``job`` may take in the pool: its prompt and answer, but what it borrows."""
    borrowed = job.slot.borrowed if job.slot is not None else 0
    return len(job.key.tokens) + job.max_new - borrowed


def _prompt_left(job: Job) -> int:
    assert job.slot is not None
    return len(job.key.tokens) - len(job.slot.tokens)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)
