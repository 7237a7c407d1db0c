"""The HTTP server around the app: uvicorn (httptools), bounded before the app sees a request,
and a drain that ends open streams with a last word instead of cutting them.

What uvicorn with httptools enforces by itself, and what it does not (uvicorn 0.54):

- request heads have no size limit: a header of any length is buffered (h11's
  ``h11_max_incomplete_event_size`` does not apply to httptools);
- nothing times out a request being received: a new connection has no timer at all, and the
  keep-alive timer (``timeout_keep_alive``, 5 s) runs only between requests and is reset by
  any byte, so a client sending a header a byte at a time holds its connection for ever;
- ``limit_concurrency`` answers past its limit with a plain-text 503.

``BoundedHttpProtocol`` adds the three bounds (head bytes, receive time, connections) with
JSON errors in the API's shape; the keep-alive timeout is uvicorn's own, unchanged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
from asyncio import TimerHandle
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from chatbot.config import Settings

logger = logging.getLogger(__name__)

DRAIN_GRACE_SECONDS = 5.0
"""After the drain deadline, how long uvicorn still waits (streams end with their last word,
answers are stored) before it cancels what is left."""


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_head_bytes: int
    """Request line and headers together; past it 431 and the connection is closed."""
    receive_timeout_s: float
    """A request's head and body must arrive within this long of its first byte (of the
    connection's opening, for the first request); past it 408 and the connection is closed."""
    max_connections: int
    """Open connections of the process; a request on one past it gets 503 and a close."""


