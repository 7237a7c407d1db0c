"""The batching engine's policy, without a model: the scheduler plans steps, the tests play
the model runner with hand-made outputs (vLLM's scheduler is tested the same way). A fake
vocabulary turns token ``t`` into the word ``wt``; token 0 ends a generation."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future

import pytest

from chatbot.engines.base import EngineEvent, Finished, SamplingParams, TokenDelta
from chatbot.engines.batching.cost import Coefficients, StepCostModel, StepShape
from chatbot.engines.batching.plan import StepOutput, StepPlan
from chatbot.engines.batching.requests import Phase, Progress, Request
from chatbot.engines.batching.scheduler import (
    ALONE_AFTER_S,
    ALONE_FACTOR,
    MIN_CHUNK,
    READS_DEFERRED,
    SHORT_STEP_SHARE,
    Scheduler,
)
from chatbot.engines.stops import Stops
from chatbot.kvcache import KVCache, PromptKey, Reuse, owner_digest
from chatbot.models.cache import CacheTier
from chatbot.models.errors import EngineFailure

PUBLIC = list(range(1000, 1016))  # a 16-token public preamble
ALICE, BOB, CAROL = (owner_digest(u) for u in ("alice", "bob", "carol"))
EOG = 0
SPACE = 3  # a token that is a space alone
# 10 ms a step, 1 ms a token, 2 ms an output, 1 µs a cell: round numbers to reason with.
COST = Coefficients(per_step_s=0.01, per_token_s=0.001, per_output_s=0.002, per_cell_s=1e-6)
BOUND_S = 0.1


class Vocabulary:
    def piece(self, token: int) -> bytes:
        return b" " if token == SPACE else f" w{token}".encode()

    def is_end_of_generation(self, token: int) -> bool:
        return token == EOG


class Client:
    """One request and everything the engine sent it."""

    def __init__(
        self, key: PromptKey, max_tokens: int = 4, *, stops: Stops = Stops(), draft: bool = False
    ) -> None:
        self.events: list[EngineEvent | BaseException | None] = []
        self.request = Request(
            key=key,
            sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0),
            stops=stops,
            emit=self.events.append,
            draft=draft,
        )

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, TokenDelta))

    @property
    def ended(self) -> bool:
        return None in self.events

    @property
    def finished(self) -> Finished:
        (done,) = [e for e in self.events if isinstance(e, Finished)]
        return done

    @property
    def failed(self) -> bool:
        return any(isinstance(e, EngineFailure) for e in self.events)


def prompt(owner: bytes, *private: int, length: int = 0) -> PromptKey:
    tokens = [*PUBLIC, *private, *range(2000, 2000 + length)]
    return PromptKey(tokens, len(PUBLIC), owner)


class SideReader:
    """Plays the side reader: the test decides when (and whether) each read is done."""

    context_tokens = 2048

    def __init__(self) -> None:
        self.reads: list[tuple[PromptKey, int, threading.Event, Future[bytearray | None]]] = []

    @property
    def busy(self) -> bool:
        return any(not future.done() for *_, future in self.reads)

    def read(
        self, key: PromptKey, upto: int, cancelled: threading.Event
    ) -> Future[bytearray | None]:
        future: Future[bytearray | None] = Future()
        self.reads.append((key, upto, cancelled, future))
        return future


def make(
    *,
    sequences: int = 2,
    pool: int = 4096,
    batch: int = 256,
    cache: bool = True,
    side: SideReader | None = None,
) -> Scheduler:
    kv = KVCache(namespace=b"test", chunk_tokens=4, ram_bytes=10**6, min_load_gain=1)
    return Scheduler(
        Vocabulary(),
        sequences=sequences,
        sequence_tokens=min(2048, pool),
        pool_tokens=pool,
        batch_tokens=batch,
        kv_cache=kv if cache else None,
        cost=StepCostModel(COST),
        step_bound_s=BOUND_S,
        side=side,
        side_read_tokens=1000,
    )


def done() -> Future[None]:
    future: Future[None] = Future()
    future.set_result(None)
    return future


def saved(scheduler: Scheduler, plan: StepPlan) -> dict[int, Future[None]]:
    """Play the runner's part of the plan's saves: a "state" (as many bytes as tokens) handed
    to the cache, which saves it on its I/O thread; returns once they are saved."""
    kv = scheduler._kv_cache
    if kv is None:
        return {save.seq_id: done() for save in plan.saves}
    saving = {s.seq_id: kv.save(s.key, bytearray(len(s.key.tokens))) for s in plan.saves}
    for future in saving.values():
        future.result()
    return saving


def step(
    scheduler: Scheduler, sample: Callable[[Progress], int] = lambda p: 7, **output: object
) -> StepPlan:
    """Plan a step and play the runner: every chunk is evaluated, every save is done, and
    each request that wants a token samples ``sample(progress)``."""
    plan = scheduler.schedule()
    result = StepOutput(
        sampled={c.progress: sample(c.progress) for c in plan.chunks if c.wants_logits},
        saving=saved(scheduler, plan),
        elapsed_s=plan.predicted_s,
    )
    for name, value in output.items():
        setattr(result, name, value)
    scheduler.update_from_output(plan, result)
    return plan


def run_to_end(scheduler: Scheduler, *clients: Client, limit: int = 200) -> None:
    for _ in range(limit):
        if all(c.ended for c in clients):
            return
        step(scheduler)
    raise AssertionError("the requests did not end")


def next_admitted(scheduler: Scheduler) -> list[Request]:
    """The requests admitted by the next step that admits any (an idle sequence is free to
    take once its state has been handed to the cache, a step after its answer ended)."""
    for _ in range(3):
        plan = step(scheduler)
        if plan.admissions:
            return [a.progress.request for a in plan.admissions]
    return []


def progress_of(scheduler: Scheduler, client: Client) -> Progress:
    (progress,) = [p for p in scheduler._running if p.request is client.request]
    return progress


def admit(scheduler: Scheduler, client: Client) -> StepPlan:
    """Submit ``client``'s request and plan (without carrying out) the step that admits it."""
    scheduler.submit(client.request)
    for _ in range(3):
        plan = scheduler.schedule()
        if any(a.progress.request is client.request for a in plan.admissions):
            return plan
        scheduler.update_from_output(plan, StepOutput(saving=saved(scheduler, plan)))
    raise AssertionError("the request was not admitted")


