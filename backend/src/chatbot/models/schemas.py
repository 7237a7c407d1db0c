"""Request and response bodies of the HTTP API (the native API and the OpenAI-compatible one)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from chatbot.models.cache import CacheStats, LookupStats
from chatbot.models.domain import (
    AUTO,
    AgentName,
    DraftSkipReason,
    DraftState,
    MessageStatus,
    PromptFormatInfo,
    Role,
    Timing,
    Usage,
)

# Unicode's control characters (category Cc) but tab, line feed and carriage return. The
# JSON Schema patterns say the same to clients (ECMA-262 and Python read them alike).
_CONTROLS = r"\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f"
TEXT_PATTERN = rf"^[^{_CONTROLS}]*$"
NON_BLANK_PATTERN = rf"^[^{_CONTROLS}]*[^\s\ufeff{_CONTROLS}][^{_CONTROLS}]*$"
_CONTROL = re.compile(rf"[{_CONTROLS}]")
_VISIBLE = re.compile(r"[^\s\ufeff]")


def _text(value: object) -> object:
    """Text a prompt may carry: encodable (no lone surrogate) and free of control
    characters, which no tokenizer should be handed and no client means to send. Checked
    before the string's own validation, which fails on a surrogate with a vaguer message."""
    if not isinstance(value, str):
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"contains a lone surrogate (U+{ord(value[exc.start]):04X} at {exc.start}), "
            "which UTF-8 cannot encode"
        ) from None
    if control := _CONTROL.search(value):
        raise ValueError(
            f"contains the control character U+{ord(control.group()):04X} at "
            f"{control.start()}; of those only tab, line feed and carriage return are allowed"
        )
    return value


def _non_blank(value: str) -> str:
    if not _VISIBLE.search(value):
        raise ValueError("must not be blank")
    return value


Text = Annotated[
    str,
    BeforeValidator(_text),
    Field(json_schema_extra={"pattern": TEXT_PATTERN}),
]
"""Any text field of a request: UTF-8 encodable, no control character but tab, LF, CR."""

Title = Annotated[
    str,
    Field(min_length=1, max_length=200, json_schema_extra={"pattern": TEXT_PATTERN}),
    BeforeValidator(_text),
]


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


_MAX_TOKENS_DOC = (
    "At most the server's CHATBOT_MAX_TOKENS_LIMIT (the `maximum` here is the running "
    "server's; more: 400 max_tokens_too_large). Default: CHATBOT_MAX_TOKENS."
)

_FREQUENCY_PENALTY_DOC = (
    "-2 to 2: lowers each token's logit by this much for every time it appears in the last "
    "64 tokens (prompt and answer), as llama.cpp's penalty sampler counts. Default 0."
)
_PRESENCE_PENALTY_DOC = (
    "-2 to 2: lowers each token's logit by this much once it appears in the last 64 tokens "
    "(prompt and answer). Default 0."
)

MAX_STOP_SEQUENCES = 10
"""A client's stop strings, each watched for in the streamed text (the engines scan for them;
the openai engine also hands the server the first 4 of its own and the client's, as many as
vLLM takes by default)."""
StopString = Annotated[
    str,
    Field(min_length=1, max_length=200, json_schema_extra={"pattern": TEXT_PATTERN}),
    BeforeValidator(_text),
]


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


MessageContent = Annotated[
    str,
    BeforeValidator(_text),
    AfterValidator(_non_blank),
    Field(
        min_length=1,
        description="Not blank (some character is not white space), no control character "
        "but tab, line feed and carriage return, at most CHATBOT_MAX_MESSAGE_CHARS "
        "characters (more: 413 message_too_large).",
        json_schema_extra={"pattern": NON_BLANK_PATTERN},
    ),
]
"""What a user writes: a message, or a draft of one."""


class MessageCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    content: MessageContent
    stream: bool = Field(default=True, strict=True)
    max_tokens: PositiveInteger | None = Field(default=None, description=_MAX_TOKENS_DOC)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, strict=True)
    frequency_penalty: float | None = Field(
        default=None, ge=-2.0, le=2.0, strict=True, description=_FREQUENCY_PENALTY_DOC
    )
    presence_penalty: float | None = Field(
        default=None, ge=-2.0, le=2.0, strict=True, description=_PRESENCE_PENALTY_DOC
    )


class DraftCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    content: MessageContent


class DraftOut(BaseModel):
    status: DraftState = Field(
        description="`prefilling`: the server is reading the prompt the message would have; "
        "`skipped`: nothing is computed for this draft (`reason` says why)."
    )
    reason: DraftSkipReason | None = Field(
        default=None,
        description="Why the draft was skipped: `disabled` (CHATBOT_DRAFTS=false), "
        "`unsupported` (the engine cannot read ahead), `engine_busy` (no spare capacity), "
        "`token_budget` (the user's CHATBOT_TOKENS_PER_MINUTE is spent), "
        "`turn_in_progress` (an answer is being written in the conversation), "
        "`compaction` (the next turn summarises the conversation first), `superseded` (a "
        "newer draft or the message itself came meanwhile). Null while prefilling.",
    )
    agent: AgentName | None = Field(
        default=None,
        description="The agent the draft was laid out for: the one the rules would route "
        "the message to. Null when skipped before routing.",
    )


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
    text: Text


class OpenAIMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = Field(default=False, strict=True)


UNSUPPORTED_PARAMETERS = (
    "best_of",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
)
"""Parameters that would change the answer and are not implemented: given a value that asks
for the feature, 400 unsupported_parameter names them (as vLLM does for a feature it was
started without), rather than an answer that silently ignores them."""


def _asks_for_feature(name: str, value: Any) -> bool:
    if value is None or value is False or value in ({}, []):
        return False
    if name in ("tool_choice", "function_call"):
        return bool(value != "none")
    if name == "response_format":
        return bool(value != {"type": "text"})
    if name == "best_of":
        return bool(value != 1)  # one candidate is what is generated anyway
    return True


class ChatCompletionRequest(BaseModel):
    # Other unknown knobs are accepted and ignored, as most
    # OpenAI-compatible servers do, so that existing clients keep working; those in
    # UNSUPPORTED_PARAMETERS are refused when they ask for their feature.
    model_config = ConfigDict(extra="allow")

    model: Text
    messages: list[OpenAIMessage] = Field(min_length=1)
    stream: bool = Field(default=False, strict=True)
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInteger | None = Field(default=None, description=_MAX_TOKENS_DOC)
    max_completion_tokens: PositiveInteger | None = Field(default=None, description=_MAX_TOKENS_DOC)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, strict=True)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, strict=True)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_SEQUENCES)] | None = (
        Field(
            default=None,
            description=f"Up to {MAX_STOP_SEQUENCES} strings of 1 to 200 characters; the "
            "answer ends before the first of them.",
        )
    )
    frequency_penalty: float | None = Field(
        default=None, ge=-2.0, le=2.0, strict=True, description=_FREQUENCY_PENALTY_DOC
    )
    presence_penalty: float | None = Field(
        default=None, ge=-2.0, le=2.0, strict=True, description=_PRESENCE_PENALTY_DOC
    )
    n: Integer = Field(default=1, ge=1, le=1, description="Only one choice is generated.")
    seed: Integer | None = None
    user: Annotated[Text, Field(max_length=256)] | None = None

    def unsupported_parameter(self) -> str | None:
        """The first parameter of ``UNSUPPORTED_PARAMETERS`` that asks for its feature."""
        extra = self.model_extra or {}
        return next(
            (name for name in UNSUPPORTED_PARAMETERS if _asks_for_feature(name, extra.get(name))),
            None,
        )


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
    max_model_len: int = Field(
        description="The model's context window in tokens, prompt and answer together "
        "(as vLLM reports it)."
    )
    prompt_format: PromptFormatInfo | None = Field(
        default=None,
        description="The embedded engine's prompt layout; null for an engine whose model "
        "server renders prompts.",
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CacheStatsResponse(BaseModel):
    engine: str
    enabled: bool = Field(description="False when the engine keeps no KV cache of its own.")
    cache: CacheStats | None = Field(
        description="The whole cache: counters and what each tier holds, for all users "
        "together. Shown to operators only (CHATBOT_OPERATORS; keyless, the local user); "
        "null for everyone else."
    )
    user: LookupStats | None = Field(description="The caller's own lookups and hits.")
