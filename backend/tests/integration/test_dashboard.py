"""The shipped Grafana dashboard against the embedded engine: a real Prometheus scrapes a
chatbot on the real model with deploy/prometheus.yml's jobs and token while two users talk,
then every panel query is evaluated as Grafana would send it (tests/prometheus.py). The
vLLM + LMCache side is tests/production/test_dashboard.py."""

from __future__ import annotations

import time
from pathlib import Path

from tests.conftest import BOB_KEY, Servers
from tests.deploy_files import host_and_port
from tests.production.chat import hang_up_at_first_token, turn
from tests.prometheus import (
    TimeRange,
    check_variable_queries,
    evaluate_dashboard,
    prometheus_server,
)

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
                # A counter's first increment makes its series and no rate: cancel each round.
                hang_up_at_first_token(bob, conversations[1][1], "Tell me a long story.")
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
