from __future__ import annotations

from pathlib import Path

import pytest

from chatbot.agents import layout
from chatbot.agents.documents import Document, DocumentIndex, load_documents
from chatbot.agents.router import RuleRouter, parse_route, routing_prompt
from chatbot.agents.state import Summary
from chatbot.engines import chat_format
from chatbot.models.domain import AgentName, ChatMessage, Message, MessageStatus
from chatbot.models.errors import ConfigurationError

DOCS = (
    Document("tea.md", "Tea", "Green tea is steamed; black tea is oxidised before drying."),
    Document("bikes.md", "Bicycles", "A derailleur moves the chain between sprockets."),
)
HEAD = layout.preamble("Be helpful.", DOCS)


def exchange(question: str, answer: str, agent: AgentName, **extra: object) -> list[Message]:
    return [
        Message(conversation_id="c", role="user", content=question),
        Message(conversation_id="c", role="assistant", content=answer, agent=agent, **extra),
    ]


@pytest.mark.parametrize(
    ("question", "previous", "agent", "reason"),
    [
        ("Can you summarise this for me?", None, AgentName.SUMMARIZER, "asks for a summary"),
        ("tl;dr please", None, AgentName.SUMMARIZER, "asks for a summary"),
        ("word " * 400, None, AgentName.SUMMARIZER, "a long pasted text"),
        ("How is green tea steamed?", None, AgentName.KNOWLEDGE, "about tea.md"),
        ("What does a derailleur do to the chain?", None, AgentName.KNOWLEDGE, "about bikes.md"),
        ("What is the capital of France?", None, AgentName.ASSISTANT, "general conversation"),
        ("And why is that?", AgentName.KNOWLEDGE, AgentName.KNOWLEDGE, "a follow-up"),
        ("And why is that?", AgentName.ASSISTANT, AgentName.ASSISTANT, "general conversation"),
    ],
)
def test_rule_router(
    question: str, previous: AgentName | None, agent: AgentName, reason: str
) -> None:
    route = RuleRouter(DocumentIndex(DOCS)).route(question, previous)
    assert (route.agent, route.reason) == (agent, reason)


def test_the_llm_routers_prompt_is_public_up_to_the_question() -> None:
    messages, public = routing_prompt("hello")
    assert public == len(messages) - 1
    assert messages[-1] == ChatMessage(role="user", content="hello")
    assert routing_prompt("other words")[0][:public] == messages[:public]
    assert parse_route(" knowledge") is AgentName.KNOWLEDGE
    assert parse_route("Summarizer.") is AgentName.SUMMARIZER
    assert parse_route("no idea") is None


def test_each_turn_extends_the_last_across_agent_switches() -> None:
    history: list[Message] = []
    previous: list[ChatMessage] | None = None
    for question, agent in [
        ("hi", AgentName.ASSISTANT),
        ("how is tea steamed?", AgentName.KNOWLEDGE),
        ("summarise please", AgentName.SUMMARIZER),
        ("thanks", AgentName.ASSISTANT),
    ]:
        prompt = layout.turn_prompt(HEAD, history, None, agent, question).messages
        if previous is not None:
            assert prompt[: len(previous)] == previous
        assert prompt[-1] == layout.turn(agent, question)
        assert [m.role for m in prompt[1:]] == ["user", "assistant"] * (len(prompt) // 2 - 1) + [
            "user"
        ]
        answer = f"answer to {question}"
        history += exchange(question, answer, agent)
        previous = [*prompt, ChatMessage(role="assistant", content=answer)]
        assert layout.extends([*prompt, previous[-1]], layout.digest(previous), len(previous))


def test_a_failed_turn_is_left_out_so_the_next_extends_the_one_before() -> None:
    history = exchange("q1", "a1", AgentName.ASSISTANT)
    before = layout.history(HEAD, history, None)
    history += exchange("q2", "half", AgentName.KNOWLEDGE, status=MessageStatus.FAILED)
    after = layout.turn_prompt(HEAD, history, None, AgentName.ASSISTANT, "q3").messages
    assert after[: len(before)] == before
    assert not any("q2" in m.content for m in after)


def test_the_agents_source_line_is_shown_but_not_read_back_by_the_model() -> None:
    cited = f"Tea is steamed.{layout.source_line('tea.md')}"
    history = exchange("how is tea made?", cited, AgentName.KNOWLEDGE, source="tea.md")
    prompt = layout.turn_prompt(HEAD, history, None, AgentName.ASSISTANT, "thanks").messages
    assert ChatMessage(role="assistant", content="Tea is steamed.") in prompt
    assert not any("Source:" in m.content for m in prompt)
    said = exchange("and coffee?", "See tea.md for tea.", AgentName.KNOWLEDGE)
    prompt = layout.history(HEAD, said, None)
    assert prompt[-1].content == "See tea.md for tea."  # what the model wrote stays


def test_a_summary_replaces_the_turns_it_covers() -> None:
    history = [
        *exchange("q1", "a1", AgentName.ASSISTANT),
        *exchange("q2", "a2", AgentName.ASSISTANT),
    ]
    prompt = layout.turn_prompt(
        HEAD, history, Summary(text="we said hi", covers=2), AgentName.ASSISTANT, "q3"
    ).messages
    contents = [m.content for m in prompt]
    assert contents[1:3] == ["Summarise our conversation so far.", "we said hi"]
    assert not any("q1" in c for c in contents)
    assert layout.turn(AgentName.ASSISTANT, "q2").content in contents


def test_agent_instructions_render_in_the_users_turn_and_only_the_preamble_is_public() -> None:
    prompt = layout.turn_prompt(HEAD, [], None, AgentName.KNOWLEDGE, "q")
    rendered = chat_format.render(
        prompt.messages, few_shot=True, public_messages=prompt.public_messages
    )
    assert rendered.segments[0].startswith("Be helpful.")
    assert "### tea.md: Tea" in rendered.segments[0]
    text = "".join(rendered.segments)
    instruction = layout.turn(AgentName.KNOWLEDGE, "q").content
    assert text.endswith(f"\nUser: {instruction}\nAssistant:")
    assert "q" in instruction.splitlines()
    public = "".join(rendered.segments[: rendered.public_segments])
    assert "System:" not in public
    assert text.startswith(public)


def test_documents_load_in_name_order_and_refuse_to_crowd_the_window(tmp_path: Path) -> None:
    (tmp_path / "b.md").write_text("# Second\nbody b\n")
    (tmp_path / "a.txt").write_text("plain text a\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    documents = load_documents(tmp_path, max_chars=1000)
    assert [(d.name, d.title, d.text) for d in documents] == [
        ("a.txt", "a", "plain text a"),
        ("b.md", "Second", "body b"),
    ]
    with pytest.raises(ConfigurationError, match="CHATBOT_DOCS_MAX_CHARS"):
        load_documents(tmp_path, max_chars=10)
    bundled = load_documents(None, max_chars=16_000)
    assert {d.name for d in bundled} == {"agents.md", "conversation-api.md", "kv-cache.md"}
