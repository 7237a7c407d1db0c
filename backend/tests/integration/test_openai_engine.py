"""The ``openai`` engine driven through the chatbot's HTTP API, against model servers that
really generate: llama-cpp-python's OpenAI-compatible server on the bundled GGUF (behind a
recording proxy where the test must see what the chatbot sends), and, where usage must be
relayed, another chatbot on the embedded engine, which reports ``cached_tokens`` in
``usage.prompt_tokens_details`` as vLLM does with ``--enable-prompt-tokens-details``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from testbed.servers import Target

from chatbot.engines.openai import affinity_key
from tests.conftest import ALICE_KEY, BOB_KEY, LiveServer, Servers
from tests.sse import parse_events
from tests.upstream import (
    UPSTREAM_MODEL,
    RecordingProxy,
    check_killed_mid_answer,
    llama_server,
    recording_proxy,
    sdk_rounds,
)
from tests.waiting import wait_until

CONTEXT_TOKENS = 2048
AFFINITY_HEADER = "x-session-id"


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One short document: the knowledge preamble stays small, so llama_cpp.server's cold
    prefill (it is not what these tests are about) stays short."""
    folder = tmp_path_factory.mktemp("docs")
    (folder / "widgets.md").write_text("# Widgets\n\nA widget is a small part of a machine.\n")
    return folder


def front(servers: Servers, docs_dir: Path, base_url: str, **overrides: object) -> str:
    """A chatbot on the openai engine, pointed at ``base_url``."""
    return servers(
        engine="openai",
        openai_base_url=base_url,
        openai_affinity_header=AFFINITY_HEADER,
        context_tokens=CONTEXT_TOKENS,
        docs_dir=docs_dir,
        **overrides,
    ).url


@pytest.fixture(scope="module")
def upstream(model_path: Path) -> Iterator[Target]:
    with llama_server(model_path, context_tokens=CONTEXT_TOKENS) as server:
        yield server


@pytest.fixture(scope="module")
def proxied(
    upstream: Target, docs_dir: Path, module_server: Servers
) -> Iterator[tuple[str, RecordingProxy]]:
    """(the chatbot's URL, the proxy between it and llama_cpp.server)."""
    with recording_proxy(upstream.url) as (proxy_url, proxy):
        yield front(module_server, docs_dir, proxy_url), proxy


def client(url: str, key: str = ALICE_KEY) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def turn(http: httpx.Client, conversation_id: str, content: str, **options: Any) -> list[Any]:
    path = f"/v1/conversations/{conversation_id}/messages"
    with http.stream("POST", path, json={"content": content, **options}) as response:
        assert response.status_code == 200, response.read()
        return list(parse_events(response.iter_lines()))


def ended(events: list[Any]) -> dict[str, Any]:
    name, data = events[-1]
    assert name == "message.end", events
    assert data["status"] == "complete"
    assert data["content"]
    assert data["timing"]["ttft_ms"] > 0
    end: dict[str, Any] = data
    return end


def test_turns_stream_through_llama_cpp_server_with_one_affinity_key_per_conversation(
    proxied: tuple[str, RecordingProxy],
) -> None:
    url, proxy = proxied
    with client(url) as alice, client(url, BOB_KEY) as bob:
        assert alice.get("/readyz").json() == {"status": "ready", "model": UPSTREAM_MODEL}
        first = alice.post("/v1/conversations", json={}).json()["id"]
        second = bob.post("/v1/conversations", json={}).json()["id"]
        before = len(proxy.completions())
        turns = [
            ended(turn(alice, first, "What is a widget?")),
            ended(turn(bob, second, "Hello, who are you?")),
            ended(turn(alice, first, "Tell me more.")),
        ]
        messages = alice.get(f"/v1/conversations/{first}/messages").json()["data"]

    sent = proxy.completions()[before:]
    assert len(sent) == 3  # the rule router asks the model nothing
    keys = [exchange.headers[AFFINITY_HEADER] for exchange in sent]
    assert keys[0] == keys[2] == affinity_key(first)
    assert keys[1] == affinity_key(second) != keys[0]
    assert all(first not in value for e in sent for value in e.headers.values())
    bodies = [json.loads(exchange.body) for exchange in sent]
    assert all(b["stream"] and b["stream_options"] == {"include_usage": True} for b in bodies)
    # The third prompt is the first one, its answer and the new question.
    assert bodies[2]["messages"][: len(bodies[0]["messages"])] == bodies[0]["messages"]
    assert bodies[2]["messages"][len(bodies[0]["messages"])]["content"] == turns[0]["content"]
    # llama-cpp-python's server streams no usage; the chatbot reports none rather than zeros.
    assert all(t["usage"] is None for t in turns)
    assert [(m["role"], m["status"]) for m in messages] == [
        ("user", "complete"),
        ("assistant", "complete"),
    ] * 2