def test_an_answer_streams_and_finishes_with_its_usage() -> None:
    s, alice = make(), Client(prompt(ALICE, 1, 2, 3))
    s.submit(alice.request)
    plan = step(s)
    (admission,) = plan.admissions
    assert (admission.keep, admission.source) == (0, None)
    (chunk,) = plan.chunks
    assert list(chunk.tokens) == alice.request.key.tokens
    assert chunk.wants_logits
    run_to_end(s, alice)
    assert alice.text == "w7 w7 w7 w7"
    assert alice.finished.finish_reason == "length"
    assert alice.finished.usage is not None
    assert alice.finished.usage.prompt_tokens == len(PUBLIC) + 3


def test_end_of_generation_stops_an_answer() -> None:
    s, alice = make(), Client(prompt(ALICE, 1))
    s.submit(alice.request)
    step(s, sample=lambda p: 5)
    step(s, sample=lambda p: EOG)
    assert alice.ended
    assert alice.finished.finish_reason == "stop"
    assert alice.text == "w5"


def test_requests_are_admitted_in_order_of_arrival() -> None:
    s = make(sequences=2)
    clients = [Client(prompt(owner, 1)) for owner in (ALICE, BOB, CAROL)]
    for client in clients:
        s.submit(client.request)
    plan = step(s)
    assert [a.progress.request for a in plan.admissions] == [c.request for c in clients[:2]]
    assert s.counts() == (2, 1)
    run_to_end(s, clients[0], clients[1])
    assert next_admitted(s) == [clients[2].request]


def test_a_conversation_continues_in_its_own_sequence() -> None:
    s = make(sequences=2)
    first = Client(prompt(ALICE, 1, 2, 3))
    s.submit(first.request)
    run_to_end(s, first)
    held = list(s._slots[0].tokens) if s._slots[0].tokens else list(s._slots[1].tokens)
    follow_up = Client(PromptKey([*held, 9, 9], len(PUBLIC), ALICE))
    s.submit(follow_up.request)
    plan = step(s)
    (admission,) = plan.admissions
    assert admission.source is None  # kept in place, nothing shared or copied
    assert admission.keep == len(held)
    (chunk,) = plan.chunks
    assert list(chunk.tokens) == [9, 9]
    seq_id = admission.progress.slot.seq_id
    progress_seq = [slot.seq_id for slot in s._slots if slot.tokens and slot.progress is None]
    assert seq_id not in progress_seq
    run_to_end(s, follow_up)
    assert follow_up.finished.usage is not None
    assert follow_up.finished.usage.cached_tokens == len(held)
    assert follow_up.finished.usage.cache_tier is CacheTier.LIVE


