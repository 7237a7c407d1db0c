"""``python -m benchmarks repeated``: many users sending the same questions, each in a new
conversation, after the same shared system prompt: what sharing public prefixes buys."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from testbed.servers import Target

from benchmarks import report
from benchmarks.runner import (
    RESULTS,
    AnswerTokens,
    Observer,
    Peers,
    Users,
    header,
    measure_each,
    model_path,
    write,
)
from benchmarks.servers import cache_targets
from benchmarks.workloads import Row, repeated_prompts


def command(
    users: Users = 8,
    prompts: Annotated[int, typer.Option(help="Distinct questions each user sends.")] = 3,
    answer_tokens: AnswerTokens = 16,
    peers: Peers = True,
) -> dict[str, Any]:
    """Many users sending the same questions after the same shared system prompt."""
    settings = {"users": users, "prompts": prompts, "answer_tokens": answer_tokens}
    result, lines = header("Repeated prompts: U users × the same P questions", settings)
    typer.echo("repeated", err=True)

    def workload(target: Target, observe: Observer) -> list[Row]:
        return repeated_prompts(
            target, users=users, prompts=prompts, answer_tokens=answer_tokens, observe=observe
        )

    runs = measure_each(cache_targets(users, answer_tokens, model_path(), peers=peers), workload)
    result["runs"] = runs
    lines += report.table(
        [
            "server",
            "token hit rate",
            "where prompt tokens came from",
            "TTFT p50 (ms)",
            "TTFT p95 (ms)",
        ],
        [_row(run) for run in runs],
    )
    lines += [
        "",
        "A user's own words are salted per user, so across users only the shared preamble "
        "(system prompt and examples) hits; the hit rate above is what that sharing buys. "
        "llama_cpp.server has no notion of users: identical prompts arrive here back to "
        "back, and it serves one user's words to the next from its live context.",
        "",
        "![hit split](repeated_hit_rate.png)",
    ]
    report.plot_hit_split(runs, RESULTS / "repeated_hit_rate.png", "Repeated prompts: tokens")
    write("repeated", result, lines)
    return result


def _row(run: report.Run) -> list[object]:
    """The run's hit rate (also kept in the run), where its prompt tokens came from, TTFT."""
    sources = run.get("token_sources")
    total = sum(sources.values()) if sources else 0
    split = (
        ", ".join(f"{k} {v / total:.1%}" for k, v in sources.items() if v)
        if sources and total
        else "n/a"
    )
    hit = report.cached_share(run["rows"])
    run["hit_rate"] = hit
    ttft = report.ttft_summary(run["rows"])
    return [run["target"], report.pct(hit), split, ttft["p50_ms"], ttft["p95_ms"]]
