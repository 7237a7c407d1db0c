"""A long prompt read beside the answers by a second llama.cpp context (``batching/side.py``)
on the real model: its answer is the one the shared context gives when it reads the prompt
itself, and so is the answer that streams meanwhile.

The two read the prompt in different chunks (the side reader in 512-token ones, the shared
context in chunks its cost model sizes from measured step times), and llama.cpp's CPU kernels
round a little differently by chunk: a question whose greedy answer is a near tie between two
tokens (which day shipped the most parcels) was answered differently in one full test run. So the
question asks for a fact stated once in the report, which a state that lost or garbled its
text could not give, and whose first tokens are no near tie."""

from __future__ import annotations

import asyncio
from pathlib import Path

from chatbot.engines.base import Finished, GenerationRequest, SamplingParams, TokenDelta
from chatbot.engines.embedded import EmbeddedEngine
from chatbot.models.domain import BatchStats, ChatMessage
from tests.integration.test_batching import SYSTEM, ask, engine, ram_cache

DAYS = [
    f"On day {day} the team shipped {day * 3} parcels from depot {day % 7} and logged "
    f"{day * 11 % 40} returns, most of them from the northern route."
    for day in range(1, 101)
]
FACT = "The depot manager is called Margaret Holloway."
REPORT = " ".join([*DAYS[:50], FACT, *DAYS[50:]])
QUESTION = REPORT + "\n\nWhat is the depot manager called?"
STREAMING = SamplingParams(max_tokens=400, temperature=0.0, top_p=1.0)
COUNT = (
    "Write the numbers from one to two hundred in words, separated by commas, on one line: "
    "one, two, three, four, five,"
)


def side_read_engine(model_path: Path, *, side_read: bool) -> EmbeddedEngine:
    return engine(
        model_path,
        parallel=2,
        kv_cache=ram_cache(model_path),
        queue_size=4,
        context_tokens=8192,
        pool_tokens=16384,
        side_read=side_read,
    )


async def beside_a_stream(running: EmbeddedEngine) -> tuple[str, str, BatchStats]:
    """Alice's long question, asked once Bob's answer streams: her answer and his."""
    started = asyncio.Event()

    async def bob() -> str:
        request = GenerationRequest(
            messages=(SYSTEM, ChatMessage(role="user", content=COUNT)),
            sampling=STREAMING,
            cache_salt="bob",
            public_messages=1,
        )
        pieces: list[str] = []
        async with await running.submit(request) as generation:
            async for event in generation:
                if isinstance(event, TokenDelta):
                    pieces.append(event.text)
                    started.set()
                elif isinstance(event, Finished):
                    assert event.finish_reason in ("stop", "length")
        return "".join(pieces)

    streaming = asyncio.create_task(bob())
    await started.wait()
    text, usage = await ask(running, [ChatMessage(role="user", content=QUESTION)], "alice")
    assert usage.prompt_tokens > 2200
    bob_text = await streaming
    stats = running.batch_stats()
    assert stats is not None
    return text, bob_text, stats


def test_a_long_prompt_read_beside_the_answers_gets_the_same_answer(model_path: Path) -> None:
    async def run(side_read: bool) -> tuple[str, str, BatchStats]:
        running = side_read_engine(model_path, side_read=side_read)
        await running.start()
        await running.warm((SYSTEM,))
        try:
            return await beside_a_stream(running)
        finally:
            await running.aclose()

    beside, bob_beside, stats = asyncio.run(run(side_read=True))
    in_place, bob_in_place, in_place_stats = asyncio.run(run(side_read=False))
    # Greedy: the same answers, wherever Alice's prompt was read.
    assert "Holloway" in in_place
    assert beside == in_place
    assert bob_beside == bob_in_place
    # The side reader read all of it but the public prefix and the last token.
    assert stats.side_read_tokens > 2048
    assert in_place_stats.side_read_tokens == 0
