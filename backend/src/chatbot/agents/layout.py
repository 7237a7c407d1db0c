"""How a turn's prompt is laid out so that the KV cache keeps hitting.

    [preamble: system prompt + documents]      public: one prefix for every user and agent
    [summary exchange]                         only once the conversation was compacted
    [user: instruction a1, q1] [assistant r1]  earlier turns, each with the instruction of
    ...                                        the agent that answered it, as it was sent
    [user: instruction ak, qk]                 this turn

The instruction rides in the user's turn, not in a system message of its own: a chat template
may accept one system message only, the first (Gemma's instruct template raises on any
other), and the prompt is then one system message and strictly alternating turns.

Turn k+1's prompt is turn k's prompt followed by turn k's answer, message for message,
whichever agents answered: an agent switch changes only the instruction of the new turn.
Two things break that on purpose, and both are counted: a compaction (the oldest turns become
one summary, once, when the window fills), and a failed answer (left out with its question, so
the next prompt extends the one before the failed turn).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from chatbot.agents.catalog import AGENTS, COMPACTION_INSTRUCTION
from chatbot.agents.documents import Document
from chatbot.agents.state import Summary
from chatbot.models.domain import AgentName, ChatMessage, Message, MessageStatus

SUMMARY_REQUEST = "Summarise our conversation so far."

PUBLIC_MESSAGES = 1
"""Only the preamble is public. The boundary must not move between turns: the KV cache
hashes what follows it with the user's salt, so a moved boundary would miss everything."""


@dataclass(frozen=True, slots=True)
class Prompt:
    messages: list[ChatMessage]
    public_messages: int = PUBLIC_MESSAGES


def preamble(system_prompt: str, documents: Sequence[Document]) -> ChatMessage:
    if not documents:
        return ChatMessage(role="system", content=system_prompt)
    blocks = "\n\n".join(f"### {d.name}: {d.title}\n{d.text}" for d in documents)
    return ChatMessage(
        role="system",
        content=f"{system_prompt}\n\nYou can consult these documents; when you use one, "
        f"name it.\n\n{blocks}",
    )


def kept_messages(messages: Sequence[Message]) -> list[Message]:
    """The messages later prompts carry: an answer that failed, or was stopped before it
    said anything, is left out together with the question it answered."""
    kept: list[Message] = []
    for message in messages:
        if message.role == "assistant" and (
            message.status is MessageStatus.FAILED or not message.content
        ):
            if kept and kept[-1].role == "user":
                kept.pop()
            continue
        kept.append(message)
    return kept


def source_line(document: str) -> str:
    return f"\n\nSource: {document}"


def spoken(message: Message) -> ChatMessage:
    """A stored message as the model reads it again: without the source line the agent
    added below an answer, which the model did not write (and, shown it, would copy into
    every later answer)."""
    content = message.content
    if message.source is not None:
        content = content.removesuffix(source_line(message.source))
    return ChatMessage(role=message.role, content=content)


def asked(instruction: str, question: str) -> ChatMessage:
    """The user's turn as the model reads it: the instruction, then the question. The same
    pair always gives the same text, so the turn re-renders identically in later prompts."""
    return ChatMessage(role="user", content=f"{instruction}\n{question}")


def turn(agent: AgentName, question: str) -> ChatMessage:
    return asked(AGENTS[agent].instruction, question)


def history(
    head: ChatMessage, messages: Sequence[Message], summary: Summary | None
) -> list[ChatMessage]:
    """The prompt up to (not including) the new turn."""
    prompt = [head]
    kept = kept_messages(messages)
    if summary is not None:
        prompt += summary_exchange(summary.text)
        kept = kept[summary.covers :]
    for i, message in enumerate(kept):
        if message.role == "user":
            answer = kept[i + 1] if i + 1 < len(kept) else None
            agent = answer.agent if answer is not None and answer.agent else AgentName.ASSISTANT
            prompt.append(turn(agent, message.content))
        else:
            prompt.append(spoken(message))
    return prompt


def turn_prompt(
    head: ChatMessage,
    messages: Sequence[Message],
    summary: Summary | None,
    agent: AgentName,
    question: str,
) -> Prompt:
    return Prompt([*history(head, messages, summary), turn(agent, question)])


def compaction_prompt(
    head: ChatMessage, messages: Sequence[Message], summary: Summary | None
) -> Prompt:
    """Asks for a summary at the end of the conversation as it stands: all of it but the
    request is already in the KV cache."""
    return Prompt(
        [
            *history(head, messages, summary),
            asked(COMPACTION_INSTRUCTION, SUMMARY_REQUEST),
        ]
    )


def summary_exchange(text: str) -> list[ChatMessage]:
    return [
        ChatMessage(role="user", content=SUMMARY_REQUEST),
        ChatMessage(role="assistant", content=text),
    ]


def digest(messages: Sequence[ChatMessage]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for message in messages:
        for part in (message.role, message.content):
            data = part.encode()
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


def extends(prompt: Sequence[ChatMessage], reference: str | None, length: int) -> bool:
    """Whether ``prompt`` starts with the ``length`` messages whose digest is ``reference``."""
    return reference is None or (len(prompt) >= length and digest(prompt[:length]) == reference)
