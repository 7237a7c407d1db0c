"""The hardening settings: refused when unsafe or inconsistent, the connection cap's default,
and deploy/ scraping /metrics with the token the chatbot requires."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from chatbot.api.server import connection_limits
from chatbot.config import LOCAL_USER, Settings
from tests.deploy_files import env_map, load_yaml

KEYS = "alice-key-0123456789abcdef=alice,bob-key-0123456789abcdef00=bob"


def settings(**values: Any) -> Settings:
    """Settings from these values and the environment, never from a .env file (pydantic
    validates the values: any type may come in)."""
    return Settings(_env_file=None, **values)


def test_operators_must_be_users_with_keys() -> None:
    assert settings(api_keys=KEYS, operators="alice").is_operator("alice")
    assert not settings(api_keys=KEYS, operators="alice").is_operator("bob")
    with pytest.raises(ValidationError, match=r"CHATBOT_OPERATORS names users .*\['carol'\]"):
        settings(api_keys=KEYS, operators="alice, carol")


def test_keyless_the_local_user_is_the_operator() -> None:
    assert settings().is_operator(LOCAL_USER)


def test_a_short_metrics_token_is_refused() -> None:
    with pytest.raises(ValidationError, match="at least 16 characters"):
        settings(metrics_token="short")


def test_the_connection_cap_defaults_below_the_open_files_limit() -> None:
    assert connection_limits(settings(), open_files=20_000).max_connections == 19_744
    assert connection_limits(settings(), open_files=0).max_connections == 10_000
    assert connection_limits(settings(max_connections=500), open_files=20_000).max_connections == (
        500
    )
    limits = connection_limits(settings(), open_files=1024)
    assert (limits.max_head_bytes, limits.receive_timeout_s) == (16_384, 10.0)


def test_prometheus_in_compose_scrapes_the_chatbot_with_its_metrics_token() -> None:
    compose = load_yaml("docker-compose.yml")
    services = compose["services"]
    chatbot_env = env_map(services["chatbot"]["environment"])
    assert chatbot_env["CHATBOT_METRICS_TOKEN"].startswith("${CHATBOT_METRICS_TOKEN:?")
    # Prometheus gets the same variable and writes it where its scrape reads the token
    # (relative to prometheus.yml), into a tmpfs: the two cannot differ, nothing is stored.
    prometheus = services["prometheus"]
    assert (
        env_map(prometheus["environment"])["CHATBOT_METRICS_TOKEN"]
        == (chatbot_env["CHATBOT_METRICS_TOKEN"])
    )
    assert "/etc/prometheus/secrets" in prometheus["tmpfs"]
    assert "> /etc/prometheus/secrets/chatbot_metrics_token" in " ".join(prometheus["entrypoint"])
    jobs = load_yaml("prometheus.yml")["scrape_configs"]
    job = next(j for j in jobs if j["job_name"] == "chatbot")
    assert job["authorization"] == {
        "type": "Bearer",
        "credentials_file": "secrets/chatbot_metrics_token",
    }
    example = (Path(__file__).parents[3] / "deploy" / ".env.example").read_text()
    assert "\nCHATBOT_METRICS_TOKEN=\n" in example
