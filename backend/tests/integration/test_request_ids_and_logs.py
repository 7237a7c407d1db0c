"""Request ids, security headers and what the logs hold, on a live server and the real model:
every response (success, 4xx of every origin, streams) carries its request id and the
security headers, the log lines of a request carry its id, and no log line, ours or
uvicorn's, holds an API key or a word a user wrote."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from chatbot.api.middleware import API_CSP
from chatbot.observability.logging import log_handler
from tests.conftest import ALICE_KEY, LiveServer
from tests.integration.test_conversation_api import new_conversation
from tests.sse import parse_events

SECRET_WORDS = "Periwinkle-Xylophone-8731 is my grandmother's secret recipe"
WRONG_KEY = "wrong-key-Marzipan-Quokka-4462"
SERVER_LOGGERS = ("chatbot", "uvicorn", "uvicorn.error", "uvicorn.access")


class Lines(logging.Handler):
    """Keeps every record as the line the server's own handler would write."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        template = log_handler()
        self.filters = list(template.filters)
        self.setFormatter(template.formatter)
        self.lines: list[str] = []
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))
        self.records.append(record)


@pytest.fixture
def server_logs() -> Iterator[Lines]:
    """Every line the server logs, at the most verbose level each logger can be set to:
    ``CHATBOT_LOG_LEVEL=debug`` for ours, uvicorn's access log on (the CLI turns it off),
    and warnings from any library."""
    lines = Lines()
    saved = {name: logging.getLogger(name).level for name in SERVER_LOGGERS}
    for name in SERVER_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG)
        logging.getLogger(name).addHandler(lines)
    root = logging.getLogger()
    warnings = Lines()
    warnings.setLevel(logging.WARNING)
    root.addHandler(warnings)
    try:
        yield lines
    finally:
        root.removeHandler(warnings)
        for name, level in saved.items():
            logging.getLogger(name).removeHandler(lines)
            logging.getLogger(name).setLevel(level)
        lines.lines += [line for line in warnings.lines if line not in lines.lines]


def rid(name: str) -> dict[str, str]:
    return {"X-Request-ID": f"test-{name}"}


def assert_headers(response: httpx.Response, request_id: str | None = None) -> None:
    if request_id is not None:
        assert response.headers["x-request-id"] == request_id
    else:
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["content-security-policy"] == API_CSP
    assert response.headers["cache-control"] == "no-store"


def test_every_response_carries_its_request_id_and_the_security_headers(
    live_server: LiveServer,
) -> None:
    with live_server.client() as alice, live_server.client(key=None) as anonymous:
        conversation_id = new_conversation(alice)
        path = f"/v1/conversations/{conversation_id}/messages"
        responses: dict[str, tuple[httpx.Response, int]] = {
            "ok": (alice.get("/v1/conversations", headers=rid("ok")), 200),
            "created": (alice.post("/v1/conversations", json={}, headers=rid("created")), 201),
            "unauthorized": (anonymous.get("/v1/conversations", headers=rid("unauthorized")), 401),
            "wrong-key": (
                anonymous.get(
                    "/v1/models", headers={**rid("wrong-key"), "Authorization": "Bearer nope"}
                ),
                401,
            ),
            "not-found": (alice.get("/v1/conversations/conv_nope", headers=rid("not-found")), 404),
            "invalid": (alice.post(path, json={"content": 3}, headers=rid("invalid")), 422),
            # 413 from the body limit, answered by the middleware before the app reads it.
            "body-too-large": (
                alice.post(path, json={"content": "x" * 70_000}, headers=rid("body-too-large")),
                413,
            ),
            "message-too-large": (
                alice.post(path, json={"content": "y" * 5000}, headers=rid("message-too-large")),
                413,
            ),
            "public": (anonymous.get("/healthz", headers=rid("public")), 200),
        }
        for name, (response, status) in responses.items():
            assert response.status_code == status, (name, response.text)
            assert_headers(response, f"test-{name}")
            assert response.headers["cache-control"] == "no-store"

        with alice.stream(
            "POST", path, json={"content": "Hello!", "max_tokens": 4}, headers=rid("stream")
        ) as streamed:
            assert streamed.status_code == 200
            assert streamed.headers["content-type"].startswith("text/event-stream")
            assert_headers(streamed, "test-stream")
            events = list(parse_events(streamed.iter_lines()))
            assert events[-1][0] == "message.end"

        body = {
            "model": live_server.state.engine.model_id,
            "messages": [{"role": "user", "content": "Hello!"}],
            "max_tokens": 4,
            "stream": True,
        }
        with alice.stream("POST", "/v1/chat/completions", json=body, headers=rid("sse")) as sse:
            assert sse.status_code == 200
            assert_headers(sse, "test-sse")
            assert list(sse.iter_lines())

        # No id offered, or one that is not a safe token: the server makes one.
        assert_headers(alice.get("/v1/models"))
        bad = alice.get("/v1/models", headers={"X-Request-ID": "two words\tand a tab"})
        assert_headers(bad)
        assert "two words" not in bad.headers["x-request-id"]


def test_logs_carry_the_request_id_and_never_a_key_or_a_message(
    live_server: LiveServer, server_logs: Lines
) -> None:
    model = live_server.state.engine.model_id
    with live_server.client() as alice:
        conversation_id = new_conversation(alice)
        path = f"/v1/conversations/{conversation_id}/messages"
        turn: dict[str, Any] = {"content": SECRET_WORDS, "max_tokens": 6}
        with alice.stream("POST", path, json=turn, headers=rid("logs-stream")) as response:
            assert response.status_code == 200
            list(response.iter_lines())
        answer = alice.post(path, json={**turn, "stream": False}, headers=rid("logs-json"))
        assert answer.status_code == 200
        chat = {"model": model, "messages": [{"role": "user", "content": SECRET_WORDS}]}
        for stream in (False, True):
            completion = alice.post(
                "/v1/chat/completions",
                json={**chat, "stream": stream, "max_tokens": 6},
                headers=rid(f"logs-chat-{stream}"),
            )
            assert completion.status_code == 200
        # Refusals that echo nothing of what was sent, to the logs at least.
        assert alice.post(path, json={"content": SECRET_WORDS * 200}).status_code == 413
        assert alice.post(path, json={"content": SECRET_WORDS, "x": 1}).status_code == 422
        bad_model = {**chat, "model": SECRET_WORDS}
        assert alice.post("/v1/chat/completions", json=bad_model).status_code == 404
    with httpx.Client(base_url=live_server.url) as stranger:
        refused = stranger.get(
            "/v1/conversations",
            headers={**rid("logs-wrong-key"), "Authorization": f"Bearer {WRONG_KEY}"},
        )
        assert refused.status_code == 401

    lines = server_logs.lines
    assert lines, "the server logged nothing"
    everything = "\n".join(lines)
    for secret in (SECRET_WORDS, "Periwinkle", ALICE_KEY, WRONG_KEY, "Marzipan"):
        assert secret not in everything, f"{secret!r} is in the logs"
    # Each request's access line carries its id.
    for name in ("logs-stream", "logs-json", "logs-chat-False", "logs-chat-True"):
        mine = [line for line in lines if f"[test-{name}]" in line]
        assert any(" POST /v1/" in line and " 200 " in line for line in mine), (name, lines)
    assert any(
        "[test-logs-wrong-key]" in line and "GET /v1/conversations 401" in line for line in lines
    )
    # Every line the chatbot logs while serving a request carries that request's id.
    access = [r for r in server_logs.records if r.name == "chatbot.access"]
    assert all(getattr(r, "request_id", "-") != "-" for r in access)
