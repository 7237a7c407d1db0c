"""Runs one generation on the engine with the product's bookkeeping around it: request
defaults and limits, the per-user stream limit and token budget, and the metrics of what it
did.

``GenerationService`` is the turn graph's ``LanguageModel`` (``agents.llm``) and what the
stateless completions (``services.completions``) generate with."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence

from chatbot.agents.layout import Prompt
from chatbot.config import Settings
from chatbot.engines.base import (
    Engine,
    EngineEvent,
    Finished,
    Generation,
    GenerationRequest,
    SamplingParams,
    TokenDelta,
)
from chatbot.models.domain import Usage
from chatbot.models.errors import InvalidRequest
from chatbot.observability.metrics import Metrics
from chatbot.services.limits import StreamLimiter, TokenBudget

logger = logging.getLogger(__name__)


def computed_tokens(usage: Usage) -> int:
    """The tokens a generation had the engine compute: its prompt less what the cache
    served (a draft's tokens among them, charged when the draft was read), and its answer."""
    return usage.prompt_tokens - usage.cached_tokens + usage.completion_tokens


class MeteredGeneration(Generation):
    """An engine generation that counts itself, charges its user's token budget, and gives
    back its user's stream slot."""

    def __init__(
        self,
        generation: Generation,
        *,
        engine_name: str,
        agent: str,
        metrics: Metrics,
        release: Callable[[], None],
        stream_interval_s: float = 0.0,
        charge: Callable[[int], None] | None = None,
    ) -> None:
        """``stream_interval_s``: after a delta is passed on, the text that follows is held
        and passed on as one delta once that long has gone by (0: every delta at once).
        ``charge``: given the tokens computed (``computed_tokens``) once the engine reports
        them."""
        self._generation = generation
        self._engine_name = engine_name
        self._agent = agent
        self._metrics = metrics
        self._release = release
        self._interval = stream_interval_s
        self._charge = charge

    def __aiter__(self) -> AsyncIterator[EngineEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[EngineEvent]:
        outcome = "cancelled"
        try:
            with self._metrics.stream():
                events = self._generation if not self._interval else self._coalesced()
                async for event in events:
                    if isinstance(event, Finished):
                        outcome = "complete"
                        self._metrics.observe_generation(
                            self._engine_name, self._agent, event.usage, event.timing
                        )
                        if self._charge is not None and event.usage is not None:
                            self._charge(computed_tokens(event.usage))
                    yield event
        except Exception:
            outcome = "failed"
            raise
        finally:
            await self.aclose()
            self._metrics.generations.labels(self._engine_name, outcome).inc()

    async def _coalesced(self) -> AsyncIterator[EngineEvent]:
        """The engine's events with the deltas of each ``stream_interval_s`` joined: every
        delta costs the layers above (the agent's LangChain model, the graph's stream, an
        SSE write) about the same whatever its length, so 10,000 streams at 40 tokens a
        second cost 4x less at 100 ms. The first delta is never held (TTFT is unchanged);
        held text goes out with the first delta after the interval, or before the end."""
        loop = asyncio.get_running_loop()
        held: list[str] = []
        due = 0.0
        try:
            async for event in self._generation:
                if isinstance(event, TokenDelta):
                    now = loop.time()
                    if now < due:
                        held.append(event.text)
                        continue
                    due = now + self._interval
                    if held:
                        held.append(event.text)
                        event = TokenDelta("".join(held))
                        held.clear()
                elif held:
                    yield TokenDelta("".join(held))
                    held.clear()
                yield event
        except Exception:
            if held:  # what was said before a failure still reaches the client
                yield TokenDelta("".join(held))
            raise
        if held:
            yield TokenDelta("".join(held))

    async def aclose(self) -> None:
        try:
            await self._generation.aclose()
        finally:
            self._release()


class GenerationService:
    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        metrics: Metrics,
        limiter: StreamLimiter,
        budget: TokenBudget,
    ) -> None:
        self.engine = engine
        self._settings = settings
        self._metrics = metrics
        self._limiter = limiter
        self._budget = budget

    def sampling(
        self,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: Sequence[str] = (),
        seed: int | None = None,
        frequency_penalty: float | None = None,
        presence_penalty: float | None = None,
    ) -> SamplingParams:
        limit = self._settings.max_tokens_limit
        if max_tokens is not None and max_tokens > limit:
            raise InvalidRequest(
                f"max_tokens is {max_tokens}; this server allows at most {limit}",
                code="max_tokens_too_large",
            )
        return SamplingParams(
            max_tokens=max_tokens or self._settings.max_tokens,
            temperature=self._settings.temperature if temperature is None else temperature,
            top_p=self._settings.top_p if top_p is None else top_p,
            stop=tuple(stop),
            seed=seed,
            frequency_penalty=frequency_penalty or 0.0,
            presence_penalty=presence_penalty or 0.0,
        )

    @property
    def model_id(self) -> str:
        return self.engine.model_id

    @property
    def context_tokens(self) -> int:
        return self.engine.context_tokens

    async def start(
        self,
        prompt: Prompt,
        sampling: SamplingParams,
        *,
        user_id: str,
        session: str = "",
        purpose: str = "none",
    ) -> MeteredGeneration:
        """Admit a generation or raise (429 stream limit or token budget spent, 503 engine
        full, 400 too long).

        The prompt's ``public_messages`` are the server's own material, whose KV cache all
        users share; everything after them is cached for ``user_id`` alone. ``purpose``
        labels the metrics (see ``Metrics.observe_generation``). ``session``: a stable key
        of the conversation, for engines with replica affinity.
        """
        self._budget.check(user_id)
        release = self._limiter.acquire(user_id)
        try:
            request = self.request(prompt, sampling, user_id=user_id, session=session)
            generation = await self.engine.submit(request)
        except BaseException:
            release()
            raise
        return MeteredGeneration(
            generation,
            engine_name=self._settings.engine.value,
            agent=purpose,
            metrics=self._metrics,
            release=release,
            stream_interval_s=self._settings.stream_interval_ms / 1000,
            charge=lambda tokens: self._budget.charge(user_id, tokens),
        )

    @staticmethod
    def request(
        prompt: Prompt, sampling: SamplingParams, *, user_id: str, session: str
    ) -> GenerationRequest:
        """The engine's request for ``prompt``: what follows its public messages is cached
        for ``user_id`` alone."""
        return GenerationRequest(
            messages=tuple(prompt.messages),
            sampling=sampling,
            cache_salt=user_id,
            public_messages=prompt.public_messages,
            session=session,
        )
