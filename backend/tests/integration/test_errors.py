"""Every error status of the API, each with its JSON body, over real HTTP."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from tests.conftest import BOB_KEY, CAROL_KEY, LiveServer
from tests.waiting import wait_until

LONG_ANSWER = {"content": "Count from one to five hundred, in words.", "max_tokens": 1500}


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert error["type"]
    return error


@pytest.fixture
def conversation(live_server: LiveServer) -> str:
    with live_server.client() as client:
        conversation_id: str = client.post("/v1/conversations", json={}).json()["id"]
        return conversation_id


def test_400_malformed_json(live_server: LiveServer) -> None:
    with live_server.client() as client:
        response = client.post(
            "/v1/conversations", content=b"{not json", headers={"content-type": "application/json"}
        )
    assert_error(response, 400, "invalid_json")


def test_400_max_tokens_over_the_servers_limit(live_server: LiveServer, conversation: str) -> None:
    with live_server.client() as client:
        response = client.post(
            f"/v1/conversations/{conversation}/messages",
            json={"content": "hi", "max_tokens": 100_000},
        )
        assert_error(response, 400, "max_tokens_too_large")
        # Nothing was stored for a refused message.
        assert client.get(f"/v1/conversations/{conversation}/messages").json()["data"] == []


def test_400_prompt_longer_than_the_context(live_server: LiveServer) -> None:
    words = " ".join(f"word{i}" for i in range(2500))
    body = {
        "model": live_server.state.engine.model_id,
        "messages": [{"role": "user", "content": words}] * 2,
    }
    with live_server.client() as client:
        assert_error(client.post("/v1/chat/completions", json=body), 400, "context_length_exceeded")


@pytest.mark.parametrize("header", [None, "Bearer wrong-key-0123456789", "Basic abc"])
def test_401_without_a_valid_key(live_server: LiveServer, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    with httpx.Client(base_url=live_server.url, headers=headers) as client:
        response = client.get("/v1/conversations")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["type"] == "authentication_error"


def test_404_unknown_conversation_model_and_route(live_server: LiveServer) -> None:
    with live_server.client() as client:
        assert_error(client.get("/v1/conversations/conv_nope"), 404, "conversation_not_found")
        body = {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}
        assert_error(client.post("/v1/chat/completions", json=body), 404, "model_not_found")
        assert_error(client.get("/v1/nothing-here"), 404, "not_found")


def test_409_second_message_while_an_answer_streams(
    live_server: LiveServer, conversation: str
) -> None:
    path = f"/v1/conversations/{conversation}/messages"
    with live_server.client() as client:
        with client.stream("POST", path, json=LONG_ANSWER) as running:
            assert running.status_code == 200
            assert_error(client.post(path, json={"content": "and?"}), 409, "turn_in_progress")
            assert_error(
                client.delete(f"/v1/conversations/{conversation}"), 409, "turn_in_progress"
            )
        # Once the server has seen the client go, the cut-short answer is stored.
        wait_until(lambda: len(client.get(path).json()["data"]) == 2)
        roles = [m["role"] for m in client.get(path).json()["data"]]
    assert roles == ["user", "assistant"]


def test_413_body_and_message_too_large(live_server: LiveServer, conversation: str) -> None:
    path = f"/v1/conversations/{conversation}/messages"
    with live_server.client() as client:
        assert_error(client.post(path, json={"content": "x" * 70_000}), 413, "payload_too_large")
        assert_error(client.post(path, json={"content": "x" * 4001}), 413, "message_too_large")
        assert client.get(path).json()["data"] == []


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/conversations/{id}/messages", {"content": ""}),
        ("POST", "/v1/conversations/{id}/messages", {"content": "   "}),
        ("POST", "/v1/conversations/{id}/messages", {"text": "wrong field"}),
        ("POST", "/v1/conversations", {"title": ""}),
        ("PATCH", "/v1/conversations/{id}", {"title": "t" * 201}),
        ("GET", "/v1/conversations?limit=0", None),
        ("POST", "/v1/chat/completions", {"model": "m", "messages": []}),
    ],
)
def test_422_invalid_fields(
    live_server: LiveServer, conversation: str, method: str, path: str, body: Any
) -> None:
    with live_server.client() as client:
        response = client.request(method, path.format(id=conversation), json=body)
    assert_error(response, 422, "validation_error")


def hold_streaming_answer(stack: ExitStack, client: httpx.Client, conversation_id: str) -> None:
    """Start a long answer and keep it streaming until ``stack`` closes."""
    response = stack.enter_context(
        client.stream("POST", f"/v1/conversations/{conversation_id}/messages", json=LONG_ANSWER)
    )
    assert response.status_code == 200


def test_429_too_many_streams_for_one_user(live_server: LiveServer) -> None:
    with live_server.client(CAROL_KEY) as carol, ExitStack() as streams:
        conversations = [carol.post("/v1/conversations", json={}).json()["id"] for _ in range(3)]
        for conversation_id in conversations[:2]:  # the limit is 2 per user
            hold_streaming_answer(streams, carol, conversation_id)
        third = carol.post(f"/v1/conversations/{conversations[2]}/messages", json=LONG_ANSWER)
        assert_error(third, 429, "too_many_streams")
        assert third.headers["retry-after"] == "1"


def test_503_when_the_engine_queue_is_full(live_server: LiveServer) -> None:
    clients = [live_server.client(key) for key in (BOB_KEY, CAROL_KEY)]
    with ExitStack() as stack:
        bob, carol = (stack.enter_context(c) for c in clients)
        running, waiting, refused = (
            c.post("/v1/conversations", json={}).json()["id"] for c in (bob, carol, bob)
        )
        # One answer runs and one waits (the queue holds 1): a third finds the engine full.
        for client, conversation_id in ((bob, running), (carol, waiting)):
            hold_streaming_answer(stack, client, conversation_id)
        response = bob.post(f"/v1/conversations/{refused}/messages", json=LONG_ANSWER)
        assert_error(response, 503, "engine_overloaded")
        assert int(response.headers["retry-after"]) >= 1
        assert bob.get(f"/v1/conversations/{refused}/messages").json()["data"] == []