def test_another_user_shares_only_the_public_prefix_by_reference() -> None:
    s = make(sequences=2)
    alice = Client(prompt(ALICE, 1, 2, 3))
    s.submit(alice.request)
    run_to_end(s, alice)
    bob = Client(prompt(BOB, 1, 2, 3))  # the same words, but Bob's
    s.submit(bob.request)
    plan = step(s)
    (admission,) = plan.admissions
    alice_seq = next(slot.seq_id for slot in s._slots if slot.owner == ALICE)
    assert admission.source == alice_seq
    assert admission.keep == len(PUBLIC)


def test_the_least_recently_used_idle_sequence_is_evicted_to_make_room() -> None:
    s = make(sequences=3, pool=100)
    alice, bob = Client(prompt(ALICE, length=20)), Client(prompt(BOB, length=20))
    for client in (alice, bob):
        s.submit(client.request)
        run_to_end(s, client)
    carol = Client(prompt(CAROL, length=40), max_tokens=4)  # 60 cells: room for one more
    s.submit(carol.request)
    plan = step(s)
    alice_seq = next(slot.seq_id for slot in s._slots if slot.owner == ALICE)
    assert plan.evictions == [alice_seq]  # Alice's sequence was used longest ago
    assert [a.progress.request for a in plan.admissions] == [carol.request]


def test_a_sequence_is_not_evicted_while_its_state_is_being_saved() -> None:
    s = make(sequences=2, pool=100)
    alice = Client(prompt(ALICE, length=40))
    s.submit(alice.request)
    saving: Future[None] = Future()
    for _ in range(10):
        plan = s.schedule()
        output = StepOutput(
            sampled={c.progress: 7 for c in plan.chunks if c.wants_logits},
            saving={save.seq_id: saving for save in plan.saves},
        )
        s.update_from_output(plan, output)
        if plan.saves:
            break
    assert alice.ended
    bob = Client(prompt(BOB, length=40))
    s.submit(bob.request)
    plan = s.schedule()
    assert plan.evictions == []
    assert plan.admissions == []
    saving.set_result(None)
    plan = step(s)
    assert len(plan.evictions) == 1
    assert [a.progress.request for a in plan.admissions] == [bob.request]


def test_a_request_waits_while_the_running_ones_need_the_pool() -> None:
    s = make(sequences=2, pool=120)
    alice = Client(prompt(ALICE, length=60), max_tokens=20)
    bob = Client(prompt(BOB, length=60), max_tokens=20)
    s.submit(alice.request)
    s.submit(bob.request)
    plan = step(s)
    assert [a.progress.request for a in plan.admissions] == [alice.request]
    assert s.counts() == (1, 1)
    run_to_end(s, alice)
    assert next_admitted(s) == [bob.request]


def test_a_long_prompt_alone_takes_longer_steps() -> None:
    s, long = make(batch=512), Client(prompt(ALICE, length=3000))
    s.submit(long.request)
    plan = step(s)
    # Nobody else waits: a few times the bound, still a bound for whoever comes next.
    assert BOUND_S < plan.predicted_s <= ALONE_FACTOR * BOUND_S
    assert sum(len(c.tokens) for c in plan.chunks) < 512


def test_while_others_stream_a_long_prompt_is_read_in_steps_of_its_own() -> None:
    s = make(sequences=3, batch=512)
    streaming = Client(prompt(BOB, 1), max_tokens=1000)
    s.submit(streaming.request)
    step(s)  # Bob is answering from now on
    long = Client(prompt(ALICE, length=1500))
    s.submit(long.request)
    chunks: list[int] = []
    read = len(PUBLIC)  # shared from Bob's sequence
    answers_step_s, last_was_read = 0.0, True
    while not long.events:
        plan = step(s)
        read += sum(len(c.tokens) for c in plan.chunks if c.progress.request is long.request)
        if plan.decode_tokens:
            # Bob's next token alone: Alice's last words, deep in the context, cost too much
            # to be read beside it.
            assert plan.chunks[0].progress.request is streaming.request
            answers_step_s, last_was_read = plan.predicted_s, False
            continue
        assert not last_was_read  # Bob's next token never waits for two steps
        (chunk,) = plan.chunks
        assert chunk.progress.request is long.request
        chunks.append(len(chunk.tokens))
        # With the answers' step before it, within the bound; but a long prompt always
        # moves on by a few tokens.
        assert answers_step_s + plan.predicted_s <= BOUND_S or len(chunk.tokens) == MIN_CHUNK
        last_was_read = True
    assert chunks[0] > chunks[-2] > 0  # deeper into the context, smaller chunks
    assert read == len(long.request.key.tokens)


