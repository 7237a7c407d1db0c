"""The shipped Grafana dashboard against the embedded engine: a real Prometheus scrapes a
chatbot on the real model with deploy/prometheus.yml's jobs and token while two users talk
(one of them drafting his messages as the chat page sends them), then every panel query is
evaluated as Grafana would send it (tests/prometheus.py). The vLLM + LMCache side is
tests/production/test_dashboard.py."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.conftest import BOB_KEY, LiveServer, Servers
from tests.deploy_files import host_and_port
from tests.production.chat import NOTES, turn
from tests.prometheus import (
    TimeRange,
    check_variable_queries,
    evaluate_dashboard,
    prometheus_server,
)
from tests.sse import parse_events
from tests.waiting import wait_until

TOKEN = "metrics-token-0123456789abcdef"

NO_VLLM = "a vLLM metric: no vLLM serves this chatbot (tests/production/test_dashboard.py)"
ELSEWHERE = (
    "engine-agnostic and needs a fault (an engine failing mid-answer, a 5xx, a compaction): "
    "tests/production/test_dashboard.py causes them for real"
)
UNAVAILABLE: dict[tuple[str, str], str] = {
    ("TTFT p95: chatbot vs vLLM", "B"): NO_VLLM,
    ("Prefill time p50 / p95", "C"): NO_VLLM,
    ("vLLM prefix cache hit rate", "A"): NO_VLLM,
    ("vLLM prefix cache hit rate", "B"): NO_VLLM,
    ("LMCache hit rate", "A"): NO_VLLM,
    ("Generated tokens/s", "B"): NO_VLLM,
    ("Queue depth", "B"): NO_VLLM,
    ("Queue depth", "C"): NO_VLLM,
    ("Prefix breaks by reason", "A"): ELSEWHERE,
    ("Generations failed / cancelled per second", "A"): ELSEWHERE,
    ("HTTP 5xx per second by route", "A"): ELSEWHERE,
}


def drafted_turn(chatbot: LiveServer, user: httpx.Client, conversation_id: str, text: str) -> None:
    """A message its user drafted first: a long draft replaced at once (dropped), then the
    message's own text, read before it is sent, as a user who pauses before Enter."""
    path = f"/v1/conversations/{conversation_id}/draft"
    engine = chatbot.state.engine
    stats = engine.draft_stats()
    assert stats is not None
    for draft in (NOTES, text):
        response = user.put(path, json={"content": draft})
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "prefilling", response.text
    wait_until(lambda: (engine.draft_stats() or stats).prefilled > stats.prefilled, timeout=60)
    assert turn(user, conversation_id, text)["usage"]["draft_tokens"] > 0


def hang_up_while_drafting(user: httpx.Client, conversation_id: str, content: str) -> None:
    """A turn the client leaves at its first token (it ends ``cancelled``), after a draft
    sent while it streamed was skipped: an answer is being written."""
    with user.stream(
        "POST", f"/v1/conversations/{conversation_id}/messages", json={"content": content}
    ) as response:
        assert response.status_code == 200, response.read()
        names = (name for name, _ in parse_events(response.iter_lines()))
        assert "token" in names  # stops reading at the first token
        draft = user.put(f"/v1/conversations/{conversation_id}/draft", json={"content": "And"})
        assert draft.json()["reason"] == "turn_in_progress", draft.text


def test_every_panel_has_data_from_the_embedded_engine(
    model_path: Path, server: Servers, tmp_path: Path, prometheus_binary: str
) -> None:
    chatbot = server(model_path, metrics_token=TOKEN)
    host, port = host_and_port(chatbot.url)
    targets = {"chatbot": [f"{host}:{port}"], "vllm": []}
    with prometheus_server(prometheus_binary, tmp_path, targets, TOKEN) as prometheus:
        start = time.time()
        # Two users taking turns on the one sequence: each comes back from the RAM tier.
        with chatbot.client() as alice, chatbot.client(BOB_KEY) as bob:
            conversations = [
                (user, user.post("/v1/conversations", json={}).json()["id"])
                for user in (alice, bob)
            ]
            for question in ("What is a widget?", "Where is it used?", "Who makes it?"):
                for user, conversation_id in conversations:
                    turn(user, conversation_id, question)
                # Bob's conversation holds the sequence: he writes his next message there.
                drafted_turn(chatbot, bob, conversations[1][1], f"And {question.lower()}")
                # A counter's first increment makes its series and no rate: cancel each round.
                hang_up_while_drafting(bob, conversations[1][1], "Tell me a long story.")
        end = prometheus.settle('chatbot_generations_total{outcome="cancelled"} >= 3')
        time_range = TimeRange(start, end)
        listed = check_variable_queries(prometheus, time_range)
        results = evaluate_dashboard(prometheus, time_range, UNAVAILABLE)
        rules = prometheus.rules()
    assert listed["engine"] == ["embedded"]
    # The KV tiers served prompt tokens: a positive share at some time, RAM's among them.
    shares = {
        series.labels["tier"]: max(series.finite(), default=0.0)
        for query, found in results.items()
        if query.panel == "Embedded engine: prompt tokens served by KV tier"
        for series in found
    }
    assert shares.get("ram", 0.0) > 0, shares
    # The shipped alerting rules loaded and evaluate against these series without errors.
    assert rules
    assert all(rule["health"] == "ok" for rule in rules), rules
