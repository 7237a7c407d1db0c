"""The simulated engine: its prefix cache keyed as the real ones (chained chunk hashes, the
public part shared, the rest salted per user), its timeline, and cancellation."""

from __future__ import annotations

import math

import pytest

from chatbot.engines.base import Finished, GenerationRequest, SamplingParams, TokenDelta
from chatbot.engines.simulated import (
    CHARS_PER_TOKEN,
    CHUNK_TOKENS,
    WORDS,
    GpuModel,
    SimulatedEngine,
)
from chatbot.models.cache import CacheTier
from chatbot.models.domain import ChatMessage
from chatbot.models.errors import ContextLengthExceeded, EngineOverloaded

pytestmark = pytest.mark.anyio

FAST = GpuModel(decode_tokens_per_s=5_000.0)
SAMPLING = SamplingParams(max_tokens=64, temperature=0.0, top_p=1.0)
# About 600 tokens of public material: two whole chunks of it are shared by everyone.
SYSTEM = ChatMessage(role="system", content="You are a helpful assistant. " * 85)


def request(*messages: ChatMessage, user: str = "alice", max_tokens: int = 64) -> GenerationRequest:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0)
    return GenerationRequest(
        messages=(SYSTEM, *messages), sampling=sampling, cache_salt=user, public_messages=1
    )


async def engine(**overrides: object) -> SimulatedEngine:
    values: dict[str, object] = {
        "context_tokens": 32_768,
        "queue_size": 4,
        "answer_tokens": 24,
        "gpu": FAST,
    }
    values.update(overrides)
    sim = SimulatedEngine(**values)  # type: ignore[arg-type]
    await sim.start()
    return sim


async def answer(sim: SimulatedEngine, req: GenerationRequest) -> tuple[str, Finished]:
    parts: list[str] = []
    finished: Finished | None = None
    async with await sim.submit(req) as generation:
        async for event in generation:
            if isinstance(event, TokenDelta):
                parts.append(event.text)
            else:
                finished = event
    assert finished is not None
    return "".join(parts), finished


def user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def said(text: str) -> ChatMessage:
    return ChatMessage(role="assistant", content=text)


QUESTION = user("Tell me about lighthouses and the people who kept them. " * 30)


async def test_answers_are_words_counted_as_tokens() -> None:
    sim = await engine()
    text, finished = await answer(sim, request(QUESTION))
    words = text.split()
    assert len(words) == 24
    assert set(words) <= set(WORDS)
    assert finished.usage is not None
    assert finished.usage.completion_tokens == 24
    assert finished.finish_reason == "stop"
    assert len(text) == 24 * CHARS_PER_TOKEN  # a token is a space and a 3-letter word


async def test_max_tokens_cuts_the_answer() -> None:
    sim = await engine()
    text, finished = await answer(sim, request(QUESTION, max_tokens=5))
    assert len(text.split()) == 5
    assert finished.finish_reason == "length"


async def test_a_follow_up_finds_the_conversation_so_far_cached() -> None:
    sim = await engine()
    first_text, first = await answer(sim, request(QUESTION))
    assert first.usage is not None
    follow_up = request(QUESTION, said(first_text), user("And who keeps them today?"))
    _, second = await answer(sim, follow_up)
    assert second.usage is not None
    assert second.usage.cached_tokens > first.usage.cached_tokens
    # Every whole chunk of the first prompt is found again, on the GPU.
    assert second.usage.cached_tokens >= first.usage.prompt_tokens // CHUNK_TOKENS * CHUNK_TOKENS
    assert second.usage.cached_tokens % CHUNK_TOKENS == 0
    assert second.usage.cache_tier is CacheTier.LIVE


async def test_another_user_shares_the_public_prefix_and_nothing_else() -> None:
    sim = await engine()
    alice_text, _ = await answer(sim, request(QUESTION))
    conversation = (QUESTION, said(alice_text), user("And who keeps them today?"))
    _, alice = await answer(sim, request(*conversation))
    _, bob = await answer(sim, request(*conversation, user="bob"))
    assert alice.usage is not None
    assert bob.usage is not None
    public_tokens = sim.prompt(request(QUESTION)).public_chars // CHARS_PER_TOKEN
    assert 0 < bob.usage.cached_tokens <= public_tokens < alice.usage.cached_tokens
    assert bob.usage.cached_tokens == public_tokens // CHUNK_TOKENS * CHUNK_TOKENS
    stats = sim.user_cache_stats("bob")
    assert stats is not None
    assert stats.hit_tokens == bob.usage.cached_tokens


