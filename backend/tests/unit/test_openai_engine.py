"""The ``openai`` engine against answers shaped as vLLM's: what llama_cpp.server (the real
server of the integration tests) never sends — usage with cached tokens, ``max_model_len``,
429 with ``Retry-After``, an error inside the stream, a stream cut before its first token.
The transport below replays such answers; it is a stand-in for vLLM, which cannot run here."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from chatbot.engines import chat_format
from chatbot.engines.base import Finished, GenerationRequest, SamplingParams, TokenDelta
from chatbot.engines.openai import SERVER_STOPS, OpenAIEngine, affinity_key
from chatbot.models.domain import ChatMessage
from chatbot.models.errors import (
    ContextLengthExceeded,
    EngineFailure,
    EngineOverloaded,
    ServiceUnavailable,
)

pytestmark = pytest.mark.anyio

MODELS = {
    "object": "list",
    "data": [{"id": "served", "owned_by": "vllm", "max_model_len": 32768}],
}
REQUEST = GenerationRequest(
    messages=(ChatMessage(role="user", content="Hello"),),
    sampling=SamplingParams(max_tokens=8, temperature=0.0, top_p=1.0),
    cache_salt="alice",
    session="conv_1",
)


def sse(*chunks: dict[str, Any], done: bool = True) -> bytes:
    lines = [f"data: {json.dumps(chunk)}\n\n" for chunk in chunks]
    return ("".join(lines) + ("data: [DONE]\n\n" if done else "")).encode()


def delta(text: str, finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}


USAGE = {
    "choices": [],
    "usage": {
        "prompt_tokens": 120,
        "completion_tokens": 2,
        "total_tokens": 122,
        "prompt_tokens_details": {"cached_tokens": 96},
    },
}
ANSWER = sse(delta("Hi"), delta(" there", "stop"), USAGE)

Reply = Callable[[httpx.Request], httpx.Response]


class VLLMReplay(httpx.AsyncBaseTransport):
    """Answers /models, then each chat completion with the next scripted reply."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json=MODELS)
        self.requests.append(request)
        return self.replies.pop(0)(request)


def ok(body: bytes) -> Reply:
    return lambda _: httpx.Response(
        200, content=body, headers={"content-type": "text/event-stream"}
    )


def status(code: int, message: str, **headers: str) -> Reply:
    return lambda _: httpx.Response(code, json={"error": {"message": message}}, headers=headers)


