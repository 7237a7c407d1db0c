"""Server-Sent Events, and tying a response's life to the generation behind it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from chatbot.api.server import Drain
from chatbot.models.errors import ServiceUnavailable

T = TypeVar("T")


def sse(event: str | None, data: Any) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n"


KEEPALIVE = b": keep-alive\n\n"
"""An SSE comment: clients skip it, proxies see the stream is alive."""


class EventStreamResponse(StreamingResponse):
    """An SSE response tied to the generation behind it.

    ``on_disconnect`` runs as soon as the client goes, even while nothing is being sent (a
    request still queued, a long prefill), so the engine is freed at once; ``on_close`` runs
    however the response ends. Under an ASGI 2.4 server Starlette notices a disconnect only
    at the next send, and it never closes the iterator itself.

    A stream that has sent nothing for ``keepalive_s`` gets a comment line. When ``drain``
    expires (the server is stopping and its grace ran out) the answer is stopped as a
    disconnect would stop it, and the stream ends with ``last_words`` instead of whatever
    the stopped answer would have said last: the client sees why, never a cut.

    Neither costs anything per event but a flag and a time: the keep-alive is written by a
    task of its own between the events (each event is one whole body chunk, so a comment
    can sit between any two), and the drain stops the source, whose end the stream awaits
    as it awaits any event. Handing every event through a queue to a reading task cost
    about 20 µs an event, ten times the response's own cost.
    """

    def __init__(
        self,
        events: AsyncIterator[str],
        *,
        on_disconnect: Callable[[], Awaitable[None]],
        on_close: Callable[[], Awaitable[None]],
        drain: Drain,
        keepalive_s: float,
        last_words: Sequence[str],
    ) -> None:
        self._guarded = self._guard(events)
        super().__init__(
            self._guarded,
            media_type="text/event-stream",
            # no-store: no cache on the way keeps a copy of the conversation's text.
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
        self._on_disconnect = on_disconnect
        self._on_close = on_close
        self._drain = drain
        self._keepalive_s = keepalive_s
        self._last_words = last_words
        self._stopping: asyncio.Task[None] | None = None

    async def _guard(self, events: AsyncIterator[str]) -> AsyncGenerator[str, None]:
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            self._stopping = asyncio.ensure_future(self._on_disconnect())

        unsubscribe = self._drain.subscribe(expire)
        try:
            async for item in events:
                if expired:
                    break
                yield item
            if expired:
                for words in self._last_words:
                    yield words
        finally:
            unsubscribe()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        last_sent = loop.time()
        state = {"started": False, "ended": False, "sending": False}

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            await self._on_disconnect()

        async def tracked_send(message: Message) -> None:
            nonlocal last_sent
            state["sending"] = True
            try:
                await send(message)
            finally:
                state["sending"] = False
                last_sent = loop.time()
            if message["type"] == "http.response.start":
                state["started"] = True
            elif not message.get("more_body", False):
                state["ended"] = True

        async def keep_alive() -> None:
            while True:
                await asyncio.sleep(max(0.0, last_sent + self._keepalive_s - loop.time()))
                if state["ended"]:
                    return
                idle = loop.time() - last_sent >= self._keepalive_s
                if idle and state["started"] and not state["sending"]:
                    body = {"type": "http.response.body", "body": KEEPALIVE, "more_body": True}
                    await tracked_send(body)

        watcher = asyncio.create_task(watch())
        ticker = asyncio.create_task(keep_alive()) if self._keepalive_s else None
        try:
            await super().__call__(scope, receive, tracked_send)
        finally:
            watcher.cancel()
            if ticker is not None:
                ticker.cancel()
                await asyncio.gather(ticker, return_exceptions=True)
            await self._guarded.aclose()
            if self._stopping is not None:
                await asyncio.gather(self._stopping, return_exceptions=True)
            await self._on_close()


async def until_disconnected(request: Request, work: Awaitable[T], drain: Drain) -> T | None:
    """Await ``work`` for a non-streamed answer; if the client disconnects first, cancel it
    (which frees the engine) and return None. If the drain expires first, cancel it and
    raise 503 ``server_shutting_down``."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    expired = asyncio.Event()
    unsubscribe = drain.subscribe(expired.set)
    deadline = asyncio.ensure_future(expired.wait())
    try:
        await asyncio.wait({task, watcher, deadline}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        unsubscribe()
        watcher.cancel()
        deadline.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    if expired.is_set():
        raise shutting_down()
    return None


def shutting_down() -> ServiceUnavailable:
    return ServiceUnavailable(
        "the server is shutting down: the answer was stopped and stored as far as it got",
        code="server_shutting_down",
        retry_after=1,
    )


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
