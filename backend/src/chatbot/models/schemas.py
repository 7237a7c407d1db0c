"""Request and response bodies of the HTTP API (the native API and the OpenAI-compatible one)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from chatbot.models.cache import CacheStats, LookupStats
from chatbot.models.domain import AUTO, AgentName, MessageStatus, Role, Timing, Usage

Title = Annotated[str, Field(min_length=1, max_length=200)]


def _json_integer(value: object) -> object:
    """What JSON Schema calls an integer (``8``, ``8.0``), not what pydantic's lax mode
    would also turn into one (``true``, ``"8"``)."""
    if isinstance(value, bool | str):
        raise ValueError("must be an integer")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Request fields take JSON's own types only, as the contract states them: numbers, not
# booleans or strings coerced into numbers, and booleans, not "true" or 1.
Integer = Annotated[int, BeforeValidator(_json_integer)]
# The bound first and inside the type, so that the schema of `PositiveInteger | None` says
# `minimum` (after the validator, or on the union, it would be an unknown `ge`).
PositiveInteger = Annotated[int, Field(ge=1), BeforeValidator(_json_integer)]


class ErrorDetail(BaseModel):
    type: str
    message: str
    code: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


# --- native conversation API


class ConversationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: Title = "New conversation"
    agent: AgentName | Literal["auto"] = Field(
        default=AUTO,
        description="Pin every turn to one agent, or `auto`: the router picks one per turn.",
    )


class ConversationUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: Title


class ConversationOut(BaseModel):
    id: str
    title: str
    agent: AgentName | Literal["auto"]
    created_at: datetime
    updated_at: datetime


class ConversationList(BaseModel):
    data: list[ConversationOut]
    has_more: bool = Field(description="Pass the last id as `after` to get the next page.")


class MessageCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    content: str = Field(min_length=1)
    stream: bool = Field(default=True, strict=True)
    max_tokens: PositiveInteger | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, strict=True)

    @field_validator("content")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("content must not be blank")
        return value


class MessageOut(BaseModel):
    id: str
    role: Role
    content: str
    status: MessageStatus
    created_at: datetime
    usage: Usage | None = None
    timing: Timing | None = None
    agent: AgentName | None = Field(default=None, description="The agent that answered.")
    route_reason: str | None = Field(default=None, description="Why the router chose that agent.")
    source: str | None = Field(
        default=None,
        description="The document named in the `Source:` line the knowledge agent added "
        "below the answer (null when the model named it itself, or for other agents).",
    )
    error: str | None = Field(
        default=None,
        description="Why a failed answer failed (`interrupted`: the server stopped in the "
        "middle of it). Send the question again to retry: a failed answer and its question "
        "are left out of later prompts.",
    )


class MessageList(BaseModel):
    data: list[MessageOut]


# --- OpenAI-compatible API


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class OpenAIMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = Field(default=False, strict=True)


class ChatCompletionRequest(BaseModel):
    # Unknown sampling knobs (penalties, logit_bias, ...) are accepted and ignored, as
    # most OpenAI-compatible servers do, so that existing clients keep working.
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[OpenAIMessage] = Field(min_length=1)
    stream: bool = Field(default=False, strict=True)
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInteger | None = None
    max_completion_tokens: PositiveInteger | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, strict=True)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, strict=True)
    stop: str | list[str] | None = None
    n: Integer = Field(default=1, ge=1, le=1, description="Only one choice is generated.")
    seed: Integer | None = None
    user: str | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage | None = Field(
        default=None, description="Null when the engine's model server reported none."
    )


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lmcache-chatbot"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CacheStatsResponse(BaseModel):
    engine: str
    enabled: bool = Field(description="False when the engine keeps no KV cache of its own.")
    cache: CacheStats | None = Field(
        description="The whole cache: counters and what each tier holds, for all users."
    )
    user: LookupStats | None = Field(description="The caller's own lookups and hits.")