def refused(_: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused")


async def run(transport: VLLMReplay, request: GenerationRequest = REQUEST) -> list[Any]:
    engine = OpenAIEngine(
        "http://vllm:8000/v1",
        api_key="secret",
        model="",
        model_id="",
        context_tokens=4096,
        affinity_header="x-session-id",
        max_connections=4,
        connect_timeout=1,
        read_timeout=5,
        retries=2,
        retry_backoff=0.001,
        transport=transport,
    )
    await engine.start()
    try:
        assert engine.ready
        assert engine.model_id == "served"
        assert engine.context_tokens == 32768  # vLLM's max_model_len, not the fallback
        generation = await engine.submit(request)
        async with generation:
            return [event async for event in generation]
    finally:
        await engine.aclose()
        assert engine.queue_depth == 0


async def test_a_streamed_answer_with_cached_tokens_and_the_affinity_header() -> None:
    transport = VLLMReplay(ok(ANSWER))
    events = await run(transport)
    assert [e.text for e in events if isinstance(e, TokenDelta)] == ["Hi", " there"]
    finished = events[-1]
    assert isinstance(finished, Finished)
    assert finished.usage is not None
    assert (finished.usage.prompt_tokens, finished.usage.cached_tokens) == (120, 96)
    assert finished.finish_reason == "stop"
    (sent,) = transport.requests
    assert sent.headers["x-session-id"] == affinity_key("conv_1")
    assert sent.headers["authorization"] == "Bearer secret"
    body = json.loads(sent.content)
    assert body["model"] == "served"
    assert body["stream_options"] == {"include_usage": True}


async def test_a_server_that_is_not_taking_requests_is_retried() -> None:
    transport = VLLMReplay(refused, status(503, "loading"), ok(ANSWER))
    events = await run(transport)
    assert isinstance(events[-1], Finished)
    assert len(transport.requests) == 3


async def test_retries_end_in_a_503() -> None:
    transport = VLLMReplay(*[status(502, "bad gateway")] * 3)
    with pytest.raises(ServiceUnavailable) as raised:
        await run(transport)
    assert raised.value.retry_after == 5
    assert len(transport.requests) == 3


async def test_a_router_that_could_not_reach_its_replica_is_retried() -> None:
    unsent = httpx.Response(
        500, text="Request failed: error sending request for url (http://10.0.0.7:8000/v1)"
    )
    transport = VLLMReplay(lambda _: unsent, ok(ANSWER))
    events = await run(transport)
    assert isinstance(events[-1], Finished)
    assert len(transport.requests) == 2


async def test_any_other_500_is_ours_to_fix_and_not_retried() -> None:
    transport = VLLMReplay(status(500, "internal server error"))
    with pytest.raises(EngineFailure):
        await run(transport)
    assert len(transport.requests) == 1


@pytest.mark.parametrize(
    ("reply", "error", "retry_after"),
    [
        (status(429, "too many requests", **{"retry-after": "7"}), EngineOverloaded, 7),
        (
            status(400, "This model's maximum context length is 32768 tokens."),
            ContextLengthExceeded,
            None,
        ),
        (status(401, "invalid api key"), EngineFailure, None),
    ],
)
async def test_refusals_map_to_our_errors_without_retrying(
    reply: Reply, error: type[Exception], retry_after: float | None
) -> None:
    transport = VLLMReplay(reply)
    with pytest.raises(error) as raised:
        await run(transport)
    assert getattr(raised.value, "retry_after", None) == retry_after
    assert len(transport.requests) == 1


async def test_a_stream_cut_before_its_first_token_is_sent_again() -> None:
    transport = VLLMReplay(ok(sse(done=False)), ok(ANSWER))
    events = await run(transport)
    assert isinstance(events[-1], Finished)
    assert len(transport.requests) == 2


async def test_a_stream_cut_after_a_token_fails_and_is_not_sent_again() -> None:
    transport = VLLMReplay(ok(sse(delta("Hi"), done=False)), ok(ANSWER))
    with pytest.raises(EngineFailure):
        await run(transport)
    assert len(transport.requests) == 1


async def test_an_error_inside_the_stream_fails_the_generation() -> None:
    error = {"error": {"message": "CUDA out of memory", "code": 500}}
    transport = VLLMReplay(ok(sse(delta("Hi"), error)))
    with pytest.raises(EngineFailure, match="CUDA out of memory"):
        await run(transport)


async def test_a_silent_server_times_out_and_is_not_asked_twice() -> None:
    class Silent(httpx.AsyncByteStream):
        """Sends no chunk, then times out reading."""

        chunks: tuple[bytes, ...] = ()

        async def __aiter__(self) -> AsyncIterator[bytes]:
            for chunk in self.chunks:
                yield chunk
            raise httpx.ReadTimeout("no chunk")

    transport = VLLMReplay(lambda _: httpx.Response(200, stream=Silent()), ok(ANSWER))
    with pytest.raises(EngineFailure) as raised:
        await run(transport)
    assert raised.value.code == "engine_timeout"
    assert len(transport.requests) == 1


async def test_a_server_asking_for_a_long_pause_is_not_waited_for() -> None:
    transport = VLLMReplay(status(503, "warming up", **{"retry-after": "20"}), ok(ANSWER))
    with pytest.raises(ServiceUnavailable) as raised:
        await run(transport)
    assert raised.value.retry_after == 20  # passed on to our client
    assert len(transport.requests) == 1


async def test_the_transcript_stops_go_with_every_request_before_the_callers_own() -> None:
    # Without them a base model behind the transcript template writes the user's next turn.
    transport = VLLMReplay(ok(ANSWER), ok(ANSWER))
    await run(transport)
    with_stops = GenerationRequest(
        messages=REQUEST.messages,
        sampling=SamplingParams(max_tokens=8, temperature=0.0, top_p=1.0, stop=("\nUser:", "END")),
        cache_salt="alice",
    )
    await run(transport, with_stops)
    plain, merged = (json.loads(r.content)["stop"] for r in transport.requests)
    # No more than vLLM takes by default; the rest are watched for by the engine itself.
    assert plain == merged == list(chat_format.STOPS[:SERVER_STOPS])
    assert "\nUser:" in plain


async def test_a_stop_the_server_was_not_given_ends_the_answer_here() -> None:
    transport = VLLMReplay(ok(sse(delta("It is 4."), delta(" END and more"), USAGE)))
    request = GenerationRequest(
        messages=REQUEST.messages,
        sampling=SamplingParams(max_tokens=8, temperature=0.0, top_p=1.0, stop=("END",)),
        cache_salt="alice",
    )
    events = await run(transport, request)
    text = "".join(e.text for e in events if isinstance(e, TokenDelta))
    assert text == "It is 4. "
    finished = events[-1]
    assert isinstance(finished, Finished)
    assert finished.finish_reason == "stop"


async def test_vllm_streams_its_stops_and_the_engine_cuts_them_keeping_the_usage() -> None:
    # vLLM would hold back the first characters of every answer until no stop could begin
    # there; told to stream stops, it does not, and the engine cuts the stop off itself.
    transport = VLLMReplay(ok(sse(delta("It is 4."), delta("\nUser: and", "stop"), USAGE)))
    events = await run(transport)
    assert json.loads(transport.requests[0].content)["include_stop_str_in_output"] is True
    text = "".join(e.text for e in events if isinstance(e, TokenDelta))
    assert text == "It is 4."
    finished = events[-1]
    assert isinstance(finished, Finished)
    assert finished.usage is not None
    assert finished.usage.cached_tokens == 96  # read to the end of the stream