def test_a_prompt_is_alone_once_nobody_else_was_served_for_a_while() -> None:
    s = make(batch=512)
    bob = Client(prompt(BOB, 1))
    s.submit(bob.request)
    run_to_end(s, bob)
    long = Client(prompt(ALICE, length=3000))
    s.submit(long.request)
    # Bob just got his answer and may ask again at once: he would wait on a long step.
    assert step(s).predicted_s <= BOUND_S
    s._others_served_at -= ALONE_AFTER_S
    assert step(s).predicted_s > BOUND_S


def reading_beside(s: Scheduler, streaming: Client) -> Client:
    """Bob answering, a long prompt of Alice's being read beside him, up to the step after
    the first reads' step."""
    s.submit(streaming.request)
    step(s)
    long = Client(prompt(ALICE, length=1500))
    s.submit(long.request)
    while step(s).decode_tokens:
        pass
    return long


def test_a_question_that_would_hold_the_answers_past_the_bound_waits_one_step() -> None:
    s = make(sequences=3, batch=512)
    bob = Client(prompt(BOB, 1), max_tokens=1000)
    reading_beside(s, bob)
    carol = Client(prompt(CAROL, length=30))
    s.submit(carol.request)
    plan = step(s)
    # Bob waited for the reads' step: Carol's question read now would take him past it.
    assert [c.progress.request for c in plan.chunks] == [bob.request]
    questions = step(s)
    assert [c.progress.request for c in questions.chunks] == [carol.request]
    answers = step(s)
    assert [c.progress.request for c in answers.chunks] == [bob.request, carol.request]
    assert questions.predicted_s + answers.predicted_s <= BOUND_S


def bob_answering(side: SideReader | None = None) -> tuple[Scheduler, Client]:
    """Bob's answer streaming (three sequences), a side reader at hand if given."""
    s = make(sequences=3, batch=512, side=side)
    bob = Client(prompt(BOB, 1), max_tokens=1000)
    s.submit(bob.request)
    step(s)
    return s, bob


def test_questions_are_read_in_a_step_of_their_own_before_the_answers() -> None:
    s, bob = bob_answering()
    carol = Client(prompt(CAROL, length=16))
    s.submit(carol.request)
    questions = step(s)
    assert [c.progress.request for c in questions.chunks] == [carol.request]
    answers = step(s)
    assert [c.progress.request for c in answers.chunks] == [bob.request, carol.request]
    # Bob waited for Carol's step and his own: both within the bound.
    assert questions.predicted_s + answers.predicted_s <= BOUND_S


def test_questions_first_never_hold_the_answers_two_steps_in_a_row() -> None:
    s, bob = bob_answering()
    carol = Client(prompt(CAROL, 1))
    s.submit(carol.request)
    assert [c.progress.request for c in step(s).chunks] == [carol.request]
    dave = Client(prompt(ALICE, 2))
    s.submit(dave.request)
    plan = step(s)
    assert [c.progress.request for c in plan.chunks] == [bob.request, carol.request, dave.request]


def test_a_question_its_draft_has_read_is_not_held_up_by_a_dearer_one() -> None:
    s, bob = bob_answering()
    carol = Client(prompt(CAROL, length=30))  # a question of 30 tokens
    dave = Client(prompt(ALICE, 2, 3))  # a message of which two tokens are left to read
    s.submit(carol.request)
    s.submit(dave.request)
    plan = step(s)
    assert [c.progress.request for c in plan.chunks] == [dave.request]
    plan = step(s)  # Carol waits one step, no more
    assert [c.progress.request for c in plan.chunks] == [bob.request, dave.request, carol.request]


