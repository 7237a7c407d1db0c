"""The servers a benchmark compares, each started as its own process on loopback: the
chatbot (cache off, live context only, tiered) and llama-cpp-python's OpenAI-compatible
server (with and without its ``LlamaRAMCache``), on the same GGUF."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from chatbot.client.local_server import ServerProcess, free_port

MODEL_ID = "bench-model"


@dataclass
class Target:
    """A running server as the workloads see it."""

    name: str
    url: str  # OpenAI base URL, ending in /v1
    keys: list[str]  # one bearer key per simulated user
    sends_system_prompt: bool  # False: the server holds the shared system prompt itself
    process: subprocess.Popen[bytes] | None  # None: a server this benchmark did not start
    is_chatbot: bool
    notes: dict[str, Any] = field(default_factory=dict)
    model: str = MODEL_ID

    def cache_stats(self) -> dict[str, Any] | None:
        if not self.is_chatbot:
            return None
        response = httpx.get(
            f"{self.url}/cache/stats", headers={"Authorization": f"Bearer {self.keys[0]}"}
        )
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats

    def peak_rss_mib(self) -> float | None:
        """The server process's peak resident memory so far."""
        if self.process is None:
            return None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
        return 0.0


@contextmanager
def chatbot(
    name: str,
    *,
    users: int,
    system_prompt: str,
    max_tokens: int,
    cache: str,
    ram_bytes: int = 2 * 1024**3,
    disk_bytes: int = 8 * 1024**3,
    context_tokens: int = 8192,
    env: dict[str, str] | None = None,
) -> Iterator[Target]:
    """``cache``: "off" (every prompt recomputed), "live" (the live context only, as before
    the KV store existed) or "tiered" (live, RAM, disk). ``env``: more ``CHATBOT_*``
    settings."""
    port = free_port()
    keys = [f"bench-user-{u:04d}-key-0123456789" for u in range(users)]
    with tempfile.TemporaryDirectory(prefix="bench-kv-") as kv_dir:
        settings = {
            **os.environ,
            "CHATBOT_HOST": "127.0.0.1",
            "CHATBOT_PORT": str(port),
            "CHATBOT_API_KEYS": ",".join(f"{k}=user{u}" for u, k in enumerate(keys)),
            # The first key reads the whole cache's counters on /v1/cache/stats.
            "CHATBOT_OPERATORS": "user0",
            "CHATBOT_MODEL_ID": MODEL_ID,
            "CHATBOT_SYSTEM_PROMPT": system_prompt,
            "CHATBOT_CONTEXT_TOKENS": str(context_tokens),
            "CHATBOT_MAX_TOKENS": str(max_tokens),
            "CHATBOT_TEMPERATURE": "0",
            "CHATBOT_MAX_STREAMS_PER_USER": "4",
            "CHATBOT_LOG_LEVEL": "warning",
            "CHATBOT_PREFIX_CACHE": "false" if cache == "off" else "true",
            "CHATBOT_KV_RAM_BYTES": str(ram_bytes if cache == "tiered" else 0),
            "CHATBOT_KV_DISK_BYTES": str(disk_bytes if cache == "tiered" else 0),
            "CHATBOT_KV_DIR": kv_dir,
            **(env or {}),
        }
        command = [sys.executable, "-m", "chatbot", "serve"]
        url = f"http://127.0.0.1:{port}"
        with ServerProcess(command, ready_url=f"{url}/readyz", env=settings) as server:
            yield Target(
                name=name,
                url=f"{url}/v1",
                keys=keys,
                sends_system_prompt=False,
                process=server.popen,
                is_chatbot=True,
                notes={
                    "cache": cache,
                    "ram_bytes": ram_bytes,
                    "disk_bytes": disk_bytes,
                    **(env or {}),
                },
            )


@contextmanager
def llama_cpp_server(
    name: str,
    *,
    users: int,
    model_path: Path,
    cache: bool,
    cache_bytes: int = 2 * 1024**3,
    context_tokens: int = 8192,
    chat_format: str | None = None,
) -> Iterator[Target]:
    """``python -m llama_cpp.server``; its cache option keeps ``Llama.save_state`` copies
    in a ``LlamaRAMCache`` of ``cache_bytes`` (which counts the KV state, not the logits
    each copy carries). ``chat_format``: None uses its fallback for a GGUF without a chat
    template (llama-2)."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model_path),
        "--model_alias",
        MODEL_ID,
        "--n_ctx",
        str(context_tokens),
        "--n_threads",
        str(os.cpu_count() or 1),
        "--n_threads_batch",
        str(os.cpu_count() or 1),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--verbose",
        "false",
    ]
    if cache:
        command += ["--cache", "true", "--cache_type", "ram", "--cache_size", str(cache_bytes)]
    if chat_format:
        command += ["--chat_format", chat_format]
    url = f"http://127.0.0.1:{port}/v1"
    with ServerProcess(command, ready_url=f"{url}/models", env=os.environ) as server:
        yield Target(
            name=name,
            url=url,
            keys=["unused"] * users,
            sends_system_prompt=True,
            process=server.popen,
            is_chatbot=False,
            notes={
                "cache": "LlamaRAMCache" if cache else "live context only",
                "chat_format": chat_format or "llama-2",
            },
        )


@contextmanager
def model_server(
    name: str, *, users: int, base_url: str, api_key: str | None, model: str
) -> Iterator[Target]:
    """An OpenAI-compatible server that is already running (vLLM with LMCache, say)."""
    yield Target(
        model=model,
        name=name,
        url=base_url.rstrip("/"),
        keys=[api_key or "unused"] * users,
        sends_system_prompt=True,
        process=None,
        is_chatbot=False,
        notes={"base_url": base_url},
    )
