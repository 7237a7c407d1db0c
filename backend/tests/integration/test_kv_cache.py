"""The tiered KV cache on the real model: a state brought back from RAM or from disk
continues exactly as a cold prefill of the same prompt would, and over HTTP each answer
says which tier served it, while one user's content never serves another."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from chatbot.engines import chat_format
from chatbot.engines.base import SamplingParams
from chatbot.engines.embedded import LlamaRunner, state_namespace
from chatbot.kvcache import KVCache, PromptKey, owner_digest
from chatbot.models.cache import CacheTier
from chatbot.models.domain import ChatMessage, Usage
from tests.conftest import BOB_KEY, CAROL_KEY, DAVE_KEY, LiveServer
from tests.integration.test_conversation_api import new_conversation, stream_turn
from tests.prompts import public_tokens

GREEDY_16 = SamplingParams(max_tokens=16, temperature=0.0, top_p=1.0)
SYSTEM = ChatMessage(role="system", content="You are a helpful assistant.")
QUESTION = ChatMessage(role="user", content="Tell me about the history of the city of Rome.")
OTHER = ChatMessage(role="user", content="What do dogs like to eat?")
GIB = 1024**3


class Runners:
    def __init__(self, model_path: Path) -> None:
        self.model_path = model_path
        self.namespace = state_namespace(model_path)
        self._open: list[LlamaRunner] = []

    def new(self, kv_cache: KVCache | None) -> LlamaRunner:
        runner = LlamaRunner(
            self.model_path, context_tokens=2048, batch_tokens=512, threads=2, kv_cache=kv_cache
        )
        self._open.append(runner)
        return runner

    def close(self) -> None:
        for runner in self._open:
            runner.close()


@pytest.fixture(scope="module")
def runners(model_path: Path) -> Iterator[Runners]:
    made = Runners(model_path)
    yield made
    made.close()


def key(runner: LlamaRunner, messages: list[ChatMessage], user: str) -> PromptKey:
    prompt = chat_format.render(messages, few_shot=True, public_messages=1)
    tokens, public_tokens = runner.tokenize(prompt)
    return PromptKey(tokens, public_tokens, owner_digest(user))


def generate(runner: LlamaRunner, prompt: PromptKey) -> tuple[list[int], str, Usage]:
    """The first 16 greedy tokens (ids and text), with no stop strings to cut them short."""
    pieces: list[str] = []
    usage, _, _, _ = runner.generate(
        prompt, GREEDY_16, emit=pieces.append, cancelled=lambda: False, stops=()
    )
    # The context holds the prompt and every generated token but the last one sampled.
    completion = runner.held_tokens()[len(prompt.tokens) :]
    runner.save(prompt)
    return completion, "".join(pieces), usage


def second_turn(answer: str) -> list[ChatMessage]:
    follow_up = ChatMessage(role="user", content="And what about Paris?")
    return [SYSTEM, QUESTION, ChatMessage(role="assistant", content=answer), follow_up]


@pytest.mark.model
def test_a_state_from_ram_or_disk_continues_like_a_cold_prefill(
    runners: Runners, tmp_path: Path
) -> None:
    ram = KVCache(namespace=runners.namespace, chunk_tokens=64, ram_bytes=GIB)
    warm = runners.new(ram)
    _, answer, _ = generate(warm, key(warm, [SYSTEM, QUESTION], "alice"))
    turn2 = second_turn(answer)
    generate(warm, key(warm, [SYSTEM, OTHER], "bob"))  # the live context moves on

    cold = runners.new(None)
    expected_ids, expected_text, cold_usage = generate(cold, key(cold, turn2, "alice"))
    assert cold_usage.cached_tokens == 0

    ids, text, usage = generate(warm, key(warm, turn2, "alice"))
    assert usage.cache_tier is CacheTier.RAM
    assert usage.cached_tokens > len(key(warm, [SYSTEM, QUESTION], "alice").tokens)
    assert (ids, text) == (expected_ids, expected_text)

    # The disk tier: saved by one process, read back by the next (a new cache and context
    # on the same folder, with no RAM tier).
    saving = runners.new(
        KVCache(namespace=runners.namespace, chunk_tokens=64, disk_bytes=GIB, disk_dir=tmp_path)
    )
    generate(saving, key(saving, [SYSTEM, QUESTION], "alice"))
    restarted = runners.new(
        KVCache(namespace=runners.namespace, chunk_tokens=64, disk_bytes=GIB, disk_dir=tmp_path)
    )
    ids, text, usage = generate(restarted, key(restarted, turn2, "alice"))
    assert usage.cache_tier is CacheTier.DISK
    assert (ids, text) == (expected_ids, expected_text)


def test_each_answer_names_the_tier_that_served_it(live_server: LiveServer) -> None:
    with live_server.client() as alice, live_server.client(CAROL_KEY) as carol:
        mine = new_conversation(alice)
        stream_turn(alice, mine, "Which planet is the largest?")
        other = new_conversation(carol)
        carol_end = stream_turn(carol, other, "Which metal is the lightest?")[-1][1]
        # Alice's conversation lost the live context to Carol's and comes back from RAM.
        end = stream_turn(alice, mine, "How many moons does it have?")[-1][1]
        stored = alice.get(f"/v1/conversations/{mine}/messages").json()["data"][-1]

    assert carol_end["usage"]["cache_tier"] is not None  # the shared preamble, at least
    assert end["usage"]["cache_tier"] == "ram"
    assert end["usage"]["cached_tokens"] > public_tokens(live_server)
    assert stored["usage"] == end["usage"]


def test_one_users_words_never_hit_the_cache_for_another(live_server: LiveServer) -> None:
    words = "Please repeat after me: the secret password is tangerine-42."
    with live_server.client() as alice, live_server.client(DAVE_KEY) as dave:
        stream_turn(alice, new_conversation(alice), words)
        stream_turn(alice, new_conversation(alice), "Something else, to move the context on.")
        end = stream_turn(dave, new_conversation(dave), words)[-1][1]
    # Dave, who has written nothing before, gets the server's public preamble from the
    # cache and not one token more, though Alice's identical words are in RAM.
    assert end["usage"]["cached_tokens"] == public_tokens(live_server)


def test_cache_stats_show_the_tiers_and_only_the_callers_own_lookups(
    live_server: LiveServer,
) -> None:
    with live_server.client(CAROL_KEY) as carol, live_server.client(BOB_KEY) as bob:
        before = carol.get("/v1/cache/stats").json()
        stream_turn(bob, new_conversation(bob), "What colour is the sky?")
        after = carol.get("/v1/cache/stats").json()
        bobs = bob.get("/v1/cache/stats").json()
        metrics = httpx.get(f"{live_server.url}/metrics").text

    assert after["enabled"] is True
    assert after["user"] == before["user"], "Carol's own counters must not move for Bob"
    assert after["cache"]["lookups"] == before["cache"]["lookups"] + 1
    assert set(after["cache"]["tiers"]) == {"live", "ram", "disk"}
    ram = after["cache"]["tiers"]["ram"]
    assert 0 < ram["bytes"] <= ram["budget_bytes"]
    assert bobs["user"]["lookups"] >= 1
    assert 0 < bobs["user"]["hit_rate"] <= 1
    assert 'chatbot_kv_hit_tokens_total{tier="ram"}' in metrics
    assert "chatbot_kv_lookups_total" in metrics


def test_cache_stats_need_a_key(live_server: LiveServer) -> None:
    response = httpx.get(f"{live_server.url}/v1/cache/stats")
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