def test_questions_of_about_the_same_cost_are_read_together() -> None:
    s, _ = bob_answering()
    carol = Client(prompt(CAROL, length=16))
    dave = Client(prompt(ALICE, length=14))
    s.submit(carol.request)
    s.submit(dave.request)
    plan = step(s)
    assert [c.progress.request for c in plan.chunks] == [dave.request, carol.request]


def test_text_held_at_a_possible_stop_counts_the_next_answers_step_in() -> None:
    s = make(sequences=3, batch=512)
    bob = Client(prompt(BOB, 1), max_tokens=1000, stops=Stops(("w9 w9 w9",)))
    reading_beside(s, bob)
    answers = step(s, sample=lambda p: 9)  # " w9" may start the stop: held back
    assert answers.decode_tokens == 1
    assert bob.text == "w7 w7"
    reads = step(s)
    assert reads.decode_tokens == 0
    # The held text shows after the next answers' step: both within the bound.
    assert 2 * answers.predicted_s + reads.predicted_s <= BOUND_S


def test_a_short_follow_up_is_read_before_a_long_prompt_goes_on() -> None:
    s = make(sequences=3, batch=512)
    long = Client(prompt(ALICE, length=1500))
    s.submit(long.request)
    step(s)
    short = Client(prompt(BOB, 1, 2))
    s.submit(short.request)
    plan = step(s)
    first, second = plan.chunks
    assert first.progress.request is short.request
    assert first.wants_logits
    assert second.progress.request is long.request
    assert plan.predicted_s <= BOUND_S or len(second.tokens) == MIN_CHUNK


def test_the_cost_model_predicts_from_tokens_and_positions() -> None:
    model = StepCostModel(COST)
    shallow, deep = StepShape(), StepShape()
    shallow.add(0, 100)
    deep.add(5000, 100)
    assert model.predict(deep) > model.predict(shallow)
    n = model.max_chunk(StepShape(), 5000, BOUND_S, most=10_000)
    at_n, past_n = StepShape(), StepShape()
    at_n.add(5000, n)
    past_n.add(5000, n + 1)
    assert model.predict(at_n) <= BOUND_S < model.predict(past_n)


def test_the_cost_model_fits_the_steps_it_times() -> None:
    truth = Coefficients(per_step_s=0.02, per_token_s=0.003, per_output_s=0.006, per_cell_s=5e-7)
    model = StepCostModel(COST)
    steps = [(0, 1, 1), (100, 4, 4), (0, 64, 0), (2000, 256, 1), (6000, 128, 0), (300, 8, 8)]
    for start, n, outputs in steps * 40:
        shape = StepShape()
        shape.add(start, n, outputs=outputs)
        model.observe(shape, StepCostModel(truth).predict(shape))
    model.refit()
    fitted = model.coefficients
    assert fitted.per_token_s == pytest.approx(truth.per_token_s, rel=0.2)
    assert fitted.per_output_s == pytest.approx(truth.per_output_s, rel=0.2)
    assert fitted.per_cell_s == pytest.approx(truth.per_cell_s, rel=0.2)


@pytest.mark.parametrize("phase", ["waiting", "prefill", "decode"])
def test_a_cancelled_request_ends_in_every_phase(phase: str) -> None:
    s = make(sequences=1)
    alice = Client(prompt(ALICE, length=600), max_tokens=50)
    s.submit(alice.request)
    if phase == "waiting":
        bob = Client(prompt(BOB, 1))
        s.submit(bob.request)
        assert s.withdraw(bob.request)
        step(s)
        assert s.counts() == (1, 0)
        return
    s.submit(Client(prompt(BOB, 1)).request)  # Bob waits: the alone-rule does not apply
    step(s)
    if phase == "decode":
        while progress_of(s, alice).phase is not Phase.DECODE:
            step(s)
    alice.request.cancelled.set()
    plan = step(s)
    assert alice.ended
    assert not alice.failed
    assert all(c.progress.request is not alice.request for c in plan.chunks)
    assert s.counts() == (0, 1)
    step(s)
    assert s.counts() == (1, 0)  # Bob took the sequence over


