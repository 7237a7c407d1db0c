"""The OpenAI-compatible API: ``/v1/chat/completions`` and ``/v1/models``, OpenAI's wire
format around the stateless completions of ``services.completions``."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any
from uuid import uuid4

from fastapi import APIRouter, Depends, Request, Response

from chatbot.api.deps import CompletionsDep, CurrentUser, StateDep, not_overloaded
from chatbot.api.errors import error_body
from chatbot.api.streaming import EventStreamResponse, shutting_down, sse, until_disconnected
from chatbot.engines.base import Finished, TokenDelta
from chatbot.models.errors import ChatbotError, EngineFailure
from chatbot.models.schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    CompletionUsage,
    Delta,
    ErrorResponse,
    ModelCard,
    ModelList,
    PromptTokensDetails,
)
from chatbot.services.generation import MeteredGeneration

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["openai"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 500, 503)
}
_STARTED = int(time.time())


@router.get("/models", responses=_ERRORS)
async def list_models(_: CurrentUser, completions: CompletionsDep) -> ModelList:
    card = ModelCard(
        id=completions.model_id,
        created=_STARTED,
        max_model_len=completions.context_tokens,
        prompt_format=completions.prompt_format,
    )
    return ModelList(data=[card])


def _usage(finished: Finished) -> CompletionUsage | None:
    u = finished.usage
    if u is None:
        return None
    return CompletionUsage(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        total_tokens=u.prompt_tokens + u.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=u.cached_tokens),
    )


_COMPLETIONS_DOC = """OpenAI's chat completions. Parameters that would change the answer and
are not implemented (`logit_bias`, `logprobs`, `top_logprobs`, `tools`, `tool_choice`,
`functions`, `function_call`, `response_format` other than text) are refused with 400
`unsupported_parameter` naming them; other unknown parameters are ignored. With
`"stream": true` the chunks stream as Server-Sent Events and end with `data: [DONE]`; an error
after the stream started comes as one chunk `{error: {type, message, code}}` before
`[DONE]` (code `server_shutting_down` when the server stopped and its drain ran out). A
stream silent for `CHATBOT_SSE_KEEPALIVE_SECONDS` gets a comment line (`: keep-alive`)."""


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    description=_COMPLETIONS_DOC,
    responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}}},
    dependencies=[Depends(not_overloaded)],
)
async def create_chat_completion(
    body: ChatCompletionRequest,
    user: CurrentUser,
    completions: CompletionsDep,
    state: StateDep,
    request: Request,
) -> ChatCompletion | Response:
    generation = await completions.start(user, body)
    completion_id = f"chatcmpl-{uuid4().hex}"
    created = int(time.time())
    model_id = completions.model_id
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _chunks(generation, completion_id, created, model_id, include_usage)
        return EventStreamResponse(
            chunks,
            on_disconnect=generation.aclose,
            on_close=generation.aclose,
            drain=state.drain,
            keepalive_s=state.settings.sse_keepalive_seconds,
            last_words=[sse(None, error_body(shutting_down())), sse(None, "[DONE]")],
        )
    try:
        result = await until_disconnected(
            request, _complete(generation, completion_id, created, model_id), state.drain
        )
    finally:
        await generation.aclose()
    return Response(status_code=499) if result is None else result


async def _complete(
    generation: MeteredGeneration, completion_id: str, created: int, model_id: str
) -> ChatCompletion:
    parts: list[str] = []
    async for event in generation:
        if isinstance(event, TokenDelta):
            parts.append(event.text)
        else:
            return ChatCompletion(
                id=completion_id,
                created=created,
                model=model_id,
                choices=[
                    Choice(
                        message=AssistantMessage(content="".join(parts)),
                        finish_reason=event.finish_reason,
                    )
                ],
                usage=_usage(event),
            )
    raise EngineFailure("the engine ended without finishing the answer")


async def _chunks(
    generation: MeteredGeneration,
    completion_id: str,
    created: int,
    model_id: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    def chunk(delta: Delta, finish: Any = None, usage: CompletionUsage | None = None) -> str:
        choices = [] if usage else [ChunkChoice(delta=delta, finish_reason=finish)]
        body = ChatCompletionChunk(
            id=completion_id, created=created, model=model_id, choices=choices, usage=usage
        )
        return sse(None, body.model_dump_json(exclude_none=True))

    yield chunk(Delta(role="assistant", content=""))
    try:
        async for event in generation:
            if isinstance(event, TokenDelta):
                yield chunk(Delta(content=event.text))
            else:
                yield chunk(Delta(), finish=event.finish_reason)
                usage = _usage(event)
                if include_usage and usage is not None:
                    yield chunk(Delta(), usage=usage)
    except ChatbotError as exc:
        # Headers are sent already: the error travels in the stream, as vLLM's does.
        yield sse(None, error_body(exc))
    except Exception:
        logger.exception("a streamed completion failed")
        yield sse(None, error_body(EngineFailure("the answer failed")))
    yield sse(None, "[DONE]")
