"""Fakes for tests: stand-ins named as such, never used by the product.

``FakeEngine`` is a scripted engine (``chatbot.engines.base.Engine``): no model, no tokenizer.
It records every request it is given, answers each with a few words, and can be told to be
full, to fail after some tokens, or to answer slowly. It takes drafts as an engine that
reads ahead does: the newest of a session is held until the session's message comes (whose
usage then counts the draft's tokens as cached) or it is dropped, and it can be told to have
no spare capacity for them, or to be unable to read ahead at all. A server built with
``create_app(settings, engine=FakeEngine(...))`` runs the whole turn lifecycle (routing,
prompt layout, admission, streaming, cancellation, failure, compaction, storage) in a
fraction of a second, which is what the fast tier (tests/fast) drives over HTTP.

The tests read the fake's attributes from their own thread while the server's event loop
writes them: each is a plain value or a list only appended to, which is safe to read so.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from chatbot.engines.base import (
    DraftStatus,
    Engine,
    EngineEvent,
    Finished,
    Generation,
    GenerationRequest,
    TokenDelta,
)
from chatbot.models.domain import ChatMessage, DraftStats, Timing, Usage
from chatbot.models.errors import EngineFailure, EngineOverloaded, ServiceUnavailable

CHARS_PER_TOKEN = 4
"""The fake counts a token for every 4 characters of a message, and 4 more per message."""


def count_tokens(request: GenerationRequest) -> int:
    return sum(len(m.content) // CHARS_PER_TOKEN + 4 for m in request.messages)


def drafted_tokens(draft: GenerationRequest | None, request: GenerationRequest) -> int:
    """The tokens of ``draft`` that ``request`` finds: all of the draft's messages when the
    request has the same ones but its last, and that last message starts with the draft's."""
    if draft is None or draft.cache_salt != request.cache_salt:
        return 0
    *drafted, typed = draft.messages
    *before, sent = request.messages
    if drafted != before or not sent.content.startswith(typed.content):
        return 0
    return count_tokens(draft)


def draft_text(draft: GenerationRequest) -> str:
    """What the user had written: a draft's last message, the agent's instruction line off."""
    last: ChatMessage = draft.messages[-1]
    return last.content.split("\n", 1)[-1]


def numbered_words(request: GenerationRequest, number: int) -> list[str]:
    """The default script: answer number ``number`` is eight words that name it, each a
    token (``"w3.0"``, ``" w3.1"``...): every answer is different and recognisable in later
    prompts."""
    del request
    return words(number, 8)


def words(number: int, count: int) -> list[str]:
    """``count`` tokens naming answer ``number``, a space before each but the first."""
    return [f"{' ' if i else ''}w{number}.{i}" for i in range(count)]


@dataclass(eq=False)
class FakeGeneration(Generation):
    """One scripted answer. ``closed``: the consumer closed it (the server does when a
    client goes away or the turn ends); ``produced``: the tokens it gave out."""

    engine: FakeEngine
    request: GenerationRequest
    words: list[str]
    fail_after: int | None
    token_delay_s: float
    draft_tokens: int = 0
    produced: list[str] = field(default_factory=list)
    closed: bool = False
    finished: bool = False

    def __aiter__(self) -> AsyncIterator[EngineEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[EngineEvent]:
        for word in self.words:
            if self.closed:
                return
            if self.fail_after is not None and len(self.produced) == self.fail_after:
                raise EngineFailure("the fake engine failed, as scripted")
            if self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)
            self.produced.append(word)
            yield TokenDelta(word)
        self.finished = True
        prompt = count_tokens(self.request)
        yield Finished(
            usage=Usage(
                prompt_tokens=prompt,
                cached_tokens=self.draft_tokens,
                completion_tokens=len(self.produced),
                draft_tokens=self.draft_tokens,
            ),
            timing=Timing(queue_ms=0.0, prefill_ms=1.0, ttft_ms=1.0, total_ms=2.0),
            finish_reason="stop",
        )

    async def aclose(self) -> None:
        self.closed = True


class FakeEngine(Engine):
    """A scripted engine for tests (see the module's docstring).

    ``script(request, number)`` gives the words of answer ``number`` (0 for the first
    request); ``full``: every submit is refused as an engine whose queue is full would
    refuse it; ``fail_after``: answers raise ``EngineFailure`` after that many tokens;
    ``token_delay_s``: the pause before each token; ``draft_status``: what ``prefill_draft``
    answers (``PREFILLING``: the draft is held)."""

    def __init__(
        self,
        *,
        context_tokens: int = 4096,
        script: Callable[[GenerationRequest, int], list[str]] = numbered_words,
        token_delay_s: float = 0.0,
    ) -> None:
        self.model_id = "fake-scripted"
        self._context_tokens = context_tokens
        self._ready = False
        self.script = script
        self.token_delay_s = token_delay_s
        self.full = False
        self.fail_after: int | None = None
        self.generations: list[FakeGeneration] = []
        """Every admitted request's generation, in order."""
        self.draft_status = DraftStatus.PREFILLING
        self.drafts: list[GenerationRequest] = []
        """Every draft held, in order."""
        self.held: dict[str, GenerationRequest] = {}
        """The draft held for each session."""
        self.most_held = 0
        """The most drafts ever held at once."""
        self.dropped_sessions: list[str] = []
        """The sessions whose held draft was dropped (``drop_draft``), in order."""
        self._stats = DraftStats()

    @property
    def requests(self) -> list[GenerationRequest]:
        return [g.request for g in self.generations]

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def context_tokens(self) -> int:
        return self._context_tokens

    async def start(self) -> None:
        self._ready = True

    async def aclose(self) -> None:
        self._ready = False
        for generation in self.generations:
            await generation.aclose()

    async def submit(self, request: GenerationRequest) -> Generation:
        if not self._ready:
            raise ServiceUnavailable("the fake engine is not started")
        if self.full:
            raise EngineOverloaded("the fake engine's queue is full", retry_after=1)
        words = self.script(request, len(self.generations))
        generation = FakeGeneration(self, request, words, self.fail_after, self.token_delay_s)
        draft = self.held.pop(request.session, None) if request.session else None
        generation.draft_tokens = drafted_tokens(draft, request)
        self._count(tokens_used=generation.draft_tokens)
        self.generations.append(generation)
        return generation

    async def prefill_draft(self, request: GenerationRequest) -> DraftStatus:
        if self.draft_status is not DraftStatus.PREFILLING:
            return self.draft_status
        replaced = self.held.pop(request.session, None)
        self.held[request.session] = request
        self.drafts.append(request)
        self.most_held = max(self.most_held, len(self.held))
        # Read at once, all of it: the fake has no tokens to read.
        self._count(prefilled=1, dropped=int(replaced is not None), tokens=count_tokens(request))
        return DraftStatus.PREFILLING

    async def drop_draft(self, session: str) -> None:
        if self.held.pop(session, None) is not None:
            self.dropped_sessions.append(session)
            self._count(dropped=1)

    def draft_stats(self) -> DraftStats:
        return self._stats

    def _count(
        self, *, prefilled: int = 0, dropped: int = 0, tokens: int = 0, tokens_used: int = 0
    ) -> None:
        s = self._stats
        self._stats = DraftStats(
            prefilled=s.prefilled + prefilled,
            dropped=s.dropped + dropped,
            tokens=s.tokens + tokens,
            tokens_used=s.tokens_used + tokens_used,
        )
