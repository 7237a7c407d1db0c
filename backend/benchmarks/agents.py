"""The agents benchmark: what routing costs in time to first token, and how much of each
prompt the cache still serves when the router switches agents between turns.

Each user holds one conversation through the native API; the users take turns, so every
turn also brings its conversation back from the RAM tier. The same questions run against
the chatbot with its conversations pinned to one agent (no routing), with the rule router,
with the LLM router, and with the rule router and the cache off.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from benchmarks.servers import Target
from chatbot.sse import parse_sse

TURNS = (
    "Hi! I am planning a week of hiking in {place} in May.",
    "How does the KV cache keep saved states in RAM and on disk?",
    "Which endpoint of the conversation API shows the cache counters?",
    "Please summarise our conversation so far.",
    "What should I pack for rain in {place}?",
    "What happens when a conversation fills the context window?",
)
PLACES = ("Portugal", "Norway", "the Alps", "Scotland", "Iceland", "the Dolomites")


@dataclass(frozen=True, slots=True)
class AgentRow:
    user: int
    round: int
    agent: str
    route_reason: str
    ttft_ms: float
    """Client side: request sent → first token event."""
    prompt_tokens: int
    cached_tokens: int
    previous_prompt_tokens: int
    switched: bool
    """The agent differs from the one that answered the previous turn."""


def _turn(
    client: httpx.Client, key: str, conversation: str, content: str, max_tokens: int
) -> tuple[float, dict[str, Any]]:
    body = {"content": content, "max_tokens": max_tokens}
    headers = {"Authorization": f"Bearer {key}"}
    sent = time.perf_counter()
    first: float | None = None
    end: dict[str, Any] = {}
    path = f"/conversations/{conversation}/messages"
    with client.stream("POST", path, json=body, headers=headers) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {response.read().decode()}")
        for event in parse_sse(response.iter_lines()):
            if event.event == "token" and first is None:
                first = time.perf_counter()
            elif event.event == "message.end":
                end = json.loads(event.data)
            elif event.event == "error":
                raise RuntimeError(event.data)
    return round(((first or time.perf_counter()) - sent) * 1000, 1), end


def agent_switches(
    target: Target, *, users: int, answer_tokens: int, pinned: str | None = None
) -> list[dict[str, Any]]:
    rows: list[AgentRow] = []
    with httpx.Client(base_url=target.url, timeout=600) as client:
        conversations = []
        for u in range(users):
            body = {"title": f"user {u}", **({"agent": pinned} if pinned else {})}
            response = client.post(
                "/conversations",
                json=body,
                headers={"Authorization": f"Bearer {target.keys[u]}"},
            )
            response.raise_for_status()
            conversations.append(response.json()["id"])
        previous: dict[int, tuple[str, int]] = {}
        for t, template in enumerate(TURNS, start=1):
            for u, conversation in enumerate(conversations):
                content = template.format(place=PLACES[u % len(PLACES)])
                ttft, end = _turn(client, target.keys[u], conversation, content, answer_tokens)
                usage = end["usage"]
                last_agent, last_prompt = previous.get(u, ("", 0))
                rows.append(
                    AgentRow(
                        user=u,
                        round=t,
                        agent=end["agent"],
                        route_reason=end["route_reason"],
                        ttft_ms=ttft,
                        prompt_tokens=usage["prompt_tokens"],
                        cached_tokens=usage["cached_tokens"],
                        previous_prompt_tokens=last_prompt,
                        switched=t > 1 and end["agent"] != last_agent,
                    )
                )
                previous[u] = (end["agent"], usage["prompt_tokens"])
    return [asdict(row) for row in rows]


def prefix_breaks(target: Target) -> float:
    """``chatbot_prefix_breaks_total`` summed over its reasons."""
    text = httpx.get(target.url.removesuffix("/v1") + "/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("chatbot_prefix_breaks_total")
    )
