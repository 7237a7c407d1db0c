"""Drafts through the HTTP API, without a model: ``PUT /v1/conversations/{id}/draft`` answers
at once with whether the engine is reading it, hands the engine exactly the prompt the
message will have, stores nothing, and stays within the user's limits however many come.

The scripted engine (tests/fakes.py) holds the newest draft of each conversation as an
engine that reads ahead does, and counts the draft's tokens as cached when the message
comes; what the engine did is read from it and from /metrics."""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatbot.agents.graph import CHARS_PER_TOKEN
from chatbot.engines.base import DraftStatus
from tests.conftest import BOB_KEY, LiveServer, Servers
from tests.fakes import count_tokens, draft_text
from tests.fast.api import ends, messages, new_conversation, stream_turn
from tests.fast.conftest import contents, fake_server

TEA_QUESTION = "Are green tea leaves steamed or oxidised?"  # about tea.md: the knowledge agent
QUESTION = "And what would you plant next to the tomatoes?"


def draft_path(conversation_id: str) -> str:
    return f"/v1/conversations/{conversation_id}/draft"


def put_draft(client: httpx.Client, conversation_id: str, content: str) -> dict[str, Any]:
    response = client.put(draft_path(conversation_id), json={"content": content})
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


def error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The JSON error of a refusal with ``status``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    detail: dict[str, Any] = response.json()["error"]
    assert set(detail) == {"type", "message", "code"}
    return detail


def metric(chatbot: LiveServer, line_start: str) -> float:
    text = chatbot.state.metrics.export().decode()
    lines = [line for line in text.splitlines() if line.startswith(line_start)]
    values = [float(line.rsplit(" ", 1)[1]) for line in lines]
    assert values, f"no sample starts with {line_start}"
    return sum(values)


# --- the prompt


def test_a_draft_is_read_with_the_very_prompt_its_message_then_has(
    server: Servers, docs_dir: Path
) -> None:
    chatbot, engine = fake_server(server, docs_dir)
    with chatbot.client() as alice:
        conversation = new_conversation(alice)
        stream_turn(alice, conversation, "I grow tomatoes in my garden.")
        before = messages(alice, conversation)
        typed = QUESTION[:20]
        started = time.monotonic()
        assert put_draft(alice, conversation, typed) == {
            "status": "prefilling",
            "reason": None,
            "agent": "assistant",
        }
        assert time.monotonic() - started < 1.0
        assert put_draft(alice, conversation, QUESTION)["status"] == "prefilling"
        # Nothing is stored: no message, no history.
        assert messages(alice, conversation) == before
        _, end = ends(stream_turn(alice, conversation, QUESTION))

    first, last = engine.drafts
    assert draft_text(first) == typed
    message = engine.requests[-1]
    # The message's prompt is the last draft's, word for word, and cached for the same user
    # and conversation.
    assert contents(message) == contents(last)
    assert (message.cache_salt, message.public_messages, message.session) == (
        last.cache_salt,
        last.public_messages,
        last.session,
    )
    assert (last.cache_salt, last.session) == ("alice", conversation)
    assert end["usage"]["draft_tokens"] == count_tokens(last) > 0
    assert engine.held == {}, "the message ended its draft"


def test_a_draft_is_laid_out_for_the_agent_the_message_will_get(
    server: Servers, docs_dir: Path
) -> None:
    chatbot, engine = fake_server(server, docs_dir)
    with chatbot.client() as alice:
        routed = new_conversation(alice)
        assert put_draft(alice, routed, "Hi! How")["agent"] == "assistant"
        assert put_draft(alice, routed, TEA_QUESTION)["agent"] == "knowledge"
        start, _ = ends(stream_turn(alice, routed, TEA_QUESTION))
        assert start["agent"] == "knowledge"
        assert contents(engine.requests[-1]) == contents(engine.drafts[-1])

        pinned = new_conversation(alice, agent="summarizer")
        assert put_draft(alice, pinned, "Hello there")["agent"] == "summarizer"
        ends(stream_turn(alice, pinned, "Hello there"))
        assert contents(engine.requests[-1]) == contents(engine.drafts[-1])


# --- who may draft, and what