def alice_back_from_ram(s: Scheduler) -> Client:
    """Alice's follow-up, once her first turn's sequence went to Bob: her state is in RAM
    only (the answer's last token is never evaluated, so the state holds three of four)."""
    first = Client(prompt(ALICE, 1, 2, 3, 4, 5, 6, 7, 8))
    s.submit(first.request)
    run_to_end(s, first)
    other = Client(prompt(BOB, length=40))
    s.submit(other.request)
    run_to_end(s, other)
    return Client(PromptKey([*first.request.key.tokens, 7, 7, 7, 9], len(PUBLIC), ALICE))


def test_a_cancelled_request_ends_while_its_saved_state_is_read() -> None:
    s = make(sequences=1)
    again = alice_back_from_ram(s)
    plan = admit(s, again)
    assert progress_of(s, again).phase is Phase.RESTORING
    again.request.cancelled.set()
    s.update_from_output(plan, StepOutput())
    plan = step(s)
    assert again.ended
    assert not again.failed
    assert s.counts() == (0, 0)


def test_a_saved_state_is_read_off_the_step_then_loaded() -> None:
    s = make(sequences=1)
    again = alice_back_from_ram(s)
    plan = admit(s, again)
    assert not plan.loads
    assert all(c.progress.request is not again.request for c in plan.chunks)
    progress = progress_of(s, again)
    assert progress.fetched is not None
    progress.fetched.result()
    s.update_from_output(plan, StepOutput())
    plan = step(s)
    (load,) = plan.loads
    assert load.restore.tier is CacheTier.RAM
    (chunk,) = [c for c in plan.chunks if c.progress.request is again.request]
    assert list(chunk.tokens) == [9]
    run_to_end(s, again)
    assert again.finished.usage is not None
    assert again.finished.usage.cache_tier is CacheTier.RAM


def test_a_failure_admitting_one_request_fails_that_request_only() -> None:
    s = make(sequences=2)
    bob = Client(prompt(BOB, 1), max_tokens=10)
    s.submit(bob.request)
    step(s)
    alice = Client(prompt(ALICE, 1, 2))
    s.submit(alice.request)
    plan = s.schedule()
    (admission,) = plan.admissions
    output = StepOutput(
        sampled={c.progress: 7 for c in plan.chunks if c.progress.request is bob.request},
        failed={admission.progress: RuntimeError("llama.cpp refused the sequence")},
    )
    s.update_from_output(plan, output)
    assert alice.failed
    assert alice.ended
    assert not bob.failed
    assert not bob.ended
    run_to_end(s, bob)
    assert bob.finished.finish_reason == "length"


def test_an_exception_while_planning_an_admission_fails_that_request_only() -> None:
    s = make(sequences=2)
    bob = Client(prompt(BOB, 1), max_tokens=10)
    s.submit(bob.request)
    step(s)
    kv = s._kv_cache
    assert kv is not None
    real_find = kv.find

    def find(key: PromptKey, live: int) -> object:
        if key.owner == ALICE:
            raise OSError("the index is unreadable")
        return real_find(key, live)

    kv.find = find  # type: ignore[method-assign,assignment]
    alice = Client(prompt(ALICE, 1, 2))
    s.submit(alice.request)
    step(s)
    assert alice.failed
    assert alice.ended
    run_to_end(s, bob)
    assert not bob.failed


def test_a_failed_decode_fails_the_requests_in_its_batch() -> None:
    s = make(sequences=2)
    alice, bob = Client(prompt(ALICE, 1)), Client(prompt(BOB, 1))
    s.submit(alice.request)
    s.submit(bob.request)
    step(s, decode_error=RuntimeError("llama_decode returned -1"))
    assert alice.failed
    assert bob.failed
    assert s.counts() == (0, 0)


def draft_of(key: PromptKey) -> Client:
    return Client(key, draft=True)


def test_a_draft_is_read_ahead_and_its_message_continues_from_it() -> None:
    s = make(sequences=2)
    draft = draft_of(prompt(ALICE, length=100))
    s.submit_draft(draft.request)
    run_to_end(s, draft)
    assert s.draft_stats().prefilled == 1
    drafted = len(draft.request.key.tokens)  # nothing was resident: the draft read it all
    assert s.draft_stats().tokens == drafted
    message = Client(PromptKey([*draft.request.key.tokens, 5, 6], len(PUBLIC), ALICE))
    s.submit(message.request)
    plan = step(s)
    (admission,) = plan.admissions
    assert admission.source is None  # in place, in the draft's sequence
    (chunk,) = plan.chunks
    assert list(chunk.tokens) == [5, 6]
    run_to_end(s, message)
    assert message.finished.usage is not None
    assert message.finished.usage.draft_tokens == drafted
    assert s.draft_stats().tokens_used == drafted


