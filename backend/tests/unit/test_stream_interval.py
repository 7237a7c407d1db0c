"""CHATBOT_STREAM_INTERVAL_MS: the engine's deltas of each interval go up as one, none lost."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest

from chatbot.engines.base import EngineEvent, Finished, Generation, TokenDelta
from chatbot.models.domain import Timing
from chatbot.models.errors import EngineFailure
from chatbot.observability.metrics import Metrics
from chatbot.services.generation import MeteredGeneration

pytestmark = pytest.mark.anyio

END = Finished(
    usage=None, timing=Timing(queue_ms=0, prefill_ms=0, ttft_ms=0, total_ms=0), finish_reason="stop"
)


class Scripted(Generation):
    """Yields each token after its pause (seconds), then ends or fails."""

    def __init__(self, script: Sequence[tuple[float, str]], fail: bool = False) -> None:
        self._script = script
        self._fail = fail

    def __aiter__(self) -> AsyncIterator[EngineEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[EngineEvent]:
        for pause, text in self._script:
            await asyncio.sleep(pause)
            yield TokenDelta(text)
        if self._fail:
            raise EngineFailure("the engine went away")
        yield END

    async def aclose(self) -> None:
        pass


def metered(generation: Generation, interval_s: float) -> MeteredGeneration:
    return MeteredGeneration(
        generation,
        engine_name="test",
        agent="assistant",
        metrics=Metrics(),
        release=lambda: None,
        stream_interval_s=interval_s,
    )


async def events(generation: MeteredGeneration) -> list[EngineEvent]:
    return [event async for event in generation]


async def test_the_first_token_goes_at_once_and_the_rest_of_the_interval_as_one_delta() -> None:
    script = [(0.0, " one")] + [(0.005, f" {n}") for n in ("two", "three", "four", "five")]
    got = await events(metered(Scripted(script), interval_s=5.0))
    assert got == [TokenDelta(" one"), TokenDelta(" two three four five"), END]


async def test_a_token_after_the_interval_takes_what_was_held_with_it() -> None:
    script = [(0.0, " a"), (0.005, " b"), (0.3, " c"), (0.0, " d")]
    got = await events(metered(Scripted(script), interval_s=0.2))
    assert got == [TokenDelta(" a"), TokenDelta(" b c"), TokenDelta(" d"), END]


async def test_without_an_interval_every_delta_passes_as_it_came() -> None:
    script = [(0.0, " a"), (0.0, " b"), (0.0, " c")]
    got = await events(metered(Scripted(script), interval_s=0.0))
    assert got == [TokenDelta(" a"), TokenDelta(" b"), TokenDelta(" c"), END]


async def test_what_was_held_reaches_the_consumer_before_a_failure() -> None:
    script = [(0.0, " said"), (0.005, " before"), (0.005, " failing")]
    seen: list[EngineEvent] = []

    async def read() -> None:
        async for event in metered(Scripted(script, fail=True), interval_s=5.0):
            seen.append(event)

    with pytest.raises(EngineFailure):
        await read()
    assert seen == [TokenDelta(" said"), TokenDelta(" before failing")]
