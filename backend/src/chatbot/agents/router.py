"""Choosing the agent of a turn.

The default router is a handful of rules over the message and the conversation's state: it
costs microseconds and no model call, so it adds nothing to the time to first token. The LLM
router asks the model instead, behind a routing prompt that is the same for every user and
every turn, so only the question itself is ever prefilled.
"""

from __future__ import annotations

import re

from chatbot.agents.catalog import AGENTS
from chatbot.agents.documents import DocumentIndex
from chatbot.agents.state import Route
from chatbot.models.domain import AgentName, ChatMessage

LONG_PASTE_CHARS = 1500
"""A message this long is a text to work on rather than a question."""

_WORD = re.compile(r"[a-z]+")
_SUMMARY = re.compile(r"\b(summari[sz]\w*|summary|tl;?dr|recap|sum (it )?up)\b", re.IGNORECASE)
_FOLLOW_UP = re.compile(r"^(and|also|what about|how about|why|more|tell me more)\b|\b(it|that)\b")


class RuleRouter:
    def __init__(self, index: DocumentIndex) -> None:
        self._index = index

    def route(self, question: str, previous: AgentName | None) -> Route:
        if _SUMMARY.search(question):
            return Route(agent=AgentName.SUMMARIZER, reason="asks for a summary")
        if len(question) >= LONG_PASTE_CHARS:
            return Route(agent=AgentName.SUMMARIZER, reason="a long pasted text")
        document = self._index.about(question)
        if document is not None:
            return Route(agent=AgentName.KNOWLEDGE, reason=f"about {document.name}")
        if previous in (AgentName.KNOWLEDGE, AgentName.SUMMARIZER) and _FOLLOW_UP.search(
            question.lower()
        ):
            return Route(agent=previous, reason="a follow-up")
        return Route(agent=AgentName.ASSISTANT, reason="general conversation")


ROUTING_INSTRUCTIONS = (
    "Pick the agent that should answer the user's message. Agents:\n"
    + "\n".join(f"- {spec.name.value}: {spec.purpose}" for spec in AGENTS.values())
    + "\nReply with the agent's name only."
)

ROUTING_EXAMPLES: tuple[tuple[str, AgentName], ...] = (
    ("Hi! How are you today?", AgentName.ASSISTANT),
    ("How does the KV cache work in this chatbot?", AgentName.KNOWLEDGE),
    ("Can you summarise our conversation so far?", AgentName.SUMMARIZER),
    ("Write a haiku about the sea.", AgentName.ASSISTANT),
    ("Which endpoint lists my conversations?", AgentName.KNOWLEDGE),
    ("TL;DR of this text please: ...", AgentName.SUMMARIZER),
)


def routing_prompt(question: str) -> tuple[list[ChatMessage], int]:
    """The LLM router's prompt and how many of its leading messages are public: everything
    but the question is the same for every user and every turn."""
    messages = [ChatMessage(role="system", content=ROUTING_INSTRUCTIONS)]
    for example, agent in ROUTING_EXAMPLES:
        messages += [
            ChatMessage(role="user", content=example),
            ChatMessage(role="assistant", content=agent.value),
        ]
    public = len(messages)
    messages.append(ChatMessage(role="user", content=question))
    return messages, public


def parse_route(reply: str) -> AgentName | None:
    words = _WORD.findall(reply.lower())
    for word in words[:3]:
        for agent in AgentName:
            if word.startswith(agent.value[:5]):
                return agent
    return None
