"""Pure ASGI middleware (streaming-safe): request ids, body size limit, request metrics."""

from __future__ import annotations

import json
import re
from uuid import uuid4

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatbot.observability.logging import request_id
from chatbot.observability.metrics import Metrics

_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestContextMiddleware:
    """Gives every request an id (``X-Request-ID``), refuses bodies over ``max_body_bytes``
    with 413 before the app reads them, and counts requests by route and status."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, metrics: Metrics) -> None:
        self._app = app
        self._max_body_bytes = max_body_bytes
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        offered = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = offered if _VALID_REQUEST_ID.match(offered) else uuid4().hex
        token = request_id.set(rid)
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            body_receive = await self._read_body(headers, receive)
            if body_receive is None:
                await self._too_large(send_with_id)
            else:
                await self._app(scope, body_receive, send_with_id)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self._metrics.requests.labels(path, str(status)).inc()
            request_id.reset(token)

    async def _read_body(self, headers: dict[bytes, bytes], receive: Receive) -> Receive | None:
        """Reads the whole body (bounded) and replays it; None if it is too large."""
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self._max_body_bytes:
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self._max_body_bytes:
                return None
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    async def _too_large(self, send: Send) -> None:
        body = json.dumps(
            {
                "error": {
                    "type": "invalid_request_error",
                    "message": f"the request body exceeds {self._max_body_bytes} bytes",
                    "code": "payload_too_large",
                }
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
