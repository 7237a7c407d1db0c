"""What the terminal client prints, as plain text (colour is added where it is printed)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from chatbot.client.api import AnswerEnded, CacheReport, Conversation

SEPARATOR = " · "
ASCII_SEPARATOR = " | "  # for a terminal whose encoding has no middle dot

_TIER_NAMES = {"live": "live context", "ram": "RAM", "disk": "disk"}
_TIER_ORDER = ("live", "ram", "disk")


def percent(part: int, whole: int) -> str:
    """A share rounded down, so that 100 % means all of it and a little is never 0 %."""
    if whole <= 0:
        return "0"
    share = math.floor(100 * part / whole)
    return "<1" if share == 0 and part > 0 else str(share)


def answer_summary(answer: AnswerEnded, separator: str = SEPARATOR) -> str:
    """The one line shown after an answer: how soon it started, how much of the prompt was
    already cached and where, and which agent answered (the web page's badge, in words)."""
    parts: list[str] = []
    if answer.status == "cancelled":
        parts.append("stopped")
    elif answer.status != "complete":
        parts.append(answer.status)
    if answer.timing is not None:
        parts.append(f"TTFT {round(answer.timing.ttft_ms):,} ms")
    usage = answer.usage
    if usage is not None and usage.prompt_tokens > 0:
        share = f"{percent(usage.cached_tokens, usage.prompt_tokens)} %"
        if usage.cached_tokens and usage.cache_tier:
            share += f", {_TIER_NAMES.get(usage.cache_tier, usage.cache_tier)}"
        parts.append(
            f"{usage.cached_tokens:,}/{usage.prompt_tokens:,} prompt tokens cached ({share})"
        )
    if answer.agent:
        parts.append(f"agent {answer.agent}")
    return separator.join(parts)


def conversation_lines(conversations: Sequence[Conversation], current_id: str | None) -> list[str]:
    """Numbered for ``/switch <n>``, newest first, the current one marked with ``*``."""
    width = len(str(len(conversations)))
    lines = []
    for number, conversation in enumerate(conversations, start=1):
        mark = "*" if conversation.id == current_id else " "
        when = conversation.updated_at[:16].replace("T", " ")
        lines.append(
            f"{mark} {number:>{width}}  {conversation.title}  "
            f"[{conversation.agent}, {when} UTC, {conversation.id}]"
        )
    return lines


def size(count: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def stats_lines(report: CacheReport, separator: str = SEPARATOR) -> list[str]:
    """``GET /v1/cache/stats`` for a person: the caller's own hit rate and where the hits
    came from, then what each tier holds for everyone."""
    if not report.enabled:
        return [f"The {report.engine} engine keeps no KV cache of its own: no figures here."]
    lines = []
    user = report.user
    if user is None or user.lookups == 0:
        lines.append("Your prompts: none looked up in the cache yet.")
    else:
        lines.append(
            f"Your prompts: {user.hit_tokens:,} of {user.requested_tokens:,} tokens "
            f"served from the cache ({percent(user.hit_tokens, user.requested_tokens)} % "
            f"hit rate) over {user.lookups:,} {'lookup' if user.lookups == 1 else 'lookups'}"
        )
        by_tier = [
            f"{_TIER_NAMES[tier]} {user.hit_tokens_by_tier.get(tier, 0):,}" for tier in _TIER_ORDER
        ]
        lines.append(f"  tokens by tier: {separator.join(by_tier)}")
    held = []
    for tier in _TIER_ORDER:
        figures = report.tiers.get(tier)
        if figures is None:
            continue
        budget = f" of {size(figures.budget_bytes)}" if figures.budget_bytes else ""
        entries = "entry" if figures.entries == 1 else "entries"
        held.append(
            f"{_TIER_NAMES[tier]} {figures.entries:,} {entries}, {size(figures.bytes)}{budget}"
        )
    if held:
        lines.append(f"The cache (all users): {separator.join(held)}")
    return lines