class _Refused(Exception):
    def __init__(self, status: HTTPStatus, message: str, code: str, retry_after: int = 0) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.retry_after = retry_after


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bound on a request's head, on the time a request
    takes to arrive, and on the process's open connections (see the module's docstring)."""

    limits: ClassVar[ConnectionLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._receive_timer: TimerHandle | None = None
        self._in_head = False
        self._head_bytes = 0
        self._refused = False

    @classmethod
    def bound(cls, limits: ConnectionLimits) -> type[BoundedHttpProtocol]:
        """The protocol class uvicorn is given (it instantiates the class itself)."""
        return type("BoundedHttpProtocol", (cls,), {"limits": limits})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # A connection that never sends a byte is a request that never arrives.
        self._arm_receive_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_receive_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # uvicorn's own, with the refusals: a callback's exception reaches here as a parser
        # error whose context it is (httptools' way).
        if self._refused:
            return
        self._unset_keepalive_if_required()
        if self._receive_timer is None and (self.cycle is None or self.cycle.response_complete):
            # Bytes between requests that start none (blank lines): the clock runs too.
            self._arm_receive_timer()
        try:
            self.parser.feed_data(data)
            if self._in_head:
                # The head is still incomplete: httptools holds it, so it is bounded here,
                # chunk by chunk, before it can grow (on_headers_complete checks it exactly).
                self._head_bytes += len(data)
                if self._head_bytes > self.limits.max_head_bytes:
                    self._refuse(self._head_too_large())
        except httptools.HttpParserUpgrade:
            self._disarm_receive_timer()  # the connection is another protocol's now
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _Refused):
                self._refuse(exc.__context__)
            else:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        if self._receive_timer is None:
            self._arm_receive_timer()

    def on_headers_complete(self) -> None:
        self._in_head = False
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.limits.max_head_bytes:
            raise self._head_too_large()  # stops the parser; answered in data_received
        if len(self.connections) > self.limits.max_connections:
            raise _Refused(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"the server holds its maximum of {self.limits.max_connections} connections",
                "too_many_connections",
                retry_after=2,
            )
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm_receive_timer()
        super().on_message_complete()

    def _head_too_large(self) -> _Refused:
        return _Refused(
            HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
            f"the request line and headers exceed {self.limits.max_head_bytes} bytes",
            "headers_too_large",
        )

    def _arm_receive_timer(self) -> None:
        self._disarm_receive_timer()
        self._receive_timer = self.loop.call_later(
            self.limits.receive_timeout_s, self._receive_timed_out
        )

    def _disarm_receive_timer(self) -> None:
        if self._receive_timer is not None:
            self._receive_timer.cancel()
            self._receive_timer = None

    def _receive_timed_out(self) -> None:
        self._receive_timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            # An answer is being written on this connection, and what lags is a pipelined
            # request behind it, which is read only once that answer ends.
            self._arm_receive_timer()
            return
        self._refuse(
            _Refused(
                HTTPStatus.REQUEST_TIMEOUT,
                f"the request did not arrive within {self.limits.receive_timeout_s:g} s",
                "request_timeout",
            )
        )

    def _refuse(self, refusal: _Refused) -> None:
        """Answer with the API's JSON error and close: what is left of the request is not
        read (the connection's state is unknown past this point)."""
        self._refused = True
        self._disarm_receive_timer()
        if self.transport.is_closing():
            return
        body = json.dumps(
            {
                "error": {
                    "type": "invalid_request_error"
                    if refusal.status < 500
                    else "service_unavailable",
                    "message": refusal.message,
                    "code": refusal.code,
                }
            }
        ).encode()
        head = [f"HTTP/1.1 {refusal.status.value} {refusal.status.phrase}".encode()]
        head += [name + b": " + value for name, value in self.server_state.default_headers]
        head += [
            b"content-type: application/json",
            b"content-length: " + str(len(body)).encode(),
            b"connection: close",
        ]
        if refusal.retry_after:
            head.append(b"retry-after: " + str(refusal.retry_after).encode())
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.transport.close()


class Drain:
    """The moment a graceful stop runs out: streams still open then end with a last word
    (an ``error`` event, or an error chunk and ``[DONE]``) instead of being cut."""

    def __init__(self) -> None:
        self._callbacks: set[Callable[[], None]] = set()
        self.expired = False
        self._timer: TimerHandle | None = None

    def start(self, seconds: float) -> None:
        """The stop began: expire in ``seconds``."""
        if self._timer is None and not self.expired:
            self._timer = asyncio.get_running_loop().call_later(seconds, self.expire)

    def expire(self) -> None:
        self.expired = True
        for callback in list(self._callbacks):
            callback()
        self._callbacks.clear()

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` when the drain expires (at once if it has); returns the
        unsubscribe."""
        if self.expired:
            callback()
            return lambda: None
        self._callbacks.add(callback)
        return lambda: self._callbacks.discard(callback)


class ChatbotServer(uvicorn.Server):
    """uvicorn's server that starts the app's drain when a stop begins."""

    def __init__(self, config: uvicorn.Config, *, drain: Drain, drain_seconds: float) -> None:
        super().__init__(config)
        self._drain = drain
        self._drain_seconds = drain_seconds

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._drain.start(self._drain_seconds)
        await super().shutdown(sockets)


def connection_limits(settings: Settings, open_files: int) -> ConnectionLimits:
    """``open_files``: the process's open-files limit, from which the default connection
    cap is derived (what is left once the model, the store and the logs have theirs)."""
    derived = max(64, open_files - 256) if open_files > 0 else 10_000
    return ConnectionLimits(
        max_head_bytes=settings.max_header_bytes,
        receive_timeout_s=settings.receive_timeout_seconds,
        max_connections=settings.max_connections or derived,
    )


def server_for(
    app: Any, settings: Settings, *, drain: Drain, open_files: int = 0, **config: Any
) -> ChatbotServer:
    """The bounded, draining uvicorn server for ``app``. ``config``: more ``uvicorn.Config``
    options (host, port, log_level...)."""
    limits = connection_limits(settings, open_files)
    uvicorn_config = uvicorn.Config(
        app,
        http=BoundedHttpProtocol.bound(limits),
        # uvicorn cancels what is left only after the app's own deadline and a grace.
        timeout_graceful_shutdown=math.ceil(settings.drain_seconds + DRAIN_GRACE_SECONDS),
        **config,
    )
    return ChatbotServer(uvicorn_config, drain=drain, drain_seconds=settings.drain_seconds)