def test_a_draft_in_someone_elses_conversation_is_the_404_of_one_that_never_was(
    server: Servers, docs_dir: Path
) -> None:
    chatbot, engine = fake_server(server, docs_dir)
    with chatbot.client() as alice, chatbot.client(BOB_KEY) as bob:
        alices = new_conversation(alice)
        never = "conv_0123456789abcdef0123456789abcdef"
        for method, body in (("PUT", {"content": "mine now"}), ("DELETE", None)):
            refused = [
                bob.request(method, draft_path(conversation), json=body)
                for conversation in (alices, never)
            ]
            details = [error(response, 404) for response in refused]
            assert details[0]["code"] == "conversation_not_found"
            assert refused[0].text.replace(alices, "<id>") == refused[1].text.replace(never, "<id>")
    assert engine.drafts == []
    assert engine.dropped_sessions == []


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"content": "x" * 4001}, 413, "message_too_large"),
        ({"content": "a bell \u0007 rings"}, 422, None),
        ({"content": "lone \ud800 surrogate"}, 422, None),
        ({"content": " \n\t "}, 422, None),
        ({"content": ""}, 422, None),
        ({}, 422, None),
        ({"content": "hi", "draft": True}, 422, None),
        ({"content": 42}, 422, None),
    ],
)
def test_a_draft_is_validated_as_a_message_is(
    server: Servers, docs_dir: Path, body: dict[str, Any], status: int, code: str | None
) -> None:
    chatbot, engine = fake_server(server, docs_dir)
    with chatbot.client() as alice:
        conversation = new_conversation(alice)
        # JSON's escapes, so that a lone surrogate goes as the client wrote it.
        raw, headers = json.dumps(body).encode(), {"content-type": "application/json"}
        as_draft = error(alice.put(draft_path(conversation), content=raw, headers=headers), status)
        path = f"/v1/conversations/{conversation}/messages"
        sent = alice.post(path, content=raw, headers=headers)
        as_message = error(sent, status)
    assert as_draft["type"] == as_message["type"]
    if code is not None:
        assert as_draft["code"] == as_message["code"] == code
    assert engine.drafts == []


def test_a_draft_that_is_not_json_is_a_400(server: Servers, docs_dir: Path) -> None:
    chatbot, engine = fake_server(server, docs_dir)
    with chatbot.client() as alice:
        conversation = new_conversation(alice)
        response = alice.put(
            draft_path(conversation),
            content=b'{"content": "unfinished',
            headers={"content-type": "application/json"},
        )
    assert error(response, 400)["type"] == "invalid_request_error"
    assert engine.drafts == []


# --- ending a draft


def test_delete_drops_the_draft_and_deleting_the_conversation_does_too(
    server: Servers, docs_dir: Path
) -> None:
    chatbot, engine = fake_server(server, docs_dir)
    with chatbot.client() as alice:
        kept, deleted = new_conversation(alice), new_conversation(alice)
        put_draft(alice, kept, "Something I changed my mind about")
        put_draft(alice, deleted, "Something for a conversation I delete")
        assert set(engine.held) == {kept, deleted}

        assert alice.delete(draft_path(kept)).status_code == 204
        assert alice.delete(draft_path(kept)).status_code == 204  # none left: the same
        assert alice.delete(f"/v1/conversations/{deleted}").status_code == 204
        error(alice.put(draft_path(deleted), json={"content": "too late"}), 404)
        assert messages(alice, kept) == []
    assert engine.dropped_sessions == [kept, deleted]
    assert engine.held == {}


def test_a_draft_waits_for_no_answer_and_is_skipped_while_one_is_written(
    server: Servers, docs_dir: Path
) -> None:
    chatbot, engine = fake_server(server, docs_dir)
    engine.token_delay_s = 0.2  # eight words: 1.6 s an answer
    with chatbot.client() as alice:
        answering, other = new_conversation(alice), new_conversation(alice)
        with alice.stream(
            "POST", f"/v1/conversations/{answering}/messages", json={"content": "Tell me"}
        ) as stream:
            assert stream.status_code == 200
            started = time.monotonic()
            assert put_draft(alice, other, "Meanwhile, elsewhere")["status"] == "prefilling"
            assert put_draft(alice, answering, "And then?") == {
                "status": "skipped",
                "reason": "turn_in_progress",
                "agent": None,
            }
            assert time.monotonic() - started < 1.0, "drafts never wait for an answer"
            stream.read()
    assert [draft_text(d) for d in engine.drafts] == ["Meanwhile, elsewhere"]


