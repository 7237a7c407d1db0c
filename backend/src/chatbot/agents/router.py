"""Choosing the agent of a turn.

The default router is a handful of rules over the message and the conversation's state: it
costs microseconds and no model call, so it adds nothing to the time to first token. The LLM
router asks the model instead, behind a routing prompt that is the same for every user and
every turn, so only the question itself is ever prefilled.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from chatbot.agents.catalog import AGENTS
from chatbot.agents.documents import Document
from chatbot.agents.state import Route
from chatbot.models.domain import AgentName, ChatMessage

LONG_PASTE_CHARS = 1500
"""A message this long is a text to work on rather than a question."""

_WORD = re.compile(r"[a-z][a-z0-9\-]{2,}")
_SUMMARY = re.compile(r"\b(summari[sz]\w*|summary|tl;?dr|recap|sum (it )?up)\b", re.IGNORECASE)
_ABOUT_US = re.compile(r"\b(lmcache|chatbot|documentation|docs?|this (server|product|api))\b")
_FOLLOW_UP = re.compile(r"^(and|also|what about|how about|why|more|tell me more)\b|\b(it|that)\b")
_STOPWORDS = frozenset(
    [
        "the",
        "and",
        "for",
        "are",
        "but",
        "not",
        "you",
        "your",
        "with",
        "this",
        "that",
        "have",
        "from",
        "they",
        "what",
        "when",
        "where",
        "which",
        "who",
        "how",
        "why",
        "can",
        "does",
        "did",
        "was",
        "were",
        "will",
        "would",
        "should",
        "could",
        "there",
        "their",
        "them",
        "then",
        "than",
        "into",
        "about",
        "also",
        "more",
        "some",
        "any",
        "all",
        "its",
        "it's",
        "our",
        "out",
        "one",
        "two",
        "use",
        "used",
        "using",
        "like",
        "just",
        "only",
        "each",
        "other",
        "over",
        "such",
        "very",
        "been",
        "being",
        "before",
        "after",
        "because",
        "while",
        "these",
        "those",
    ]
)


def _words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS}


class RuleRouter:
    def __init__(self, documents: Sequence[Document]) -> None:
        self._documents = tuple(documents)
        self._vocabulary = {d.name: _words(f"{d.title} {d.text}") for d in documents}

    def route(self, question: str, previous: AgentName | None) -> Route:
        if _SUMMARY.search(question):
            return Route(agent=AgentName.SUMMARIZER, reason="asks for a summary")
        if len(question) >= LONG_PASTE_CHARS:
            return Route(agent=AgentName.SUMMARIZER, reason="a long pasted text")
        document = self._document_asked_about(question)
        if document is not None:
            return Route(agent=AgentName.KNOWLEDGE, reason=f"about {document}")
        lowered = question.lower()
        if previous in (AgentName.KNOWLEDGE, AgentName.SUMMARIZER) and _FOLLOW_UP.search(lowered):
            return Route(agent=previous, reason="a follow-up")
        return Route(agent=AgentName.ASSISTANT, reason="general conversation")

    def _document_asked_about(self, question: str) -> str | None:
        """The document whose words the question shares most, if it shares enough: two
        content words, or any when the question names the product or its docs."""
        words = _words(question)
        if not words or not self._documents:
            return None
        best, overlap = max(
            ((name, len(words & vocabulary)) for name, vocabulary in self._vocabulary.items()),
            key=lambda item: item[1],
        )
        if overlap >= 2 or (overlap >= 1 and _ABOUT_US.search(question.lower())):
            return best
        return None


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
