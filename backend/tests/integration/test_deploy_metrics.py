"""The Grafana dashboard in deploy/ against a real server's /metrics: every chatbot_* name a
panel queries is exported, and the metric list the deploy tests document is the server's."""

from __future__ import annotations

import httpx

from tests.conftest import LiveServer
from tests.deploy_files import (
    CHATBOT_FAMILIES,
    dashboard_metric_names,
    exported_names,
    families_in_exposition,
)


def served_families(live_server: LiveServer) -> dict[str, str]:
    # /metrics needs no API key; from loopback, without CHATBOT_METRICS_TOKEN, no token either.
    response = httpx.get(f"{live_server.url}/metrics", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return families_in_exposition(response.text)


def test_every_chatbot_metric_on_the_dashboard_is_exported(live_server: LiveServer) -> None:
    exported = exported_names(served_families(live_server))
    wanted = {name for name in dashboard_metric_names() if name.startswith("chatbot_")}
    assert wanted, "the dashboard queries no chatbot_* metric"
    missing = wanted - exported
    assert not missing, f"the dashboard queries names the server does not export: {missing}"


def test_documented_chatbot_metrics_match_the_server(live_server: LiveServer) -> None:
    """CHATBOT_FAMILIES is what the dashboard test accepts; it must not drift from the app.
    The live server runs the embedded engine, so the chatbot_kv_* families are there too."""
    served = {
        name.removesuffix("_total"): kind
        for name, kind in served_families(live_server).items()
        if name.startswith("chatbot_") and not name.endswith("_created")
    }
    assert served == CHATBOT_FAMILIES
