"""The agents on the real model through the HTTP API: routing, pinning, the knowledge agent
and its shared documents, a cache that keeps covering the history across agent switches,
and compaction at a stable boundary when the window fills."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatbot.agents.router import routing_prompt
from tests.conftest import BOB_KEY, CAROL_KEY, LiveServer, Servers
from tests.integration.test_conversation_api import new_conversation, stream_turn
from tests.prompts import public_tokens

KV_QUESTION = "How does the KV cache keep saved states in RAM and on disk?"


def ends(events: list[tuple[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``message.start`` and ``message.end`` payloads of a streamed turn."""
    named = dict(events)
    assert {"message.start", "message.end"} <= named.keys(), events
    return named["message.start"], named["message.end"]


def metric(server: LiveServer, name: str, **labels: str) -> float:
    with server.client() as client:
        text = client.get("/metrics").text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_the_router_picks_an_agent_per_turn_and_switching_keeps_the_cache(
    live_server: LiveServer,
) -> None:
    breaks_before = metric(live_server, "chatbot_prefix_breaks_total")
    turns = [
        ("Write one sentence about the sea.", "assistant", "general conversation"),
        (KV_QUESTION, "knowledge", "about kv-cache.md"),
        ("Please summarise our conversation so far.", "summarizer", "asks for a summary"),
        ("Thanks! What is 2 plus 2?", "assistant", "general conversation"),
    ]
    with live_server.client() as alice:
        conversation = new_conversation(alice)
        previous_prompt = 0
        for content, agent, reason in turns:
            start, end = ends(stream_turn(alice, conversation, content))
            assert (start["agent"], start["route_reason"]) == (agent, reason)
            assert (end["agent"], end["route_reason"]) == (agent, reason)
            # The whole previous prompt, whatever agent it went to, is served from cache.
            assert end["usage"]["cached_tokens"] >= previous_prompt
            previous_prompt = end["usage"]["prompt_tokens"]
        stored = alice.get(f"/v1/conversations/{conversation}/messages").json()["data"]
    answers = [m for m in stored if m["role"] == "assistant"]
    assert [m["agent"] for m in answers] == [agent for _, agent, _ in turns]
    assert answers[1]["route_reason"] == "about kv-cache.md"
    assert metric(live_server, "chatbot_prefix_breaks_total") == breaks_before
    assert metric(live_server, "chatbot_ttft_seconds_count", agent="knowledge") >= 1


def test_a_pinned_conversation_keeps_its_agent(live_server: LiveServer) -> None:
    with live_server.client() as alice:
        conversation = new_conversation(alice, agent="knowledge")
        assert alice.get(f"/v1/conversations/{conversation}").json()["agent"] == "knowledge"
        start, end = ends(stream_turn(alice, conversation, "Hello there!"))
    assert (start["agent"], start["route_reason"]) == ("knowledge", "pinned")
    assert end["agent"] == "knowledge"


def test_an_unknown_agent_is_refused(live_server: LiveServer) -> None:
    with live_server.client() as alice:
        response = alice.post("/v1/conversations", json={"agent": "poet"})
    assert response.status_code == 422
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_the_knowledge_agent_names_its_document_and_shares_it_with_every_user(
    live_server: LiveServer,
) -> None:
    with live_server.client(BOB_KEY) as bob, live_server.client(CAROL_KEY) as carol:
        _, bobs = ends(stream_turn(bob, new_conversation(bob), KV_QUESTION))
        assert bobs["agent"] == "knowledge"
        assert "kv-cache.md" in bobs["content"]
        # Carol's very first turn finds the documents already computed, though Bob's own
        # question, in the same words, is not hers to reuse.
        question = "Which endpoint shows the cache counters of the conversation API?"
        _, carols = ends(stream_turn(carol, new_conversation(carol), question))
    assert carols["agent"] == "knowledge"
    assert "conversation-api.md" in carols["content"]
    assert carols["usage"]["cached_tokens"] >= public_tokens(live_server)


@pytest.fixture(scope="module")
def small_window(
    model_path: Path, module_server: Servers, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """A server whose window fills in a few turns: compaction at 1024 tokens, one short
    document."""
    docs = tmp_path_factory.mktemp("docs")
    (docs / "tea.md").write_text("# Tea\nGreen tea is steamed; black tea is oxidised.\n")
    return module_server(
        model_path, docs_dir=docs, context_tokens=2048, compact_at=0.5, compact_keep_messages=2
    ).url


def test_a_full_window_is_compacted_once_at_a_stable_boundary(small_window: str) -> None:
    filler = " ".join(["The quick brown fox jumps over the lazy dog."] * 8)
    with httpx.Client(
        base_url=small_window, headers={"Authorization": "Bearer " + BOB_KEY}, timeout=120
    ) as bob:
        conversation = new_conversation(bob, agent="assistant")
        usages = []
        for turn in range(9):
            _, end = ends(stream_turn(bob, conversation, f"Note {turn}: {filler}"))
            assert end["status"] == "complete"
            usages.append(end["usage"])
        metrics = bob.get("/metrics").text
        stored = bob.get(f"/v1/conversations/{conversation}/messages").json()["data"]
    breaks = {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "chatbot_prefix_breaks_total"
    }
    assert breaks == {"compaction": 1.0}, breaks
    compacted = next(
        i
        for i in range(1, len(usages))
        if usages[i]["prompt_tokens"] < usages[i - 1]["prompt_tokens"]
    )
    # The compacted prompt is shorter; then the prompts extend each other again.
    for previous, usage in zip(usages[compacted:], usages[compacted + 1 :], strict=False):
        assert usage["cached_tokens"] >= previous["prompt_tokens"]
    assert all(u["prompt_tokens"] < 1024 for u in usages)
    # Compaction changes what the model reads, never what the user sees.
    assert len(stored) == 18


def test_the_llm_router_routes_behind_a_cached_shared_prompt(
    model_path: Path, server: Servers
) -> None:
    routed = server(model_path, router="llm")
    with routed.client() as alice, routed.client(BOB_KEY) as bob:
        start, _ = ends(stream_turn(alice, new_conversation(alice), KV_QUESTION))
        # Another user's first turn: the routing prompt is public, only the question is new.
        ends(stream_turn(bob, new_conversation(bob), "Write one sentence about the sea."))
    cached = metric(routed, "chatbot_cached_tokens_total", agent="router")
    routings = metric(routed, "chatbot_ttft_seconds_count", agent="router")
    shared = public_tokens(routed, *routing_prompt("any question"))
    assert start["agent"] in {"assistant", "knowledge", "summarizer"}
    assert start["route_reason"].startswith(("the model chose", "about", "general"))
    assert routings == 2
    # The first routing call found only the start-of-text token cached (the pinned preamble
    # begins with it too); the second, everything but its question.
    assert cached == 1 + shared
