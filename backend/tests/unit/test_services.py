from __future__ import annotations

import math

import pytest

from chatbot.agents.layout import kept_messages
from chatbot.models.domain import Message, MessageStatus
from chatbot.models.errors import RateLimited, ServiceUnavailable
from chatbot.services.drafts import FIRST_DRAFT_TOKENS, HeldDraft, estimated_tokens
from chatbot.services.limits import RequestRateLimiter, StreamLimiter, TokenBudget


def message(role: str, content: str, status: MessageStatus = MessageStatus.COMPLETE) -> Message:
    return Message(conversation_id="c", role=role, content=content, status=status)


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
    limiter = StreamLimiter(per_user=2, total=100)
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


def test_stream_limiter_refuses_past_the_total_with_503() -> None:
    limiter = StreamLimiter(per_user=2, total=3)
    limiter.acquire("alice")
    limiter.acquire("bob")
    release = limiter.acquire("carol")
    with pytest.raises(ServiceUnavailable) as refused:
        limiter.acquire("dave")
    assert (refused.value.code, refused.value.retry_after) == ("server_busy", 1)
    release()
    limiter.acquire("dave")


def test_request_rate_limiter_refills_over_the_minute() -> None:
    now = [0.0]
    limiter = RequestRateLimiter(per_minute=3, clock=lambda: now[0])
    for _ in range(3):
        limiter.check("alice")
    with pytest.raises(RateLimited) as refused:
        limiter.check("alice")
    assert refused.value.code == "too_many_requests"
    assert refused.value.retry_after == 20  # one request comes back every 20 s
    limiter.check("bob")  # others keep their own budget
    now[0] = 20.0
    limiter.check("alice")
    with pytest.raises(RateLimited):
        limiter.check("alice")
    now[0] = 10_000.0
    for _ in range(3):  # a long pause refills the bucket, but only to its size
        limiter.check("alice")
    with pytest.raises(RateLimited):
        limiter.check("alice")


def test_token_budget_refuses_once_spent_and_a_debt_is_paid_back_by_the_refill() -> None:
    now = [0.0]
    budget = TokenBudget(per_minute=600, clock=lambda: now[0])  # 10 tokens a second
    budget.check("alice")
    budget.charge("alice", 900)  # an answer is charged once done: the balance goes below 0
    with pytest.raises(RateLimited) as refused:
        budget.check("alice")
    assert refused.value.code == "token_budget_exhausted"
    assert refused.value.retry_after == 31  # -300 → above 0
    budget.check("bob")  # others keep their own budget
    assert not budget.try_charge("alice", 1)
    now[0] = 31.0
    budget.check("alice")
    assert not budget.try_charge("alice", 11)  # a draft is charged only if it fits
    assert budget.try_charge("alice", 10)
    budget.charge("alice", -10)  # and given back when the engine did not read it
    now[0] = 10_000.0
    assert budget.try_charge("alice", 600)  # a long pause refills it, only to its size
    assert not budget.try_charge("alice", 1)


def test_a_draft_is_estimated_at_what_it_adds_to_the_previous_one() -> None:
    first = "Where did we eat on Monday"
    assert estimated_tokens(None, first) == math.ceil(len(first) / 3) + FIRST_DRAFT_TOKENS
    held = HeldDraft.of(first, at=0.0)
    assert estimated_tokens(held, first + "?") == 2  # one character, and the last token again
    assert estimated_tokens(held, first) == 1
    edited = "Where did we dine on Monday?"  # not an extension: all of it is read again
    assert estimated_tokens(held, edited) == math.ceil(len(edited) / 3) + 1
