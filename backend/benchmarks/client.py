"""One streamed chat completion against any OpenAI-compatible server, timed as the
client sees it: TTFT is the time from sending the request to the first content token."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import httpx

from chatbot.sse import parse_sse


@dataclass(frozen=True, slots=True)
class Reply:
    text: str
    ttft_ms: float
    total_ms: float
    prompt_tokens: int
    cached_tokens: int | None  # None: the server does not report it
    completion_tokens: int
    sent_at: float = 0.0
    """``time.perf_counter()`` when the request was sent."""
    arrivals: tuple[float, ...] = ()
    """``time.perf_counter()`` when each piece of text arrived."""


def chat(
    client: httpx.Client,
    key: str,
    messages: list[dict[str, str]],
    *,
    model: str,
    max_tokens: int,
) -> Reply:
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    arrivals: list[float] = []
    usage: dict[str, object] = {}
    headers = {"Authorization": f"Bearer {key}"}
    with client.stream("POST", "/chat/completions", json=body, headers=headers) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {response.read().decode()}")
        for event in parse_sse(response.iter_lines()):
            if event.data == "[DONE]":
                continue
            chunk = json.loads(event.data)
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content") or ""
                if text:
                    arrivals.append(time.perf_counter())
                    first = first or arrivals[-1]
                    parts.append(text)
            usage = chunk.get("usage") or usage
    ended = time.perf_counter()
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return Reply(
        text="".join(parts),
        ttft_ms=round(((first or ended) - sent) * 1000, 1),
        total_ms=round((ended - sent) * 1000, 1),
        prompt_tokens=int(str(usage.get("prompt_tokens", 0))),
        cached_tokens=None if cached is None else int(cached),
        completion_tokens=int(str(usage.get("completion_tokens", 0))),
        sent_at=sent,
        arrivals=tuple(arrivals),
    )
