"""Limits that need a server configured for them: requests per user per minute, answers at
once for all users, messages per conversation. Each refusal is a precise status with a JSON
error and, where waiting helps, ``Retry-After``; nothing is stored for a refused turn.
(Message and body size, streams per user and the engine queue: test_errors.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ALICE_KEY, BOB_KEY, LiveServer, Servers
from tests.sse import parse_events

LONG_ANSWER = {"content": "Count from one to five hundred, in words.", "max_tokens": 1500}


@pytest.fixture(scope="module")
def tight_server(model_path: Path, module_server: Servers) -> LiveServer:
    return module_server(model_path, max_streams=1, max_conversation_messages=4, queue_size=4)


def conversation(server: LiveServer, key: str) -> str:
    with server.client(key) as client:
        created = client.post("/v1/conversations", json={"title": "t", "agent": "assistant"})
        assert created.status_code == 201
        identifier: str = created.json()["id"]
        return identifier


def test_429_past_the_requests_per_minute_of_one_user(model_path: Path, server: Servers) -> None:
    limited = server(model_path, requests_per_minute=3)
    with limited.client(ALICE_KEY) as alice, limited.client(BOB_KEY) as bob:
        for _ in range(3):
            assert alice.get("/v1/conversations").status_code == 200
        refused = alice.get("/v1/conversations")
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "too_many_requests"
        assert refused.headers["retry-after"] == "20"  # one request back every 20 s
        assert bob.get("/v1/conversations").status_code == 200  # a budget of his own


def test_503_past_the_answers_at_once_for_all_users(tight_server: LiveServer) -> None:
    mine, theirs = conversation(tight_server, ALICE_KEY), conversation(tight_server, BOB_KEY)
    with tight_server.client(ALICE_KEY) as alice, tight_server.client(BOB_KEY) as bob:
        path = f"/v1/conversations/{mine}/messages"
        with alice.stream("POST", path, json=LONG_ANSWER) as running:
            assert running.status_code == 200
            events = parse_events(running.iter_lines())
            assert next(events)[0] == "message.start"
            refused = bob.post(
                f"/v1/conversations/{theirs}/messages", json={"content": "Hi", "stream": False}
            )
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "server_busy"
        assert refused.headers["retry-after"] == "1"
        stored = bob.get(f"/v1/conversations/{theirs}/messages").json()["data"]
        assert stored == []


def test_413_past_the_messages_of_one_conversation(tight_server: LiveServer) -> None:
    mine = conversation(tight_server, ALICE_KEY)
    path = f"/v1/conversations/{mine}/messages"
    with tight_server.client(ALICE_KEY) as alice:
        for question in ("Hello!", "How are you?"):
            answered = alice.post(path, json={"content": question, "stream": False})
            assert answered.status_code == 200
        refused = alice.post(path, json={"content": "And now?", "stream": False})
        assert refused.status_code == 413
        assert refused.json()["error"]["code"] == "conversation_too_long"
        assert len(alice.get(path).json()["data"]) == 4
