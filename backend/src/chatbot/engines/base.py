"""The engine protocol: every engine turns a chat prompt into a stream of token deltas.

An engine is used in two steps so that a request it cannot take fails fast, before a
response has started::

    generation = await engine.submit(request)   # may raise EngineOverloaded, ...
    async with generation:                      # leaving it early cancels generation
        async for event in generation:          # TokenDelta ..., then one Finished
            ...
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Literal, Self

from chatbot.models.cache import CacheStats, LookupStats
from chatbot.models.domain import (
    BatchStats,
    ChatMessage,
    DraftStats,
    PromptFormatInfo,
    Timing,
    Usage,
)

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...] = ()
    seed: int | None = None
    frequency_penalty: float = 0.0
    """OpenAI's: lowers a token's logit by this much for each time it was seen."""
    presence_penalty: float = 0.0
    """OpenAI's: lowers a token's logit by this much once it was seen at all."""


class DraftStatus(StrEnum):
    PREFILLING = "prefilling"
    """The engine is reading it."""
    SKIPPED = "skipped"
    """The engine has no spare capacity now: nothing will be computed."""
    UNSUPPORTED = "unsupported"
    """This engine cannot read ahead."""


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    messages: tuple[ChatMessage, ...]
    sampling: SamplingParams
    cache_salt: str
    """Whose content this is: what the user wrote is cached for them alone."""
    public_messages: int = 0
    """Leading messages that are public material (the server's system prompt, agent
    instructions, shared documents), whose cache every user may share."""
    session: str = ""
    """A stable key of the conversation the request continues: engines that spread
    requests over replicas keep a conversation on the one that holds its KV cache."""


@dataclass(frozen=True, slots=True)
class TokenDelta:
    text: str


@dataclass(frozen=True, slots=True)
class Finished:
    usage: Usage | None
    """None: the engine's server did not report usage (llama-cpp-python's server streams
    none); nothing is made up in its place."""
    timing: Timing
    finish_reason: FinishReason


EngineEvent = TokenDelta | Finished


class Generation(ABC):
    """A submitted request: iterate it for events; closing it early cancels the work."""

    @abstractmethod
    def __aiter__(self) -> AsyncIterator[EngineEvent]: ...

    @abstractmethod
    async def aclose(self) -> None:
        """Cancel if still running and wait until the engine no longer works on it."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class Engine(ABC):
    model_id: str

    @abstractmethod
    async def start(self) -> None:
        """Load the model or connect; called once by the app's lifespan."""

    @abstractmethod
    async def aclose(self) -> None:
        """Cancel what is running and release the model or connections."""

    @property
    @abstractmethod
    def ready(self) -> bool: ...

    @property
    @abstractmethod
    def context_tokens(self) -> int:
        """The model's context window: prompt and answer together."""

    @property
    def queue_depth(self) -> int:
        """Requests submitted and waiting for the engine."""
        return 0

    async def warm(self, public: Sequence[ChatMessage]) -> None:
        """Read the server's public leading messages ahead of any request, where the
        engine can keep what it read (the embedded engine pins it in its context); an
        engine that cannot ignores them."""
        del public

    def prompt_format(self) -> PromptFormatInfo | None:
        """How the engine lays out prompts, where it renders them itself."""
        return None

    def batch_stats(self) -> BatchStats | None:
        """How the engine's batches are going, where it batches requests itself."""
        return None

    def cache_stats(self) -> CacheStats | None:
        """The engine's own KV-cache counters, where it keeps them."""
        return None

    def user_cache_stats(self, cache_salt: str) -> LookupStats | None:
        """One user's share of those counters."""
        return None

    async def prefill_draft(self, request: GenerationRequest) -> DraftStatus:
        """Read the prompt a message would have, ahead of the message, at the lowest
        priority: ``request.messages`` end with what the user has written so far, and the
        prompt stops where the answer would begin. Returns at once, never waits for the
        model. Nothing is answered or stored but KV cache: when the message comes, the
        usual longest-prefix lookup finds what the draft computed. A newer draft of the
        same ``request.session`` (the conversation) replaces this one."""
        del request
        return DraftStatus.UNSUPPORTED

    async def drop_draft(self, session: str) -> None:
        """Stop reading the conversation's draft, if one is being read."""
        del session

    def draft_stats(self) -> DraftStats | None:
        """What the engine did with drafts, where it reads them itself."""
        return None

    @abstractmethod
    async def submit(self, request: GenerationRequest) -> Generation:
        """Admit a request or raise at once (overloaded, prompt too long, not ready)."""