def test_a_draft_that_a_compaction_would_precede_is_skipped(
    server: Servers, docs_dir: Path
) -> None:
    chatbot, engine = fake_server(
        server, docs_dir, context_tokens=1024, compact_at=0.5, compact_keep_messages=2
    )
    with chatbot.client() as alice:
        conversation = new_conversation(alice, agent="assistant")
        for note in ("First note.", "Second note."):
            stream_turn(alice, conversation, note)
        assert put_draft(alice, conversation, "A short third note.")["status"] == "prefilling"
        long_note = "The quick brown fox jumps over the lazy dog. " * 40  # ~600 tokens
        assert put_draft(alice, conversation, long_note) == {
            "status": "skipped",
            "reason": "compaction",
            "agent": None,
        }
    assert len(engine.drafts) == 1


# --- turned off, or no room


def test_drafts_off_are_answered_as_skipped_and_nothing_is_computed(
    server: Servers, docs_dir: Path
) -> None:
    chatbot, engine = fake_server(server, docs_dir, drafts=False)
    with chatbot.client() as alice:
        conversation = new_conversation(alice)
        assert put_draft(alice, conversation, "Hello") == {
            "status": "skipped",
            "reason": "disabled",
            "agent": None,
        }
        ends(stream_turn(alice, conversation, "Hello"))
    assert engine.drafts == []
    assert metric(chatbot, 'chatbot_drafts_skipped_total{reason="disabled"}') == 1


@pytest.mark.parametrize(
    ("engine_says", "reason"),
    [(DraftStatus.SKIPPED, "engine_busy"), (DraftStatus.UNSUPPORTED, "unsupported")],
)
def test_an_engine_without_room_or_support_skips_the_draft_and_charges_nothing(
    server: Servers, docs_dir: Path, engine_says: DraftStatus, reason: str
) -> None:
    # A budget that one charged draft of this size would spend.
    chatbot, engine = fake_server(server, docs_dir, tokens_per_minute=150)
    engine.draft_status = engine_says
    text = "w" * 300  # 100 tokens and the turn's 32
    with chatbot.client() as alice:
        conversation = new_conversation(alice)
        for _ in range(3):
            body = put_draft(alice, conversation, text)
            assert body == {"status": "skipped", "reason": reason, "agent": "assistant"}
        engine.draft_status = DraftStatus.PREFILLING
        assert put_draft(alice, conversation, text)["status"] == "prefilling"
    assert metric(chatbot, f'chatbot_drafts_skipped_total{{reason="{reason}"}}') == 3


# --- limits


def test_a_conversation_holds_one_draft_and_a_user_a_few(server: Servers, docs_dir: Path) -> None:
    chatbot, engine = fake_server(server, docs_dir, max_drafts_per_user=2)
    with chatbot.client() as alice, chatbot.client(BOB_KEY) as bob:
        first, second, third = (new_conversation(alice) for _ in range(3))
        bobs = new_conversation(bob)
        put_draft(bob, bobs, "Bob's own")
        for text in ("One", "One more", "One more word"):
            put_draft(alice, first, text)
        assert set(engine.held) == {first, bobs}, "a newer draft replaces the older"
        put_draft(alice, second, "Two")
        put_draft(alice, third, "Three")
        # The third conversation's draft dropped Alice's oldest; Bob's is his own.
        assert set(engine.held) == {second, third, bobs}
        assert engine.dropped_sessions == [first]
        put_draft(alice, second, "Two, again")  # the newest now: third is the oldest
        put_draft(alice, first, "One, back")
        assert set(engine.held) == {first, second, bobs}
    assert engine.most_held == 3


def test_drafts_are_charged_to_the_users_token_budget(server: Servers, docs_dir: Path) -> None:
    chatbot, engine = fake_server(server, docs_dir, tokens_per_minute=600)
    typed = "My notes from the trip, all of them. " * 12  # 444 characters: 148 tokens
    with chatbot.client() as alice, chatbot.client(BOB_KEY) as bob:
        first, second = new_conversation(alice), new_conversation(alice)
        assert put_draft(alice, first, typed)["status"] == "prefilling"  # 180 charged
        # Only what was added is charged: 8 characters, 3 tokens and the last one again.
        for _ in range(20):
            typed += " And so?"
            assert put_draft(alice, first, typed)["status"] == "prefilling"
        # Another text entirely, twice over what is left: skipped.
        other = "An unrelated letter to my landlord. " * 40  # 1,440 characters: 480 tokens
        assert put_draft(alice, second, other) == {
            "status": "skipped",
            "reason": "token_budget",
            "agent": "assistant",
        }
        # Bob's budget is his own.
        assert put_draft(bob, new_conversation(bob), other)["status"] == "prefilling"

        # The budget has room left (600 - 180 - 20 * 4): the message is answered, and is
        # charged what the drafts had not read. The next one finds the budget spent.
        _, end = ends(stream_turn(alice, first, typed))
        assert end["usage"]["draft_tokens"] > 0
        stream_turn(alice, second, other)
        refused = alice.post(f"/v1/conversations/{first}/messages", json={"content": "Hi"})
        assert error(refused, 429)["code"] == "token_budget_exhausted"
        assert int(refused.headers["retry-after"]) >= 1
        assert put_draft(alice, first, "Hi")["reason"] == "token_budget"
    assert len([d for d in engine.drafts if d.cache_salt == "alice"]) == 21


