"""Conformance suite of the conversation index, run against every implementation: in
memory, SQLite, and PostgreSQL (a server of the test session's own)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta

import pytest

from chatbot.agents.state import checkpoint_serializer
from chatbot.models.domain import Conversation, utcnow
from chatbot.models.errors import Conflict, NotFound
from chatbot.persistence.index import ConversationIndex
from chatbot.persistence.storage import open_storage

Scenario = Callable[[ConversationIndex], Awaitable[None]]


@pytest.fixture
def on_store(store_url: str) -> Callable[[Scenario], None]:
    """Runs a scenario against a freshly opened store."""

    def run(scenario: Scenario) -> None:
        async def opened() -> None:
            async with open_storage(store_url, serde=checkpoint_serializer()) as storage:
                await scenario(storage.index)

        asyncio.run(opened())

    return run


async def make(store: ConversationIndex, user: str, n: int) -> list[Conversation]:
    start = utcnow()
    made = []
    for i in range(n):
        conversation = Conversation(
            user_id=user, title=f"t{i}", agent="assistant", created_at=start + timedelta(seconds=i)
        )
        await store.create(conversation)
        made.append(conversation)
    return made


def test_newest_first_with_pages(on_store: Callable[[Scenario], None]) -> None:
    async def scenario(store: ConversationIndex) -> None:
        made = await make(store, "alice", 5)
        page, more = await store.recent("alice", limit=2, after=None)
        assert [c.id for c in page] == [made[4].id, made[3].id]
        assert more
        page, more = await store.recent("alice", limit=10, after=page[-1].id)
        assert [c.id for c in page] == [made[2].id, made[1].id, made[0].id]
        assert not more

    on_store(scenario)


def test_another_users_conversation_does_not_exist(on_store: Callable[[Scenario], None]) -> None:
    async def scenario(store: ConversationIndex) -> None:
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

    on_store(scenario)


def test_touch_records_activity(on_store: Callable[[Scenario], None]) -> None:
    async def scenario(store: ConversationIndex) -> None:
        (conversation,) = await make(store, "alice", 1)
        later = conversation.updated_at + timedelta(minutes=5)
        await store.touch("alice", conversation.id, later)
        assert (await store.get("alice", conversation.id)).updated_at == later

    on_store(scenario)


def test_rename_and_delete(on_store: Callable[[Scenario], None]) -> None:
    async def scenario(store: ConversationIndex) -> None:
        (conversation,) = await make(store, "alice", 1)
        renamed = await store.rename("alice", conversation.id, "New title")
        assert renamed.title == "New title"
        assert renamed.updated_at >= conversation.updated_at
        await store.delete("alice", conversation.id)
        with pytest.raises(NotFound):
            await store.get("alice", conversation.id)

    on_store(scenario)


def test_one_turn_at_a_time(on_store: Callable[[Scenario], None]) -> None:
    async def scenario(store: ConversationIndex) -> None:
        (conversation,) = await make(store, "alice", 1)
        assert (await store.claim_turn("alice", conversation.id)).id == conversation.id
        with pytest.raises(Conflict):
            await store.claim_turn("alice", conversation.id)
        with pytest.raises(NotFound):
            await store.claim_turn("bob", conversation.id)
        await store.release_turn(conversation.id)
        await store.claim_turn("alice", conversation.id)

    on_store(scenario)


def test_a_claim_of_a_process_that_is_gone_is_taken_over(store_url: str) -> None:
    """Two processes' stores on one database: the second cannot take a turn the first
    holds while the first is alive, and can once it has gone without releasing it."""
    if store_url == "memory://":
        pytest.skip("an in-memory store is never shared")

    async def scenario() -> None:
        async with open_storage(store_url, serde=checkpoint_serializer()) as second:
            async with open_storage(store_url, serde=checkpoint_serializer()) as first:
                (conversation,) = await make(first.index, "alice", 1)
                await first.index.claim_turn("alice", conversation.id)
                with pytest.raises(Conflict):
                    await second.index.claim_turn("alice", conversation.id)
            # The first closed with its claim still recorded, as a killed process does.
            await second.index.claim_turn("alice", conversation.id)
            with pytest.raises(Conflict):
                await second.index.claim_turn("alice", conversation.id)

    asyncio.run(scenario())
