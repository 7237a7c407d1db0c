"""The page's files as the app serves them, without a browser: its policy, its libraries,
and the plain-text fallback when the libraries are not installed."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from chatbot.web import VENDOR_FILES, WEB_DIR, install_page, installed_vendor_files
from chatbot.web.headers import PAGE_CSP
from tests.conftest import LiveServer

ASSETS = ("/static/app.js", "/static/style.css")
VENDOR = tuple(f"/static/vendor/{name}" for name in VENDOR_FILES)


def test_the_page_and_its_files_carry_the_page_policy(live_server: LiveServer) -> None:
    """No key needed: the page itself holds nothing of anyone's."""
    if len(installed_vendor_files(WEB_DIR / "node_modules")) < len(VENDOR_FILES):
        pytest.fail("the page's libraries are not installed: run `make web`")
    with httpx.Client(base_url=live_server.url, timeout=30) as client:
        page = client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert page.headers["content-security-policy"] == PAGE_CSP
        assert page.headers["x-frame-options"] == "DENY"
        assert '<script type="module" src="/static/app.js">' in page.text

        for path in (*ASSETS, *VENDOR):
            response = client.get(path)
            assert response.status_code == 200, path
            assert response.headers["content-security-policy"] == PAGE_CSP, path
            assert response.headers["x-content-type-options"] == "nosniff", path
            assert response.content, path
        # Module scripts run only with a JavaScript type.
        for path in ("/static/app.js", *VENDOR):
            assert client.get(path).headers["content-type"].startswith("text/javascript")

        # Only the page's files: not the folder's Python, npm manifests or node_modules.
        for path in ("/static/__init__.py", "/static/package.json", "/static/index.html"):
            assert client.get(path).status_code == 404, path
        assert client.get("/static/node_modules/marked/package.json").status_code == 404

        # The API keeps its own policy.
        assert client.get("/healthz").headers["content-security-policy"] != PAGE_CSP


@pytest.mark.anyio
async def test_without_the_libraries_the_page_is_still_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = FastAPI()
    with caplog.at_level(logging.WARNING, logger="chatbot.web"):
        install_page(app, node_modules=tmp_path / "node_modules")
    warnings = [r for r in caplog.records if r.name == "chatbot.web"]
    assert len(warnings) == 1
    assert "make web" in warnings[0].getMessage()

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://page") as client:
        for path in ("/", *ASSETS):
            assert (await client.get(path)).status_code == 200, path
        # The page imports them, fails, and shows answers as plain text.
        for path in VENDOR:
            assert (await client.get(path)).status_code == 404, path
