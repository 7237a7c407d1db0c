"""The files in deploy/ as the tests read them, the metric names the dashboard may use, and a
small PromQL reader that finds the metric names in an expression.

Names of other projects are listed with the version and file they were checked against; a
newer release that renames one makes the dashboard test fail here, not a panel go blank.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY_DIR / "grafana" / "dashboards" / "chatbot.json"

# Metric families by Prometheus type, as registered (before exposition suffixes).

# backend/src/chatbot/observability/metrics.py; chatbot_kv_* and chatbot_engine_* only exist
# on the embedded engine.
CHATBOT_FAMILIES: dict[str, str] = {
    "chatbot_ttft_seconds": "histogram",
    "chatbot_prefill_seconds": "histogram",
    "chatbot_prompt_tokens": "counter",
    "chatbot_cached_tokens": "counter",
    "chatbot_completion_tokens": "counter",
    "chatbot_draft_hit_tokens": "counter",
    "chatbot_drafts_received": "counter",
    "chatbot_drafts_skipped": "counter",
    "chatbot_generations": "counter",
    "chatbot_prefix_breaks": "counter",
    "chatbot_requests": "counter",
    "chatbot_active_streams": "gauge",
    "chatbot_engine_queue_depth": "gauge",
    "chatbot_engine_running_sequences": "gauge",
    "chatbot_engine_waiting_sequences": "gauge",
    "chatbot_engine_steps": "counter",
    "chatbot_engine_batch_tokens": "counter",
    "chatbot_engine_decode_tokens": "counter",
    "chatbot_engine_answer_steps": "counter",
    "chatbot_engine_side_read_tokens": "counter",
    "chatbot_engine_step_seconds": "histogram",
    "chatbot_engine_predicted_step_seconds": "counter",
    "chatbot_engine_step_bound_seconds": "gauge",
    "chatbot_engine_drafts_prefilled": "counter",
    "chatbot_engine_drafts_dropped": "counter",
    "chatbot_engine_draft_tokens": "counter",
    "chatbot_engine_draft_tokens_used": "counter",
    "chatbot_kv_lookups": "counter",
    "chatbot_kv_requested_tokens": "counter",
    "chatbot_kv_hits": "counter",
    "chatbot_kv_hit_tokens": "counter",
    "chatbot_kv_stores": "counter",
    "chatbot_kv_evictions": "counter",
    "chatbot_kv_entries": "gauge",
    "chatbot_kv_bytes": "gauge",
    "chatbot_kv_budget_bytes": "gauge",
}

# vLLM 0.33.0, vllm/v1/metrics/loggers.py (PrometheusStatLogger; prometheus_client types).
# Early V1 releases named the prefix-cache pair vllm:gpu_prefix_cache_*; the
# external_prefix_cache_* pair counts the tokens a KV connector (LMCache) supplied.
VLLM_FAMILIES: dict[str, str] = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:external_prefix_cache_queries": "counter",
    "vllm:external_prefix_cache_hits": "counter",
    "vllm:prompt_tokens": "counter",
    "vllm:prompt_tokens_cached": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:request_success": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:request_prefill_time_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram",
}

# LMCache 0.5.6, lmcache/observability.py (PrometheusLogger). They are registered in vLLM's
# worker process and exported by vLLM's /metrics through PROMETHEUS_MULTIPROC_DIR.
LMCACHE_FAMILIES: dict[str, str] = {
    "lmcache:num_retrieve_requests": "counter",
    "lmcache:num_store_requests": "counter",
    "lmcache:num_requested_tokens": "counter",
    "lmcache:num_hit_tokens": "counter",
    "lmcache:num_stored_tokens": "counter",
    "lmcache:num_lookup_tokens": "counter",
    "lmcache:num_lookup_hits": "counter",
    "lmcache:num_remote_read_bytes": "counter",
    "lmcache:num_remote_write_bytes": "counter",
    "lmcache:local_cache_usage": "gauge",
    "lmcache:remote_cache_usage": "gauge",
    # Its health monitor pings the remote tier (lmcache/v1/health_monitor).
    "lmcache:remote_ping_errors": "counter",
    "lmcache:remote_ping_successes": "counter",
}

# LMCache 0.5.6, lmcache/v1/config.py (_CONFIG_DEFINITIONS): the keys deploy/lmcache.yaml may
# use. LMCache logs an unknown key and goes on, so a misspelt one would silently do nothing.
LMCACHE_CONFIG_KEYS: frozenset[str] = frozenset(
    {
        "chunk_size",
        "local_cpu",
        "max_local_cpu_size",
        "local_cpu_use_hugepages",
        "reserve_local_cpu_size",
        "local_disk",
        "local_disk_path_sharding",
        "max_local_disk_size",
        "remote_url",
        "remote_serde",
        "use_layerwise",
        "save_decode_cache",
        "save_unfull_chunk",
        "pre_caching_hash_algorithm",
        "cache_policy",
        "min_retrieve_tokens",
        "blocking_timeout_secs",
        "enable_async_loading",
    }
)
# LMCache 0.5.6, lmcache/v1/storage_backend/naive_serde/__init__.py (CreateSerde).
LMCACHE_SERDES: frozenset[str] = frozenset({"naive", "kivi", "cachegen"})

# vllm-project/production-stack, helm/values.yaml + values.schema.json + templates (chart
# 0.1.x up to 0.1.16): the keys deploy/helm/values.yaml may set, per section.
HELM_KEYS: dict[str, frozenset[str]] = {
    "": frozenset({"servingEngineSpec", "routerSpec", "cacheserverSpec"}),
    "servingEngineSpec": frozenset(
        {"runtimeClassName", "vllmApiKey", "modelSpec", "labels", "containerPort", "servicePort"}
    ),
    "modelSpec": frozenset(
        {
            "name",
            "repository",
            "tag",
            "modelURL",
            "replicaCount",
            "requestCPU",
            "requestMemory",
            "requestGPU",
            "pvcStorage",
            "pvcAccessMode",
            "hf_token",
            "vllmConfig",
            "lmcacheConfig",
            "env",
        }
    ),
    "vllmConfig": frozenset(
        {
            "enablePrefixCaching",
            "enableChunkedPrefill",
            "maxModelLen",
            "dtype",
            "tensorParallelSize",
            "maxNumSeqs",
            "gpuMemoryUtilization",
            "extraArgs",
        }
    ),
    # enabled/cpuOffloadingBufferSize/logLevel are in the schema; diskOffloadingBufferSize
    # only in deployment-vllm-multi.yaml.
    "lmcacheConfig": frozenset(
        {"enabled", "cpuOffloadingBufferSize", "diskOffloadingBufferSize", "logLevel"}
    ),
    "routerSpec": frozenset(
        {"replicaCount", "routingLogic", "sessionKey", "resources", "repository", "tag"}
    ),
    "cacheserverSpec": frozenset(
        {"enabled", "image", "replicaCount", "containerPort", "servicePort", "serde", "resources"}
    ),
}
# The chart's routingLogic enum (values.schema.json).
HELM_ROUTING_LOGIC: frozenset[str] = frozenset(
    {
        "roundrobin",
        "session",
        "prefixaware",
        "kvaware",
        "disaggregated_prefill",
        "disaggregated_prefill_orchestrated",
    }
)


def exported_names(families: Mapping[str, str]) -> set[str]:
    """The sample names Prometheus stores for metric families of the given types."""
    names: set[str] = set()
    for family, kind in families.items():
        if kind == "counter":
            names.add(family if family.endswith("_total") else f"{family}_total")
        elif kind == "histogram":
            names.update(f"{family}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        elif kind == "summary":
            names.update({family, f"{family}_sum", f"{family}_count"})
        else:
            names.add(family)
    return names


def families_in_exposition(text: str) -> dict[str, str]:
    """Metric families a Prometheus text exposition declares, from its ``# TYPE`` lines: a
    labelled metric with no samples yet is declared all the same."""
    families: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[:2] == ["#", "TYPE"]:
            families[parts[2]] = parts[3]
    return families


KNOWN_METRICS: frozenset[str] = frozenset(
    exported_names(CHATBOT_FAMILIES)
    | exported_names(VLLM_FAMILIES)
    | exported_names(LMCACHE_FAMILIES)
)

# --- PromQL

PROMQL_FUNCTIONS: frozenset[str] = frozenset(
    {
        # aggregation operators
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "group",
        # functions the dashboard may reasonably use
        "rate",
        "irate",
        "increase",
        "delta",
        "idelta",
        "deriv",
        "histogram_quantile",
        "abs",
        "ceil",
        "floor",
        "round",
        "clamp",
        "clamp_min",
        "clamp_max",
        "label_replace",
        "label_join",
        "vector",
        "scalar",
        "time",
        "absent",
        "avg_over_time",
        "max_over_time",
        "min_over_time",
        "sum_over_time",
        "count_over_time",
    }
)
PROMQL_KEYWORDS: frozenset[str] = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
    | {"and", "or", "unless", "inf", "nan"}
)

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_IDENTIFIER = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects. Strings, label matchers, ranges, grouping label
    lists and Grafana variables are removed first; a word followed by ``(`` must be a known
    function, so a misspelt one fails here instead of being taken for a metric."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _VARIABLE.sub(" ", text)
    names: set[str] = set()
    for match in _IDENTIFIER.finditer(text):
        word, call = match.group(1), match.group(2)
        if call:
            if word not in PROMQL_FUNCTIONS:
                raise ValueError(f"unknown PromQL function {word!r} in {expr!r}")
        elif word.lower() not in PROMQL_KEYWORDS:
            names.add(word)
    return names


LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.*),\s*(?P<label>\w+)\s*\)\s*$")
"""A Grafana variable query listing a label's values among the series a selector matches."""


