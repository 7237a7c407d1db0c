"""Server-Sent Events, and tying a response's life to the generation behind it."""

from __future__ import annotations

import asyncio
import enum
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from chatbot.api.server import Drain
from chatbot.models.errors import ServiceUnavailable

T = TypeVar("T")


def sse(event: str | None, data: Any) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n"


KEEPALIVE = ": keep-alive\n\n"
"""An SSE comment: clients ignore it, proxies see the stream is alive."""


class _Signal(enum.Enum):
    END = enum.auto()
    KEEPALIVE = enum.auto()
    DEADLINE = enum.auto()


class EventStreamResponse(StreamingResponse):
    """An SSE response tied to the generation behind it.

    ``on_disconnect`` runs as soon as the client goes, even while nothing is being sent (a
    request still queued, a long prefill), so the engine is freed at once; ``on_close`` runs
    however the response ends. Under an ASGI 2.4 server Starlette notices a disconnect only
    at the next send, and it never closes the iterator itself.

    A stream silent for ``keepalive_s`` gets a comment line. When ``drain`` expires (the
    server is stopping and its grace ran out) the answer is stopped as a disconnect would
    stop it, ``last_words`` are sent, and the stream ends: the client sees why, never a cut.
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

    async def _guard(self, events: AsyncIterator[str]) -> AsyncGenerator[str, None]:
        """``events`` read by a task of their own, so that a silent source can be
        interrupted by a keep-alive or the drain; the source reads on only once the client
        took the last event (its backpressure, and the coalescing that rides on it, stay)."""
        inbox: asyncio.Queue[str | _Signal] = asyncio.Queue()
        taken = asyncio.Event()
        sent = False

        async def pump() -> None:
            try:
                async for item in events:
                    taken.clear()
                    inbox.put_nowait(item)
                    await taken.wait()
            finally:
                inbox.put_nowait(_Signal.END)

        loop = asyncio.get_running_loop()
        ticker: asyncio.TimerHandle | None = None

        def tick() -> None:
            nonlocal sent, ticker
            if not sent:
                inbox.put_nowait(_Signal.KEEPALIVE)
            sent = False
            ticker = loop.call_later(self._keepalive_s, tick)

        if self._keepalive_s:
            ticker = loop.call_later(self._keepalive_s, tick)
        unsubscribe = self._drain.subscribe(lambda: inbox.put_nowait(_Signal.DEADLINE))
        pumping = asyncio.create_task(pump())
        try:
            while True:
                item = await inbox.get()
                if item is _Signal.END:
                    (outcome,) = await asyncio.gather(pumping, return_exceptions=True)
                    if isinstance(outcome, Exception):
                        raise outcome
                    return
                if item is _Signal.KEEPALIVE:
                    yield KEEPALIVE
                elif item is _Signal.DEADLINE:
                    await self._on_disconnect()
                    for words in self._last_words:
                        yield words
                    return
                else:
                    sent = True
                    yield item
                    taken.set()
        finally:
            unsubscribe()
            if ticker is not None:
                ticker.cancel()
            pumping.cancel()
            await asyncio.gather(pumping, return_exceptions=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            await self._on_disconnect()

        watcher = asyncio.create_task(watch())
        try:
            await super().__call__(scope, receive, send)
        finally:
            watcher.cancel()
            await self._guarded.aclose()
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
