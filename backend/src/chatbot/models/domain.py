"""Domain types shared by the services, the engines and the API."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal
from uuid import uuid4

from pydantic import BaseModel, ConfigDict, Field

from chatbot.models.cache import CacheTier

Role = Literal["system", "user", "assistant"]


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid4().hex}"


class ChatMessage(BaseModel):
    """One message of a prompt, as an engine receives it."""

    model_config = ConfigDict(frozen=True)

    role: Role
    content: str


class Usage(BaseModel):
    prompt_tokens: int = Field(ge=0, description="Tokens in the prompt.")
    cached_tokens: int = Field(
        ge=0, description="Prompt tokens whose KV state was reused, not recomputed."
    )
    completion_tokens: int = Field(ge=0, description="Tokens generated.")
    cache_tier: CacheTier | None = Field(
        default=None, description="Where the cached tokens came from; null: nothing cached."
    )
    draft_tokens: int = Field(
        default=0,
        ge=0,
        description="Cached tokens that a draft computed while the user was writing (the "
        "rest were read in earlier turns or shared).",
    )


class Timing(BaseModel):
    queue_ms: float = Field(ge=0, description="Waiting for the engine.")
    prefill_ms: float = Field(
        ge=0, description="Computing the uncached prompt tokens and the first sample."
    )
    ttft_ms: float = Field(ge=0, description="From admission to the first token.")
    total_ms: float = Field(ge=0, description="From admission to the last token.")

    @classmethod
    def measured(
        cls,
        *,
        submitted: float,
        admitted: float,
        prefilled: float,
        first_token: float,
        ended: float,
    ) -> Timing:
        """From one clock's readings in seconds: the request submitted to the engine, admitted
        by it, its prompt prefilled (the first token sampled), its first text out, its last."""
        return cls(
            queue_ms=_ms(admitted - submitted),
            prefill_ms=_ms(prefilled - admitted),
            ttft_ms=_ms(first_token - submitted),
            total_ms=_ms(ended - submitted),
        )


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


class PromptFormatInfo(BaseModel):
    """How the embedded engine lays out prompts, and what its start-up check found."""

    name: str = Field(
        description="`transcript` (the plain User:/Assistant: layout with few-shot examples, "
        "for a base model), `model` (the GGUF's own chat template) or a template file's name."
    )
    prefix_stable: bool = Field(
        description="Each turn's prompt tokens start with the previous turn's, so the KV "
        "cache of earlier turns is reused in full (checked at start-up on 2- and 3-turn chats)."
    )
    reuse: float = Field(
        ge=0,
        le=1,
        description="The smallest share of a turn's prompt tokens that the next turn's prompt "
        "starts with, in that check: 1 when prefix-stable.",
    )


class AgentName(StrEnum):
    ASSISTANT = "assistant"  # general conversation
    KNOWLEDGE = "knowledge"  # answers from the documents in the shared prefix
    SUMMARIZER = "summarizer"  # summarises the conversation or a pasted text


AUTO: Literal["auto"] = "auto"
"""A conversation's ``agent`` when the router picks one per turn."""


class MessageStatus(StrEnum):
    COMPLETE = "complete"
    CANCELLED = "cancelled"  # the client went away or stopped it; the partial answer is kept
    FAILED = "failed"  # the engine failed or the server stopped; left out of later prompts


class Conversation(BaseModel):
    id: str = Field(default_factory=lambda: new_id("conv"))
    user_id: str
    title: str
    agent: AgentName | Literal["auto"] = AUTO
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class Message(BaseModel):
    id: str = Field(default_factory=lambda: new_id("msg"))
    conversation_id: str
    role: Role
    content: str
    status: MessageStatus = MessageStatus.COMPLETE
    created_at: datetime = Field(default_factory=utcnow)
    usage: Usage | None = None
    timing: Timing | None = None
    agent: AgentName | None = None
    """The agent that answered (assistant messages)."""
    route_reason: str | None = None
    """Why the router chose that agent."""
    source: str | None = None
    """The document the knowledge agent named in a line below the answer."""
    error: str | None = None
    """Why a failed answer failed: an error code (``interrupted``: the server stopped in the
    middle of it). Sending the question again is a clean retry, as a failed answer and its
    question are left out of later prompts."""


class DraftState(StrEnum):
    PREFILLING = "prefilling"
    SKIPPED = "skipped"


class DraftSkipReason(StrEnum):
    """Why nothing is computed for a draft (see ``DraftOut.reason``)."""

    DISABLED = "disabled"
    UNSUPPORTED = "unsupported"
    ENGINE_BUSY = "engine_busy"
    TOKEN_BUDGET = "token_budget"  # noqa: S105 (a reason, not a secret)
    TURN_IN_PROGRESS = "turn_in_progress"
    COMPACTION = "compaction"
    SUPERSEDED = "superseded"


@dataclass(frozen=True, slots=True)
class DraftStats:
    """What an engine did with drafts: prompts read while their user was still writing."""

    prefilled: int = 0
    """Drafts read to their end."""
    dropped: int = 0
    """Drafts stopped before their end: replaced by a newer one or by the message itself,
    or their sequence needed by a request."""
    tokens: int = 0
    """Prompt tokens computed for drafts."""
    tokens_used: int = 0
    """Of those, tokens a message's prompt reused."""


STEP_SECONDS_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
"""Upper bounds, in seconds, of the histogram of an engine's step times."""


@dataclass(frozen=True, slots=True)
class BatchStats:
    """What an engine that serves many sequences at once reports of its work."""

    running: int
    """Requests holding a sequence: being prefilled or answering."""
    waiting: int
    """Requests waiting for a sequence."""
    steps: int
    """Batches evaluated since start-up."""
    batch_tokens: int
    """Tokens evaluated in all those batches: answer tokens and prompt chunks."""
    decode_tokens: int
    """Answer tokens among them."""
    answer_steps: int = 0
    """Batches that carried answer tokens: ``decode_tokens / answer_steps`` answers share
    each of them."""
    side_read_tokens: int = 0
    """Prompt tokens read by the side reader, beside the answers, and handed to their
    sequence."""
    step_seconds: float = 0.0
    """Time those batches took."""
    predicted_step_seconds: float = 0.0
    """Time the engine's cost model predicted for them."""
    step_bound_seconds: float = 0.0
    """The most a step may cost (``CHATBOT_STEP_BOUND_MS``)."""
    step_seconds_buckets: tuple[int, ...] = ()
    """Steps by time taken: a count per bucket of ``STEP_SECONDS_BUCKETS``, then one for
    the slower ones."""
