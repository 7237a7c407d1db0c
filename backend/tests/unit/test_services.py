from __future__ import annotations

import pytest

from chatbot.agents.layout import kept_messages
from chatbot.models.domain import Message, MessageStatus
from chatbot.models.errors import RateLimited
from chatbot.services.limits import StreamLimiter


def message(role: str, content: str, status: MessageStatus = MessageStatus.COMPLETE) -> Message:
    return Message(conversation_id="c", role=role, content=content, status=status)  # type: ignore[arg-type]


def test_history_leaves_out_failed_and_empty_answers_with_their_questions() -> None:
    history = kept_messages(
        [
            message("user", "q1"),
            message("assistant", "a1"),
            message("user", "q2"),
            message("assistant", "half", MessageStatus.FAILED),
            message("user", "q3"),
            message("assistant", "", MessageStatus.CANCELLED),
            message("user", "q4"),
            message("assistant", "stopped early", MessageStatus.CANCELLED),
        ]
    )
    assert [m.content for m in history] == ["q1", "a1", "q4", "stopped early"]


def test_stream_limiter_counts_per_user_and_releases_once() -> None:
    limiter = StreamLimiter(per_user=2)
    first, _ = limiter.acquire("alice"), limiter.acquire("alice")
    with pytest.raises(RateLimited) as refused:
        limiter.acquire("alice")
    assert refused.value.retry_after == 1
    limiter.acquire("bob")  # other users are not affected
    first()
    first()  # a second release must not free a slot that is still held
    limiter.acquire("alice")
    with pytest.raises(RateLimited):
        limiter.acquire("alice")
