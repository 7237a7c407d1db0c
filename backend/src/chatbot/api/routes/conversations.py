"""The native conversation API: conversations, their messages, and streamed turns."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response, status

from chatbot.api.deps import (
    ConversationsDep,
    CurrentUser,
    DraftingUser,
    DraftsDep,
    StateDep,
    not_overloaded,
)
from chatbot.api.errors import error_body
from chatbot.api.streaming import EventStreamResponse, shutting_down, sse, until_disconnected
from chatbot.models.domain import Conversation, Message
from chatbot.models.schemas import (
    ConversationCreate,
    ConversationList,
    ConversationOut,
    ConversationUpdate,
    DraftCreate,
    DraftOut,
    ErrorResponse,
    MessageCreate,
    MessageList,
    MessageOut,
)
from chatbot.models.turns import TurnDelta, TurnEnded, TurnFailed, TurnStarted
from chatbot.services.conversations import Turn

router = APIRouter(prefix="/v1/conversations", tags=["conversations"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 422, 429, 503)
}

_STREAM_DOC = """With `"stream": true` (the default) the answer streams as Server-Sent Events:
`message.start` `{conversation_id, message_id, agent, route_reason}`, `token` `{delta}`
(many), then either `message.end` `{message_id, status, content, usage, timing, agent,
route_reason, source}` or `error` `{error: {type, message, code}}` (code
`server_shutting_down` when the server stopped and its drain ran out: the answer is stored
as far as it got). A stream silent for `CHATBOT_SSE_KEEPALIVE_SECONDS` gets a comment line
(`: keep-alive`), which SSE clients ignore.
With `"stream": false` the answer comes back as one JSON message."""


def _out(conversation: Conversation) -> ConversationOut:
    return ConversationOut.model_validate(conversation, from_attributes=True)


def _message_out(message: Message) -> MessageOut:
    return MessageOut.model_validate(message, from_attributes=True)


@router.post("", status_code=status.HTTP_201_CREATED, responses=_ERRORS)
async def create_conversation(
    body: ConversationCreate, user: CurrentUser, conversations: ConversationsDep
) -> ConversationOut:
    return _out(await conversations.create(user, title=body.title, agent=body.agent))


@router.get("", responses=_ERRORS)
async def list_conversations(
    user: CurrentUser,
    conversations: ConversationsDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(description="The last id of the previous page.")] = None,
) -> ConversationList:
    page, has_more = await conversations.recent(user, limit=limit, after=after)
    return ConversationList(data=[_out(c) for c in page], has_more=has_more)


@router.get("/{conversation_id}", responses=_ERRORS)
async def get_conversation(
    conversation_id: str, user: CurrentUser, conversations: ConversationsDep
) -> ConversationOut:
    return _out(await conversations.get(user, conversation_id))


@router.patch("/{conversation_id}", responses=_ERRORS)
async def rename_conversation(
    conversation_id: str,
    body: ConversationUpdate,
    user: CurrentUser,
    conversations: ConversationsDep,
) -> ConversationOut:
    return _out(await conversations.rename(user, conversation_id, body.title))


@router.delete("/{conversation_id}", status_code=status.HTTP_204_NO_CONTENT, responses=_ERRORS)
async def delete_conversation(
    conversation_id: str, user: CurrentUser, conversations: ConversationsDep
) -> Response:
    await conversations.delete(user, conversation_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


_DRAFT_DOC = """What the user has written so far, before they send it: the server reads the
prompt the message would have (same agent, same layout) at the lowest priority, so that when
the message comes only what changed since is computed (its `usage.draft_tokens`). Answers at
once and never waits for the model; nothing is stored. A newer draft replaces the older;
sending the message, `DELETE`, or deleting the conversation ends it. Validated as a message
(413 `message_too_large`, 422). Skipped, still 202, when the engine has no spare capacity,
the user's token budget is spent, or drafts are off: `reason` says which. Drafts count
against a request rate of their own (CHATBOT_REQUESTS_PER_MINUTE, apart from other
requests') and against the user's CHATBOT_TOKENS_PER_MINUTE."""


@router.put(
    "/{conversation_id}/draft",
    status_code=status.HTTP_202_ACCEPTED,
    description=_DRAFT_DOC,
    responses=_ERRORS,
)
async def put_draft(
    conversation_id: str, body: DraftCreate, user: DraftingUser, drafts: DraftsDep
) -> DraftOut:
    outcome = await drafts.put(user, conversation_id, body.content)
    return DraftOut.model_validate(outcome, from_attributes=True)


@router.delete(
    "/{conversation_id}/draft", status_code=status.HTTP_204_NO_CONTENT, responses=_ERRORS
)
async def delete_draft(conversation_id: str, user: DraftingUser, drafts: DraftsDep) -> Response:
    """Stop reading the conversation's draft (the user cleared what they wrote)."""
    await drafts.delete(user, conversation_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{conversation_id}/messages", responses=_ERRORS)
async def list_messages(
    conversation_id: str, user: CurrentUser, conversations: ConversationsDep
) -> MessageList:
    messages = await conversations.messages(user, conversation_id)
    return MessageList(data=[_message_out(m) for m in messages])


@router.post(
    "/{conversation_id}/messages",
    response_model=MessageOut,
    description=_STREAM_DOC,
    responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}}},
    dependencies=[Depends(not_overloaded)],
)
async def send_message(
    conversation_id: str,
    body: MessageCreate,
    user: CurrentUser,
    conversations: ConversationsDep,
    state: StateDep,
    request: Request,
) -> MessageOut | Response:
    turn = await conversations.start_turn(
        user,
        conversation_id,
        body.content,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
    )
    if body.stream:
        return EventStreamResponse(
            _sse_events(turn),
            on_disconnect=turn.cancel,
            on_close=turn.aclose,
            drain=state.drain,
            keepalive_s=state.settings.sse_keepalive_seconds,
            last_words=[sse("error", error_body(shutting_down()))],
        )
    try:
        answer = await until_disconnected(request, _answer(turn), state.drain)
    finally:
        await turn.aclose()
    if answer is None:
        return Response(status_code=499)  # the client closed the request
    return answer


async def _answer(turn: Turn) -> MessageOut:
    async for event in turn.events():
        if isinstance(event, TurnFailed):
            raise event.error
        if isinstance(event, TurnEnded):
            return _message_out(event.message)
    raise AssertionError("a turn always ends with TurnEnded or TurnFailed")


async def _sse_events(turn: Turn) -> AsyncIterator[str]:
    async for event in turn.events():
        match event:
            case TurnStarted():
                yield sse(
                    "message.start",
                    {
                        "conversation_id": event.conversation_id,
                        "message_id": event.message_id,
                        "agent": event.agent.value,
                        "route_reason": event.route_reason,
                    },
                )
            case TurnDelta(text=text):
                yield sse("token", {"delta": text})
            case TurnEnded(message=message):
                yield sse(
                    "message.end",
                    {
                        "message_id": message.id,
                        "status": message.status.value,
                        "content": message.content,
                        "usage": message.usage.model_dump() if message.usage else None,
                        "timing": message.timing.model_dump() if message.timing else None,
                        "agent": message.agent.value if message.agent else None,
                        "route_reason": message.route_reason,
                        "source": message.source,
                    },
                )
            case TurnFailed(error=error):
                yield sse("error", error_body(error))
