"""Server-Sent Events, and tying a response's life to the generation behind it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")


def sse(event: str | None, data: Any) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n"


class EventStreamResponse(StreamingResponse):
    """An SSE response tied to the generation behind it.

    ``on_disconnect`` runs as soon as the client goes, even while nothing is being sent (a
    request still queued, a long prefill), so the engine is freed at once; ``on_close`` runs
    however the response ends. Under an ASGI 2.4 server Starlette notices a disconnect only
    at the next send, and it never closes the iterator itself.
    """

    def __init__(
        self,
        events: AsyncIterator[str],
        *,
        on_disconnect: Callable[[], Awaitable[None]],
        on_close: Callable[[], Awaitable[None]],
    ) -> None:
        super().__init__(
            events,
            media_type="text/event-stream",
            # no-store: no cache on the way keeps a copy of the conversation's text.
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
        self._on_disconnect = on_disconnect
        self._on_close = on_close

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
            await self._on_close()


async def until_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Await ``work`` for a non-streamed answer; if the client disconnects first, cancel it
    (which frees the engine) and return None."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
