"""A Prometheus of the test's own scraping the test's processes with the jobs of
deploy/prometheus.yml, and the shipped Grafana dashboard evaluated through its HTTP API as
Grafana would query it.

Debian's ``prometheus`` (``make prometheus`` installs it, with ``promtool``) runs from a folder
laid out as compose mounts /etc/prometheus: the generated ``prometheus.yml``, the shipped
``alerts.yml`` beside it, and the bearer token in ``secrets/chatbot_metrics_token``, so the
relative paths of the shipped file resolve as they do in production.
"""

from __future__ import annotations

import itertools
import math
import re
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from testbed.process import ServerProcess

from chatbot.client.local_server import free_port
from tests.deploy_files import (
    DEPLOY_DIR,
    LABEL_VALUES,
    PanelQuery,
    dashboard_queries,
    load_dashboard,
    load_yaml,
)
from tests.waiting import wait_until

# Short, so that a test sees rates within seconds; Grafana's $__rate_interval is derived from
# it as from the data source's timeInterval in production.
SCRAPE_INTERVAL_S = 1
TOKEN_FILE = "secrets/chatbot_metrics_token"  # deploy/prometheus.yml's credentials_file
# The panel width Grafana divides the time range by for $__interval (a wide panel).
MAX_DATA_POINTS = 1000