def test_a_newer_draft_continues_where_the_older_got() -> None:
    s = make(sequences=2)
    first = draft_of(prompt(ALICE, length=100))
    s.submit_draft(first.request)
    run_to_end(s, first)
    # The user wrote on: a word more.
    newer = draft_of(PromptKey([*first.request.key.tokens, 1, 2], len(PUBLIC), ALICE))
    s.submit_draft(newer.request)
    plan = step(s)
    (chunk,) = plan.chunks
    assert list(chunk.tokens) == [1, 2]


def test_drafts_wait_for_requests_and_get_only_what_they_leave() -> None:
    s = make(sequences=3, batch=512)
    streaming = Client(prompt(BOB, 1), max_tokens=1000)
    s.submit(streaming.request)
    step(s)
    draft = draft_of(prompt(ALICE, length=1500))
    s.submit_draft(draft.request)
    short = Client(prompt(CAROL, 1, 2))
    s.submit(short.request)
    plan = step(s)
    assert [c.progress.request for c in plan.chunks] == [short.request]  # first, alone
    plan = step(s)
    requests = [c.progress.request for c in plan.chunks]
    assert requests[:2] == [streaming.request, short.request]  # the draft comes last
    for _ in range(5):
        plan = step(s)
        assert plan.predicted_s <= BOUND_S


def test_a_request_that_needs_a_drafts_sequence_pauses_the_draft() -> None:
    s = make(sequences=1)
    draft = draft_of(prompt(ALICE, length=1000))
    s.submit_draft(draft.request)
    step(s)
    bob = Client(prompt(BOB, 1))
    s.submit(bob.request)
    plan = step(s)
    assert not draft.ended
    assert s.draft_stats().dropped == 0
    assert [p.request for p in plan.released] == [draft.request]
    # What the draft read is saved before Bob's request takes the sequence over.
    (save,) = plan.saves
    assert save.key.owner == ALICE
    assert [a.progress.request for a in plan.admissions] == [bob.request]
    # Once Bob is answered, the draft goes on from its saved state, not from the start.
    run_to_end(s, bob)
    assert next_admitted(s) == [draft.request]
    fetched = progress_of(s, draft).fetched
    assert fetched is not None
    fetched.result()
    run_to_end(s, draft)
    assert not draft.failed
    read_again = s.draft_stats().tokens - len(draft.request.key.tokens)
    assert 0 <= read_again < 4  # at most the saved state's last, partial chunk


def test_a_draft_takes_an_idle_sequence_but_never_a_running_one() -> None:
    s = make(sequences=1)
    bob = Client(prompt(BOB, 1))
    s.submit(bob.request)
    run_to_end(s, bob)
    step(s)  # Bob's state is saved: his idle sequence may be evicted
    draft = draft_of(prompt(ALICE, length=10))
    s.submit_draft(draft.request)
    plan = step(s)
    assert [a.progress.request for a in plan.admissions] == [draft.request]
    run_to_end(s, draft)
    carol = Client(prompt(CAROL, 1), max_tokens=50)
    s.submit(carol.request)
    step(s)
    late = draft_of(prompt(ALICE, 1, length=10))
    s.submit_draft(late.request)
    plan = step(s)
    assert plan.admissions == []  # Carol is answering in the only sequence: it waits
    run_to_end(s, carol)
    assert next_admitted(s) == [late.request]
    assert s.draft_stats().dropped == 0


def test_a_waiting_draft_is_dropped_once_its_message_or_a_newer_draft_replaces_it() -> None:
    s = make(sequences=1)
    carol = Client(prompt(CAROL, 1), max_tokens=50)
    s.submit(carol.request)
    step(s)
    late = draft_of(prompt(ALICE, 1, length=10))
    s.submit_draft(late.request)
    step(s)
    late.request.cancelled.set()
    run_to_end(s, carol)
    plan = step(s)
    assert plan.admissions == []


