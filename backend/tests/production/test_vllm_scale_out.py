"""Scale-out as deployed: two vLLM replicas sharing one LMCache server behind
``vllm-router --policy consistent_hash``, keyed on the chatbot's affinity header.

Which replica served a turn is read from the replicas' own metrics, not from the chatbot."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from testbed.vllm_stack import CHUNK_TOKENS, LMCacheServer, Router, VllmServer, metric

from tests.conftest import Servers
from tests.production.chat import NOTES, client, turn
from tests.production.conftest import chatbot_front

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def replicas(
    vllm_model: Path, chat_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[list[VllmServer], Router]]:
    work = tmp_path_factory.mktemp("scale-out")
    cache = LMCacheServer(l2_dir=work / "l2", log_dir=work)
    servers = [
        VllmServer(vllm_model, chat_template, work, cache, name=f"vllm-{i}") for i in range(2)
    ]
    router = Router([s.url for s in servers], work)
    try:
        cache.start()
        for server in servers:
            server.start()
        router.start()
        yield servers, router
    finally:
        router.stop()
        for server in servers:
            server.stop()
        cache.stop()


def served(server: VllmServer) -> float:
    if server.process is None or not server.process.running:
        return 0.0
    return metric(server.metrics(), "vllm:request_success_total")


def step(
    alice: httpx.Client, conversation_id: str, content: str, servers: list[VllmServer]
) -> tuple[dict[str, Any], list[float]]:
    """One turn, and the requests each replica finished meanwhile, by its own count."""
    before = [served(s) for s in servers]
    end = turn(alice, conversation_id, content)
    return end, [served(s) - b for s, b in zip(servers, before, strict=True)]


def test_a_conversation_stays_on_one_replica_and_moves_with_its_kv_when_it_stops(
    replicas: tuple[list[VllmServer], Router],
    docs_dir: Path,
    server: Servers,
) -> None:
    servers, router = replicas
    questions = (f"{NOTES} Which shelf has the most screws?", "And the fewest?", "Why?")
    url = chatbot_front(server, f"{router.url}/v1", docs_dir)
    with client(url) as alice:
        conversation_id = alice.post("/v1/conversations", json={}).json()["id"]
        homes = []
        for question in questions:
            _, counts = step(alice, conversation_id, question, servers)
            assert sorted(counts) == [0, 1], counts  # one replica served the turn
            homes.append(counts.index(1))
        assert len(set(homes)) == 1, homes  # and always the same one
        home, other = servers[homes[0]], servers[1 - homes[0]]

        home.stop()
        router.wait_until_unhealthy(home.url)
        external = metric(other.metrics(), "vllm:external_prefix_cache_hits_total")
        end, counts = step(alice, conversation_id, "Tell me again about shelf 20.", servers)
        assert counts[1 - homes[0]] == 1
        # The other replica never saw this conversation: its KV came from LMCache.
        cached = end["usage"]["cached_tokens"]
        assert cached >= CHUNK_TOKENS
        taken = metric(other.metrics(), "vllm:external_prefix_cache_hits_total") - external
        assert taken == cached
