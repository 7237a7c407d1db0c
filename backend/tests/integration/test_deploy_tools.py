"""The files in deploy/ checked by their own tools, Debian's builds of them (``make
prometheus docker-compose``): ``promtool check config`` on the shipped Prometheus
configuration, ``promtool check rules`` and ``promtool test rules`` on the alerting rules, and
``docker-compose config`` on the compose file with the example environment (no daemon)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from chatbot.config import Settings
from tests.deploy_files import DEPLOY_DIR, KNOWN_METRICS, load_yaml, promql_metric_names

RULES = "alerts.yml"
RULE_TESTS = "alerts.test.yml"


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def alerts() -> dict[str, dict[str, Any]]:
    groups = load_yaml(RULES)["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def test_promtool_accepts_the_shipped_prometheus_config(promtool: str, tmp_path: Path) -> None:
    """The shipped file byte for byte, in a folder laid out as compose mounts it: promtool
    reads the rule files and the token file it names."""
    shutil.copy(DEPLOY_DIR / "prometheus.yml", tmp_path)
    shutil.copy(DEPLOY_DIR / RULES, tmp_path)
    for job in load_yaml("prometheus.yml")["scrape_configs"]:
        if "authorization" in job:
            token = tmp_path / job["authorization"]["credentials_file"]
            token.parent.mkdir(exist_ok=True)
            token.write_text("a-token-of-sixteen-or-more")
    output = run([promtool, "check", "config", "prometheus.yml"], tmp_path)
    assert "SUCCESS: 1 rule files found" in output, output


def test_promtool_checks_and_unit_tests_every_alert(promtool: str) -> None:
    output = run([promtool, "check", "rules", RULES], DEPLOY_DIR)
    assert f"SUCCESS: {len(alerts())} rules found" in output, output
    assert "SUCCESS" in run([promtool, "test", "rules", RULE_TESTS], DEPLOY_DIR)


def test_every_alert_has_a_case_that_fires_it_and_one_that_does_not() -> None:
    cases = load_yaml(RULE_TESTS)
    assert cases["rule_files"] == [RULES]
    fires: set[str] = set()
    quiet: set[str] = set()
    for test in cases["tests"]:
        for case in test["alert_rule_test"]:
            (fires if case["exp_alerts"] else quiet).add(case["alertname"])
    assert fires == set(alerts()), set(alerts()) ^ fires
    assert quiet == set(alerts()), set(alerts()) ^ quiet


def test_alerts_query_known_metrics_and_the_configured_queue_bound() -> None:
    rules = alerts()
    names = set().union(*(promql_metric_names(rule["expr"]) for rule in rules.values()))
    assert names - KNOWN_METRICS == {"up"}
    assert all(rule["labels"]["severity"] in {"warning", "critical"} for rule in rules.values())
    # The queue is full at CHATBOT_QUEUE_SIZE, which compose and the chart leave at its default.
    bound = Settings.model_fields["queue_size"].default
    assert rules["ChatbotEngineQueueFull"]["expr"].endswith(f">= {bound}")


def example_environment(**overrides: str) -> dict[str, str]:
    """deploy/.env.example with each empty value filled with a value of its own."""
    values: dict[str, str] = {}
    for line in (DEPLOY_DIR / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name] = value or f"example-{name.lower()}-0123456789"
    return values | overrides


def compose_config(
    docker_compose: str, folder: Path, environment: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    env_file = folder / "example.env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in environment.items()))
    command = [docker_compose, "-f", "docker-compose.yml", "--env-file", str(env_file), "config"]
    # Only the env file: nothing of this shell's environment may satisfy a variable.
    clean = {"PATH": os.environ["PATH"], "HOME": str(folder)}
    return subprocess.run(
        command, cwd=DEPLOY_DIR, env=clean, capture_output=True, text=True, timeout=120
    )


def test_docker_compose_accepts_the_file_with_the_example_environment(
    docker_compose: str, tmp_path: Path
) -> None:
    environment = example_environment()
    done = compose_config(docker_compose, tmp_path, environment)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert set(services) == {
        "vllm",
        "lmcache-server",
        "chatbot",
        "postgres",
        "prometheus",
        "grafana",
    }
    # Prometheus gets the very token the chatbot requires on /metrics.
    token = environment["CHATBOT_METRICS_TOKEN"]
    assert services["chatbot"]["environment"]["CHATBOT_METRICS_TOKEN"] == token
    assert services["prometheus"]["environment"]["CHATBOT_METRICS_TOKEN"] == token
    mounts = {volume.split(":")[1] for volume in services["prometheus"]["volumes"]}
    assert {"/etc/prometheus/prometheus.yml", "/etc/prometheus/alerts.yml"} <= mounts


def test_docker_compose_refuses_the_file_without_a_required_secret(
    docker_compose: str, tmp_path: Path
) -> None:
    done = compose_config(docker_compose, tmp_path, example_environment(CHATBOT_METRICS_TOKEN=""))
    assert done.returncode != 0
    assert "set CHATBOT_METRICS_TOKEN in deploy/.env" in done.stderr, done.stderr
