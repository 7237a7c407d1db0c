"""The batching engine's policy: which requests get a sequence, what each step evaluates,
and what the results mean. Shaped as vLLM v1's scheduler: ``schedule()`` returns a plain
``StepPlan``, the model runner (``runner.py``) carries it out on llama.cpp, and
``update_from_output()`` applies what it reports. Nothing here calls llama.cpp, so the whole
policy is tested with a fake vocabulary and hand-made outputs.

Each step is one ``llama_decode``. While some answers are streaming and some prompts are
being read, steps go in turn:

1. a questions' step: the questions about to be answered (a few cheap tokens each), read
   whole, cheapest first (a message its draft has read does not wait for another user's
   question of thirty tokens);
2. an answers' step: the next token of every answer (and a question that came after the
   questions' step);
3. a reads' step: chunks of the longer prompts, shortest rest first (a follow-up of a few
   dozen tokens is not read behind another user's pasted document).

The questions go first so that their readers do not wait for the answers' tokens; the
answers, which beside them would have waited for the questions' tokens anyway, lose only
the second step's fixed cost. Measured in-process at 8 users (144 follow-ups each way),
follow-up TTFT p50 / p95 85 / 195 ms against 122 / 232 with the questions beside the answers,
and the runs 6 % shorter.

All together may cost at most ``step_bound_s``, predicted by ``StepCostModel`` from their
tokens and positions: a long prompt's chunks shrink as it advances into the context, and
an answer's next token never waits for more than the bound. Apart, the two steps cost less
than mixed (llama.cpp's CPU attention pays for a batch that mixes sequences). While a reader
waits for an answer's first text, the reads' step waits a few answers' steps. With nobody
answering, a step reads every prompt within the bound; a prompt alone on the engine takes
steps a few times longer (nobody waits on it, and big chunks read fastest).

The KV cache, per sequence:

- A sequence that has answered stays resident, idle: the conversation's next turn
  continues there, with nothing copied (the live tier).
- A new request takes the longest prefix it may use from any resident sequence: its own
  conversation's in place, or another's public prefix (system prompt, documents, few-shot
  examples) shared by reference with ``seq_cp``. The public prefix is computed once, at
  start-up, into a pinned sequence that is never evicted.
- The tiered store (``chatbot.kvcache``) then loads a saved state if one serves more: it is
  read from its tier on the cache's I/O thread while the request waits (RESTORING) and the
  other sequences keep stepping, then copied in at the start of a step.
- After each answer the sequence's state is copied out at the start of the next step and
  saved on the I/O thread; the sequence is not evicted until that save is done. When every
  sequence is taken, the least recently used idle one is evicted.

Requests wait in a FIFO queue for a sequence; the engine bounds that queue. A failure while
admitting one request fails that request alone; a failed ``llama_decode`` fails the requests
in its batch.
"""

from __future__ import annotations

import logging
import threading
import time
from array import array
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import replace
from typing import Protocol

from chatbot.engines.base import Finished, FinishReason, TokenDelta
from chatbot.engines.batching.cost import StepCostModel, StepShape
from chatbot.engines.batching.plan import (
    Admission,
    Chunk,
    Handoff,
    Load,
    Save,
    StepOutput,
    StepPlan,
)
from chatbot.engines.batching.requests import AnswerText, Phase, Progress, Request, Slot
from chatbot.kvcache import KVCache, PromptKey, Restore, Reuse
from chatbot.kvcache.keys import shareable_prefix
from chatbot.models.cache import CacheTier
from chatbot.models.domain import STEP_SECONDS_BUCKETS, BatchStats, DraftStats, Timing, Usage
from chatbot.models.errors import EngineFailure, ServiceUnavailable

logger = logging.getLogger(__name__)

PINNED_SEQUENCES = 4
"""Sequences beyond ``sequences`` that hold public prefixes computed at start-up."""

SHORT_STEP_SHARE = 0.25
"""The share of the bound a reads' step may take while a reader waits for an answer's first
text (a question just read, whose first token may be a space that shows nothing)."""

READS_DEFERRED = 3
"""Answers' steps in a row after which the prompts being read get a step of their own even
though a reader waits or the bound leaves them nothing: questions arriving one after
another never stop a long read."""

QUESTION_SHARE = 0.5
"""A prompt about to be answered whose rest costs at most this share of the bound is a
question, read whole in a questions' step; a longer rest (a long prompt's last words deep in
the context) is read in reads' steps like the rest of it."""

PASS_OVER = 2.0
"""A question that would add more than this many times what the cheaper questions of its
step add is read in the next step: questions of about the same cost go together."""

ALONE_FACTOR = 4
"""A prompt alone on the engine may take steps this many times the bound: nobody waits on
it, and big chunks read a long prompt fastest; but a request arriving meanwhile waits for
the step under way, so even then it has a bound (a 512-token chunk deep in the context
takes over a second here)."""

