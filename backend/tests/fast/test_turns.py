"""The turn lifecycle through the HTTP API, without a model: routing, the prompt layout,
admission, cancellation, failure, compaction, and the stored (checkpointed) messages.

Each test serves the real app on loopback, in this process, with a scripted engine
(tests/fakes.py: it records every prompt and can be made full, failing or slow) or the
simulated one (``CHATBOT_ENGINE=simulated``). Only the API is used to drive and to check,
and the fake's record of the prompts it was given."""

from __future__ import annotations

import itertools
from pathlib import Path

import httpx

from chatbot.engines.base import GenerationRequest
from tests.conftest import ALICE_KEY, BOB_KEY, Servers
from tests.fakes import words
from tests.fast.api import (
    ends,
    messages,
    messages_path,
    new_conversation,
    open_turn,
    stream_turn,
    streamed_text,
)
from tests.fast.conftest import contents, fake_server
from tests.waiting import wait_until

KV_QUESTION = "How does the KV cache keep saved states in RAM and on disk?"


# --- routing


def test_the_rule_router_picks_an_agent_per_turn_on_the_simulated_engine(
    server: Servers,
) -> None:
    simulated = server(engine="simulated", simulated_answer_tokens=6)
    turns = [
        ("Write one sentence about the sea.", "assistant", "general conversation"),
        (KV_QUESTION, "knowledge", "about kv-cache.md"),
        ("Please summarise our conversation so far.", "summarizer", "asks for a summary"),
        ("Thanks! What is 2 plus 2?", "assistant", "general conversation"),
    ]
    with simulated.client() as alice:
        conversation = new_conversation(alice)
        for content, agent, reason in turns:
            start, end = ends(stream_turn(alice, conversation, content))
            assert (start["agent"], start["route_reason"]) == (agent, reason)
            assert (end["agent"], end["route_reason"], end["status"]) == (agent, reason, "complete")
            # Six words (the simulated engine's answers); the knowledge agent names its
            # document below them.
            assert len(end["content"].split("\n")[0].split()) == 6
            if agent == "knowledge":
                assert end["source"] == "kv-cache.md"
                assert end["content"].endswith("\n\nSource: kv-cache.md")
        stored = messages(alice, conversation)
    answers = [m for m in stored if m["role"] == "assistant"]
    assert [m["agent"] for m in answers] == [agent for _, agent, _ in turns]


def test_a_pinned_conversation_keeps_its_agent(server: Servers, docs_dir: Path) -> None:
    chatbot, _ = fake_server(server, docs_dir)
    with chatbot.client() as alice:
        conversation = new_conversation(alice, agent="knowledge")
        for question in ("Hello there!", "Please summarise our conversation so far."):
            start, end = ends(stream_turn(alice, conversation, question))
            assert (start["agent"], start["route_reason"]) == ("knowledge", "pinned")
            assert end["agent"] == "knowledge"


# --- the prompt layout


def test_each_prompt_extends_the_last_and_the_preamble_is_shared(
    server: Servers, docs_dir: Path
) -> None:
    chatbot, engine = fake_server(server, docs_dir)
    questions = ["Tell me about green tea.", "And black tea?", "Write a poem about the sea."]
    with chatbot.client() as alice, chatbot.client(BOB_KEY) as bob:
        conversation = new_conversation(alice)
        for question in questions:
            ends(stream_turn(alice, conversation, question))
        ends(stream_turn(bob, new_conversation(bob), "Hello, who are you?"))

    *alices, bobs = engine.requests
    assert len(alices) == 3
    # What the model said (a stored answer may carry a source line it did not write).
    answers = ["".join(g.produced) for g in engine.generations]
    for turn, (previous, current) in enumerate(itertools.pairwise(alices)):
        # Turn k+1's prompt is turn k's, then turn k's answer, then the new question.
        assert contents(current)[: len(previous.messages)] == contents(previous)
        assert contents(current)[len(previous.messages)] == ("assistant", answers[turn])
        assert len(current.messages) == len(previous.messages) + 2
    for request, question in zip(alices, questions, strict=True):
        role, content = contents(request)[-1]
        assert role == "user"
        assert content.endswith(question)
    # The preamble is public and the same for every user; what follows is each user's own.
    preamble = alices[0].messages[0]
    assert preamble.role == "system"
    assert "Green tea leaves are steamed" in preamble.content
    assert bobs.messages[0] == preamble
    assert {r.public_messages for r in engine.requests} == {1}
    assert alices[0].cache_salt != bobs.cache_salt
    assert len({r.cache_salt for r in alices}) == 1


# --- admission


