"""Drafts on the ``openai`` engine against real vLLM with LMCache: what the user is still
writing goes to vLLM as a one-token request on the conversation's replica, so that vLLM's
prefix cache holds it when the message comes. Every figure is vLLM's own."""

from __future__ import annotations

from pathlib import Path

import pytest
from testbed.vllm_stack import CHUNK_TOKENS, metric

from tests.conftest import Servers
from tests.production.chat import NOTES, client, turn
from tests.production.conftest import Stack, chatbot_front
from tests.waiting import wait_until

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

QUESTION = " Which shelf holds the most gears, and how many screws are on it?"


@pytest.fixture(scope="module")
def front(stack: Stack, docs_dir: Path, module_server: Servers) -> str:
    return chatbot_front(module_server, f"{stack.vllm.url}/v1", docs_dir)


def finished_requests(stack: Stack) -> float:
    return metric(stack.vllm.metrics(), "vllm:request_success_total")


def test_a_draft_is_in_vllms_cache_when_the_message_comes(front: str, stack: Stack) -> None:
    with client(front) as alice:
        # The same kind of message without a draft: vLLM reads all of the user's notes.
        cold_id = alice.post("/v1/conversations", json={}).json()["id"]
        cold = turn(alice, cold_id, NOTES.replace("widgets", "bolts") + QUESTION)["usage"]

        conversation_id = alice.post("/v1/conversations", json={}).json()["id"]
        before = finished_requests(stack)
        draft = NOTES + QUESTION[: -len(" screws are on it?")]
        response = alice.put(f"/v1/conversations/{conversation_id}/draft", json={"content": draft})
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "prefilling"
        wait_until(lambda: finished_requests(stack) > before, timeout=120)

        warm = turn(alice, conversation_id, NOTES + QUESTION)["usage"]
        assert warm["prompt_tokens"] == pytest.approx(cold["prompt_tokens"], abs=8)
        # The notes came from the draft's request: all but the last of LMCache's chunks is
        # cached, where the message without a draft had only the shared preamble.
        assert warm["cached_tokens"] > cold["cached_tokens"] + 300
        assert warm["prompt_tokens"] - warm["cached_tokens"] < CHUNK_TOKENS