def test_the_openai_client_keeps_one_affinity_key_for_a_stateless_conversation(
    proxied: tuple[str, RecordingProxy],
) -> None:
    url, proxy = proxied
    before = len(proxy.completions())
    with openai.OpenAI(base_url=f"{url}/v1", api_key=ALICE_KEY, max_retries=0) as sdk:
        history: list[Any] = [{"role": "user", "content": "Name a colour."}]
        for question in ("And another one?", None):
            stream = sdk.chat.completions.create(
                model=UPSTREAM_MODEL, messages=history, stream=True, max_tokens=16
            )
            answer = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            assert answer
            history.append({"role": "assistant", "content": answer})
            if question:
                history.append({"role": "user", "content": question})
    keys = {e.headers[AFFINITY_HEADER] for e in proxy.completions()[before:]}
    assert len(keys) == 1


def test_a_client_that_hangs_up_cancels_the_upstream_request(
    proxied: tuple[str, RecordingProxy],
) -> None:
    url, proxy = proxied
    with client(url) as alice:
        conversation_id = alice.post("/v1/conversations", json={}).json()["id"]
        path = f"/v1/conversations/{conversation_id}/messages"
        body = {"content": "Count from one to one hundred.", "max_tokens": 400}
        with alice.stream("POST", path, json=body) as response:
            for name, _ in parse_events(response.iter_lines()):
                if name == "token":
                    break
        upstream_request = proxy.completions()[-1]
        wait_until(lambda: upstream_request.closed)
        assert not upstream_request.finished
        messages = f"/v1/conversations/{conversation_id}/messages"
        wait_until(lambda: alice.get(messages).json()["data"][-1]["status"] == "cancelled")


def test_usage_and_cached_tokens_are_relayed_from_the_model_server(
    live_server: LiveServer, docs_dir: Path, server: Servers
) -> None:
    """The model server is another chatbot on the embedded engine: it reports
    ``prompt_tokens_details.cached_tokens``, the field vLLM fills."""
    model = live_server.state.engine.model_id
    url = front(
        server, docs_dir, f"{live_server.url}/v1", openai_api_key=ALICE_KEY, openai_model=model
    )
    with client(url) as alice:
        conversation_id = alice.post("/v1/conversations", json={}).json()["id"]
        one = ended(turn(alice, conversation_id, "What is a widget?"))["usage"]
        two = ended(turn(alice, conversation_id, "Where is it used?"))["usage"]
    assert one["prompt_tokens"] > 0
    assert one["completion_tokens"] > 0
    # The second prompt extends the first, which the model server had kept.
    assert two["prompt_tokens"] > one["prompt_tokens"]
    assert two["cached_tokens"] >= one["prompt_tokens"]

    rounds = sdk_rounds(url, model, "Say something about widgets.", "Go on.")
    first, second = (usage for _, usage in rounds)
    cached = second.prompt_tokens_details
    assert cached is not None
    assert cached.cached_tokens is not None
    assert cached.cached_tokens >= first.prompt_tokens


def test_a_model_server_that_dies_mid_answer(
    model_path: Path, docs_dir: Path, server: Servers
) -> None:
    """SIGKILL mid-stream: an ``error`` event, the conversation keeps every earlier message
    and the failed answer, and the next message is a quick 503 with ``Retry-After``."""
    with llama_server(model_path, context_tokens=CONTEXT_TOKENS) as upstream:
        process = upstream.process
        assert process is not None
        url = front(server, docs_dir, upstream.url, max_tokens=400)
        with client(url) as alice:
            conversation_id = alice.post("/v1/conversations", json={}).json()["id"]
            ended(turn(alice, conversation_id, "What is a widget?"))

            def kill() -> None:
                process.kill()  # SIGKILL: gone mid-sentence, connections and all
                process.wait(timeout=30)

            body = {"content": "Count from one to one hundred."}
            check_killed_mid_answer(alice, conversation_id, body, kill)


def test_a_model_server_that_is_down_at_start(
    docs_dir: Path, server: Servers, unused_port: int
) -> None:
    url = front(server, docs_dir, f"http://127.0.0.1:{unused_port}/v1")
    with client(url) as alice:
        assert alice.get("/healthz").status_code == 200
        assert alice.get("/readyz").status_code == 503
        conversation_id = alice.post("/v1/conversations", json={}).json()["id"]
        refused = alice.post(
            f"/v1/conversations/{conversation_id}/messages", json={"content": "Hello"}
        )
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "engine_unreachable"


@pytest.fixture
def unused_port() -> int:
    from chatbot.client.local_server import free_port

    return free_port()
