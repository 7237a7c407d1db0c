"""Model servers the ``openai`` engine is tested against: llama-cpp-python's own
OpenAI-compatible server (``python -m llama_cpp.server``) on the bundled GGUF, really
generating, and a recording proxy that sits between the chatbot and such a server and notes
what the chatbot sends and when it hangs up."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from openai.types import CompletionUsage
from testbed.servers import MODEL_ID, Target, llama_cpp_server

from tests.conftest import ALICE_KEY, serve_in_thread
from tests.sse import parse_events

UPSTREAM_MODEL = MODEL_ID


@contextmanager
def llama_server(model_path: Path, *, context_tokens: int) -> Iterator[Target]:
    """The test bed's launcher; ``Target.url`` is its OpenAI base URL."""
    with llama_cpp_server(
        "llama_cpp.server",
        users=1,
        model_path=model_path,
        cache=False,
        context_tokens=context_tokens,
        # The GGUF has no chat template, and with the fallback (llama-2) the model answers
        # follow-up turns with nothing at all; Gemma's own turn markers keep it talking.
        chat_format="gemma",
    ) as server:
        yield server


@dataclass
class Exchange:
    """One request that went through the proxy."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    finished: bool = False  # the whole upstream response reached the chatbot
    closed: bool = False  # the proxy has let go of the upstream response


class RecordingProxy:
    """Forwards every request to ``upstream`` as it is, streaming the response back."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.exchanges: list[Exchange] = []
        self.app = FastAPI()
        self.app.add_api_route("/{path:path}", self._forward, methods=["GET", "POST"])

    def completions(self) -> list[Exchange]:
        return [e for e in self.exchanges if e.path.endswith("/chat/completions")]

    async def _forward(self, path: str, request: Request) -> Response:
        exchange = Exchange(
            method=request.method,
            path=f"/{path}",
            headers=dict(request.headers),
            body=await request.body(),
        )
        self.exchanges.append(exchange)
        client = httpx.AsyncClient(timeout=120)
        upstream = await client.send(
            client.build_request(
                request.method,
                f"{self.upstream}/{path}",
                content=exchange.body,
                headers={"content-type": request.headers.get("content-type", "")},
            ),
            stream=True,
        )

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
                exchange.finished = True
            finally:
                # Also when the chatbot hangs up: the upstream request is dropped with it.
                await upstream.aclose()
                await client.aclose()
                exchange.closed = True

        return StreamingResponse(
            relay(),
            status_code=upstream.status_code,
            media_type=upstream.headers.get("content-type"),
        )


@contextmanager
def recording_proxy(upstream: str) -> Iterator[tuple[str, RecordingProxy]]:
    """(the proxy's OpenAI base URL, the proxy)."""
    proxy = RecordingProxy(upstream.removesuffix("/v1"))
    for url in serve_in_thread(proxy.app):
        yield f"{url}/v1", proxy


def check_killed_mid_answer(
    alice: httpx.Client, conversation_id: str, body: Mapping[str, object], kill: Callable[[], None]
) -> None:
    """Sends ``body`` to a conversation with one answered turn, calls ``kill`` (the model
    server gone, connections and all) at the first token, and checks what a user sees: an
    ``error`` event, every earlier message kept and the answer stored as failed, then a quick
    503 with ``Retry-After`` for the next message, which leaves nothing behind."""
    path = f"/v1/conversations/{conversation_id}/messages"
    events = []
    killed = False
    with alice.stream("POST", path, json=body) as response:
        for event in parse_events(response.iter_lines()):
            events.append(event)
            if event[0] == "token" and not killed:
                kill()
                killed = True
    name, error = events[-1]
    assert name == "error", events
    assert error["error"]["code"] == "engine_failed"
    messages = alice.get(path).json()["data"]
    assert [(m["role"], m["status"]) for m in messages] == [
        ("user", "complete"),
        ("assistant", "complete"),
        ("user", "complete"),
        ("assistant", "failed"),
    ]
    started = time.monotonic()
    refused = alice.post(path, json={"content": "Are you there?"})
    waited = time.monotonic() - started
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "engine_unreachable"
    assert int(refused.headers["retry-after"]) > 0
    assert waited < 5, "a server that is down must be refused, not waited for"
    assert len(alice.get(path).json()["data"]) == 4  # the refused turn left nothing


def sdk_rounds(url: str, model: str, first: str, then: str) -> list[tuple[str, CompletionUsage]]:
    """Two streamed rounds of one conversation through the official ``openai`` client (the
    second sends the first's answer back, then ``then``): each round's answer and usage."""
    rounds = []
    with openai.OpenAI(base_url=f"{url}/v1", api_key=ALICE_KEY, max_retries=0) as sdk:
        messages: list[Any] = [{"role": "user", "content": first}]
        for _ in range(2):
            stream = sdk.chat.completions.create(
                model=model,
                messages=messages,
                stream=True,
                max_tokens=16,
                temperature=0,
                stream_options={"include_usage": True},
            )
            chunks = list(stream)
            answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            usage = chunks[-1].usage
            assert usage is not None
            rounds.append((answer, usage))
            messages += [
                {"role": "assistant", "content": answer},
                {"role": "user", "content": then},
            ]
    return rounds