def scrape_config(targets: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """deploy/prometheus.yml with each job's targets replaced by ``targets[job]`` (every job
    must be named; ``[]`` for one with no process here) and the intervals by the test's.
    Job names, metrics paths, authorization and rule files are the shipped file's."""
    config: dict[str, Any] = load_yaml("prometheus.yml")
    jobs = [job["job_name"] for job in config["scrape_configs"]]
    if sorted(jobs) != sorted(targets):
        raise ValueError(f"deploy/prometheus.yml scrapes {jobs}; targets given for {list(targets)}")
    config["global"]["scrape_interval"] = f"{SCRAPE_INTERVAL_S}s"
    config["global"]["evaluation_interval"] = f"{SCRAPE_INTERVAL_S}s"
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": list(targets[job["job_name"]])}]
    return config


def config_folder(folder: Path, config: Mapping[str, Any], token: str) -> Path:
    """Writes ``config`` as prometheus.yml into ``folder`` beside the shipped rule files and
    the token file it names; returns the config's path."""
    for rule_file in config.get("rule_files", []):
        shutil.copy(DEPLOY_DIR / rule_file, folder / rule_file)
    secret = folder / TOKEN_FILE
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text(token)
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    return path


@dataclass(frozen=True)
class Series:
    labels: dict[str, str]
    values: list[tuple[float, float]]  # (unix time, value); NaN where Grafana draws a gap

    def finite(self) -> list[float]:
        return [value for _, value in self.values if math.isfinite(value)]


class Prometheus:
    """The HTTP API of a running Prometheus."""

    def __init__(self, url: str) -> None:
        self.url = url

    def api(self, path: str, **params: str | float) -> Any:
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        body = response.json()
        assert response.status_code == 200, (path, params, body)
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    def instant(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("query", query=expr)["result"]
        return result

    def query_range(self, expr: str, start: float, end: float, step_s: float) -> list[Series]:
        data = self.api("query_range", query=expr, start=start, end=end, step=step_s)
        assert data["resultType"] == "matrix", data
        return [
            Series(item["metric"], [(float(t), float(v)) for t, v in item["values"]])
            for item in data["result"]
        ]

    def label_values(self, label: str, match: str, start: float, end: float) -> list[str]:
        """What Grafana's ``label_values(<match>, <label>)`` variable query lists."""
        values: list[str] = self.api(
            f"label/{label}/values", **{"match[]": match}, start=start, end=end
        )
        return values

    def targets_up(self) -> bool:
        active = self.api("targets", state="active")["activeTargets"]
        return bool(active) and all(target["health"] == "up" for target in active)

    def rules(self) -> list[dict[str, Any]]:
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]

    def alert_states(self) -> dict[str, str]:
        return {
            alert["labels"]["alertname"]: alert["state"] for alert in self.api("alerts")["alerts"]
        }

    def scraped(self, expr: str) -> bool:
        """``expr`` has a sample in the newest scrape."""
        return bool(self.instant(expr))

    def settle(self, expr: str) -> float:
        """Waits until ``expr`` has a sample (the last thing a test did has been scraped),
        then for four more scrapes, so that rates at the end of a range see the final
        values; returns the time to end the range at."""
        wait_until(lambda: self.scraped(expr), timeout=30)
        time.sleep(4 * SCRAPE_INTERVAL_S)
        return time.time()


@contextmanager
def prometheus_server(
    binary: str, folder: Path, targets: Mapping[str, Sequence[str]], token: str
) -> Iterator[Prometheus]:
    """``binary`` (Debian's Prometheus, the ``prometheus_binary`` fixture) on a free
    loopback port, scraping ``targets`` with the shipped jobs (``scrape_config``) and the
    shipped alerting rules; every target up on return."""
    config = config_folder(folder, scrape_config(targets), token)
    port = free_port()
    command = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    url = f"http://127.0.0.1:{port}"
    with ServerProcess(
        command, ready_url=f"{url}/-/ready", log=folder / "prometheus.log", name="prometheus"
    ):
        prometheus = Prometheus(url)
        wait_until(prometheus.targets_up, timeout=30)
        yield prometheus


# --- Grafana


@dataclass(frozen=True)
class TimeRange:
    """A dashboard's time range, and the interval variables Grafana derives from it and from
    the data source's scrape interval (timeInterval)."""

    start: float
    end: float
    scrape_interval_s: float = SCRAPE_INTERVAL_S

    @property
    def interval_s(self) -> float:
        # Grafana also rounds this to a "nice" step; below the scrape interval it never goes,
        # and the tests' ranges (minutes) never reach the rounding.
        return max(self.scrape_interval_s, math.ceil((self.end - self.start) / MAX_DATA_POINTS))

    @property
    def rate_interval_s(self) -> float:
        return max(self.interval_s + self.scrape_interval_s, 4 * self.scrape_interval_s)

    def builtins(self) -> dict[str, str]:
        range_s = math.ceil(self.end - self.start)
        return {
            "__interval": f"{self.interval_s:g}s",
            "__interval_ms": f"{self.interval_s * 1000:g}",
            "__rate_interval": f"{self.rate_interval_s:g}s",
            "__range": f"{range_s}s",
            "__range_s": str(range_s),
            "__range_ms": str(range_s * 1000),
        }


_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")


def dashboard_variables(dashboard: Mapping[str, Any]) -> dict[str, str]:
    """The dashboard's query variables at their saved selection, as Grafana interpolates them
    into PromQL: "All" becomes the variable's ``allValue`` (or every value, as a regex)."""
    values: dict[str, str] = {}
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        current = variable["current"]["value"]
        if current == "$__all" or current == ["$__all"]:
            values[variable["name"]] = variable["allValue"]
        elif isinstance(current, list):
            values[variable["name"]] = "(" + "|".join(re.escape(v) for v in current) + ")"
        else:
            values[variable["name"]] = current
    return values


def interpolate(expr: str, variables: Mapping[str, str]) -> str:
    """``expr`` with Grafana's variables replaced; an unknown one is an error, as it would be
    a blank panel."""

    def value(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        if name not in variables:
            raise KeyError(f"Grafana variable ${name} has no value: {expr!r}")
        return variables[name]

    return _VARIABLE.sub(value, expr)


_QUANTILE = re.compile(r"^histogram_quantile\((0\.\d+), (.*)\)$", re.DOTALL)
_LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def check_values(query: PanelQuery, series: list[Series]) -> None:
    """At least one series with a number; every number in the range its unit allows
    (a ratio in [0, 1], anything else, rates, quantiles, gauges, >= 0); every label the
    legend names present on every series."""
    assert series, f"{query.key}: no series for {query.expr}"
    values = [value for one in series for value in one.finite()]
    assert values, f"{query.key}: only gaps (NaN) for {query.expr}"
    low, high = (0.0, 1.0) if query.unit == "percentunit" else (0.0, math.inf)
    outside = [value for value in values if not low - 1e-9 <= value <= high + 1e-9]
    assert not outside, f"{query.key}: values outside [{low}, {high}]: {outside[:5]}"
    for label in _LEGEND_LABEL.findall(query.legend):
        assert all(label in one.labels for one in series), f"{query.key}: no label {label}"


def check_quantiles_ordered(results: Mapping[PanelQuery, list[Series]]) -> int:
    """In each panel, quantiles of the same histogram expression are ordered (p50 <= p95 <=
    p99) at every time and label set they share. Returns how many comparisons were made."""
    by_histogram: dict[tuple[str, str], list[tuple[float, list[Series]]]] = {}
    for query, series in results.items():
        match = _QUANTILE.match(query.expr)
        if match:
            key = (query.panel, match[2])
            by_histogram.setdefault(key, []).append((float(match[1]), series))
    compared = 0
    for (panel, _), quantiles in by_histogram.items():
        quantiles.sort(key=lambda item: item[0])
        for (q_low, low), (q_high, high) in itertools.pairwise(quantiles):
            highs = {(tuple(sorted(s.labels.items())), t): v for s in high for t, v in s.values}
            for one in low:
                labels = tuple(sorted(one.labels.items()))
                for t, value in one.values:
                    other = highs.get((labels, t), math.nan)
                    if math.isfinite(value) and math.isfinite(other):
                        compared += 1
                        assert value <= other + 1e-9, f"{panel}: p{q_low} > p{q_high} at {t}"
    return compared


def evaluate_dashboard(
    prometheus: Prometheus, time_range: TimeRange, unavailable: Mapping[tuple[str, str], str]
) -> dict[PanelQuery, list[Series]]:
    """Every panel query of the shipped dashboard but those in ``unavailable`` (panel title,
    refId: why it cannot have data here), over ``time_range`` at Grafana's step, each checked
    by ``check_values``; quantiles checked ordered. ``unavailable`` naming a query the
    dashboard does not have fails, so the list cannot go stale."""
    board = load_dashboard()
    queries = dashboard_queries(board)
    stale = set(unavailable) - {query.key for query in queries}
    assert not stale, f"listed as unavailable but not on the dashboard: {stale}"
    variables = dashboard_variables(board) | time_range.builtins()
    results: dict[PanelQuery, list[Series]] = {}
    for query in queries:
        if query.key in unavailable:
            continue
        expr = interpolate(query.expr, variables)
        series = prometheus.query_range(
            expr, time_range.start, time_range.end, time_range.interval_s
        )
        check_values(query, series)
        results[query] = series
    assert check_quantiles_ordered(results) > 0, "no two quantiles were ever comparable"
    return results


def check_variable_queries(prometheus: Prometheus, time_range: TimeRange) -> dict[str, list[str]]:
    """The values each ``label_values`` variable query lists over ``time_range``, every one
    non-empty (an empty list leaves every panel that uses the variable blank)."""
    board = load_dashboard()
    variables = dashboard_variables(board) | time_range.builtins()
    listed: dict[str, list[str]] = {}
    for variable in board["templating"]["list"]:
        if variable.get("type") != "query":
            continue
        match = LABEL_VALUES.match(variable["query"]["query"])
        assert match, variable["query"]
        selector = interpolate(match["selector"], variables)
        listed[variable["name"]] = prometheus.label_values(
            match["label"], selector, time_range.start, time_range.end
        )
        assert listed[variable["name"]], f"${variable['name']} lists nothing: {selector}"
    return listed
