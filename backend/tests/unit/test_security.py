"""Security headers, CORS and their configuration, on the real app without a model: only the
routes that need no engine are called (the lifespan that loads it never runs here)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.testclient import TestClient
from pydantic import ValidationError
from starlette.staticfiles import StaticFiles

from chatbot.api.app import create_app
from chatbot.api.middleware import API_CSP
from chatbot.config import Settings
from chatbot.web.headers import PAGE_CSP, ResponseHeaders

KEYS = "k-0123456789abcdef=alice"
PAGE = "https://chat.example.com"


def settings(**values: Any) -> Settings:
    """Settings from these values and the environment, never from a .env file (pydantic
    validates the values: any type may come in)."""
    return Settings(_env_file=None, **values)


def client(app: FastAPI) -> TestClient:
    # Not entered as a context manager: the lifespan, which loads the model, does not run.
    return TestClient(app, raise_server_exceptions=False)


def assert_api_headers(headers: Mapping[str, str]) -> None:
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["cache-control"] == "no-store"
    assert headers["content-security-policy"] == API_CSP


def names(header: str) -> set[str]:
    return {name.strip().lower() for name in header.split(",")}


# --- configuration


def test_cors_is_off_unless_origins_are_given() -> None:
    assert settings().cors_origins == []


def test_cors_origins_are_parsed_exactly_and_normalised() -> None:
    s = settings(cors_origins=" https://Chat.Example.com, http://localhost:3000/ ,,")
    assert s.cors_origins == ["https://chat.example.com", "http://localhost:3000"]


@pytest.mark.parametrize(
    "origin",
    [
        "chat.example.com",
        "ftp://chat.example.com",
        "https://chat.example.com/app",
        "https://user:pw@chat.example.com",
        "https://chat.example.com?x=1",
        "https://",
    ],
)
def test_something_that_is_not_an_origin_refuses_to_start(origin: str) -> None:
    with pytest.raises(ValidationError, match="CHATBOT_CORS_ORIGINS"):
        settings(cors_origins=origin)


def test_a_wildcard_origin_is_refused_when_api_keys_are_set() -> None:
    for keys in (KEYS, ""):  # keyless, any site's scripts would act as the local user
        for origins in ("*", f"{PAGE},*"):
            with pytest.raises(ValidationError, match=r"CHATBOT_CORS_ORIGINS='\*' is refused"):
                settings(api_keys=keys, cors_origins=origins)


def test_cors_origins_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATBOT_CORS_ORIGINS", f"{PAGE},http://localhost:5173")
    assert settings().cors_origins == [PAGE, "http://localhost:5173"]


# --- security headers


def test_every_response_carries_the_security_headers() -> None:
    http = client(create_app(settings(api_keys=KEYS, max_body_bytes=1024)))
    for response in [
        http.get("/healthz"),
        http.get("/v1/nothing-here"),  # 404 from the router
        http.post("/v1/conversations", content=b"x" * 2048),  # 413 from the body limit
    ]:
        assert_api_headers(response.headers)
        assert response.headers["x-request-id"]
    assert http.get("/v1/nothing-here").status_code == 404
    assert http.post("/v1/conversations", content=b"x" * 2048).status_code == 413


def test_a_header_the_app_set_itself_is_kept() -> None:
    app = create_app(settings())

    @app.get("/page", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        return HTMLResponse(
            "<!doctype html><title>chat</title>",
            headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"},
        )

    response = client(app).get("/page")
    assert response.headers["content-security-policy"] == PAGE_CSP
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert len(response.headers.get_list("content-security-policy")) == 1


def test_a_static_mount_brings_its_own_policy(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text('<!doctype html><script src="app.js"></script>')
    (tmp_path / "app.js").write_text("console.log('hi');")
    app = create_app(settings())
    headers = {"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"}
    app.mount("/", ResponseHeaders(StaticFiles(directory=tmp_path, html=True), headers))
    http = client(app)
    for path in ("/", "/app.js"):
        response = http.get(path)
        assert response.status_code == 200
        assert response.headers["content-security-policy"] == PAGE_CSP
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-content-type-options"] == "nosniff"
    # The API beside it keeps the strict policy.
    assert_api_headers(http.get("/healthz").headers)


def test_the_page_policy_allows_this_origin_only() -> None:
    directives = dict(d.strip().split(" ", 1) for d in PAGE_CSP.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"
    assert directives["style-src"] == "'self'"
    assert directives["connect-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in PAGE_CSP


def test_the_interactive_docs_get_no_default_policy() -> None:
    # FastAPI's Swagger UI page runs an inline script and loads its bundle from a CDN.
    response = client(create_app(settings())).get("/docs")
    assert response.status_code == 200
    assert "content-security-policy" not in response.headers
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"


# --- CORS


def test_no_cors_headers_at_all_by_default() -> None:
    http = client(create_app(settings(api_keys=KEYS)))
    response = http.get("/healthz", headers={"Origin": PAGE})
    assert not [name for name in response.headers if name.startswith("access-control-")]
    preflight = http.options(
        "/v1/conversations",
        headers={"Origin": PAGE, "Access-Control-Request-Method": "POST"},
    )
    assert not [name for name in preflight.headers if name.startswith("access-control-")]


def test_cors_allows_the_configured_origins_only() -> None:
    app = create_app(settings(api_keys=KEYS, cors_origins=PAGE, max_body_bytes=1024))
    http = client(app)
    preflight = http.options(
        "/v1/conversations",
        headers={
            "Origin": PAGE,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == PAGE
    allowed = {
        h.strip().lower() for h in preflight.headers["access-control-allow-headers"].split(",")
    }
    assert {"authorization", "content-type"} <= allowed
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "access-control-allow-credentials" not in preflight.headers  # bearer keys, no cookies

    refused = http.options(
        "/v1/conversations",
        headers={"Origin": "https://evil.example.net", "Access-Control-Request-Method": "POST"},
    )
    assert refused.status_code == 400
    assert "access-control-allow-origin" not in refused.headers
    other_header = http.options(
        "/v1/conversations",
        headers={
            "Origin": PAGE,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-api-key",
        },
    )
    assert other_header.status_code == 400

    simple = http.get("/healthz", headers={"Origin": PAGE})
    assert simple.headers["access-control-allow-origin"] == PAGE
    exposed = {
        h.strip().lower() for h in simple.headers["access-control-expose-headers"].split(",")
    }
    assert exposed == {"x-request-id", "retry-after"}
    assert (
        "access-control-allow-origin"
        not in http.get("/healthz", headers={"Origin": "https://evil.example.net"}).headers
    )
    # An error the middleware itself answers is readable by the page too.
    too_large = http.post("/v1/conversations", content=b"x" * 2048, headers={"Origin": PAGE})
    assert too_large.status_code == 413
    assert too_large.headers["access-control-allow-origin"] == PAGE
    assert_api_headers(too_large.headers)


def test_an_unhandled_error_is_a_json_500_with_the_id_and_headers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = create_app(settings())

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("boom")

    with caplog.at_level("ERROR", logger="chatbot"):
        response = client(app).get("/boom", headers={"X-Request-ID": "req-500"})
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert response.headers["x-request-id"] == "req-500"
    assert_api_headers(response.headers)
    logged = [r for r in caplog.records if r.name == "chatbot.api.middleware"]
    assert logged
    assert logged[0].exc_info is not None
