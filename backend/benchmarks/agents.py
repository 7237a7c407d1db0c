"""``python -m benchmarks agents``: what routing costs in time to first token, and how much of each
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
from functools import partial
from typing import Annotated, Any

import httpx
import typer
from testbed.servers import Target

from benchmarks import report
from benchmarks.runner import RESULTS, AnswerTokens, each, header, write
from benchmarks.servers import Factory, chatbot
from chatbot.agents.documents import DocumentIndex, load_documents
from chatbot.agents.router import RuleRouter
from chatbot.config import Settings
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


def command(
    users: Annotated[int, typer.Option(help="Simulated users, one conversation each.")] = 4,
    answer_tokens: AnswerTokens = 24,
) -> dict[str, Any]:
    """The router's added TTFT, and the cache across agent switches."""
    settings = {"users": users, "turns": len(TURNS), "answer_tokens": answer_tokens}
    result, lines = header(
        "Agents: the router's cost and the cache across agent switches", settings
    )
    typer.echo("agents", err=True)
    runs: list[report.Run] = []
    for target in each(_targets(users, answer_tokens)):
        pinned = _PINNED.get(target.name)
        rows = agent_switches(target, users=users, answer_tokens=answer_tokens, pinned=pinned)
        runs.append(
            {
                "target": target.name,
                "notes": target.notes,
                "rows": rows,
                "prefix_breaks": prefix_breaks(target),
                "peak_rss_mib": target.peak_rss_mib(),
            }
        )
    rules_us = _rule_router_us()
    pinned_p50 = report.ttft_summary(r for r in runs[0]["rows"] if report.follow_ups(r))["p50_ms"]
    lines += report.table(
        [
            "chatbot",
            "TTFT p50 / p95, turns ≥ 2 (ms)",
            "added p50 vs pinned (ms)",
            "cached share, turns ≥ 2",
            "agent switches",
            "cached share at switches",
            "switches with whole history cached",
            "prefix breaks",
        ],
        [_row(run, pinned_p50) for run in runs],
    )
    rules, llm = runs[1]["rows"], runs[2]["rows"]
    agree = sum(a["agent"] == b["agent"] for a, b in zip(rules, llm, strict=True))
    result["rule_router_decision_us"] = round(rules_us, 1)
    result["llm_rules_agreement"] = f"{agree}/{len(rules)}"
    lines += [
        "",
        f"The rule router decides in {rules_us:.0f} µs (in process, over the workload's "
        f"questions). The LLM router chose the same agent as the rules on {agree} of "
        f"{len(rules)} turns. Agents chosen by the rule router per turn: "
        + ", ".join(r["agent"] for r in rules if r["user"] == 0)
        + ".",
    ]
    result["runs"] = runs
    report.plot_ttft_by_round(
        runs, RESULTS / "agents_ttft.png", "TTFT by turn, agents switching", "turn"
    )
    write("agents", result, lines)
    return result


_PINNED = {"pinned to assistant (no routing)": "assistant"}


def _targets(users: int, answer_tokens: int) -> dict[str, Factory]:
    """Pinned to one agent, the rule router, the LLM router, the rule router without cache."""
    configs: dict[str, tuple[str, dict[str, str]]] = {
        "pinned to assistant (no routing)": ("tiered", {}),
        "rule router": ("tiered", {"CHATBOT_ROUTER": "rules"}),
        "LLM router": ("tiered", {"CHATBOT_ROUTER": "llm"}),
        "rule router, cache off": ("off", {"CHATBOT_ROUTER": "rules"}),
    }
    system_prompt = str(Settings.model_fields["system_prompt"].default)
    return {
        name: partial(
            chatbot,
            name,
            users=users,
            system_prompt=system_prompt,
            max_tokens=answer_tokens,
            cache=cache,
            env=env,
        )
        for name, (cache, env) in configs.items()
    }


def _rule_router_us() -> float:
    """The rule router's own decision time in µs, in process: it makes no model call."""
    router = RuleRouter(DocumentIndex(load_documents(None, max_chars=16_000)))
    questions = [t.format(place=p) for t in TURNS for p in PLACES]
    started = time.perf_counter()
    for _ in range(200):
        for q in questions:
            router.route(q, None)
    return (time.perf_counter() - started) / (200 * len(questions)) * 1e6


def _row(run: report.Run, pinned_p50: float) -> list[object]:
    """Follow-up TTFT, what routing adds, and the cache at agent switches (also kept in the
    run's summary)."""
    follow = [r for r in run["rows"] if report.follow_ups(r)]
    switches = [r for r in follow if r["switched"]]
    ttft = report.ttft_summary(follow)
    covered = sum(r["cached_tokens"] >= r["previous_prompt_tokens"] for r in switches)
    run["summary"] = {
        "ttft_follow_ups": ttft,
        "added_ttft_p50_ms": round(ttft["p50_ms"] - pinned_p50, 1),
        "hit_rate_follow_ups": report.cached_share(follow),
        "switch_turns": len(switches),
        "hit_rate_switch_turns": report.cached_share(switches),
        "switch_turns_with_history_cached": covered,
    }
    return [
        run["target"],
        f"{ttft['p50_ms']:.0f} / {ttft['p95_ms']:.0f}",
        f"{run['summary']['added_ttft_p50_ms']:+.0f}",
        report.pct(run["summary"]["hit_rate_follow_ups"]),
        f"{len(switches)}",
        report.pct(run["summary"]["hit_rate_switch_turns"]),
        f"{covered}/{len(switches)}",
        f"{run['prefix_breaks']:.0f}",
    ]
