"""An engine that fails in the middle of an answer: the stream ends with an error event and
the conversation stays consistent. The real engine is wrapped at the engine seam with a
failure switch."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatbot.config import Settings
from chatbot.engines.base import Engine, EngineEvent, Generation, GenerationRequest, TokenDelta
from chatbot.engines.factory import create_engine
from chatbot.models.errors import EngineFailure
from tests.conftest import ALICE_KEY, Servers
from tests.sse import parse_events


class FailingGeneration(Generation):
    def __init__(self, inner: Generation, fail_after: int | None) -> None:
        self._inner = inner
        self._fail_after = fail_after

    async def __aiter__(self) -> AsyncIterator[EngineEvent]:
        tokens = 0
        async for event in self._inner:
            if isinstance(event, TokenDelta):
                if tokens == self._fail_after:
                    raise EngineFailure("the model failed while generating")
                tokens += 1
            yield event

    async def aclose(self) -> None:
        await self._inner.aclose()


class SwitchableFailingEngine(Engine):
    """Delegates to a real engine; with ``fail_after`` set, fails after that many tokens."""

    def __init__(self, inner: Engine) -> None:
        self._inner = inner
        self.model_id = inner.model_id
        self.fail_after: int | None = None

    async def start(self) -> None:
        await self._inner.start()

    async def aclose(self) -> None:
        await self._inner.aclose()

    @property
    def ready(self) -> bool:
        return self._inner.ready

    @property
    def context_tokens(self) -> int:
        return self._inner.context_tokens

    async def submit(self, request: GenerationRequest) -> Generation:
        return FailingGeneration(await self._inner.submit(request), self.fail_after)


@pytest.fixture(scope="module")
def failing_server(model_path: Path, module_server: Servers) -> tuple[str, SwitchableFailingEngine]:
    engines: list[SwitchableFailingEngine] = []

    def failing(settings: Settings) -> Engine:
        engines.append(SwitchableFailingEngine(create_engine(settings)))
        return engines[-1]

    return module_server.on_engine(failing, model_path).url, engines[0]


def test_failure_mid_stream_ends_with_an_error_and_keeps_the_conversation(
    failing_server: tuple[str, SwitchableFailingEngine],
) -> None:
    url, engine = failing_server
    headers = {"Authorization": f"Bearer {ALICE_KEY}"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        conversation_id = client.post("/v1/conversations", json={}).json()["id"]
        path = f"/v1/conversations/{conversation_id}/messages"

        def turn(content: str) -> list[tuple[str, Any]]:
            with client.stream("POST", path, json={"content": content}) as response:
                return list(parse_events(response.iter_lines()))

        first = turn("What is the capital of Spain?")
        engine.fail_after = 2
        failed = turn("And of Portugal?")
        engine.fail_after = None
        names = [name for name, _ in failed]
        assert names == ["message.start", "token", "token", "error"]
        assert failed[-1][1] == {
            "error": {
                "type": "engine_error",
                "message": "the model failed while generating",
                "code": "generation_failed",
            }
        }

        stored = client.get(path).json()["data"]
        assert [(m["role"], m["status"]) for m in stored] == [
            ("user", "complete"),
            ("assistant", "complete"),
            ("user", "complete"),
            ("assistant", "failed"),
        ]
        assert stored[3]["content"] == "".join(
            data["delta"] for name, data in failed if name == "token"
        )
        # The next turn leaves the failed exchange out and still reuses the first one.
        third = turn("What is the capital of France?")
        assert third[-1][0] == "message.end"
        usage1 = first[-1][1]["usage"]
        assert third[-1][1]["usage"]["cached_tokens"] >= usage1["prompt_tokens"]


def test_openai_stream_failure_sends_an_error_chunk(
    failing_server: tuple[str, SwitchableFailingEngine],
) -> None:
    url, engine = failing_server
    body = {
        "model": engine.model_id,
        "stream": True,
        "messages": [{"role": "user", "content": "Tell me about the sea."}],
    }
    engine.fail_after = 1
    try:
        with (
            httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {ALICE_KEY}"}, timeout=60
            ) as client,
            client.stream("POST", "/v1/chat/completions", json=body) as response,
        ):
            events = [data for _, data in parse_events(response.iter_lines())]
    finally:
        engine.fail_after = None
    assert events[-1] == "[DONE]"
    assert events[-2] == {
        "error": {
            "type": "engine_error",
            "message": "the model failed while generating",
            "code": "generation_failed",
        }
    }