def test_a_long_read_waits_while_a_reader_waits_for_an_answers_first_text() -> None:
    s = make(sequences=3, batch=512)
    long = Client(prompt(ALICE, length=1500))
    s.submit(long.request)
    step(s)
    bob = Client(prompt(BOB, 1), max_tokens=1000)
    s.submit(bob.request)

    def reads(plan: StepPlan) -> bool:
        return any(c.progress.request is long.request for c in plan.chunks)

    plan = step(s, sample=lambda p: SPACE)  # nobody answers yet: Bob's question comes first
    assert plan.chunks[0].progress.request is bob.request
    # Bob's first token showed nothing: his first text is awaited, the long read waits ...
    for _ in range(READS_DEFERRED + 1):
        assert not reads(step(s, sample=lambda p: SPACE))
    # ... but not for ever: a short step of its own.
    plan = step(s)
    assert reads(plan)
    assert not plan.decode_tokens
    assert plan.predicted_s <= SHORT_STEP_SHARE * BOUND_S or plan.shape.tokens == MIN_CHUNK
    # His first text showed: answers' and reads' steps alternate.
    assert not reads(step(s))
    plan = step(s)
    assert reads(plan)
    assert plan.predicted_s > SHORT_STEP_SHARE * BOUND_S


def test_a_long_prompt_arriving_while_others_are_answered_is_read_beside_them() -> None:
    side = SideReader()
    s, bob = bob_answering(side)
    long = Client(prompt(ALICE, length=1500))
    s.submit(long.request)
    for _ in range(5):
        plan = step(s)
        # Bob alone in the shared context: his next token every step, nothing else.
        assert [c.progress.request for c in plan.chunks] == [bob.request]
    ((key, upto, _, read),) = side.reads
    assert key == long.request.key
    assert upto == len(key.tokens) - 1
    read.set_result(bytearray(b"state"))
    plan = step(s)
    (handoff,) = plan.handoffs
    assert handoff.progress.request is long.request
    assert handoff.tokens == upto
    assert s.stats().side_read_tokens == upto - len(PUBLIC)  # the public prefix was shared
    # Its last token, cheap, is read in a step of its own: the answer starts.
    assert [(c.progress.request, len(c.tokens)) for c in plan.chunks] == [(long.request, 1)]
    assert long.text


def read_beside_bob() -> tuple[Scheduler, SideReader, Client]:
    """Bob answering, and Alice's long prompt handed to the side reader."""
    side = SideReader()
    s, _ = bob_answering(side)
    long = Client(prompt(ALICE, length=1500))
    s.submit(long.request)
    step(s)
    return s, side, long


def test_a_long_prompt_alone_is_read_in_the_shared_context() -> None:
    side = SideReader()
    s = make(sequences=3, batch=512, side=side)
    long = Client(prompt(ALICE, length=1500))
    s.submit(long.request)
    step(s)
    assert side.reads == []  # alone, every core reads it


def test_a_prompt_the_side_reader_failed_is_read_in_the_shared_context() -> None:
    s, side, long = read_beside_bob()
    ((*_, read),) = side.reads
    read.set_result(None)
    run_to_end(s, long, limit=400)
    assert long.finished.usage is not None
    assert long.finished.usage.prompt_tokens == len(long.request.key.tokens)


def test_a_request_cancelled_while_read_beside_stops_the_side_reader() -> None:
    s, side, long = read_beside_bob()
    ((*_, cancelled, read),) = side.reads
    long.request.cancelled.set()
    step(s)
    assert long.ended
    assert cancelled.is_set()
    read.set_result(bytearray(b"state"))
    plan = step(s)
    assert plan.handoffs == []


def test_a_state_llama_cpp_refuses_is_read_in_the_shared_context() -> None:
    s, side, long = read_beside_bob()
    ((*_, read),) = side.reads
    read.set_result(bytearray(b"state"))
    refused = {progress_of(s, long): Reuse(0, None)}  # the runner found the sequence empty
    assert step(s, diverged=refused).handoffs
    run_to_end(s, long, limit=400)
    usage = long.finished.usage
    assert usage is not None
    assert usage.prompt_tokens == len(long.request.key.tokens)
    assert usage.cached_tokens == 0  # all of it read again, the public prefix too


def test_a_draft_is_never_read_beside_the_answers() -> None:
    side = SideReader()
    s, _ = bob_answering(side)
    draft = draft_of(prompt(ALICE, length=1500))
    s.submit_draft(draft.request)
    for _ in range(3):
        step(s)
    assert side.reads == []  # it gets what Bob leaves, in the shared context