async def test_what_left_the_gpu_is_loaded_back_from_cpu_ram() -> None:
    # A GPU cache of one chunk: the conversation's chunks come back from LMCache's RAM.
    sim = await engine(gpu_cache_tokens=CHUNK_TOKENS)
    text, _ = await answer(sim, request(QUESTION))
    _, second = await answer(sim, request(QUESTION, said(text), user("More, please.")))
    assert second.usage is not None
    assert second.usage.cache_tier is CacheTier.RAM
    cached = second.usage.cached_tokens
    uncached = second.usage.prompt_tokens - cached
    # Every cached token was copied in: each chunk found in RAM pushed the last one out.
    assert math.isclose(
        second.timing.prefill_ms,
        (FAST.prefill_s(cached, uncached) + FAST.load_s(cached)) * 1000,
        abs_tol=0.01,
    )


async def test_timing_follows_the_model() -> None:
    sim = await engine()
    _, finished = await answer(sim, request(QUESTION))
    usage, timing = finished.usage, finished.timing
    assert usage is not None
    assert usage.cached_tokens == 0
    assert usage.cache_tier is None
    assert math.isclose(
        timing.prefill_ms, FAST.prefill_s(0, usage.prompt_tokens) * 1000, abs_tol=0.01
    )
    assert math.isclose(timing.ttft_ms, timing.queue_ms + timing.prefill_ms, abs_tol=0.01)
    decode_ms = (usage.completion_tokens - 1) / FAST.decode_tokens_per_s * 1000
    assert math.isclose(timing.total_ms, timing.ttft_ms + decode_ms, abs_tol=0.01)


def test_the_prefill_model_meets_its_calibration_points() -> None:
    gpu = GpuModel()
    for tokens, measured_ms in ((1000, 38), (4000, 138), (16000, 614)):
        assert math.isclose(gpu.prefill_s(0, tokens) * 1000, measured_ms, rel_tol=0.01)
    # 16k tokens of KV from CPU RAM: ~39 ms at 54 GB/s.
    assert math.isclose(gpu.load_s(16_384) * 1000, 39.8, rel_tol=0.02)


async def test_closing_a_stream_stops_it_and_frees_its_sequence() -> None:
    sim = await engine(gpu=GpuModel(decode_tokens_per_s=50.0))
    generation = await sim.submit(request(QUESTION))
    events = aiter(generation)
    first = await anext(events)
    assert isinstance(first, TokenDelta)
    assert sim.running == 1
    await generation.aclose()
    assert sim.running == 0
    assert [event async for event in events] == []


async def test_a_queued_request_waits_and_can_be_withdrawn() -> None:
    sim = await engine(gpu=GpuModel(decode_tokens_per_s=50.0, max_sequences=1), queue_size=1)
    running = await sim.submit(request(QUESTION))
    queued = await sim.submit(request(QUESTION, user="bob"))
    assert sim.running == 1
    assert sim.queue_depth == 1
    with pytest.raises(EngineOverloaded):
        await sim.submit(request(QUESTION, user="carol"))
    await queued.aclose()
    assert sim.queue_depth == 0
    assert [event async for event in queued] == []
    await running.aclose()
    assert sim.running == 0


async def test_a_queued_request_starts_when_a_sequence_frees() -> None:
    sim = await engine(gpu=GpuModel(decode_tokens_per_s=5_000.0, max_sequences=1))
    first = await sim.submit(request(QUESTION))
    second = await sim.submit(request(QUESTION, user="bob"))
    async with first:
        assert any(isinstance(e, Finished) for e in [event async for event in first])
    async with second:
        events = [event async for event in second]
    assert isinstance(events[-1], Finished)
    assert events[-1].timing.queue_ms > 0


async def test_a_prompt_longer_than_the_context_is_refused() -> None:
    sim = await engine(context_tokens=512)
    with pytest.raises(ContextLengthExceeded):
        await sim.submit(request(QUESTION))