@dataclass(frozen=True)
class PanelQuery:
    """One target of one panel: its PromQL, legend and the panel's unit."""

    panel: str
    ref_id: str
    expr: str
    legend: str
    unit: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.panel, self.ref_id)


def dashboard_queries(dashboard: Mapping[str, Any]) -> list[PanelQuery]:
    """Every target of every panel with an expression, rows' panels included."""
    queries: list[PanelQuery] = []

    def walk(panels: Iterable[Mapping[str, Any]]) -> None:
        for panel in panels:
            unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
            queries.extend(
                PanelQuery(
                    panel["title"],
                    target["refId"],
                    target["expr"],
                    target.get("legendFormat", ""),
                    unit,
                )
                for target in panel.get("targets", [])
                if "expr" in target
            )
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    return queries


def dashboard_exprs(dashboard: Mapping[str, Any]) -> list[str]:
    """Every PromQL expression of a dashboard: panel targets (rows included) and the metric
    selectors of ``label_values(...)`` template variables."""
    exprs = [query.expr for query in dashboard_queries(dashboard)]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else ""
        match = LABEL_VALUES.match(text)
        if match:
            exprs.append(match["selector"])
    return exprs


def dashboard_metric_names(dashboard: Mapping[str, Any] | None = None) -> set[str]:
    board = load_dashboard() if dashboard is None else dashboard
    names: set[str] = set()
    for expr in dashboard_exprs(board):
        names |= promql_metric_names(expr)
    return names


# --- files


def load_yaml(relative: str) -> Any:
    return yaml.safe_load((DEPLOY_DIR / relative).read_text())


def load_yaml_documents(relative: str) -> list[Any]:
    return list(yaml.safe_load_all((DEPLOY_DIR / relative).read_text()))


def load_dashboard() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return board


def env_map(environment: Mapping[str, Any] | list[str]) -> dict[str, str]:
    """A compose ``environment`` block, map or ``KEY=value`` list, as a dict of strings."""
    if isinstance(environment, list):
        return dict(item.split("=", 1) for item in environment)
    return {key: str(value) for key, value in environment.items()}


def host_and_port(url: str) -> tuple[str, int | None]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port