def test_a_hostile_stream_of_drafts_stays_within_the_users_limits(
    server: Servers, docs_dir: Path
) -> None:
    budget, rate, cap = 2000, 40, 2
    chatbot, engine = fake_server(
        server,
        docs_dir,
        tokens_per_minute=budget,
        requests_per_minute=rate,
        max_drafts_per_user=cap,
    )
    with chatbot.client() as alice:
        conversations = [new_conversation(alice) for _ in range(4)]

    async def hostile() -> list[httpx.Response]:
        async with chatbot.async_client() as client:
            # Ten at a time, each a text of its own in one of four conversations.
            responses: list[httpx.Response] = []
            for wave in range(8):
                responses += await asyncio.gather(
                    *(
                        client.put(
                            draft_path(conversations[n % 4]),
                            json={"content": f"{wave}.{n} " + "lorem ipsum " * 25},
                        )
                        for n in range(10)
                    )
                )
            return responses

    started = time.monotonic()
    responses = asyncio.run(hostile())
    elapsed = time.monotonic() - started

    statuses = [r.status_code for r in responses]
    assert set(statuses) == {202, 429}
    # The drafts' own request rate: a burst of `rate`, and what refills meanwhile.
    assert statuses.count(202) <= rate + math.ceil(elapsed * rate / 60)
    for refused in (r for r in responses if r.status_code == 429):
        assert error(refused, 429)["code"] == "too_many_requests"
    bodies = [r.json() for r in responses if r.status_code == 202]
    assert {b["reason"] for b in bodies} <= {None, "token_budget", "superseded"}
    assert any(b["reason"] == "token_budget" for b in bodies)
    # What the engine was given was charged: at least a token for every 3 characters.
    charged = sum(math.ceil(len(draft_text(d)) / CHARS_PER_TOKEN) + 1 for d in engine.drafts)
    assert charged <= budget + elapsed * budget / 60
    assert engine.most_held <= cap

    # The user's messages have their own request rate, and other users are untouched.
    with chatbot.client() as alice, chatbot.client(BOB_KEY) as bob:
        _, end = ends(stream_turn(alice, conversations[0], "Hello?"))
        assert end["status"] == "complete"
        bobs = new_conversation(bob)
        assert put_draft(bob, bobs, "Hello from Bob")["status"] == "prefilling"
        assert ends(stream_turn(bob, bobs, "Hello from Bob"))[1]["usage"]["draft_tokens"] > 0


# --- what it is counted as


def test_drafts_are_counted_in_the_metrics(server: Servers, docs_dir: Path) -> None:
    chatbot, engine = fake_server(server, docs_dir)
    with chatbot.client() as alice:
        conversation = new_conversation(alice)
        put_draft(alice, conversation, "What is")
        put_draft(alice, conversation, "What is a teapot?")
        engine.draft_status = DraftStatus.SKIPPED
        put_draft(alice, conversation, "What is a teapot for?")
        _, end = ends(stream_turn(alice, conversation, "What is a teapot?"))
        scraped = alice.get("/metrics").text
    assert "chatbot_drafts_received_total 3.0" in scraped
    assert 'chatbot_drafts_skipped_total{reason="engine_busy"} 1.0' in scraped
    assert "chatbot_engine_drafts_prefilled_total 2.0" in scraped
    assert "chatbot_engine_drafts_dropped_total 1.0" in scraped  # replaced by the newer
    tokens = sum(count_tokens(d) for d in engine.drafts)
    assert f"chatbot_engine_draft_tokens_total {tokens:.1f}" in scraped
    used = end["usage"]["draft_tokens"]
    assert used == count_tokens(engine.drafts[-1])
    assert f"chatbot_engine_draft_tokens_used_total {used:.1f}" in scraped
    assert (
        f'chatbot_draft_hit_tokens_total{{agent="assistant",engine="embedded"}} {used:.1f}'
        in scraped
    )
