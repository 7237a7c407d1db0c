"""A running server as the tests' and benchmarks' clients see it (``Target``), and the peer
model servers they start as processes on loopback: llama-cpp-python's OpenAI-compatible
server here, llama.cpp's own in ``llama_server``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from chatbot.client.local_server import free_port
from testbed.process import ServerProcess

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
def peer_server(
    name: str,
    command: list[str],
    *,
    url: str,
    ready_url: str,
    users: int,
    notes: dict[str, Any],
) -> Iterator[Target]:
    """``command``, a model server the client sends whole prompts to, as a ``Target`` at
    ``url``: started on entry once ``ready_url`` answers, stopped on exit."""
    with ServerProcess(command, ready_url=ready_url, env=os.environ) as server:
        yield Target(
            name=name,
            url=url,
            keys=["unused"] * users,
            sends_system_prompt=True,
            process=server.popen,
            is_chatbot=False,
            notes=notes,
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
    notes = {
        "cache": "LlamaRAMCache" if cache else "live context only",
        "chat_format": chat_format or "llama-2",
    }
    with peer_server(
        name, command, url=url, ready_url=f"{url}/models", users=users, notes=notes
    ) as target:
        yield target
