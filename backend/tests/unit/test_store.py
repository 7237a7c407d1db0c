"""Conformance suite of the conversation store, run against every implementation."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta

import pytest

from chatbot.models.domain import Conversation, utcnow
from chatbot.models.errors import NotFound
from chatbot.services.store import ConversationStore, InMemoryStore

STORES: list[Callable[[], ConversationStore]] = [InMemoryStore]


@pytest.fixture(params=STORES, ids=lambda factory: factory.__name__)
def store(request: pytest.FixtureRequest) -> ConversationStore:
    factory: Callable[[], ConversationStore] = request.param
    return factory()


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def make(store: ConversationStore, user: str, n: int) -> list[Conversation]:
    start = utcnow()
    made = []
    for i in range(n):
        conversation = Conversation(
            user_id=user, title=f"t{i}", agent="assistant", created_at=start + timedelta(seconds=i)
        )
        await store.create(conversation)
        made.append(conversation)
    return made


def test_newest_first_with_pages(store: ConversationStore) -> None:
    async def scenario() -> None:
        made = await make(store, "alice", 5)
        page, more = await store.recent("alice", limit=2, after=None)
        assert [c.id for c in page] == [made[4].id, made[3].id]
        assert more
        page, more = await store.recent("alice", limit=10, after=page[-1].id)
        assert [c.id for c in page] == [made[2].id, made[1].id, made[0].id]
        assert not more

    run(scenario())


def test_another_users_conversation_does_not_exist(store: ConversationStore) -> None:
    async def scenario() -> None:
        (mine,) = await make(store, "alice", 1)
        assert await store.recent("bob", limit=10, after=None) == ([], False)
        for attempt in (
            store.get("bob", mine.id),
            store.rename("bob", mine.id, "x"),
            store.delete("bob", mine.id),
            store.touch("bob", mine.id, mine.created_at),
            store.recent("bob", limit=1, after=mine.id),
        ):
            with pytest.raises(NotFound):
                await attempt
        assert await store.get("alice", mine.id) == mine

    run(scenario())


def test_touch_records_activity(store: ConversationStore) -> None:
    async def scenario() -> None:
        (conversation,) = await make(store, "alice", 1)
        later = conversation.updated_at + timedelta(minutes=5)
        await store.touch("alice", conversation.id, later)
        assert (await store.get("alice", conversation.id)).updated_at == later

    run(scenario())


def test_rename_and_delete(store: ConversationStore) -> None:
    async def scenario() -> None:
        (conversation,) = await make(store, "alice", 1)
        renamed = await store.rename("alice", conversation.id, "New title")
        assert renamed.title == "New title"
        assert renamed.updated_at >= conversation.updated_at
        await store.delete("alice", conversation.id)
        with pytest.raises(NotFound):
            await store.get("alice", conversation.id)

    run(scenario())
