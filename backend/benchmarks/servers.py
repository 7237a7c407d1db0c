"""The chatbot as the benchmarks start it, a process of its own on loopback: on its embedded
engine (cache off, live context only, tiered) or on its ``openai`` engine in front of a model
server. The model servers themselves are the test bed's (``testbed``)."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import httpx
from testbed.process import ServerProcess
from testbed.servers import MODEL_ID, Target, llama_cpp_server

from benchmarks.workloads import SYSTEM_PROMPT
from chatbot.client.local_server import free_port

Factory = Callable[[], AbstractContextManager[Target]]
"""A target not yet started: entering what it returns starts it, leaving stops it."""


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


@contextmanager
def chatbot_in_front(
    name: str,
    upstream: Target,
    *,
    users: int,
    answer_tokens: int,
    context_tokens: int = 8192,
) -> Iterator[Target]:
    """The chatbot on its ``openai`` engine, in front of the model server ``upstream``."""
    env = {
        "CHATBOT_ENGINE": "openai",
        "CHATBOT_OPENAI_BASE_URL": upstream.url,
        "CHATBOT_OPENAI_MODEL": upstream.model,
    }
    if upstream.keys[0] != "unused":
        env["CHATBOT_OPENAI_API_KEY"] = upstream.keys[0]
    with chatbot(
        name,
        users=users,
        system_prompt=SYSTEM_PROMPT,
        max_tokens=answer_tokens,
        cache="off",  # the embedded engine's setting; the model server keeps the cache
        context_tokens=context_tokens,
        env=env,
    ) as front:
        front.notes = {"engine": "openai", "model server": upstream.name, **upstream.notes}
        yield front


def ours(
    name: str,
    cache: str,
    users: int,
    answer_tokens: int,
    *,
    ram_bytes: int = 2 * 1024**3,
    disk_bytes: int = 8 * 1024**3,
) -> Factory:
    """The chatbot on its embedded engine with the benchmarks' system prompt."""
    return lambda: chatbot(
        name,
        users=users,
        system_prompt=SYSTEM_PROMPT,
        max_tokens=answer_tokens,
        cache=cache,
        ram_bytes=ram_bytes,
        disk_bytes=disk_bytes,
    )


CACHE_OFF = "chatbot, cache off"
TIERED = "chatbot, tiered KV cache"


def cache_targets(
    users: int, answer_tokens: int, model_path: Path, *, peers: bool = True
) -> dict[str, Factory]:
    """The chatbot with its cache off and with its tiered KV cache, and (``peers``)
    llama_cpp.server without and with its ``LlamaRAMCache``."""

    def theirs(name: str, cache: bool) -> Factory:
        return lambda: llama_cpp_server(name, users=users, model_path=model_path, cache=cache)

    targets = {
        name: ours(name, cache, users, answer_tokens)
        for name, cache in ((CACHE_OFF, "off"), (TIERED, "tiered"))
    }
    if peers:
        targets["llama_cpp.server"] = theirs("llama_cpp.server", False)
        targets["llama_cpp.server --cache"] = theirs("llama_cpp.server --cache", True)
    return targets


def engine_ttft(target: Target) -> tuple[float, float] | None:
    """(seconds, requests) of the chatbot's ``chatbot_ttft_seconds`` so far, all labels
    together: TTFT as its engine saw it; None for a server that is not the chatbot."""
    if not target.is_chatbot:
        return None
    text = httpx.get(f"{target.url.removesuffix('/v1')}/metrics", timeout=10).text
    totals = {"_sum": 0.0, "_count": 0.0}
    for line in text.splitlines():
        for suffix in totals:
            if line.startswith(f"chatbot_ttft_seconds{suffix}"):
                totals[suffix] += float(line.rsplit(" ", 1)[1])
    return totals["_sum"], totals["_count"]
