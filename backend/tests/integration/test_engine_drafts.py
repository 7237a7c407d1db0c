"""Drafts on the real model: what the embedded engine reads while a user is still writing
is what their message's prompt then finds in the cache, the answer is the same as without
it, and a draft never serves anyone else."""

from __future__ import annotations

import asyncio
from pathlib import Path

from chatbot.engines.base import (
    DraftStatus,
    GenerationRequest,
)
from chatbot.engines.embedded import EmbeddedEngine
from chatbot.models.domain import ChatMessage, Usage
from tests.integration.test_batching import GREEDY_16, SYSTEM, ask, engine, ram_cache
from tests.waiting import wait_until

DOCUMENT = (
    "Here are my notes from the trip. We left Lyon early on Monday, drove through the Alps "
    "and reached Turin by noon. The museum of cinema was closed, so we walked along the Po "
    "and ate at a small trattoria near the station. On Tuesday we took the train to Genoa, "
    "saw the aquarium, and spent the evening in the old port. "
) * 3
MESSAGE = DOCUMENT + "Where did we eat on Monday?"


def drafts_engine(model_path: Path) -> EmbeddedEngine:
    return engine(model_path, parallel=4, kv_cache=ram_cache(model_path), queue_size=4)


def request(text: str, user: str, session: str) -> GenerationRequest:
    return GenerationRequest(
        messages=(SYSTEM, ChatMessage(role="user", content=text)),
        sampling=GREEDY_16,
        cache_salt=user,
        public_messages=1,
        session=session,
    )


async def answer(running: EmbeddedEngine, text: str, user: str, session: str) -> tuple[str, Usage]:
    return await ask(running, [ChatMessage(role="user", content=text)], user, session=session)


async def drafted(running: EmbeddedEngine, text: str, user: str, session: str) -> None:
    """Send a draft and wait until the engine has read it to its end."""
    before = running.draft_stats()
    assert before is not None
    status = await running.prefill_draft(request(text, user, session))
    assert status is DraftStatus.PREFILLING
    await asyncio.to_thread(
        wait_until,
        lambda: (stats := running.draft_stats()) is not None and stats.prefilled > before.prefilled,
        timeout=120,
    )


def test_a_draft_is_what_the_message_finds_and_the_answer_is_the_same(model_path: Path) -> None:
    async def run() -> None:
        running = drafts_engine(model_path)
        await running.start()
        try:
            cold_text, cold = await answer(running, MESSAGE, "alice", "conv-a")
            assert cold.draft_tokens == 0
            # Bob writes the same message; the draft stops short of its last words.
            await drafted(running, MESSAGE[: -len("on Monday?")], "bob", "conv-b")
            text, usage = await answer(running, MESSAGE, "bob", "conv-b")
            assert text == cold_text  # greedy: the same answer with and without a draft
            assert usage.draft_tokens > usage.prompt_tokens // 2
            assert usage.prompt_tokens - usage.cached_tokens < 10  # the last words, no more
            stats = running.draft_stats()
            assert stats is not None
            assert stats.tokens_used == usage.draft_tokens
        finally:
            await running.aclose()

    asyncio.run(run())


def test_a_draft_never_serves_another_user(model_path: Path) -> None:
    async def run() -> None:
        running = drafts_engine(model_path)
        await running.start()
        try:
            # What any user shares with another: the public preamble.
            await answer(running, "Hello there!", "dave", "conv-d")
            _, public = await answer(running, "Good morning!", "erin", "conv-e")
            assert public.cached_tokens > 0
            await drafted(running, MESSAGE, "alice", "conv-a")
            # Carol sends exactly what Alice drafted: the preamble is all she gets.
            _, usage = await answer(running, MESSAGE, "carol", "conv-c")
            assert usage.draft_tokens == 0
            assert usage.cached_tokens == public.cached_tokens
        finally:
            await running.aclose()

    asyncio.run(run())


def test_a_newer_draft_computes_only_what_changed(model_path: Path) -> None:
    async def run() -> None:
        running = drafts_engine(model_path)
        await running.start()
        try:
            await drafted(running, DOCUMENT, "alice", "conv-a")
            first = running.draft_stats()
            assert first is not None
            await drafted(running, DOCUMENT + "Where did we", "alice", "conv-a")
            second = running.draft_stats()
            assert second is not None
            assert 0 < second.tokens - first.tokens < 10
        finally:
            await running.aclose()

    asyncio.run(run())
