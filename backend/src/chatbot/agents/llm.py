"""The turn graph's seam to the engine, and what tracing sees of each call through it.

``LanguageModel`` is what the graph needs of the engine. The graph owns it; the service that
admits and meters generations (``services.generation.GenerationService``) implements it, so
the graph never reaches back up into the services and a test can hand it any engine.

``report`` tells the run's LangChain callback handlers (Langfuse's, when tracing is on)
about one generation as LangChain's own chat models do: start with the prompt, a token
event per piece of text (the first is the completion start time), then the end with its
usage, cached tokens included. With no handler it is a plain pass-through.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from langchain_core.callbacks import AsyncCallbackManager
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, LLMResult
from langchain_core.runnables import RunnableConfig

from chatbot.agents.layout import Prompt
from chatbot.engines.base import EngineEvent, Finished, Generation, SamplingParams, TokenDelta
from chatbot.models.domain import ChatMessage


class LanguageModel(Protocol):
    @property
    def model_id(self) -> str: ...

    @property
    def context_tokens(self) -> int:
        """The model's window; a remote engine may learn it only after start-up."""
        ...

    async def start(
        self,
        prompt: Prompt,
        sampling: SamplingParams,
        *,
        user_id: str,
        session: str,
        purpose: str,
    ) -> Generation:
        """Admit a generation or raise a ``ChatbotError`` (limits, engine full, too long).

        ``session``: a stable key of the conversation, for engines with replica affinity;
        ``purpose``: the agent that answers, or "router", "compaction" (a metrics label)."""
        ...


def report(
    generation: Generation,
    messages: Sequence[ChatMessage],
    config: RunnableConfig,
    *,
    model_id: str,
    sampling: SamplingParams,
) -> AsyncIterator[EngineEvent]:
    """``generation``'s events, reported to ``config``'s callback handlers as one LLM call
    (the generation itself when there is no handler: no extra step per token)."""
    manager = AsyncCallbackManager.configure(
        config.get("callbacks"),
        inheritable_tags=config.get("tags"),
        inheritable_metadata={**config.get("metadata", {}), "ls_model_name": model_id},
    )
    if not manager.handlers:
        return aiter(generation)
    return _reported(generation, messages, manager, model_id, sampling)


async def _reported(
    generation: Generation,
    messages: Sequence[ChatMessage],
    manager: AsyncCallbackManager,
    model_id: str,
    sampling: SamplingParams,
) -> AsyncIterator[EngineEvent]:
    (run,) = await manager.on_chat_model_start(
        {"name": "lmcache-chatbot"},
        [_langchain_messages(messages)],
        invocation_params={
            "model_name": model_id,
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
        },
        name=model_id,
    )
    parts: list[str] = []
    finished: Finished | None = None
    try:
        async for event in generation:
            if isinstance(event, TokenDelta):
                parts.append(event.text)
                await run.on_llm_new_token(event.text)
            elif isinstance(event, Finished):
                finished = event
            yield event
    except BaseException as exc:
        await run.on_llm_error(exc)
        raise
    await run.on_llm_end(_result("".join(parts), finished, model_id))


def _result(text: str, finished: Finished | None, model_id: str) -> LLMResult:
    usage = finished.usage if finished is not None else None
    message = AIMessage(
        content=text,
        usage_metadata=None
        if usage is None
        else {
            "input_tokens": usage.prompt_tokens,
            "output_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "input_token_details": {"cache_read": usage.cached_tokens},
        },
        response_metadata={
            # None: stopped before its end.
            "finish_reason": finished.finish_reason if finished is not None else None,
            "model_name": model_id,
            "cache_tier": usage.cache_tier.value if usage and usage.cache_tier else None,
            "ttft_ms": finished.timing.ttft_ms if finished is not None else None,
        },
    )
    output: dict[str, Any] = {"model_name": model_id}
    return LLMResult(generations=[[ChatGeneration(message=message)]], llm_output=output)


def _langchain_messages(messages: Sequence[ChatMessage]) -> list[BaseMessage]:
    kinds: dict[str, type[BaseMessage]] = {
        "system": SystemMessage,
        "user": HumanMessage,
        "assistant": AIMessage,
    }
    return [kinds[m.role](content=m.content) for m in messages]
