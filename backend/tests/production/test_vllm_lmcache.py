"""The chatbot's ``openai`` engine against real vLLM with LMCache: streamed turns, the cached
tokens vLLM reports, a conversation that outlives a vLLM restart (KV from LMCache's RAM tier)
and a restart of both (KV from LMCache's disk tier), cancellation, and vLLM killed mid-answer.

Every figure asserted here is read from vLLM's or LMCache's own answers and metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
from testbed.vllm_stack import CHUNK_TOKENS, SERVED_MODEL, metric

from tests.conftest import Servers
from tests.production.chat import INVENTED_TURN, LONG_ANSWER, NOTES, client, turn
from tests.production.conftest import Stack, chatbot_front
from tests.sse import parse_events
from tests.upstream import check_killed_mid_answer, sdk_rounds
from tests.waiting import wait_until

# A test that starts vLLM (about a minute on two cores, more when converting the model) may
# take longer than the suite's 300 s.
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def front(stack: Stack, docs_dir: Path, module_server: Servers) -> str:
    return chatbot_front(module_server, f"{stack.vllm.url}/v1", docs_dir)


def lmcache_counters(stack: Stack) -> dict[str, float]:
    text = stack.cache.metrics()
    return {
        name: metric(text, f"lmcache_mp_{name}_total")
        for name in (
            "lookup_hit_tokens",
            "lookup_hit_l1_tokens",
            "lookup_hit_l2_tokens",
            "num_finished_retrieves",
            "l1_read_chunks",
            "l2_store_submitted_objects_chunks",
            "l2_store_completed_objects_chunks",
        )
    }


def grew(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before[name] for name in before}


def external_hits(stack: Stack) -> float:
    """Prompt tokens vLLM took from its KV connector (LMCache), by vLLM's own count."""
    return metric(stack.vllm.metrics(), "vllm:external_prefix_cache_hits_total")


def test_streamed_turns_relay_the_cached_tokens_of_vllms_prefix_cache(front: str) -> None:
    with client(front) as alice:
        assert alice.get("/readyz").json() == {"status": "ready", "model": SERVED_MODEL}
        conversation_id = alice.post("/v1/conversations", json={}).json()["id"]
        one = turn(alice, conversation_id, "What is a widget?")
        two = turn(alice, conversation_id, "Where is it used?")
        messages = alice.get(f"/v1/conversations/{conversation_id}/messages").json()["data"]
    assert one["usage"]["prompt_tokens"] > 128
    assert two["usage"]["prompt_tokens"] > one["usage"]["prompt_tokens"]
    # vLLM's prefix cache holds the first prompt in 128-token CPU blocks.
    assert two["usage"]["cached_tokens"] >= one["usage"]["prompt_tokens"] // 128 * 128 > 0
    assert two["usage"]["cached_tokens"] % 128 == 0
    assert [(m["role"], m["status"]) for m in messages] == [
        ("user", "complete"),
        ("assistant", "complete"),
    ] * 2


def test_the_official_openai_client_through_the_chatbot(front: str) -> None:
    rounds = sdk_rounds(front, SERVED_MODEL, "Name a colour.", "And another one?")
    for answer, _ in rounds:
        assert answer.strip()
        assert not INVENTED_TURN.search(answer), answer
    usages = [usage for _, usage in rounds]
    details = usages[1].prompt_tokens_details
    assert details is not None
    assert details.cached_tokens is not None
    assert details.cached_tokens >= usages[0].prompt_tokens // 128 * 128 > 0