def test_a_user_over_the_stream_limit_gets_429_before_the_question_is_stored(
    server: Servers, docs_dir: Path
) -> None:
    """Two answers at once per user (the tests' setting); a third is refused at once."""
    chatbot, engine = fake_server(server, docs_dir)
    engine.token_delay_s = 0.05  # answers of 400 tokens that would last 20 s
    engine.script = lambda request, number: words(number, 400)
    with chatbot.client() as alice, chatbot.client(BOB_KEY) as bob:
        first, second, third = (new_conversation(alice) for _ in range(3))
        with open_turn(alice, first, "One?") as one, open_turn(alice, second, "Two?") as two:
            assert next(one)[0] == "message.start"
            assert next(two)[0] == "message.start"
            refused = alice.post(messages_path(third), json={"content": "Three?"})
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["code"] == "too_many_streams"
            assert messages(alice, third) == [], "a refused question is not stored"
            # Short answers from now on: another user has a limit of his own.
            engine.token_delay_s = 0.0
            engine.script = lambda request, number: ["fine"]
            assert ends(stream_turn(bob, new_conversation(bob), "Hello?"))[1]["content"] == "fine"
        # Once the two are gone, the third conversation is answered.
        wait_until(lambda: all(g.closed for g in engine.generations[:2]))
        _, end = ends(stream_turn(alice, third, "Three?"))
        assert end["content"] == "fine"


def test_a_full_engine_is_a_503_with_retry_after_and_nothing_stored(
    server: Servers, docs_dir: Path
) -> None:
    chatbot, engine = fake_server(server, docs_dir)
    with chatbot.client() as alice:
        conversation = new_conversation(alice)
        engine.full = True
        for body in ({"content": "Hello?"}, {"content": "Hello?", "stream": False}):
            refused = alice.post(messages_path(conversation), json=body)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "engine_overloaded"
            assert int(refused.headers["retry-after"]) >= 1
        assert messages(alice, conversation) == []
        engine.full = False
        _, end = ends(stream_turn(alice, conversation, "Hello?"))
        assert end["status"] == "complete"
        assert [m["role"] for m in messages(alice, conversation)] == ["user", "assistant"]


# --- cancellation


def test_a_client_that_goes_mid_answer_leaves_it_cancelled_with_what_was_said(
    server: Servers, docs_dir: Path
) -> None:
    chatbot, engine = fake_server(server, docs_dir)
    engine.token_delay_s = 0.02
    engine.script = lambda request, number: words(number, 1000)  # 20 s
    with chatbot.client() as alice:
        conversation = new_conversation(alice)
        received = ""
        with open_turn(alice, conversation, "Count to a thousand.") as events:
            for name, data in events:
                if name == "token":
                    received += data["delta"]
                if len(received.split()) >= 3:
                    break  # the client goes: the connection closes unread
        generation = engine.generations[-1]
        wait_until(lambda: generation.closed)
        wait_until(lambda: messages(alice, conversation)[-1]["status"] == "cancelled")
        question, answer = messages(alice, conversation)
        assert (question["role"], question["status"]) == ("user", "complete")
        assert answer["role"] == "assistant"
        said = "".join(generation.produced)
        assert answer["content"] == said
        assert said.startswith(received)
        assert not generation.finished
        assert len(generation.produced) < 1000

        # The conversation goes on; the cancelled answer, as far as it got, is in the prompt.
        engine.token_delay_s = 0.0
        engine.script = lambda request, number: ["next"]
        _, end = ends(stream_turn(alice, conversation, "Go on."))
        assert end["status"] == "complete"
        assert ("assistant", said) in contents(engine.requests[-1])


# --- failure


def test_an_engine_failure_mid_answer_is_an_error_event_and_the_next_turn_works(
    server: Servers, docs_dir: Path
) -> None:
    chatbot, engine = fake_server(server, docs_dir)
    with chatbot.client() as alice:
        conversation = new_conversation(alice)
        ends(stream_turn(alice, conversation, "What is green tea?"))
        engine.fail_after = 2
        failed = stream_turn(alice, conversation, "And black tea?")
        engine.fail_after = None

        names = [name for name, _ in failed]
        assert names[0] == "message.start"
        assert names[-1] == "error"
        assert set(names[1:-1]) == {"token"}
        assert failed[-1][1] == {
            "error": {
                "type": "engine_error",
                "message": "the fake engine failed, as scripted",
                "code": "generation_failed",
            }
        }
        said = streamed_text(failed)
        assert said == "".join(engine.generations[-1].produced)
        assert len(engine.generations[-1].produced) == 2

        stored = messages(alice, conversation)
        assert [(m["role"], m["status"]) for m in stored] == [
            ("user", "complete"),
            ("assistant", "complete"),
            ("user", "complete"),
            ("assistant", "failed"),
        ]
        assert stored[3]["content"] == said

        _, end = ends(stream_turn(alice, conversation, "What is oolong?"))
        assert end["status"] == "complete"
    # The next prompt leaves the failed exchange out: it extends the first turn's.
    first, _, third = engine.requests
    assert contents(third)[: len(first.messages)] == contents(first)
    assert len(third.messages) == len(first.messages) + 2
    assert not any("black tea?" in content for _, content in contents(third))


# --- compaction


