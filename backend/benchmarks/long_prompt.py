"""The ``concurrent`` benchmark's ``long-prompt`` workload: what one long prompt does to the
users already streaming.

S users stream answers back to back (no think time) while one more user sends a message of
about ``prompt_tokens`` tokens. While that message is prefilled, the others' tokens should
keep coming. Reported, for the others: the largest gap between two tokens of one answer that
overlaps the long prefill, the p95 of those gaps, and the TTFT of their requests sent during
it; and the long prompt's own TTFT, beside its TTFT on the same server with nobody else (a
solo run first, with another text of the same length, so that neither finds the other
cached).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import httpx
from testbed.servers import Target

from benchmarks.chats import Ask, Prompts, note, turn
from benchmarks.client import Reply
from benchmarks.report import percentile
from benchmarks.workloads import SYSTEM_PROMPT
from chatbot.models.domain import ChatMessage

LONG_USER_SEED = 10_000  # notes of users the chatting users never are


def long_message(prompts: Prompts, tokens: int, seed: int) -> str:
    """Users' notes one after another until about ``tokens`` tokens, then a question."""
    parts: list[str] = []
    while prompts.count(" ".join(parts)) < tokens:
        parts.append(note(LONG_USER_SEED + seed * 1000 + len(parts)))
    return " ".join(parts) + "\n\nWhich of these trips climbs the most in one day?"


@dataclass(frozen=True, slots=True)
class Stream:
    """One answer to a chatting user: when it was asked, and when its pieces came."""

    user: int
    reply: Reply


def _ask(http: httpx.Client, ask: Ask, user: int, text: str, answer_tokens: int) -> Reply:
    messages = [
        ChatMessage(role="system", content=SYSTEM_PROMPT),
        ChatMessage(role="user", content=text),
    ]
    return ask(http, user, messages, answer_tokens)


def solo(target: Target, ask: Ask, text: str, *, user: int, answer_tokens: int) -> Reply:
    """The long message alone on the server."""
    with httpx.Client(base_url=target.url, timeout=600) as http:
        return _ask(http, ask, user, text, answer_tokens)


def play(
    target: Target, ask: Ask, text: str, *, users: int, answer_tokens: int
) -> tuple[Reply, list[Stream]]:
    """``users`` chatting back to back, and the long message ``text`` from one more user
    once each of them has had an answer; (the long message's reply, the others' answers)."""
    streams: list[Stream] = []
    lock = threading.Lock()
    answered = threading.Barrier(users + 1)
    done = threading.Event()
    failures: list[BaseException] = []

    def chat(user: int) -> None:
        messages = [ChatMessage(role="system", content=SYSTEM_PROMPT)]
        try:
            with httpx.Client(base_url=target.url, timeout=600) as http:
                round_ = 1
                while not done.is_set():
                    messages.append(ChatMessage(role="user", content=turn(user, round_)))
                    reply = ask(http, user, messages, answer_tokens)
                    messages.append(ChatMessage(role="assistant", content=reply.text))
                    with lock:
                        streams.append(Stream(user, reply))
                    if round_ == 1:
                        answered.wait()
                    # Then the six follow-up questions over and over.
                    round_ = 2 + (round_ - 1) % 6
        except BaseException as exc:
            failures.append(exc)
            answered.abort()
            raise

    threads = [threading.Thread(target=chat, args=(u,)) for u in range(users)]
    for thread in threads:
        thread.start()
    long_reply: Reply | None = None
    try:
        answered.wait()
        with httpx.Client(base_url=target.url, timeout=600) as http:
            long_reply = _ask(http, ask, users, text, answer_tokens)
    except threading.BrokenBarrierError:
        pass  # a user failed: said below
    finally:
        done.set()
        for thread in threads:
            thread.join()
    if failures:
        raise RuntimeError(f"{len(failures)} users failed") from failures[0]
    assert long_reply is not None
    return long_reply, streams


def summary(long_reply: Reply, streams: list[Stream], solo_reply: Reply) -> dict[str, Any]:
    """The figures the module's docstring names, in ms."""
    start = long_reply.sent_at
    end = start + long_reply.ttft_ms / 1000
    gaps = [
        (later - earlier) * 1000
        for s in streams
        for earlier, later in pairwise(s.reply.arrivals)
        if later > start and earlier < end
    ]
    asked_during = [s.reply.ttft_ms for s in streams if start <= s.reply.sent_at < end]
    return {
        "long_prompt_tokens": long_reply.prompt_tokens,
        "long_ttft_ms": long_reply.ttft_ms,
        "solo_long_ttft_ms": solo_reply.ttft_ms,
        "others_largest_gap_ms": round(max(gaps), 1) if gaps else None,
        "others_gap_p95_ms": round(percentile(gaps, 0.95), 1) if gaps else None,
        "others_gaps": len(gaps),
        "others_ttft_during_ms": asked_during,
        "others_answers": len(streams),
    }