def test_a_client_that_hangs_up_aborts_the_vllm_request(stack: Stack, front: str) -> None:
    def running() -> float:
        return metric(stack.vllm.metrics(), "vllm:num_requests_running")

    def finished() -> float:
        """Requests vLLM ran to their end (a stop, the length limit); an abort is not one."""
        return metric(stack.vllm.metrics(), "vllm:request_success_total")

    with client(front) as alice:
        conversation_id = alice.post("/v1/conversations", json={}).json()["id"]
        path = f"/v1/conversations/{conversation_id}/messages"
        # Greedy, so the answer is the same long count every run: sampled, the model may end
        # it after a few words, before the client has left.
        body = {"content": LONG_ANSWER, "max_tokens": 400, "temperature": 0.0}
        before = finished()
        with alice.stream("POST", path, json=body) as response:
            events = parse_events(response.iter_lines())
            tokens = 0
            for name, _ in events:
                tokens += name == "token"
                if tokens == 8:
                    break
            assert tokens == 8, "the answer ended before the client left"
            assert running() == 1  # the answer is being generated as the client leaves
        wait_until(lambda: running() == 0)
        wait_until(lambda: alice.get(path).json()["data"][-1]["status"] == "cancelled")
    assert finished() == before  # vLLM dropped the request rather than finishing it


def test_a_conversation_goes_on_after_vllm_restarts_with_its_kv_from_lmcache(
    stack: Stack, front: str
) -> None:
    with client(front) as alice:
        conversation_id = alice.post("/v1/conversations", json={}).json()["id"]
        first = turn(alice, conversation_id, f"{NOTES} What is a widget made of?")
        stack.vllm.restart()  # vLLM's own prefix cache is gone; LMCache's server is not
        assert external_hits(stack) == 0
        before = lmcache_counters(stack)
        second = turn(alice, conversation_id, "Who makes them?")
        after = lmcache_counters(stack)
    cached = second["usage"]["cached_tokens"]
    stored_chunks = first["usage"]["prompt_tokens"] // CHUNK_TOKENS
    # At least every whole chunk of the first prompt came back from LMCache.
    assert stored_chunks >= 1
    assert cached >= stored_chunks * CHUNK_TOKENS
    # The three counts agree: what the chatbot relayed, what vLLM took from its connector,
    # what LMCache found and sent.
    assert external_hits(stack) == cached
    delta = grew(before, after)
    assert delta["lookup_hit_tokens"] >= cached
    assert delta["lookup_hit_l1_tokens"] >= cached
    assert delta["num_finished_retrieves"] >= 1
    assert delta["l1_read_chunks"] * CHUNK_TOKENS >= cached


def test_a_conversation_goes_on_from_lmcaches_disk_tier_after_both_restart(
    stack: Stack, front: str
) -> None:
    with client(front) as alice:
        conversation_id = alice.post("/v1/conversations", json={}).json()["id"]
        first = turn(alice, conversation_id, f"{NOTES} Which shelf has the most gears?")
        # The disk writes are asynchronous: stop nothing before they are done.
        wait_until(
            lambda: (
                (c := lmcache_counters(stack))["l2_store_completed_objects_chunks"]
                == c["l2_store_submitted_objects_chunks"]
            ),
            timeout=30,
        )
        stack.vllm.stop()
        stack.cache.stop()  # L1 (RAM) is gone with it; the fs L2 folder stays
        stack.cache.start()
        stack.vllm.start()
        second = turn(alice, conversation_id, "How long do they last?")
        counters = lmcache_counters(stack)  # a new process: its counters start at zero
    cached = second["usage"]["cached_tokens"]
    assert cached >= first["usage"]["prompt_tokens"] // CHUNK_TOKENS * CHUNK_TOKENS > 0
    assert external_hits(stack) == cached
    assert counters["lookup_hit_l2_tokens"] >= cached
    assert counters["num_finished_retrieves"] >= 1


def test_vllm_killed_mid_answer(stack: Stack, front: str) -> None:
    """SIGKILL to vLLM and its engine mid-stream: an ``error`` event, the conversation keeps
    every earlier message and the failed answer, and the next message is a quick 503 with
    ``Retry-After``. Runs last: it leaves vLLM down."""
    with client(front) as alice:
        conversation_id = alice.post("/v1/conversations", json={}).json()["id"]
        turn(alice, conversation_id, "What is a widget?")
        body = {"content": LONG_ANSWER, "max_tokens": 400}
        check_killed_mid_answer(alice, conversation_id, body, stack.vllm.kill)
