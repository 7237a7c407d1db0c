"""The events of one conversation turn: the turn graph emits them, the conversation service
hands them on, and the API writes them to the client, under these same names.

A turn begins with ``TurnStarted`` (the engine took the answer) or, having stored nothing,
with ``TurnRefused``; then ``TurnDelta`` per piece of text; then ``TurnEnded`` or
``TurnFailed`` with the answer as stored.
"""

from __future__ import annotations

from dataclasses import dataclass

from chatbot.models.domain import AgentName, Message
from chatbot.models.errors import ChatbotError


@dataclass(frozen=True, slots=True)
class TurnRefused:
    """The engine could not take the answer (limits, engine full, prompt too long); the
    question was not stored."""

    error: ChatbotError


@dataclass(frozen=True, slots=True)
class TurnStarted:
    conversation_id: str
    message_id: str
    agent: AgentName
    route_reason: str


@dataclass(frozen=True, slots=True)
class TurnDelta:
    text: str


@dataclass(frozen=True, slots=True)
class TurnEnded:
    message: Message


@dataclass(frozen=True, slots=True)
class TurnFailed:
    """The answer failed after it started; ``message`` is stored as failed, with what was
    said before the failure."""

    error: ChatbotError
    message: Message


TurnEvent = TurnStarted | TurnDelta | TurnEnded | TurnFailed
"""What a client sees of a turn that started."""
