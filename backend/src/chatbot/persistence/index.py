"""The conversation index: an interface, and the in-memory implementation (the default).

It holds what lists and owns conversations (owner, title, pinned agent, times); their
messages are the agents' graph state, kept by its checkpointer, and nowhere else.

Every read and write takes the owner's user id, so that no code path can reach another
user's conversation: to a caller, someone else's conversation does not exist.

The index is also where a turn is claimed: one turn at a time per conversation, across every
API replica sharing the database. A claim names the process that holds it, so that a replica
that died in the middle of a turn is seen to be gone and its claim taken over.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from datetime import datetime

from chatbot.models.domain import Conversation, utcnow
from chatbot.models.errors import Conflict, NotFound


def turn_in_progress() -> Conflict:
    return Conflict(
        "an answer is still being generated in this conversation", code="turn_in_progress"
    )


class ConversationIndex(ABC):
    @abstractmethod
    async def create(self, conversation: Conversation) -> None: ...

    @abstractmethod
    async def get(self, user_id: str, conversation_id: str) -> Conversation:
        """Raises NotFound if it does not exist or belongs to someone else."""

    @abstractmethod
    async def recent(
        self, user_id: str, *, limit: int, after: str | None
    ) -> tuple[list[Conversation], bool]:
        """The user's conversations, newest first, from just after ``after``; and whether
        more follow."""

    @abstractmethod
    async def rename(self, user_id: str, conversation_id: str, title: str) -> Conversation: ...

    @abstractmethod
    async def delete(self, user_id: str, conversation_id: str) -> None: ...

    @abstractmethod
    async def touch(self, user_id: str, conversation_id: str, when: datetime) -> None:
        """Record activity (a new message) at ``when``."""

    @abstractmethod
    async def claim_turn(self, user_id: str, conversation_id: str) -> Conversation:
        """Hold the conversation for one turn. Raises NotFound, or Conflict while a turn
        holds it on a process that is alive (this one or another replica)."""

    @abstractmethod
    async def release_turn(self, conversation_id: str) -> None:
        """Give back this process's claim (no-op if it holds none)."""

    @abstractmethod
    async def aclose(self) -> None:
        """Close connections."""


class MemoryIndex(ConversationIndex):
    def __init__(self) -> None:
        self._conversations: dict[str, Conversation] = {}
        self._turns: set[str] = set()
        self._lock = asyncio.Lock()

    def _owned(self, user_id: str, conversation_id: str) -> Conversation:
        conversation = self._conversations.get(conversation_id)
        if conversation is None or conversation.user_id != user_id:
            raise NotFound(f"no conversation {conversation_id!r}", code="conversation_not_found")
        return conversation

    async def create(self, conversation: Conversation) -> None:
        async with self._lock:
            self._conversations[conversation.id] = conversation

    async def get(self, user_id: str, conversation_id: str) -> Conversation:
        return self._owned(user_id, conversation_id)

    async def recent(
        self, user_id: str, *, limit: int, after: str | None
    ) -> tuple[list[Conversation], bool]:
        mine = sorted(
            (c for c in self._conversations.values() if c.user_id == user_id),
            key=lambda c: (c.created_at, c.id),
            reverse=True,
        )
        if after is not None:
            cursor = self._owned(user_id, after)
            mine = [c for c in mine if (c.created_at, c.id) < (cursor.created_at, cursor.id)]
        return mine[:limit], len(mine) > limit

    async def rename(self, user_id: str, conversation_id: str, title: str) -> Conversation:
        async with self._lock:
            renamed = self._owned(user_id, conversation_id).model_copy(
                update={"title": title, "updated_at": utcnow()}
            )
            self._conversations[conversation_id] = renamed
            return renamed

    async def delete(self, user_id: str, conversation_id: str) -> None:
        async with self._lock:
            self._owned(user_id, conversation_id)
            del self._conversations[conversation_id]

    async def touch(self, user_id: str, conversation_id: str, when: datetime) -> None:
        async with self._lock:
            conversation = self._owned(user_id, conversation_id)
            self._conversations[conversation_id] = conversation.model_copy(
                update={"updated_at": when}
            )

    async def claim_turn(self, user_id: str, conversation_id: str) -> Conversation:
        conversation = self._owned(user_id, conversation_id)
        if conversation_id in self._turns:
            raise turn_in_progress()
        self._turns.add(conversation_id)
        return conversation

    async def release_turn(self, conversation_id: str) -> None:
        self._turns.discard(conversation_id)

    async def aclose(self) -> None:
        return None
