"""Conversations survive the process: SIGKILL in the middle of a streamed answer, a graceful
stop, and two API processes on one PostgreSQL continuing one conversation. Each server is a
real ``chatbot serve`` process on the real model; each store a real database."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.postgres import fresh_database
from tests.processes import BOB_KEY, ChatbotProcess, chatbot_process
from tests.sse import parse_events

LONG_ANSWER = "Count from one to five hundred, in words."


def turn(client: httpx.Client, conversation: str, content: str, **body: Any) -> dict[str, Any]:
    response = client.post(
        f"/v1/conversations/{conversation}/messages",
        json={"content": content, "stream": False, **body},
    )
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def messages(client: httpx.Client, conversation: str) -> list[dict[str, Any]]:
    response = client.get(f"/v1/conversations/{conversation}/messages")
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data


def stream_until_tokens(
    client: httpx.Client, conversation: str, content: str, tokens: int
) -> Iterator[None]:
    """Streams an answer; yields (once) after ``tokens`` token events, and reads on after."""
    with client.stream(
        "POST",
        f"/v1/conversations/{conversation}/messages",
        json={"content": content, "max_tokens": 1500},
    ) as response:
        assert response.status_code == 200
        seen = 0
        for event, _ in parse_events(response.iter_lines()):
            seen += event == "token"
            if seen == tokens:
                yield
                return


def stopped_cleanly(server: ChatbotProcess) -> None:
    # uvicorn exits through the signal it caught, once the lifespan's shutdown is done.
    assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in server.logs()


@pytest.mark.parametrize("store_url", ["sqlite", "postgresql"], indirect=True)
def test_sigkill_mid_answer_keeps_every_message_and_marks_the_turn_retryable(
    store_url: str, model_path: Path, tmp_path: Path
) -> None:
    log = tmp_path / "server.log"
    with (
        chatbot_process(model_path, tmp_path / "kv", log, store_url=store_url) as server,
        server.client() as client,
    ):
        conversation = client.post(
            "/v1/conversations", json={"title": "crash", "agent": "assistant"}
        ).json()["id"]
        first = turn(client, conversation, "What is a KV cache?")
        for _ in stream_until_tokens(client, conversation, LONG_ANSWER, tokens=3):
            server.kill()  # in the middle of the answer: nothing of the process runs after

    with (
        chatbot_process(model_path, tmp_path / "kv", log, store_url=store_url) as restarted,
        restarted.client() as client,
    ):
        listed = client.get("/v1/conversations").json()["data"]
        assert [c["id"] for c in listed] == [conversation]
        history = messages(client, conversation)
        assert [(m["role"], m["status"]) for m in history] == [
            ("user", "complete"),
            ("assistant", "complete"),
            ("user", "complete"),
            ("assistant", "failed"),
        ]
        assert history[1]["content"] == first["content"]
        assert history[2]["content"] == LONG_ANSWER
        assert history[3]["error"] == "interrupted"

        # Retrying is sending the question again: the failed turn is left out of the prompt.
        retried = turn(client, conversation, LONG_ANSWER, max_tokens=8)
        assert retried["status"] == "complete"
        assert len(messages(client, conversation)) == 6


def test_sigterm_lets_the_answer_being_streamed_finish(model_path: Path, tmp_path: Path) -> None:
    store_url = f"sqlite:///{tmp_path / 'chatbot.db'}"
    log = tmp_path / "server.log"
    with (
        chatbot_process(model_path, tmp_path / "kv", log, store_url=store_url) as server,
        server.client() as client,
    ):
        conversation = client.post(
            "/v1/conversations", json={"title": "drain", "agent": "assistant"}
        ).json()["id"]
        with client.stream(
            "POST",
            f"/v1/conversations/{conversation}/messages",
            json={"content": LONG_ANSWER, "max_tokens": 48},
        ) as response:
            events = parse_events(response.iter_lines())
            assert next(events)[0] == "message.start"
            server.process.send_signal(signal.SIGTERM)  # SIGTERM: drain
            rest = list(events)
        assert rest[-1][0] == "message.end"
        assert rest[-1][1]["status"] == "complete"
        stopped_cleanly(server)
        with pytest.raises(httpx.TransportError):
            client.get("/healthz")  # no longer accepting

    with (
        chatbot_process(model_path, tmp_path / "kv", log, store_url=store_url) as restarted,
        restarted.client() as client,
    ):
        history = messages(client, conversation)
        assert [m["status"] for m in history] == ["complete", "complete"]
        assert history[1]["content"] == rest[-1][1]["content"]


def test_a_drain_that_runs_out_stores_the_answer_as_far_as_it_got(
    model_path: Path, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{tmp_path / 'chatbot.db'}"
    log = tmp_path / "server.log"
    # The answer must outlast the drain whatever the model chooses to say, and the small
    # model's answers are often a dozen tokens: the simulated engine (a timing model, named
    # as the fake it is) answers 400 tokens at 20 a second, so 20 s against a 1 s drain.
    slow = {"engine": "simulated", "simulated_decode_tokens_per_s": 20}
    slow |= {"simulated_answer_tokens": 400}
    with (
        chatbot_process(
            model_path, tmp_path / "kv", log, store_url=store_url, drain_seconds=1, **slow
        ) as server,
        server.client() as client,
    ):
        conversation = client.post(
            "/v1/conversations", json={"title": "cut", "agent": "assistant"}
        ).json()["id"]
        events: list[tuple[str, Any]] = []
        with client.stream(
            "POST",
            f"/v1/conversations/{conversation}/messages",
            json={"content": LONG_ANSWER, "max_tokens": 1500},
        ) as response:
            for event in parse_events(response.iter_lines()):
                events.append(event)
                if [name for name, _ in events].count("token") == 2:
                    server.process.send_signal(signal.SIGTERM)  # and read on
        # Never a complete answer, never a cut: the stream's last event says why it ended.
        names = [name for name, _ in events]
        assert names.count("token") >= 2  # SIGTERM came mid-answer
        assert "message.end" not in names
        assert events[-1][1]["error"]["code"] == "server_shutting_down"
        stopped_cleanly(server)

    with (
        chatbot_process(model_path, tmp_path / "kv", log, store_url=store_url, **slow) as restarted,
        restarted.client() as client,
    ):
        history = messages(client, conversation)
        assert history[-1]["status"] == "cancelled"
        assert history[-1]["content"]  # what was generated before the stop is kept


def test_two_api_processes_on_one_postgresql_continue_one_conversation(
    postgres_url: str, model_path: Path, tmp_path: Path
) -> None:
    store_url = fresh_database(postgres_url)
    with (
        chatbot_process(
            model_path, tmp_path / "kv-a", tmp_path / "a.log", store_url=store_url
        ) as a,
        chatbot_process(
            model_path, tmp_path / "kv-b", tmp_path / "b.log", store_url=store_url
        ) as b,
        a.client() as on_a,
        b.client() as on_b,
        b.client(BOB_KEY) as bob,
    ):
        conversation = on_a.post(
            "/v1/conversations", json={"title": "two", "agent": "assistant"}
        ).json()["id"]
        first = turn(on_a, conversation, "What is a KV cache?")
        second = turn(on_b, conversation, "Say that again in one sentence.")
        # Replica B's prompt carried the first exchange, read from the shared store.
        assert second["usage"]["prompt_tokens"] > (
            first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]
        )
        assert [m["id"] for m in messages(on_a, conversation)] == [
            m["id"] for m in messages(on_b, conversation)
        ]
        assert len(messages(on_a, conversation)) == 4

        # One turn at a time across replicas.
        for _ in stream_until_tokens(on_a, conversation, LONG_ANSWER, tokens=1):
            busy = on_b.post(
                f"/v1/conversations/{conversation}/messages",
                json={"content": "Hello?", "stream": False},
            )
            assert busy.status_code == 409
            assert busy.json()["error"]["code"] == "turn_in_progress"

        renamed = on_b.patch(f"/v1/conversations/{conversation}", json={"title": "renamed"})
        assert renamed.status_code == 200
        assert on_a.get(f"/v1/conversations/{conversation}").json()["title"] == "renamed"
        # Isolation holds on every replica.
        assert bob.get(f"/v1/conversations/{conversation}").status_code == 404