SIDE_READ_TOKENS = 2048
"""Prompt tokens still to read from which a prompt arriving while others are answered is
read by the side reader (``side.py``). Below, the shared context reads it sooner on all its
cores: its chunks are cheap near the start of a context, and dear deep in one. Measured in
separate runs with two users streaming, a 1,500-token message took 7.0 s to its first token
read here and 7.9 s read beside; 6,708 tokens beside four streaming users 44.7 s here and
28.2 s beside."""

ALONE_AFTER_S = 1.0
"""A prompt is alone once nobody else has been served for this long: a user whose answer
just ended is likely to ask again within moments, and would wait on a long step."""

MIN_CHUNK = 16
"""The fewest prompt tokens the first prompt in line is given where the bound leaves it
nothing (a deep position, a slow machine), in a step without answers or once its reads'
step has waited ``READS_DEFERRED`` answers' steps: a long prompt always moves on."""

# An empty plan (everyone waiting on a read from disk, or on a save to finish) waits this
# long for a wake-up before it looks again.
_IDLE_WAIT_S = 0.05


class Vocabulary(Protocol):
    def piece(self, token: int) -> bytes: ...

    def is_end_of_generation(self, token: int) -> bool: ...


class Side(Protocol):
    """The side reader (``side.py``), as the scheduler uses it."""

    context_tokens: int

    @property
    def busy(self) -> bool: ...

    def read(
        self, key: PromptKey, upto: int, cancelled: threading.Event
    ) -> Future[bytearray | None]: ...


