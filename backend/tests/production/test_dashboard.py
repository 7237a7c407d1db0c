"""The shipped Grafana dashboard against the production stack: a real Prometheus scrapes the
chatbot and vLLM (with LMCache) with deploy/prometheus.yml's jobs, token and alerting rules
while conversations run, are compacted, cancelled and broken by vLLM's death; then every
panel query is evaluated as Grafana would send it (tests/prometheus.py)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from tests.conftest import Servers
from tests.deploy_files import PanelQuery, host_and_port
from tests.production.chat import LONG_ANSWER, NOTES, client, hang_up_at_first_token, turn
from tests.production.conftest import Stack, chatbot_front
from tests.prometheus import (
    Series,
    TimeRange,
    check_variable_queries,
    evaluate_dashboard,
    prometheus_server,
)
from tests.upstream import check_killed_mid_answer
from tests.waiting import wait_until

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

TOKEN = "metrics-token-0123456789abcdef"

IN_PROCESS_LMCACHE = (
    "lmcache:* come from LMCache's in-process connector (LMCacheConnectorV1, what compose and "
    "the chart run), which has no CPU path; the CPU stack's multi-process LMCache server "
    "exports lmcache_mp_* on a port of its own instead"
)
EMBEDDED_ONLY = (
    "the embedded engine's own metrics, absent on the openai engine: "
    "tests/integration/test_dashboard.py evaluates them"
)
UNAVAILABLE: dict[tuple[str, str], str] = {
    ("LMCache hit rate", "A"): IN_PROCESS_LMCACHE,
    ("Embedded engine: batches", "A"): EMBEDDED_ONLY,
    ("Embedded engine: batches", "B"): EMBEDDED_ONLY,
    ("Embedded engine: sequences", "A"): EMBEDDED_ONLY,
    ("Embedded engine: sequences", "B"): EMBEDDED_ONLY,
    ("Embedded engine: prompt tokens served by KV tier", "A"): EMBEDDED_ONLY,
    ("Embedded engine: KV bytes by tier", "A"): EMBEDDED_ONLY,
    ("Embedded engine: KV bytes by tier", "B"): EMBEDDED_ONLY,
    **{("Embedded engine: step time", ref): EMBEDDED_ONLY for ref in "ABCD"},
    ("Drafts per second", "C"): EMBEDDED_ONLY,
    ("Drafts per second", "D"): EMBEDDED_ONLY,
    **{("Embedded engine: draft compute used and wasted", ref): EMBEDDED_ONLY for ref in "ABC"},
    ("Drafts per second", "B"): (
        "a draft is skipped when the engine has no spare capacity or a user's budget is "
        "spent, which this test's one user never meets: tests/integration/test_dashboard.py "
        "skips drafts for real, tests/fast/test_drafts.py each reason"
    ),
}


def peak(results: Mapping[PanelQuery, list[Series]], panel: str, ref_id: str) -> float:
    """The largest value a query took over the range."""
    (series,) = [found for query, found in results.items() if query.key == (panel, ref_id)]
    return max(value for one in series for value in one.finite())


def test_every_panel_has_data_from_the_chatbot_on_vllm_and_lmcache(
    stack: Stack, docs_dir: Path, module_server: Servers, tmp_path: Path, prometheus_binary: str
) -> None:
    # Compaction at half of the 2,048-token window: a long conversation breaks its prefix.
    front = chatbot_front(
        module_server,
        f"{stack.vllm.url}/v1",
        docs_dir,
        metrics_token=TOKEN,
        compact_at=0.5,
        compact_keep_messages=2,
    )
    targets = {
        "chatbot": ["{}:{}".format(*host_and_port(front))],
        "vllm": ["{}:{}".format(*host_and_port(stack.vllm.url))],
    }
    with prometheus_server(prometheus_binary, tmp_path, targets, TOKEN) as prometheus:
        start = time.time()
        with client(front) as alice:
            long_one = alice.post("/v1/conversations", json={}).json()["id"]
            for shelf in range(1, 7):
                turn(alice, long_one, f"{NOTES} How many gears are on shelf {shelf}?")
                if prometheus.scraped("chatbot_prefix_breaks_total"):
                    break
            assert prometheus.scraped('chatbot_prefix_breaks_total{reason="compaction"}')
            short_one = alice.post("/v1/conversations", json={}).json()["id"]
            for question in ("What is a widget?", "Where is it used?"):
                # Written first as drafts, which vLLM reads on the conversation's replica.
                for typed in (question[:8], question):
                    draft = alice.put(
                        f"/v1/conversations/{short_one}/draft", json={"content": typed}
                    )
                    assert draft.status_code == 202, draft.text
                turn(alice, short_one, question)
                hang_up_at_first_token(alice, short_one, LONG_ANSWER)
            broken = alice.post("/v1/conversations", json={}).json()["id"]
            turn(alice, broken, "What is a gear?")
            body = {"content": LONG_ANSWER, "max_tokens": 400}
            check_killed_mid_answer(alice, broken, body, stack.vllm.kill)  # failed, then a 503
            assert alice.post(f"/v1/conversations/{broken}/messages", json=body).status_code == 503
        # The shipped rule sees vLLM go.
        wait_until(lambda: prometheus.alert_states().get("VllmDown") == "pending", timeout=30)
        end = prometheus.settle('chatbot_requests_total{status="503"} >= 2')
        time_range = TimeRange(start, end)
        listed = check_variable_queries(prometheus, time_range)
        results = evaluate_dashboard(prometheus, time_range, UNAVAILABLE)
        rules = prometheus.rules()
    assert listed["engine"] == ["openai"]
    # Reuse shows on both sides: the tokens the chatbot relayed as cached, vLLM's own hits.
    assert peak(results, "Prompt tokens served from cache (chatbot)", "A") > 0
    assert peak(results, "vLLM prefix cache hit rate", "A") > 0
    assert all(rule["health"] == "ok" for rule in rules), rules
