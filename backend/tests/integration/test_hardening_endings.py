"""Clean endings: a stop whose drain runs out ends every open stream with a last event (native:
``error`` server_shutting_down; OpenAI: an error chunk, then ``[DONE]``) instead of a cut, and
a non-streamed answer with 503 server_shutting_down; a
silent stream gets keep-alive comments that clients skip; a new message right after a Stop
waits for the stopped turn instead of getting 409."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import ALICE_KEY, LiveServer
from tests.integration.test_conversation_api import new_conversation
from tests.processes import ChatbotProcess, chatbot_process
from tests.sse import parse_events

LONG_ANSWER = "Count from one to five hundred, in words."
# The simulated engine (a timing model, a fake named as such) answers at a pace a test can
# set: 400 tokens at 5 a second outlast a 1 s drain whatever a small model would say, and
# leave 200 ms between tokens for keep-alives to fill.
SLOW = {
    "engine": "simulated",
    "simulated_decode_tokens_per_s": 5,
    "simulated_answer_tokens": 400,
    "sse_keepalive_seconds": 0.1,
    "drain_seconds": 1,
}


@pytest.fixture
def slow_server(model_path: Path, tmp_path: Path) -> Iterator[ChatbotProcess]:
    with chatbot_process(model_path, tmp_path / "kv", tmp_path / "server.log", **SLOW) as server:
        yield server


def _read(response: httpx.Response, into: list[str], tokens: threading.Event) -> None:
    for line in response.iter_lines():
        into.append(line)
        if sum(1 for seen in into if seen.startswith("data:")) >= 3:
            tokens.set()


def test_past_the_drain_each_open_stream_ends_with_a_last_event(
    slow_server: ChatbotProcess,
) -> None:
    lines: dict[str, list[str]] = {"native": [], "openai": []}
    started = {name: threading.Event() for name in lines}
    failures: list[BaseException] = []

    def native() -> None:
        with slow_server.client() as client:
            conversation = new_conversation(client, agent="assistant")
            with client.stream(
                "POST",
                f"/v1/conversations/{conversation}/messages",
                json={"content": LONG_ANSWER, "max_tokens": 400},
            ) as response:
                _read(response, lines["native"], started["native"])

    def completions() -> None:
        with slow_server.client() as client:
            model = client.get("/v1/models").json()["data"][0]["id"]
            body = {
                "model": model,
                "stream": True,
                "max_tokens": 400,
                "messages": [{"role": "user", "content": LONG_ANSWER}],
            }
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                _read(response, lines["openai"], started["openai"])

    answers: list[httpx.Response] = []

    def not_streamed() -> None:
        with slow_server.client() as client:
            conversation = new_conversation(client, agent="assistant")
            answers.append(
                client.post(
                    f"/v1/conversations/{conversation}/messages",
                    json={"content": LONG_ANSWER, "max_tokens": 400, "stream": False},
                )
            )

    def run(target: Any) -> None:
        try:
            target()
        except BaseException as exc:  # a cut stream raises here: the test reports it
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(f,)) for f in (native, completions, not_streamed)]
    for thread in threads:
        thread.start()
    for event in started.values():
        assert event.wait(timeout=60)
    slow_server.process.send_signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures, failures
    # Both ended about when the drain ran out, not when uvicorn would have cut them.
    assert time.monotonic() - stopped_at < 5

    native_events = list(parse_events([*lines["native"], ""]))
    names = [name for name, _ in native_events]
    assert names[0] == "message.start"
    assert "token" in names
    assert "message.end" not in names
    assert native_events[-1] == (
        "error",
        {
            "error": {
                "type": "service_unavailable",
                "message": "the server is shutting down: the answer was stopped and stored "
                "as far as it got",
                "code": "server_shutting_down",
            }
        },
    )
    openai_events = list(parse_events([*lines["openai"], ""]))
    assert openai_events[-1] == ("message", "[DONE]")
    assert openai_events[-2][1]["error"]["code"] == "server_shutting_down"
    assert not any(c.get("finish_reason") for _, d in openai_events[:-2] for c in d["choices"])
    # A non-streamed answer cut by the drain is a 503 that says why.
    assert answers[0].status_code == 503
    assert answers[0].json()["error"]["code"] == "server_shutting_down"
    assert slow_server.process.wait(timeout=60) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in slow_server.logs()
    assert "Cancel" not in slow_server.logs()  # uvicorn had nothing left to cancel


def test_a_silent_stream_gets_keep_alive_comments_that_clients_skip(
    slow_server: ChatbotProcess,
) -> None:
    with slow_server.client() as client:
        conversation = new_conversation(client, agent="assistant")
        with client.stream(
            "POST",
            f"/v1/conversations/{conversation}/messages",
            json={"content": LONG_ANSWER, "max_tokens": 4},
        ) as response:
            lines = list(response.iter_lines())
        model = client.get("/v1/models").json()["data"][0]["id"]
    assert lines.count(": keep-alive") >= 2
    events = list(parse_events(lines))
    assert [n for n, _ in events].count("token") == 4
    assert events[-1][0] == "message.end"
    # The official client reads through them.
    sdk = openai.OpenAI(base_url=f"{slow_server.url}/v1", api_key=ALICE_KEY)
    chunks = list(
        sdk.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": LONG_ANSWER}],
            max_tokens=3,
            stream=True,
        )
    )
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks)


def _stop_after_first_token(client: httpx.Client, conversation: str) -> None:
    with client.stream(
        "POST",
        f"/v1/conversations/{conversation}/messages",
        json={"content": LONG_ANSWER, "max_tokens": 1500},
    ) as response:
        for name, _ in parse_events(response.iter_lines()):
            if name == "token":
                return  # closes the connection with the answer unread: the Stop button


def test_a_new_message_right_after_a_stop_is_answered_not_409(live_server: LiveServer) -> None:
    with live_server.client() as client:
        conversation = new_conversation(client, agent="assistant")
        for _ in range(5):
            _stop_after_first_token(client, conversation)
            again = client.post(
                f"/v1/conversations/{conversation}/messages",
                json={"content": "Just say hello.", "stream": False, "max_tokens": 2},
            )
            assert again.status_code == 200, again.text
        stored = client.get(f"/v1/conversations/{conversation}/messages").json()["data"]
    statuses = [m["status"] for m in stored if m["role"] == "assistant"]
    assert statuses == ["cancelled", "complete"] * 5


def test_a_message_while_an_answer_is_still_generating_gets_409_at_once(
    slow_server: ChatbotProcess,
) -> None:
    """On the slow engine, so that the answer is surely still running."""
    with slow_server.client() as client:
        conversation = new_conversation(client, agent="assistant")
        with client.stream(
            "POST",
            f"/v1/conversations/{conversation}/messages",
            json={"content": LONG_ANSWER, "max_tokens": 1500},
        ) as response:
            # Read up to the first token, and keep the stream open: a generator left
            # behind would close the connection, which is a Stop.
            events = parse_events(response.iter_lines())
            while next(events)[0] != "token":
                pass
            asked = time.monotonic()
            busy = client.post(
                f"/v1/conversations/{conversation}/messages",
                json={"content": "Hello?", "stream": False},
            )
            waited = time.monotonic() - asked
    assert busy.status_code == 409
    assert busy.json()["error"]["code"] == "turn_in_progress"
    assert waited < 1.0
