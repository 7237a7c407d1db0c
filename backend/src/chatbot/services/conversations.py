"""Conversations and their turns: what a user's message goes through, start to end."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from chatbot.config import Settings
from chatbot.engines.base import Finished, TokenDelta
from chatbot.models.domain import (
    ChatMessage,
    Conversation,
    Message,
    MessageStatus,
    new_id,
)
from chatbot.models.errors import ChatbotError, Conflict, EngineFailure, PayloadTooLarge
from chatbot.services.generation import GenerationService, MeteredGeneration
from chatbot.services.store import ConversationStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TurnStarted:
    conversation_id: str
    message_id: str


@dataclass(frozen=True, slots=True)
class TurnDelta:
    text: str


@dataclass(frozen=True, slots=True)
class TurnEnded:
    message: Message


@dataclass(frozen=True, slots=True)
class TurnFailed:
    error: ChatbotError
    message: Message


TurnEvent = TurnStarted | TurnDelta | TurnEnded | TurnFailed


def prompt_history(messages: list[Message]) -> list[ChatMessage]:
    """The earlier messages a new prompt carries. An answer that failed, or was stopped
    before it said anything, is left out together with the question it answered."""
    history: list[ChatMessage] = []
    for message in messages:
        if message.role == "assistant" and (
            message.status is MessageStatus.FAILED or not message.content
        ):
            if history and history[-1].role == "user":
                history.pop()
            continue
        history.append(ChatMessage(role=message.role, content=message.content))
    return history


class Turn:
    """One answer being generated. Iterate ``events()`` once; the answer is stored however
    the iteration ends: complete, cancelled (kept as far as it got) or failed."""

    def __init__(
        self,
        *,
        store: ConversationStore,
        user_id: str,
        conversation_id: str,
        generation: MeteredGeneration,
        on_done: Callable[[], None],
    ) -> None:
        self._store = store
        self._user_id = user_id
        self._conversation_id = conversation_id
        self._generation = generation
        self._on_done = on_done
        self.message_id = new_id("msg")
        self._finished = False

    async def events(self) -> AsyncIterator[TurnEvent]:
        yield TurnStarted(conversation_id=self._conversation_id, message_id=self.message_id)
        parts: list[str] = []
        status = MessageStatus.CANCELLED
        error: ChatbotError | None = None
        finished: Finished | None = None
        try:
            async for event in self._generation.events():
                if isinstance(event, TokenDelta):
                    parts.append(event.text)
                    yield TurnDelta(event.text)
                else:
                    finished = event
                    status = MessageStatus.COMPLETE
        except ChatbotError as exc:
            status, error = MessageStatus.FAILED, exc
        except Exception:
            logger.exception("turn failed")
            status, error = MessageStatus.FAILED, EngineFailure("the answer failed")
        finally:
            message = self._answer("".join(parts), status, finished)
            # Shielded: a client that disconnects cancels us, and the answer must still be
            # stored before the conversation takes its next turn.
            await asyncio.shield(self._finish(message))
        if error is not None:
            yield TurnFailed(error=error, message=message)
        else:
            yield TurnEnded(message=message)

    def _answer(self, content: str, status: MessageStatus, finished: Finished | None) -> Message:
        return Message(
            id=self.message_id,
            conversation_id=self._conversation_id,
            role="assistant",
            content=content,
            status=status,
            usage=finished.usage if finished else None,
            timing=finished.timing if finished else None,
        )

    async def _finish(self, message: Message) -> None:
        if self._finished:
            return
        self._finished = True
        try:
            await self._generation.aclose()
            await self._store.add_message(self._user_id, message)
        finally:
            self._on_done()

    async def cancel(self) -> None:
        """Stop generating; the events end and the answer is stored as far as it got."""
        await self._generation.aclose()

    async def aclose(self) -> None:
        """Cancel a turn whose events were never read to the end (the client left)."""
        await asyncio.shield(self._finish(self._answer("", MessageStatus.CANCELLED, None)))


class ConversationService:
    def __init__(
        self, store: ConversationStore, generations: GenerationService, settings: Settings
    ) -> None:
        self._store = store
        self._generations = generations
        self._settings = settings
        self._running: set[str] = set()

    async def create(self, user_id: str, *, title: str, agent: str) -> Conversation:
        conversation = Conversation(user_id=user_id, title=title, agent=agent)
        await self._store.create(conversation)
        return conversation

    async def get(self, user_id: str, conversation_id: str) -> Conversation:
        return await self._store.get(user_id, conversation_id)

    async def recent(
        self, user_id: str, *, limit: int, after: str | None
    ) -> tuple[list[Conversation], bool]:
        return await self._store.recent(user_id, limit=limit, after=after)

    async def rename(self, user_id: str, conversation_id: str, title: str) -> Conversation:
        return await self._store.rename(user_id, conversation_id, title)

    async def delete(self, user_id: str, conversation_id: str) -> None:
        self._refuse_if_running(conversation_id)
        await self._store.delete(user_id, conversation_id)

    async def messages(self, user_id: str, conversation_id: str) -> list[Message]:
        return await self._store.messages(user_id, conversation_id)

    async def start_turn(
        self,
        user_id: str,
        conversation_id: str,
        content: str,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> Turn:
        """Admit the user's message; raises before anything is stored if it cannot be
        answered now (too large, conversation busy, limits, engine full)."""
        if len(content) > self._settings.max_message_chars:
            raise PayloadTooLarge(
                f"the message has {len(content)} characters; the limit is "
                f"{self._settings.max_message_chars}",
                code="message_too_large",
            )
        conversation = await self._store.get(user_id, conversation_id)
        self._refuse_if_running(conversation.id)
        history = prompt_history(await self._store.messages(user_id, conversation.id))
        prompt = [
            ChatMessage(role="system", content=self._settings.system_prompt),
            *history,
            ChatMessage(role="user", content=content),
        ]
        sampling = self._generations.sampling(max_tokens=max_tokens, temperature=temperature)
        # The system prompt is the server's: every user shares its cache.
        generation = await self._generations.start(user_id, prompt, sampling, public_messages=1)
        self._running.add(conversation.id)
        try:
            await self._store.add_message(
                user_id,
                Message(conversation_id=conversation.id, role="user", content=content),
            )
        except BaseException:
            self._running.discard(conversation.id)
            await generation.aclose()
            raise
        return Turn(
            store=self._store,
            user_id=user_id,
            conversation_id=conversation.id,
            generation=generation,
            on_done=lambda: self._running.discard(conversation.id),
        )

    def _refuse_if_running(self, conversation_id: str) -> None:
        if conversation_id in self._running:
            raise Conflict(
                "an answer is still being generated in this conversation",
                code="turn_in_progress",
            )
