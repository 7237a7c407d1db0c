"""A conversation's state: the LangGraph channels checkpointed after every step.

The messages live here and nowhere else; the conversation index (title, owner, pinned agent)
is the persistence package's `ConversationIndex`.
"""

from __future__ import annotations

import operator
from typing import Annotated, TypedDict

from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from pydantic import BaseModel

from chatbot.models.cache import CacheTier
from chatbot.models.domain import AgentName, Message, MessageStatus, Timing, Usage


class Route(BaseModel):
    agent: AgentName
    reason: str


class Summary(BaseModel):
    """The oldest messages, summarised once when the conversation filled its window."""

    text: str
    covers: int
    """How many leading messages it replaces in prompts."""


class ConversationState(TypedDict, total=False):
    messages: Annotated[list[Message], operator.add]
    pending: Message | None
    """The question of the turn in progress; once answered it moves into ``messages`` with
    its answer, in one checkpoint. A checkpoint that still holds one after its run ended
    records a turn that was interrupted."""
    route: Route | None
    summary: Summary | None
    context_tokens: int
    """Prompt and answer tokens of the last answered turn: what the next prompt starts from."""
    prefix_digest: str | None
    """Digest of the prompt messages the next turn must start with for the cache to hit."""
    prefix_length: int
    """How many messages that digest covers."""
    compacted: bool
    """Whether this turn's prompt was compacted (its prefix break is expected)."""


def checkpoint_serializer() -> JsonPlusSerializer:
    """Rebuilds only the state's own types from a checkpoint, nothing a writer to the
    checkpoint store could slip in."""
    return JsonPlusSerializer(
        allowed_msgpack_modules=[
            Message,
            Route,
            Summary,
            Usage,
            Timing,
            MessageStatus,
            AgentName,
            CacheTier,
        ]
    )
