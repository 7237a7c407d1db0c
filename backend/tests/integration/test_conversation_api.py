"""The native API on the real model, over real HTTP: streamed turns, cache reuse,
disconnects, isolation."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from chatbot.engines.embedded import EmbeddedEngine
from tests.conftest import BOB_KEY, LiveServer
from tests.sse import parse_events
from tests.waiting import engine_running, wait_until


def new_conversation(client: httpx.Client, **body: Any) -> str:
    response = client.post("/v1/conversations", json=body)
    assert response.status_code == 201, response.text
    conversation_id: str = response.json()["id"]
    return conversation_id


def stream_turn(
    client: httpx.Client, conversation_id: str, content: str, **extra: Any
) -> list[tuple[str, Any]]:
    with client.stream(
        "POST", f"/v1/conversations/{conversation_id}/messages", json={"content": content, **extra}
    ) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(parse_events(response.iter_lines()))


def engine(server: LiveServer) -> EmbeddedEngine:
    assert isinstance(server.state.engine, EmbeddedEngine)
    return server.state.engine


def test_streamed_turn_sends_start_tokens_and_end(live_server: LiveServer) -> None:
    with live_server.client() as client:
        conversation_id = new_conversation(client, title="Geography")
        events = stream_turn(client, conversation_id, "What is the capital of Italy?")

    names = [name for name, _ in events]
    assert names[0] == "message.start"
    assert names[-1] == "message.end"
    assert names.count("token") >= 2, "tokens must stream one by one"
    start, end = events[0][1], events[-1][1]
    assert start["conversation_id"] == conversation_id
    assert end["message_id"] == start["message_id"]
    assert end["status"] == "complete"
    streamed = "".join(data["delta"] for name, data in events if name == "token")
    assert end["content"] == streamed
    assert streamed.strip()
    assert end["usage"]["prompt_tokens"] > 100  # the few-shot preamble alone is longer
    assert end["usage"]["completion_tokens"] >= 1
    timing = end["timing"]
    assert 0 < timing["ttft_ms"] <= timing["total_ms"]
    assert 0 < timing["prefill_ms"] <= timing["ttft_ms"]


def test_second_turn_reuses_the_first_turns_kv_cache(live_server: LiveServer) -> None:
    with live_server.client() as client:
        conversation_id = new_conversation(client)
        first = stream_turn(client, conversation_id, "Name a large animal.")[-1][1]
        computed_before = engine(live_server).context.evaluated_tokens()
        second = stream_turn(client, conversation_id, "Where does it live?")[-1][1]
        computed_after = engine(live_server).context.evaluated_tokens()
        stored = client.get(f"/v1/conversations/{conversation_id}/messages").json()["data"]

    usage1, usage2 = first["usage"], second["usage"]
    # Turn 2's prompt extends turn 1's token for token: all of it is reused, and some of
    # the answer the model wrote, which the context still holds.
    assert usage1["prompt_tokens"] <= usage2["cached_tokens"] < usage2["prompt_tokens"]
    assert usage2["cached_tokens"] <= usage1["prompt_tokens"] + usage1["completion_tokens"]
    # llama.cpp's own counter agrees: everything it evaluated before the first sample (its
    # "prompt eval" batch) is exactly the prompt tokens we report as not cached.
    prompt_evaluated = computed_after[0] - computed_before[0]
    assert prompt_evaluated == usage2["prompt_tokens"] - usage2["cached_tokens"]

    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]
    assert stored[3]["usage"] == usage2
    assert stored[3]["status"] == "complete"
    assert stored[3]["content"] == second["content"]


def test_non_streamed_turn_returns_the_stored_message(live_server: LiveServer) -> None:
    with live_server.client() as client:
        conversation_id = new_conversation(client)
        response = client.post(
            f"/v1/conversations/{conversation_id}/messages",
            json={"content": "Say hello.", "stream": False},
        )
        assert response.status_code == 200, response.text
        message = response.json()
        stored = client.get(f"/v1/conversations/{conversation_id}/messages").json()["data"]
    assert message["role"] == "assistant"
    assert message["status"] == "complete"
    assert stored[-1] == message


def test_a_client_that_disconnects_frees_the_engine(live_server: LiveServer) -> None:
    with live_server.client() as client:
        conversation_id = new_conversation(client)
        with client.stream(
            "POST",
            f"/v1/conversations/{conversation_id}/messages",
            json={
                "content": "Count from one to five hundred, in words.",
                "max_tokens": 1500,
                "temperature": 0.0,
            },
        ) as response:
            for name, _ in parse_events(response.iter_lines()):
                if name == "token":
                    break  # leave after the first token: the body is closed unread
        # 1,500 tokens would keep the engine busy for over half a minute.
        wait_until(lambda: not engine_running(engine(live_server)), timeout=10)
        path = f"/v1/conversations/{conversation_id}/messages"
        wait_until(lambda: len(client.get(path).json()["data"]) == 2)
        stored = client.get(path).json()["data"]
        assert stored[-1]["role"] == "assistant"
        assert stored[-1]["status"] == "cancelled"
        assert stored[-1]["content"], "what was streamed before the disconnect is kept"
        # The conversation goes on, and the engine serves the next turn.
        events = stream_turn(client, conversation_id, "Thanks, that is enough.")
        assert events[-1][0] == "message.end"


def test_users_see_only_their_own_conversations(live_server: LiveServer) -> None:
    with live_server.client() as alice, live_server.client(BOB_KEY) as bob:
        mine = new_conversation(alice, title="alice's secrets")
        assert mine not in [c["id"] for c in bob.get("/v1/conversations").json()["data"]]
        assert mine in [c["id"] for c in alice.get("/v1/conversations").json()["data"]]
        for method, path, body in [
            ("GET", f"/v1/conversations/{mine}", None),
            ("PATCH", f"/v1/conversations/{mine}", {"title": "taken"}),
            ("GET", f"/v1/conversations/{mine}/messages", None),
            ("POST", f"/v1/conversations/{mine}/messages", {"content": "hi"}),
            ("DELETE", f"/v1/conversations/{mine}", None),
        ]:
            response = bob.request(method, path, json=body)
            assert response.status_code == 404, (method, path)
            assert response.json()["error"]["code"] == "conversation_not_found"
        assert alice.get(f"/v1/conversations/{mine}").json()["title"] == "alice's secrets"
        assert alice.get(f"/v1/conversations/{mine}/messages").json()["data"] == []


def test_conversations_crud_and_pagination(live_server: LiveServer) -> None:
    with live_server.client(BOB_KEY) as bob:
        ids = [new_conversation(bob, title=f"c{i}") for i in range(3)]
        page = bob.get("/v1/conversations", params={"limit": 2}).json()
        assert [c["id"] for c in page["data"]] == ids[::-1][:2]
        assert page["has_more"]
        rest = bob.get(
            "/v1/conversations", params={"limit": 2, "after": page["data"][-1]["id"]}
        ).json()
        assert rest["data"][0]["id"] == ids[0]
        renamed = bob.patch(f"/v1/conversations/{ids[0]}", json={"title": "renamed"})
        assert renamed.status_code == 200
        assert renamed.json()["title"] == "renamed"
        assert bob.delete(f"/v1/conversations/{ids[0]}").status_code == 204
        assert bob.get(f"/v1/conversations/{ids[0]}").status_code == 404


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health_endpoints(live_server: LiveServer, path: str) -> None:
    with live_server.client(key=None) as anonymous:
        assert anonymous.get(path).status_code == 200


def test_a_queued_request_whose_client_leaves_gives_up_its_place(
    live_server: LiveServer,
) -> None:
    long_answer = {"content": "Count from one to five hundred, in words.", "max_tokens": 1500}
    with live_server.client(BOB_KEY) as bob, live_server.client() as alice:
        running = new_conversation(bob)
        queued = new_conversation(alice)
        with bob.stream("POST", f"/v1/conversations/{running}/messages", json=long_answer):
            with alice.stream(
                "POST", f"/v1/conversations/{queued}/messages", json=long_answer
            ) as response:
                assert response.status_code == 200
                assert engine(live_server).queue_depth == 1
            # Alice left while waiting: her place is freed while Bob's answer still runs.
            wait_until(lambda: engine(live_server).queue_depth == 0)
            assert engine_running(engine(live_server))
        path = f"/v1/conversations/{queued}/messages"
        wait_until(lambda: len(alice.get(path).json()["data"]) == 2)
        assert alice.get(path).json()["data"][1]["status"] == "cancelled"