def test_a_long_conversation_on_a_small_window_is_summarised_and_the_summary_used(
    server: Servers, docs_dir: Path
) -> None:
    """A 1024-token window compacted at half: the fake counts a token per 4 characters and
    4 a message, so each exchange of a note and its answer adds about 50, and the ninth
    note finds the window past its half."""
    chatbot, engine = fake_server(
        server, docs_dir, context_tokens=1024, compact_at=0.5, compact_keep_messages=2
    )
    filler = " ".join(["The quick brown fox jumps over the lazy dog."] * 2)
    notes = [f"Note {n}: {filler}" for n in range(10)]
    with chatbot.client() as alice:
        conversation = new_conversation(alice, agent="assistant")
        for note in notes:
            _, end = ends(stream_turn(alice, conversation, note))
            assert end["status"] == "complete"
        stored = messages(alice, conversation)
        metrics = alice.get("/metrics").text

    # Compaction changes what the model reads, never what the user sees.
    assert [m["content"] for m in stored if m["role"] == "user"] == notes
    # One request asked for a summary rather than answering a note; it came once.
    summaries = [
        i
        for i, request in enumerate(engine.requests)
        if not any(contents(request)[-1][1].endswith(note) for note in notes)
    ]
    assert len(summaries) == 1, [contents(r)[-1] for r in engine.requests]
    asked = summaries[0]
    summary = "".join(engine.generations[asked].produced)
    before, after = engine.requests[asked - 1], engine.requests[asked + 1 :]
    assert after, "a turn followed the compaction"
    # The summary replaced every exchange but the last (compact_keep_messages=2): the first
    # prompt after it holds the note before the compaction and its own.
    held = [n for n in notes if any(c.endswith(n) for _, c in contents(after[0]))]
    assert held == notes[asked - 1 : asked + 1]
    for request in after:
        prompt = contents(request)
        # The preamble, then the summary as an exchange, then the turns it left.
        assert prompt[0] == contents(before)[0]
        assert prompt[1][0] == "user"
        assert prompt[2] == ("assistant", summary), "later prompts start from the summary"
        assert not any(notes[0] in content for _, content in prompt)
    assert count_chars(after[0]) < count_chars(before)
    # The prompts after it extend each other again.
    for previous, current in itertools.pairwise(after):
        assert contents(current)[: len(previous.messages)] == contents(previous)
    assert 'chatbot_prefix_breaks_total{reason="compaction"} 1.0' in metrics


def count_chars(request: GenerationRequest) -> int:
    return sum(len(m.content) for m in request.messages)


# --- stored messages, across a restart


def test_messages_are_stored_and_survive_a_restart_on_the_same_sqlite_store(
    server: Servers, docs_dir: Path, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{tmp_path / 'chatbot.db'}"
    first, _ = fake_server(server, docs_dir, store_url=store_url)
    questions = ["What is green tea?", "And black tea?"]
    with first.client() as alice:
        conversation = new_conversation(alice, title="Tea")
        ends_ = [ends(stream_turn(alice, conversation, q))[1] for q in questions]
        before = messages(alice, conversation)
    assert [(m["role"], m["status"]) for m in before] == [
        ("user", "complete"),
        ("assistant", "complete"),
    ] * 2
    assert [m["content"] for m in before] == [
        questions[0],
        ends_[0]["content"],
        questions[1],
        ends_[1]["content"],
    ]
    assert [m["id"] for m in before[1::2]] == [e["message_id"] for e in ends_]
    assert all(m["usage"]["completion_tokens"] == 8 for m in before[1::2])

    server.stop(first)
    second, engine = fake_server(server, docs_dir, store_url=store_url)
    with second.client() as alice:
        assert messages(alice, conversation) == before
        listed = alice.get("/v1/conversations").json()["data"]
        assert [(c["id"], c["title"]) for c in listed] == [(conversation, "Tea")]
        _, end = ends(stream_turn(alice, conversation, "Which has more caffeine?"))
        assert end["status"] == "complete"
        assert len(messages(alice, conversation)) == 6
    # The restarted server's first prompt carries the stored history.
    prompt = contents(engine.requests[0])
    assert ("assistant", "w1.0 w1.1 w1.2 w1.3 w1.4 w1.5 w1.6 w1.7") in prompt
    assert prompt[-1][1].endswith("Which has more caffeine?")


def test_another_users_conversation_is_not_found(server: Servers, docs_dir: Path) -> None:
    chatbot, _ = fake_server(server, docs_dir)
    with chatbot.client(ALICE_KEY) as alice, chatbot.client(BOB_KEY) as bob:
        conversation = new_conversation(alice)
        ends(stream_turn(alice, conversation, "Hello?"))
        for response in (
            bob.get(messages_path(conversation)),
            bob.post(messages_path(conversation), json={"content": "Mine now?"}),
        ):
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "conversation_not_found"
        assert len(messages(alice, conversation)) == 2
    assert httpx.get(f"{chatbot.url}/healthz").status_code == 200