class Scheduler:
    """``submit``, ``withdraw``, ``wake``, ``stop``, ``counts`` and ``stats`` may be called
    from any thread; the rest runs on the engine's worker thread."""

    def __init__(
        self,
        vocabulary: Vocabulary,
        *,
        sequences: int,
        sequence_tokens: int,
        pool_tokens: int,
        batch_tokens: int,
        kv_cache: KVCache | None,
        cost: StepCostModel,
        step_bound_s: float,
        side: Side | None = None,
        side_read_tokens: int = SIDE_READ_TOKENS,
        cost_beside: StepCostModel | None = None,
    ) -> None:
        """``sequence_tokens``: the most one sequence holds, prompt and answer. The KV pool
        of ``pool_tokens`` cells is shared: a request is admitted once the pool has room for
        all it may hold, so that no answer ever finds the pool full."""
        if pool_tokens < sequence_tokens:
            raise ValueError(
                f"a KV pool of {pool_tokens} tokens cannot hold one sequence of {sequence_tokens}"
            )
        self._vocabulary = vocabulary
        self._sequence_tokens = sequence_tokens
        self._pool_tokens = pool_tokens
        self._batch_tokens = batch_tokens
        self._kv_cache = kv_cache
        # Steps cost more on the thread fewer they have while the side reader reads: each
        # case has a model of its own.
        self._costs = {False: cost, True: cost_beside or StepCostModel(cost.prior.times(2))}
        self.cost = cost
        self.step_bound_s = step_bound_s
        self._side = side
        self._side_read_tokens = side_read_tokens
        self._slots = [Slot(i) for i in range(sequences)]
        self._pins = [Slot(sequences + i, pinned=True) for i in range(PINNED_SEQUENCES)]
        self._by_seq = {slot.seq_id: slot for slot in (*self._slots, *self._pins)}
        self._waiting: deque[Request] = deque()
        self._drafts: deque[Request] = deque()  # admitted only when no request waits
        self._draft_stats = DraftStats()
        self._running: list[Progress] = []  # in admission order
        self._pending = StepPlan()  # what the last update left for the next step to carry out
        self._answers_steps = 0  # answers' steps since the last reads' step
        self._answers_step_s = 0.0  # the last answers' step, predicted
        self._reads_step_s = 0.0  # steps planned since the last answers' step, predicted
        self._questions_step = False  # the step just planned was questions' of their own
        self._others_served_at = -ALONE_AFTER_S  # a step served more than one request
        self._lock = threading.Condition()
        self._woken = False
        self._stopping = False
        self._stopped = False
        self._stats = BatchStats(
            running=0,
            waiting=0,
            steps=0,
            batch_tokens=0,
            decode_tokens=0,
            step_bound_seconds=step_bound_s,
            step_seconds_buckets=(0,) * (len(STEP_SECONDS_BUCKETS) + 1),
        )

    # -- any thread ---------------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        with self._lock:
            if self._stopping:
                raise ServiceUnavailable("the server is shutting down")
            self._waiting.append(request)
            self._wake()

    def submit_draft(self, request: Request) -> None:
        """Read ``request`` (a draft) when no request waits and it fits without taking
        anything from a running request (``_admit_drafts``)."""
        with self._lock:
            if self._stopping:
                return
            self._drafts.append(request)
            self._wake()

    def withdraw(self, request: Request) -> bool:
        """Take back a request still waiting for a sequence; False once it has one."""
        with self._lock:
            if request in self._waiting:
                self._waiting.remove(request)
                return True
            return False

    def wake(self) -> None:
        """Something changed (a request cancelled, a read or a save done): plan again now."""
        with self._lock:
            self._wake()

    def stop(self) -> list[Request]:
        """Ask the loop to end after this step; returns the requests that never started."""
        with self._lock:
            self._stopping = True
            never_started = list(self._waiting)
            self._waiting.clear()
            self._wake()
            return never_started

    def counts(self) -> tuple[int, int]:
        """(running, waiting) requests; a public prefix or a draft being read is not one."""
        with self._lock:
            return self._answering(), len(self._waiting)

    def draft_stats(self) -> DraftStats:
        with self._lock:
            return self._draft_stats

    def stats(self) -> BatchStats:
        with self._lock:
            return replace(self._stats, running=self._answering(), waiting=len(self._waiting))

    def resident_sequences(self) -> int:
        return len(self._resident())

    def _wake(self) -> None:
        self._woken = True
        self._lock.notify()

    def _answering(self) -> int:
        return sum(1 for p in self._running if p.request.answers)

    # -- the worker thread: plan --------------------------------------------------------------

    def next_plan(self) -> StepPlan | None:
        """The next step's plan, once there is something to do; None once stopped."""
        while True:
            with self._lock:
                while not (
                    self._stopping or self._waiting or self._drafts or self._running or self._woken
                ):
                    self._lock.wait()
                self._woken = False
                if self._stopped:
                    return None
                stopping = self._stopping
            if stopping:
                self._stopped = True
                return self._last_plan()
            plan = self.schedule()
            if not plan.is_empty():
                return plan
            with self._lock:
                if not self._woken:
                    self._lock.wait(_IDLE_WAIT_S)

    def schedule(self) -> StepPlan:
        plan, self._pending = self._pending, StepPlan()
        for progress in [p for p in self._running if p.request.cancelled.is_set()]:
            self._release(progress, plan, save=True)
        self._load_fetched(plan)
        self._take_side_reads(plan)
        self._admit(plan)
        self._admit_drafts(plan)
        self._read_beside(plan)
        plan.beside_side_reader = self._side is not None and self._side.busy
        self.cost = self._costs[plan.beside_side_reader]
        self._batch(plan)
        return plan

    def _last_plan(self) -> StepPlan:
        """Shutting down: every running request ends, its sequence saved."""
        plan, self._pending = self._pending, StepPlan()
        for progress in list(self._running):
            progress.request.emit(ServiceUnavailable("the server is shutting down"))
            self._release(progress, plan, save=True)
        return plan

    def _admit(self, plan: StepPlan) -> None:
        while True:
            with self._lock:
                if not self._waiting:
                    return
                request = self._waiting[0]
            slot = self._choose_slot(request)
            max_new = self._max_new(request)
            evicted = self._make_room(request, max_new, slot) if slot is not None else None
            if slot is None or evicted is None:
                if self._pause_running_drafts(plan):
                    continue  # their sequences and cells are free now: try again
                return
            with self._lock:
                self._waiting.popleft()
            for victim in evicted:
                self._evict(victim, plan)
            try:
                self._start(request, slot, max_new, plan)
            except Exception as exc:
                logger.exception("admitting a request failed")
                self._fail_admission(request, slot, exc)

    def _admit_drafts(self, plan: StepPlan) -> None:
        """Drafts, once no request waits, as requests are admitted (an idle sequence, saved
        already, may be evicted for one), but never at a running request's expense. A draft
        that does not fit now waits for room (running requests ending, idle sequences
        saved) until a newer draft or its message replaces it (cancelled): the page sends
        a newer one only once the user writes on, and the sooner a paste is read the better.
        The engine refuses drafts that could never fit (longer than a sequence)."""
        waiting: list[Request] = []
        while True:
            with self._lock:
                if self._waiting or not self._drafts:
                    break
                request = self._drafts.popleft()
            if request.cancelled.is_set():
                continue
            slot = self._choose_slot(request)
            evicted = self._make_room(request, 0, slot) if slot is not None else None
            if slot is None or evicted is None:
                waiting.append(request)
                continue
            for victim in evicted:
                self._evict(victim, plan)
            try:
                self._start(request, slot, 0, plan)
            except Exception as exc:
                logger.exception("admitting a draft failed")
                self._fail_admission(request, slot, exc)
        with self._lock:
            self._drafts.extendleft(reversed(waiting))

    def _pause_running_drafts(self, plan: StepPlan) -> bool:
        """A request needs what drafts hold: they stop, what they read kept in their
        sequences, and wait to go on (``_admit_drafts``) where they got."""
        drafts = [p for p in self._running if p.request.draft]
        for progress in drafts:
            self._release(progress, plan, save=False, paused=True)
        with self._lock:
            self._drafts.extendleft(reversed([p.request for p in drafts]))
        return bool(drafts)

    def _count_draft(self, **counts: int) -> None:
        with self._lock:
            s = self._draft_stats
            self._draft_stats = replace(
                s, **{name: getattr(s, name) + n for name, n in counts.items()}
            )

    def _max_new(self, request: Request) -> int:
        if not request.answers:
            return 0
        return min(request.sampling.max_tokens, self._sequence_tokens - len(request.key.tokens))

    def _choose_slot(self, request: Request) -> Slot | None:
        """The sequence ``request`` runs on: the idle one holding most of its prompt for its
        owner (its conversation, continued in place), else an empty one, else the least
        recently used one that may be evicted."""
        key = request.key
        if request.pin:
            return next((s for s in self._pins if s.progress is None and not s.tokens), None)
        idle = [s for s in self._slots if s.progress is None]
        if self._kv_cache is not None:
            own = [s for s in idle if s.tokens and s.owner == key.owner]
            best = max(own, key=lambda s: shareable_prefix(s.key, key), default=None)
            if best is not None and shareable_prefix(best.key, key) > key.public_tokens:
                return best
        free = [s for s in idle if not s.tokens or s.evictable]
        return min(free, key=lambda s: (bool(s.tokens), s.used_at), default=None)

    def _make_room(self, request: Request, max_new: int, slot: Slot) -> list[Slot] | None:
        """The idle sequences to evict, least recently used first, so that the pool can hold
        all that ``request`` may write into ``slot``; None if it cannot be done now. Cells
        shared with a pinned preamble are counted once, other shared cells once per
        sequence: the estimate errs on the safe side, but for a saved state loaded into
        cells of its own, for which a full pool evicts at the step."""
        key = request.key
        limit = len(key.tokens) - 1
        pinned = max((min(shareable_prefix(p.key, key), limit) for p in self._pins), default=0)
        return self._victims(len(key.tokens) + max_new - pinned, keep=slot)

    def _victims(self, need: int, keep: Slot | None = None) -> list[Slot] | None:
        """The idle sequences (but ``keep``) to evict, least recently used first, so that
        the pool holds ``need`` more cells beside all it has promised; None if it cannot."""
        idle = sorted(
            (s for s in self._slots if s.progress is None and s.tokens and s is not keep),
            key=lambda s: (not s.evictable, s.used_at),
        )
        running = sum(p.reserved for p in self._running)
        held = sum(len(s.tokens) - s.borrowed for s in (*self._pins, *idle))
        evicted: list[Slot] = []
        for victim in idle:
            if running + held + need <= self._pool_tokens or not victim.evictable:
                break
            held -= len(victim.tokens) - victim.borrowed
            evicted.append(victim)
        return evicted if running + held + need <= self._pool_tokens else None

    def _evict(self, slot: Slot, plan: StepPlan) -> None:
        if slot.drafted_from is not None:
            self._save(slot, plan)  # what a draft read is saved only now
            slot.drafted_from = None
        plan.evictions.append(slot.seq_id)
        slot.tokens = array("i")
        slot.borrowed = 0

    def _start(self, request: Request, slot: Slot, max_new: int, plan: StepPlan) -> None:
        """Give ``request`` its sequence, holding as much of its prompt as any tier can."""
        key = request.key
        progress = Progress(
            request, slot, max_new, admitted_at=time.perf_counter(), text=AnswerText(request.stops)
        )
        if slot.drafted_from is not None and slot.owner != key.owner:
            self._save(slot, plan)  # another conversation's draft, read but not yet saved
        keep, source = self._resident_prefix(slot, key) if self._kv_cache else (0, None)
        plan.admissions.append(Admission(progress, keep, source.seq_id if source else None))
        if source is not None:
            slot.borrowed = keep if source.pinned else min(source.borrowed, keep)
            slot.drafted_from = None  # what it holds now is another sequence's
        else:
            slot.borrowed = min(slot.borrowed, keep)
        self._take_drafted(progress, slot, keep)
        slot.tokens = array("i", key.tokens[:keep])
        slot.owner, slot.public_tokens = key.owner, key.public_tokens
        slot.progress = progress
        progress.reuse = Reuse(keep, CacheTier.LIVE if keep else None)
        with self._lock:
            self._running.append(progress)
        if self._kv_cache is None or request.pin:
            return
        restore = self._kv_cache.find(key, keep)
        if restore is None:
            self._count(progress)
            return
        progress.phase = Phase.RESTORING
        progress.restore = restore
        progress.fetched = self._kv_cache.fetch(restore)
        progress.fetched.add_done_callback(lambda _: self.wake())

    def _take_drafted(self, progress: Progress, slot: Slot, keep: int) -> None:
        """The sequence keeps its first ``keep`` tokens for ``progress``: a draft goes on
        computing after them; a message takes what drafts computed among them."""
        drafted_from = min(slot.drafted_from, keep) if slot.drafted_from is not None else None
        if progress.request.draft:
            slot.drafted_from = keep if drafted_from is None else drafted_from
            return
        if drafted_from is not None:
            progress.draft_tokens = keep - drafted_from
            if progress.draft_tokens:
                self._count_draft(tokens_used=progress.draft_tokens)
        slot.drafted_from = None

    def _take_drafted_state(self, progress: Progress, restore: Restore) -> None:
        """As ``_take_drafted``, for a saved state loaded into the sequence."""
        drafted = restore.drafted_from if restore.drafted_from is not None else restore.tokens
        drafted_from = min(drafted, restore.tokens)
        if progress.request.draft:
            progress.slot.drafted_from = drafted_from
        elif drafted_from < restore.tokens:
            progress.draft_tokens = restore.tokens - drafted_from
            self._count_draft(tokens_used=progress.draft_tokens)

    def _resident_prefix(self, slot: Slot, key: PromptKey) -> tuple[int, Slot | None]:
        """The longest prefix of ``key`` that a resident sequence holds and ``key``'s owner
        may use: ``slot``'s own, kept in place (no source), or another's, to share. At least
        one prompt token is left to evaluate."""
        limit = len(key.tokens) - 1
        held = {s: min(shareable_prefix(s.key, key), limit) for s in self._resident()}
        in_place = held.get(slot, 0)
        source = max(held, key=held.__getitem__, default=None)
        if source is None or source is slot or held[source] <= in_place:
            return in_place, None
        return held[source], source

    def _load_fetched(self, plan: StepPlan) -> None:
        """Requests whose saved state has been read: copy it in this step."""
        for progress in self._running:
            if progress.phase is not Phase.RESTORING or progress.fetched is None:
                continue
            if not progress.fetched.done():
                continue
            assert progress.restore is not None
            payload = progress.fetched.result() if progress.fetched.exception() is None else None
            progress.phase = Phase.PREFILL
            if payload is None:  # gone since it was found: the live prefix it is
                self._count(progress)
                continue
            plan.loads.append(Load(progress, progress.restore, payload))
            self._take_drafted_state(progress, progress.restore)
            progress.slot.tokens = array(
                "i", progress.request.key.tokens[: progress.restore.tokens]
            )
            progress.slot.borrowed = 0  # a saved state is loaded into cells of its own
            progress.reuse = Reuse(progress.restore.tokens, progress.restore.tier)

    def _read_beside(self, plan: StepPlan) -> None:
        """Hand a long prompt to the side reader, when others are being answered meanwhile
        (alone, the shared context reads it faster, on every core). Not a draft: drafts get
        only what the others leave, and a newer one every few words typed would stop the
        read each time (measured, a pasted document's TTFT on Enter: 2.9 s with drafts read
        beside, 3.7 s without, in two runs of ``python -m benchmarks typing``)."""
        side = self._side
        if side is None or side.busy or len(self._running) < 2:
            return
        for progress in self._running:
            request = progress.request
            tokens = len(request.key.tokens)
            if (
                progress.phase is Phase.PREFILL
                and not progress.read_beside
                and request.answers
                and progress.prompt_left >= self._side_read_tokens
                and tokens <= side.context_tokens
            ):
                progress.phase = Phase.SIDE
                progress.read_beside = True
                progress.fetched = side.read(request.key, tokens - 1, request.cancelled)
                progress.fetched.add_done_callback(lambda _: self.wake())
                return

    def _take_side_reads(self, plan: StepPlan) -> None:
        """Prompts the side reader has read: their state comes into their sequence in this
        step, and their last token is evaluated in the shared context."""
        for progress in self._running:
            if progress.phase is not Phase.SIDE or progress.fetched is None:
                continue
            if not progress.fetched.done():
                continue
            payload = progress.fetched.result() if progress.fetched.exception() is None else None
            progress.fetched = None
            progress.phase = Phase.PREFILL
            # The state comes into cells of its own: room for those it shared, or it is
            # read in the shared context after all.
            if payload is None or not self._room_for(progress.slot.borrowed, plan):
                continue
            tokens = len(progress.request.key.tokens) - 1
            plan.handoffs.append(Handoff(progress, tokens, payload))
            with self._lock:
                read = tokens - len(progress.slot.tokens)
                self._stats = replace(
                    self._stats, side_read_tokens=self._stats.side_read_tokens + read
                )
            progress.slot.tokens = array("i", progress.request.key.tokens[:tokens])
            progress.slot.borrowed = 0  # the state comes into cells of its own

    def _room_for(self, cells: int, plan: StepPlan) -> bool:
        """Whether the pool can take ``cells`` more beside all it has promised, evicting
        idle sequences in ``plan`` if need be."""
        victims = self._victims(cells)
        for victim in victims or ():
            self._evict(victim, plan)
        return victims is not None

    def _is_question(self, progress: Progress) -> bool:
        """A prompt about to be answered, cheaply: read whole, in a questions' step."""
        return (
            progress.request.answers
            and self._question_cost(progress) <= QUESTION_SHARE * self.step_bound_s
        )

    def _question_cost(self, progress: Progress) -> float:
        """The rest of the prompt and its first token, in a step alone."""
        rest = StepShape()
        rest.add(len(progress.slot.tokens), progress.prompt_left, outputs=1)
        return self.cost.predict(rest)

    @staticmethod
    def _reader_waits(questions: list[Progress], decoding: list[Progress]) -> bool:
        """Someone waits for an answer's first text: a question about to be read, or an
        answer whose first token showed nothing yet (a space)."""
        return bool(questions) or any(p.text.first_text_at is None for p in decoding)

    def _batch(self, plan: StepPlan) -> None:
        """Questions' steps, answers' steps and reads' steps, in turn while each has work.

        A questions' step holds the questions about to be answered, read whole, and comes
        just before an answers' step, which holds the next token of every answer. A reads'
        step holds the chunks of longer prompts, shortest rest first, sized so that it and
        the answers' step before it fit in the bound together: an answer's next token never
        waits for more than the bound. Apart, the answers' and the reads' steps cost
        less than together: measured, four answer tokens added to a 128-token chunk at
        position 4,096 made a 300 ms step take 400 to 460 ms, against 30 ms for those four
        tokens in a step of their own. While a reader waits for an answer's first text, the
        reads' step waits (up to ``READS_DEFERRED`` answers' steps, then a short one).
        With nobody answering, a step holds every prompt's chunks within the bound,
        ``ALONE_FACTOR`` times it for a prompt alone."""
        decoding = [p for p in self._running if p.phase is Phase.DECODE]
        prefilling = [p for p in self._running if p.phase is Phase.PREFILL]
        questions: list[Progress] = []
        reads: list[Progress] = []
        for progress in prefilling:
            (questions if self._is_question(progress) else reads).append(progress)
        reads.sort(key=lambda p: (p.request.draft, p.prompt_left))  # drafts get what is left
        shape = StepShape()
        if decoding and reads and self._answers_steps > 0 and not self._questions_step:
            waits = self._reader_waits(questions, decoding)
            overdue = self._answers_steps > READS_DEFERRED
            if not waits or overdue:
                if waits:
                    budget_s = self.step_bound_s * SHORT_STEP_SHARE
                elif any(p.text.holding for p in decoding):
                    # Text held back at a possible stop shows after the next answers' step:
                    # that one counts too.
                    budget_s = self.step_bound_s - 2 * self._answers_step_s
                else:
                    budget_s = self.step_bound_s - self._answers_step_s
                self._read(plan, shape, reads, budget_s, at_least=MIN_CHUNK if overdue else 0)
                if plan.chunks:
                    self._answers_steps = 0
                    plan.shape = shape
                    plan.predicted_s = self._reads_step_s = self.cost.predict(shape)
                    return
        if (
            decoding
            and not self._questions_step
            and self._read_questions_first(plan, questions, decoding)
        ):
            return
        self._questions_step = False
        for progress in decoding:
            start = len(progress.slot.tokens)
            plan.chunks.append(Chunk(progress, start, (progress.next_token,), True))
            shape.add(start, 1, outputs=1)
        plan.decode_tokens = len(plan.chunks)
        # The answers waited for the reads' step before: a question that would take them
        # past the bound is read in the next step, which comes right after.
        shape = self._take_questions(
            plan,
            shape,
            questions,
            lambda step: (
                not decoding or self._reads_step_s + self.cost.predict(step) <= self.step_bound_s
            ),
        )
        self._reads_step_s = 0.0
        now = time.monotonic()
        if decoding:
            self._answers_steps += 1
            self._answers_step_s = self.cost.predict(shape)
        sole = len(self._running) == len(prefilling) == 1 and prefilling[0].request.answers
        if self._running and not sole:
            self._others_served_at = now
        if not decoding:
            alone = sole and now - self._others_served_at >= ALONE_AFTER_S
            bound_s = self.step_bound_s * (ALONE_FACTOR if alone else 1)
            self._read(plan, shape, reads, bound_s, at_least=MIN_CHUNK)
        plan.shape = shape
        plan.predicted_s = self.cost.predict(shape)

    def _read_questions_first(
        self, plan: StepPlan, questions: list[Progress], decoding: list[Progress]
    ) -> bool:
        """The questions in a step of their own before the answers' next token, which then
        comes after both steps, within the bound; False if none fits."""
        answers = StepShape()
        for progress in decoding:
            answers.add(len(progress.slot.tokens), 1, outputs=1)
        budget_s = self.step_bound_s - self._reads_step_s - self.cost.predict(answers)
        shape = self._take_questions(
            plan, StepShape(), questions, lambda step: self.cost.predict(step) <= budget_s
        )
        if not plan.chunks:
            return False
        plan.shape = shape
        plan.predicted_s = self.cost.predict(shape)
        # The answers waited for this step too: the answers' step next counts it in.
        self._reads_step_s += plan.predicted_s
        self._questions_step = True
        self._others_served_at = time.monotonic()
        return True

    def _take_questions(
        self,
        plan: StepPlan,
        shape: StepShape,
        questions: list[Progress],
        fits: Callable[[StepShape], bool],
    ) -> StepShape:
        """``questions`` read whole into ``plan``'s step, cheapest first, each that ``fits``
        the step with it; returns the step's shape with them."""
        asked_s = 0.0  # what the questions taken add to the step
        for progress in sorted(questions, key=self._question_cost):
            start = len(progress.slot.tokens)
            tokens = progress.request.key.tokens[start:]
            with_question = replace(shape)
            with_question.add(start, len(tokens), outputs=1)
            added_s = self.cost.predict(with_question) - self.cost.predict(shape)
            # One that would add more than PASS_OVER times what those taken add waits for
            # the next step, once: a message its draft has read (a few tokens left) is not
            # held up by another user's question of thirty.
            if asked_s and added_s > PASS_OVER * asked_s and not progress.passed_over:
                progress.passed_over = True
                continue
            if not fits(with_question):
                continue
            plan.chunks.append(Chunk(progress, start, tokens, True))
            shape = with_question
            asked_s += added_s
        return shape

    def _read(
        self,
        plan: StepPlan,
        shape: StepShape,
        reads: list[Progress],
        budget_s: float,
        *,
        at_least: int,
    ) -> None:
        """Chunks of ``reads``, in order, within the batch's tokens and ``budget_s``; the
        first moves on by ``at_least`` tokens whatever the budget (a draft only in a step of
        its own)."""
        tokens_left = self._batch_tokens - shape.tokens
        for progress in reads:
            if tokens_left <= 0:
                break
            start = len(progress.slot.tokens)
            most = min(progress.prompt_left, tokens_left)
            n = self.cost.max_chunk(shape, start, budget_s, most)
            if progress is reads[0] and not (progress.request.draft and plan.chunks):
                n = max(n, min(at_least, most))
            if n <= 0:
                break
            tokens = progress.request.key.tokens[start : start + n]
            ends = start + n == len(progress.request.key.tokens)
            wants_logits = ends and progress.request.answers
            plan.chunks.append(Chunk(progress, start, tokens, wants_logits))
            shape.add(start, n, outputs=int(wants_logits))
            tokens_left -= n

    # -- the worker thread: apply ------------------------------------------------------------

    def update_from_output(self, plan: StepPlan, output: StepOutput) -> None:
        for seq_id, saving in output.saving.items():
            self._by_seq[seq_id].saving = saving
            saving.add_done_callback(lambda _: self.wake())
        for progress, reuse in output.diverged.items():
            progress.slot.tokens = array("i", progress.request.key.tokens[: reuse.tokens])
            progress.slot.borrowed = min(progress.slot.borrowed, reuse.tokens)
            progress.reuse = reuse
        for load in plan.loads:
            if load.progress not in output.failed:
                self._count(load.progress)
        for progress, exc in output.failed.items():
            logger.error("admitting a request failed: %s", exc)
            self._fail([progress])
        evaluated = [
            c
            for c in plan.chunks
            if c.progress not in output.failed and c.progress not in output.diverged
        ]
        if output.decode_error is not None:
            logger.error("llama_decode failed: %s", output.decode_error)
            self._fail([c.progress for c in evaluated])
            return
        if output.pool_full:
            self._make_room_after_full_pool([c.progress for c in evaluated])
            return
        if evaluated:
            self._record_step(plan, output.elapsed_s)
        for chunk in evaluated:
            progress = chunk.progress
            progress.slot.tokens.extend(chunk.tokens)
            if progress.request.draft:
                self._count_draft(tokens=len(chunk.tokens))
            if not progress.request.answers and progress.prompt_left == 0:
                self._finish(progress, "stop")
        for progress, token in output.sampled.items():
            if progress in self._running:
                self._sampled(progress, token)

    def _record_step(self, plan: StepPlan, elapsed_s: float) -> None:
        logger.debug(
            "step: %d tokens (%d answering), %d cells; predicted %.1f ms, took %.1f ms",
            plan.shape.tokens,
            plan.decode_tokens,
            plan.shape.cells,
            plan.predicted_s * 1000,
            elapsed_s * 1000,
        )
        self._costs[plan.beside_side_reader].observe(plan.shape, elapsed_s)
        bucket = bisect_left(STEP_SECONDS_BUCKETS, elapsed_s)
        with self._lock:
            s = self._stats
            buckets = list(s.step_seconds_buckets)
            buckets[bucket] += 1
            self._stats = replace(
                s,
                steps=s.steps + 1,
                batch_tokens=s.batch_tokens + plan.shape.tokens,
                decode_tokens=s.decode_tokens + plan.decode_tokens,
                answer_steps=s.answer_steps + (plan.decode_tokens > 0),
                step_seconds=s.step_seconds + elapsed_s,
                predicted_step_seconds=s.predicted_step_seconds + plan.predicted_s,
                step_seconds_buckets=tuple(buckets),
            )

    def _make_room_after_full_pool(self, progresses: list[Progress]) -> None:
        """A saved state loaded into cells of its own took more of the pool than admission
        counted: evict an idle sequence and let the next step try the same batch again."""
        idle = sorted((s for s in self._slots if s.tokens and s.evictable), key=lambda s: s.used_at)
        if not idle:
            self._fail(progresses)
            return
        logger.warning("the KV pool is full: evicting an idle sequence")
        self._evict(idle[0], self._pending)

    def _sampled(self, progress: Progress, token: int) -> None:
        if progress.first_sample_at is None:
            progress.first_sample_at = time.perf_counter()
        progress.phase = Phase.DECODE
        if self._vocabulary.is_end_of_generation(token):
            self._finish(progress, "stop")
            return
        progress.completion.append(token)
        text = progress.text.feed(self._vocabulary.piece(token))
        if text:
            progress.request.emit(TokenDelta(text))
        if progress.text.stopped:
            self._finish(progress, "stop")
        elif len(progress.completion) >= progress.max_new:
            self._finish(progress, "length")
        else:
            progress.next_token = token

    def _finish(self, progress: Progress, reason: FinishReason) -> None:
        request = progress.request
        tail = progress.text.flush()
        if tail:
            request.emit(TokenDelta(tail))
        ended = time.perf_counter()
        timing = Timing.measured(
            submitted=request.submitted_at,
            admitted=progress.admitted_at,
            prefilled=progress.first_sample_at or ended,
            first_token=progress.text.first_text_at or ended,
            ended=ended,
        )
        usage = Usage(
            prompt_tokens=len(request.key.tokens),
            cached_tokens=progress.reuse.tokens,
            completion_tokens=len(progress.completion),
            cache_tier=progress.reuse.tier,
            draft_tokens=progress.draft_tokens,
        )
        request.emit(Finished(usage=usage, timing=timing, finish_reason=reason))
        if request.draft:
            self._count_draft(prefilled=1)
        self._release(progress, self._pending, save=True)

    def _release(
        self, progress: Progress, plan: StepPlan, *, save: bool, paused: bool = False
    ) -> None:
        """End the request's stream (unless ``paused``, a draft to go on later) and leave
        its sequence resident and idle, its state to be saved at the start of ``plan``'s
        step."""
        with self._lock:
            self._running.remove(progress)
        if not paused:
            progress.request.emit(None)
        plan.released.append(progress)
        slot = progress.slot
        slot.progress = None
        slot.used_at = self._stats.steps
        if progress.phase is Phase.SIDE:
            progress.request.cancelled.set()  # the side reader stops reading it
        if progress.request.draft:
            if progress.prompt_left and not paused:
                self._count_draft(dropped=1)
            return  # saved only when evicted: the next draft may replace it first
        if save and progress.request.answers and progress.phase is not Phase.RESTORING:
            self._save(slot, plan)

    def _save(self, slot: Slot, plan: StepPlan) -> None:
        """Copy what ``slot`` holds out at the start of ``plan``'s step, to save it."""
        if self._kv_cache is None or not self._kv_cache.worth_saving(len(slot.tokens)):
            return
        public = min(slot.public_tokens, len(slot.tokens))
        held = PromptKey(array("i", slot.tokens), public, slot.owner)
        plan.saves.append(Save(slot.seq_id, held, slot.drafted_from))
        slot.saving = Future()  # until the runner hands over the real one

    def fail_running(self) -> None:
        """End every running request with an error, its sequence cleared."""
        self._fail(list(self._running))

    def _fail(self, progresses: Sequence[Progress]) -> None:
        """The context failed under these requests: their sequences' contents are unknown."""
        for progress in progresses:
            if progress not in self._running:
                continue
            progress.request.emit(EngineFailure("the model failed while generating"))
            self._release(progress, self._pending, save=False)
            self._evict(progress.slot, self._pending)

    def _fail_admission(self, request: Request, slot: Slot, exc: BaseException) -> None:
        request.emit(EngineFailure("the model failed while generating"))
        request.emit(None)
        progress = slot.progress
        if progress is not None and progress.request is request:
            with self._lock:
                self._running.remove(progress)
            self._pending.released.append(progress)
            slot.progress = None
        self._evict(slot, self._pending)

    def _count(self, progress: Progress) -> None:
        """A prompt's lookup, for the hit rates; a draft's is not one (its message's is)."""
        if self._kv_cache is not None and not progress.request.draft:
            self._kv_cache.count(progress.request.key, progress.reuse)

    def _resident(self) -> list[Slot]:
        return [slot for slot in (*self._slots, *self._pins) if slot.tokens]
