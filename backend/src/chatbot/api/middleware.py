"""Pure ASGI middleware (streaming-safe): request ids, body size limit, request metrics and
the access log, security headers."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Collection
from uuid import uuid4

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatbot.observability.logging import request_id
from chatbot.observability.metrics import Metrics

_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("chatbot.access")

API_CSP = "default-src 'none'; frame-ancestors 'none'"
"""The API's policy: its JSON and event streams load nothing and are framed by nothing."""


async def _gone() -> Message:
    return {"type": "http.disconnect"}


_GONE: Receive = _gone


class RequestContextMiddleware:
    """Gives every request an id (``X-Request-ID``), refuses bodies over ``max_body_bytes``
    with 413 before the app reads them, counts requests by route and status, and logs one
    access line each.

    An exception no handler took becomes the JSON 500 here, inside the middleware that adds
    the id and the security headers, and is logged with the request's id: Starlette's own
    500 is sent from outside every middleware.
    """

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
        started = time.perf_counter()
        responded = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start":
                status, responded = message["status"], True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            body_receive = await self._read_body(headers, receive)
            if body_receive is _GONE:
                # The client went (or was cut off) before its body arrived: a part of a
                # body is never handed to the app as if it were all of it.
                status = 499
            elif body_receive is None:
                await self._error(
                    send_with_id,
                    413,
                    "invalid_request_error",
                    f"the request body exceeds {self._max_body_bytes} bytes",
                    "payload_too_large",
                )
            else:
                await self._app(scope, body_receive, send_with_id)
        except Exception:
            if responded:  # a stream that broke: its status is sent, nothing more to say
                raise
            logger.exception("unhandled error")
            await self._error(
                send_with_id, 500, "server_error", "internal server error", "internal_error"
            )
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self._metrics.requests.labels(path, str(status)).inc()
            # The path and status only: never the query, a header or the body, which carry
            # keys and what users wrote.
            access_logger.info(
                "%s %s %d %.0f ms",
                scope.get("method", "-"),
                scope.get("path", "-"),
                status,
                (time.perf_counter() - started) * 1000,
            )
            request_id.reset(token)

    async def _read_body(self, headers: dict[bytes, bytes], receive: Receive) -> Receive | None:
        """Reads the whole body (bounded) and replays it; None if it is too large, _GONE
        if the client disconnected before it ended."""
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self._max_body_bytes:
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return _GONE
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

    @staticmethod
    async def _error(send: Send, status: int, type_: str, message: str, code: str) -> None:
        body = json.dumps({"error": {"type": type_, "message": message, "code": code}}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class SecurityHeadersMiddleware:
    """Adds the security headers every response should carry, except where the response set
    the header itself: a page, or a static mount wrapped in ``ResponseHeaders``
    (``chatbot.web.headers``), brings its own ``Content-Security-Policy`` (``PAGE_CSP``) and
    caching, and keeps them.

    ``csp_exempt`` are paths that get no default policy: FastAPI's interactive docs, which
    load their scripts from a CDN and run an inline one.
    """

    def __init__(self, app: ASGIApp, *, csp_exempt: Collection[str] = ()) -> None:
        self._app = app
        self._csp_exempt = frozenset(csp_exempt)
        base: list[tuple[bytes, bytes]] = [
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"),
            (b"referrer-policy", b"no-referrer"),
            (b"cache-control", b"no-store"),
        ]
        self._defaults = [*base, (b"content-security-policy", API_CSP.encode())]
        self._exempt_defaults = base

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        exempt = scope.get("path") in self._csp_exempt
        defaults = self._exempt_defaults if exempt else self._defaults

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in defaults if name not in present]
                message["headers"] = headers
            await send(message)

        await self._app(scope, receive, send_with_headers)
