"""The LangChain face of one admitted engine generation.

The engine is used in two steps (admit, then stream) so that a request it cannot take fails
before a response starts; LangChain's chat models have one. This model wraps a generation
that was already admitted, so that what LangGraph callback handlers expect of an LLM call
(start, one event per token, end with usage, error) is reported by LangChain itself: that is
what Langfuse's handler turns into a generation with its usage and completion start time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
)
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field, PrivateAttr

from chatbot.engines.base import Finished, Generation, TokenDelta
from chatbot.models.domain import ChatMessage


class AdmittedGeneration(BaseChatModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    generation: Generation = Field(exclude=True)
    model_name: str
    _finished: Finished | None = PrivateAttr(default=None)

    @property
    def finished(self) -> Finished | None:
        """How the generation ended; None if it was stopped before its end."""
        return self._finished

    @property
    def _llm_type(self) -> str:
        return "lmcache-chatbot"

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        raise NotImplementedError("an admitted generation is only ever streamed")

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        produced = False
        async for event in self.generation:
            produced = True
            if isinstance(event, TokenDelta):
                yield ChatGenerationChunk(message=AIMessageChunk(content=event.text))
            elif isinstance(event, Finished):
                self._finished = event
                usage = event.usage
                yield ChatGenerationChunk(
                    message=AIMessageChunk(
                        content="",
                        usage_metadata=None
                        if usage is None
                        else {
                            "input_tokens": usage.prompt_tokens,
                            "output_tokens": usage.completion_tokens,
                            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
                            "input_token_details": {"cache_read": usage.cached_tokens},
                        },
                        response_metadata={
                            "finish_reason": event.finish_reason,
                            "model_name": self.model_name,
                            "cache_tier": usage.cache_tier.value
                            if usage and usage.cache_tier
                            else None,
                            "ttft_ms": event.timing.ttft_ms,
                        },
                    )
                )
        if not produced:
            # Stopped before its first token; LangChain wants at least one chunk.
            yield ChatGenerationChunk(
                message=AIMessageChunk(content="", response_metadata={"finish_reason": "stop"})
            )


def langchain_messages(messages: Sequence[ChatMessage]) -> list[BaseMessage]:
    kinds: dict[str, type[BaseMessage]] = {
        "system": SystemMessage,
        "user": HumanMessage,
        "assistant": AIMessage,
    }
    return [kinds[m.role](content=m.content) for m in messages]
