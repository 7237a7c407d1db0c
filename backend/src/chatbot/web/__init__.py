"""The chat page: a static page at ``/``, its script and style under ``/static/``, and the
two browser libraries it renders answers with (Markdown, then sanitised HTML) under
``/static/vendor/``.

The libraries are npm packages pinned in this folder's ``package.json`` and installed into
its ``node_modules/`` (``make web``); they are never copied into the repository. Without
them the page still works and shows answers as plain text.

Only the files named here are served, never the folder: it also holds this module, the
npm manifests and ``node_modules/``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI
from starlette.responses import FileResponse
from starlette.routing import Mount, Route, Router
from starlette.types import ASGIApp, Receive, Scope, Send

from chatbot.web.headers import PAGE_HEADERS, ResponseHeaders

logger = logging.getLogger(__name__)

WEB_DIR = Path(__file__).parent
PAGE_FILES = {
    "app.js": "text/javascript",
    "style.css": "text/css",
}
VENDOR_FILES = {
    "marked.esm.js": Path("marked/lib/marked.esm.js"),
    "purify.es.mjs": Path("dompurify/dist/purify.es.mjs"),
}
"""The URL name of each library file, and where npm puts it under ``node_modules/``."""


class _File:
    """Serves one file (GET and HEAD), with its conditional requests and ranges."""

    def __init__(self, path: Path, media_type: str) -> None:
        self._path = path
        self._media_type = media_type

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = FileResponse(self._path, media_type=self._media_type)
        await response(scope, receive, send)


def installed_vendor_files(node_modules: Path) -> dict[str, Path]:
    """The library files npm has put in place, by URL name."""
    found = {name: node_modules / path for name, path in VENDOR_FILES.items()}
    return {name: path for name, path in found.items() if path.is_file()}


def install_page(
    app: FastAPI, *, web_dir: Path = WEB_DIR, node_modules: Path | None = None
) -> None:
    """Adds ``/`` and ``/static/`` to ``app``. A library that is not installed answers 404,
    and the page falls back to plain text; the app says so once, here."""
    modules = node_modules if node_modules is not None else web_dir / "node_modules"
    vendor = installed_vendor_files(modules)
    if len(vendor) < len(VENDOR_FILES):
        logger.warning(
            "the chat page's libraries are not installed (run `make web`): answers show as "
            "plain text; missing: %s",
            ", ".join(sorted(set(VENDOR_FILES) - set(vendor))),
        )
    static = [
        Route(f"/{name}", _File(web_dir / name, media_type), methods=["GET"])
        for name, media_type in PAGE_FILES.items()
    ]
    static += [
        Route(f"/vendor/{name}", _File(path, "text/javascript"), methods=["GET"])
        for name, path in vendor.items()
    ]
    index: ASGIApp = _File(web_dir / "index.html", "text/html; charset=utf-8")
    app.router.routes.append(
        Route("/", ResponseHeaders(index, PAGE_HEADERS), methods=["GET"], include_in_schema=False)
    )
    app.router.routes.append(Mount("/static", ResponseHeaders(Router(static), PAGE_HEADERS)))
