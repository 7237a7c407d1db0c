"""The production model-server stack as processes on loopback: LMCache's multi-process cache
server, vLLM (its CPU build) with LMCache's ``LMCacheMPConnector``, and vLLM's router.

They run from the model-server virtual environment that ``make vllm`` builds (``.venv-vllm``
at the repository root), on the bundled model converted to a bf16 Hugging Face folder by
``deploy/vllm/convert_gguf.py``. The production tests and the ``vllm`` benchmark start them
through this module; every process is started in a session of its own, so that stopping it
also stops what it forked (vLLM's engine core and worker).

Telemetry is off in every process: nothing started here tries to reach outside the machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import httpx

from chatbot.client.local_server import free_port
from testbed.process import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-vllm"
CONVERT = ROOT / "deploy" / "vllm" / "convert_gguf.py"
SHIPPED_TEMPLATE = ROOT / "deploy" / "vllm" / "transcript.jinja"
SERVED_MODEL = "gemma-3-270m"
# LMCache's default: KV is stored and found in whole 256-token chunks.
CHUNK_TOKENS = 256
MAX_STOP_STRINGS = 16

# Both projects report usage unless told not to; the hub must never be asked for anything.
QUIET = {
    "DO_NOT_TRACK": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "LMCACHE_TRACK_USAGE": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "LMCACHE_DISABLE_BANNER": "1",
}


class StackMissing(RuntimeError):
    """The model-server virtual environment is not there: ``make vllm`` builds it."""


def python() -> Path:
    interpreter = VENV / "bin" / "python"
    if not interpreter.exists():
        raise StackMissing(f"{VENV} is missing: run `make vllm` at the repository root")
    return interpreter


def converted_model(gguf: Path) -> Path:
    """The bf16 folder vLLM serves, converted from ``gguf`` the first time (about 1.5 min)."""
    folder = gguf.with_name(gguf.name.removesuffix(".gguf") + "-hf-bf16")
    if not (folder / "conversion.json").exists():
        subprocess.run(
            [str(python()), str(CONVERT), str(gguf), str(folder)],
            env={**os.environ, **QUIET},
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return folder


def _environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATBOT_", "VIRTUAL_ENV"))}
    env["PATH"] = f"{VENV / 'bin'}:{env.get('PATH', '')}"
    return env | QUIET | extra


class Process(ServerProcess):
    """One server process of the stack, in a session of its own, with its log file;
    ``start`` returns once ``ready_url`` answers. Stopping or killing it also removes the
    shared memory its processes leave behind when killed."""

    def __init__(
        self,
        name: str,
        command: list[str],
        env: dict[str, str],
        log: Path,
        ready_url: str,
        ready_timeout: float = 300.0,
    ) -> None:
        super().__init__(
            command,
            ready_url=ready_url,
            env=env,
            log=log,
            name=name,
            ready_timeout=ready_timeout,
            poll_interval=0.5,
            own_session=True,
        )
        self.started_at = 0.0  # wall clock, to tell this process's shared memory from older

    def start(self) -> Self:
        self.started_at = time.time()
        return super().start()

    def kill(self) -> None:
        """SIGKILL to the process and everything it forked: nothing of it runs after this.
        Their shared-memory segments, which a killed process cannot unlink, are removed."""
        if self.popen is None:
            return
        super().kill()
        remove_orphan_segments(since=self.started_at)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL to whatever is left of the group."""
        if self.popen is None:
            return None
        code = super().stop(timeout)
        remove_orphan_segments(since=self.started_at)
        return code


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus text-format sample's values over the series matching
    ``labels`` (0 when there is none)."""
    total = 0.0
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$")
    for line in text.splitlines():
        match = pattern.match(line)
        if match is None:
            continue
        series = match.group(1) or ""
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(match.group(2))
    return total


@dataclass
class Service:
    """What every server of the stack shares: a port on loopback, and one process started
    from a command (``start`` in each) that ``stop`` and ``kill`` end."""

    port: int = field(default_factory=free_port, kw_only=True)
    process: Process | None = field(default=None, kw_only=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _launch(self, process: Process) -> None:
        self.process = process
        process.start()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()


@dataclass
class LMCacheServer(Service):
    """``lmcache server``: L1 in RAM and an ``fs`` L2 on disk, which outlives the process."""

    l2_dir: Path
    log_dir: Path
    l1_gib: float = 1.0
    http_port: int = field(default_factory=free_port)

    @property
    def metrics_url(self) -> str:
        """Its HTTP front end serves the Prometheus text (its OpenTelemetry counters)."""
        return f"http://127.0.0.1:{self.http_port}/metrics"

    def start(self) -> None:
        command = [
            str(python()),
            "-m",
            "lmcache.cli.main",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--chunk-size",
            str(CHUNK_TOKENS),
            "--l1-size-gb",
            str(self.l1_gib),
            "--eviction-policy",
            "LRU",
            "--l2-adapter",
            json.dumps({"type": "fs", "base_path": str(self.l2_dir)}),
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(self.http_port),
        ]
        log = self.log_dir / "lmcache-server.log"
        self._launch(Process("lmcache server", command, _environment(), log, self.metrics_url, 120))

    def metrics(self) -> str:
        return httpx.get(self.metrics_url, timeout=10).text

    def stop(self) -> None:
        super().stop()
        clean_shared_memory()


def clean_shared_memory() -> None:
    """LMCache leaves its shared-memory segments behind when its processes stop."""
    for segment in Path("/dev/shm").glob("lmcache_kv_*"):
        segment.unlink(missing_ok=True)


def _segments_in_use() -> set[str]:
    """The /dev/shm files some process has open or mapped."""
    used: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with suppress(OSError):
                    used.add(os.readlink(fd))
        with suppress(OSError):
            used.update(
                line.split(maxsplit=5)[-1]
                for line in (proc / "maps").read_text().splitlines()
                if "/dev/shm/" in line
            )
    return used


def remove_orphan_segments(*, since: float) -> None:
    """vLLM's processes talk through Python's shared memory (``psm_*``, ``sem.mp-*``), which
    they unlink on a clean exit but not when killed: remove those made since ``since`` that no
    process holds any more (hundreds of MB each, in RAM)."""
    used = _segments_in_use()
    for pattern in ("psm_*", "sem.mp-*"):
        for segment in Path("/dev/shm").glob(pattern):
            with suppress(OSError):
                if segment.stat().st_mtime >= since and str(segment) not in used:
                    segment.unlink()


@dataclass
class VllmServer(Service):
    """vLLM's OpenAI server on the converted model, storing to and loading from ``cache``
    (None: vLLM alone, its own prefix cache only)."""

    model_dir: Path
    chat_template: Path | None
    """None: the converted model's own (the GGUF's, which the conversion carries over)."""
    log_dir: Path
    cache: LMCacheServer | None
    name: str = "vllm"
    max_model_len: int = 2048
    # VLLM_CPU_KVCACHE_SPACE, whole GiB: vLLM's own KV pool (about 58k tokens a GiB for this
    # model, 18 KiB a token).
    kv_cache_gib: int = 1
    # --num-gpu-blocks-override: a pool of this many blocks instead, small enough that
    # conversations are evicted from vLLM, which is what LMCache then serves back. Gemma 3's
    # KV groups share the pool: about 110 blocks hold one 2,048-token prompt.
    kv_blocks: int | None = None

    def start(self) -> None:
        command = [
            str(python()),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir),
            "--served-model-name",
            SERVED_MODEL,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--max-model-len",
            str(self.max_model_len),
            "--enforce-eager",
            "--enable-prompt-tokens-details",
            "--seed",
            "0",
        ]
        if self.chat_template is not None:
            command += ["--chat-template", str(self.chat_template)]
        if self.kv_blocks is not None:
            command += ["--num-gpu-blocks-override", str(self.kv_blocks)]
        env = _environment(
            VLLM_CPU_KVCACHE_SPACE=str(self.kv_cache_gib),
            # vLLM's own block hashes and LMCache's keys must not change between processes.
            PYTHONHASHSEED="0",
            # The chatbot sends a stop string for each turn start the model could write, six
            # with their quoted forms; vLLM refuses more than 4 unless told (as OpenAI does).
            VLLM_MAX_STOP_STRINGS=str(MAX_STOP_STRINGS),
        )
        if self.cache is not None:
            connector = {
                "kv_connector": "LMCacheMPConnector",
                "kv_role": "kv_both",
                "kv_connector_extra_config": {
                    "lmcache.mp.host": "tcp://127.0.0.1",
                    "lmcache.mp.port": self.cache.port,
                },
            }
            command += ["--kv-transfer-config", json.dumps(connector)]
            # Gemma 3's sliding-window and global layers are separate KV groups, which only
            # the server-driven transfer mode accepts.
            env["LMCACHE_MP_TRANSFER_MODE"] = "lmcache_driven"
        log = self.log_dir / f"{self.name}.log"
        self._launch(Process(self.name, command, env, log, f"{self.url}/v1/models"))

    def restart(self) -> None:
        self.stop()
        self.start()

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text


@dataclass
class Router(Service):
    """``vllm-router --policy consistent_hash`` in front of vLLM replicas: it hashes the
    first of ``X-Session-ID``, ``X-User-ID``, ... that a request carries onto the healthy
    workers, so the chatbot's affinity header must be ``x-session-id``."""

    workers: list[str]
    log_dir: Path
    metrics_port: int = field(default_factory=free_port)

    def start(self) -> None:
        command = [
            str(VENV / "bin" / "vllm-router"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--worker-urls",
            *self.workers,
            "--policy",
            "consistent_hash",
            # A stopped replica leaves the ring within about a second, not the default minute.
            "--health-check-interval-secs",
            "1",
            "--health-failure-threshold",
            "1",
            "--prometheus-host",
            "127.0.0.1",
            "--prometheus-port",
            str(self.metrics_port),
        ]
        log = self.log_dir / "router.log"
        self._launch(Process("vllm-router", command, _environment(), log, f"{self.url}/health"))

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text

    def wait_until_unhealthy(self, worker: str, timeout: float = 60.0) -> None:
        """Until the router's health check has taken ``worker`` off its ring: until then it
        still sends that worker's sessions there and answers 500 for them."""
        deadline = time.monotonic() + timeout
        series = f'vllm_router_worker_health{{worker="{worker}"}} '
        while f"{series}0\n" not in self.metrics():
            if time.monotonic() > deadline:
                raise TimeoutError(f"vllm-router still counts {worker} as healthy")
            time.sleep(0.2)


@contextmanager
def stack(
    gguf: Path,
    work_dir: Path,
    *,
    chat_template: Path,
    lmcache: bool = True,
    replicas: int = 1,
    kv_cache_gib: int = 1,
    kv_blocks: int | None = None,
    max_model_len: int = 2048,
) -> Iterator[tuple[LMCacheServer | None, list[VllmServer]]]:
    """An LMCache server (when ``lmcache``) and ``replicas`` vLLM servers sharing it, all
    stopped and their shared memory cleaned on the way out."""
    model_dir = converted_model(gguf)
    (work_dir / "l2").mkdir(parents=True, exist_ok=True)
    with ExitStack() as stop:
        stop.callback(clean_shared_memory)
        cache = None
        if lmcache:
            cache = LMCacheServer(l2_dir=work_dir / "l2", log_dir=work_dir)
            stop.callback(cache.stop)
            cache.start()
        servers = []
        for index in range(replicas):
            server = VllmServer(
                model_dir=model_dir,
                chat_template=chat_template,
                log_dir=work_dir,
                cache=cache,
                name=f"vllm-{index}",
                kv_cache_gib=kv_cache_gib,
                kv_blocks=kv_blocks,
                max_model_len=max_model_len,
            )
            stop.callback(server.stop)
            server.start()
            servers.append(server)
        yield cache, servers
