"""The headers the chat page and its files are served with: the page's Content Security
Policy, and a wrapper that sets headers on every response of a static mount.

The API's middleware adds its own defaults (``chatbot.api.middleware``) to every response
that did not set them; what is set here is kept."""

from __future__ import annotations

from collections.abc import Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
"""A web page served by this app: its own scripts, styles and images, and calls to this API
only. Give it with ``ResponseHeaders`` around a static mount, or as a route's header."""

# The page, script and style change with the app; a browser may keep them but asks first
# (they carry an ETag), instead of the API's no-store.
PAGE_HEADERS = {"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"}


class ResponseHeaders:
    """Sets ``headers`` on every response of the wrapped app (a static mount, a sub-app),
    replacing what it set; the API's ``SecurityHeadersMiddleware`` then leaves them alone."""

    def __init__(self, app: ASGIApp, headers: Mapping[str, str]) -> None:
        self._app = app
        self._headers = [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        names = {name for name, _ in self._headers}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message["headers"] = [*kept, *self._headers]
            await send(message)

        await self._app(scope, receive, send_with_headers)
