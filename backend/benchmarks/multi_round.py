"""``python -m benchmarks multi-round``: U users × R rounds, taking turns round-robin, against
the chatbot with its cache off, with the live context only, tiered, tiered with budgets far
below what the workload saves, and llama_cpp.server without and with its cache."""

from __future__ import annotations

from typing import Any

import typer
from testbed.servers import Target

from benchmarks import report
from benchmarks.runner import (
    MIB,
    RESULTS,
    AnswerTokens,
    Observer,
    Peers,
    Rounds,
    Users,
    header,
    measure_each,
    model_path,
    write,
)
from benchmarks.servers import CACHE_OFF, TIERED, cache_targets, ours
from benchmarks.workloads import Row, multi_round

LIVE = "chatbot, live context only"
# Budgets far below what the workload saves: RAM and disk must evict and stay within.
TIGHT = "chatbot, tiered, tight budgets (16 MiB RAM, 24 MiB disk)"


def command(
    users: Users = 6, rounds: Rounds = 4, answer_tokens: AnswerTokens = 24, peers: Peers = True
) -> dict[str, Any]:
    """U users × R rounds, round-robin: the live context alone cannot serve them."""
    settings = {"users": users, "rounds": rounds, "answer_tokens": answer_tokens}
    result, lines = header("Multi-round QA: U users × R rounds, interleaved", settings)
    typer.echo("multi-round", err=True)
    targets = cache_targets(users, answer_tokens, model_path(), peers=peers)
    targets[LIVE] = ours(LIVE, "live", users, answer_tokens)
    targets[TIGHT] = ours(
        TIGHT, "tiered", users, answer_tokens, ram_bytes=16 * MIB, disk_bytes=24 * MIB
    )

    def workload(target: Target, observe: Observer) -> list[Row]:
        return multi_round(
            target, users=users, rounds=rounds, answer_tokens=answer_tokens, observe=observe
        )

    runs = measure_each(targets, workload)
    result["runs"] = runs
    summary = {
        run["target"]: {**report.rounds(run), "peak RSS (MiB)": run["peak_rss_mib"]} for run in runs
    }
    result["summary"] = summary
    lines += report.table(
        [*report.ROUNDS_HEADER, "peak RSS (MiB)"],
        [[*report.rounds_row(name, s), s["peak RSS (MiB)"]] for name, s in summary.items()],
    )
    headline = _headline(summary, lines)
    headline["tight_budgets"] = _budgets(next(r for r in runs if r["target"] == TIGHT), lines)
    result["headline"] = headline
    report.plot_ttft_by_round(
        runs, RESULTS / "multi_round_ttft.png", "Multi-round QA: TTFT by round", "round"
    )
    report.plot_cdf(
        runs,
        RESULTS / "multi_round_cdf.png",
        "Multi-round QA: TTFT CDF, rounds ≥ 2",
        report.follow_ups,
    )
    lines += ["", "![TTFT by round](multi_round_ttft.png) ![CDF](multi_round_cdf.png)"]
    write("multi_round", result, lines)
    return result


def _headline(summary: dict[str, Any], lines: list[str]) -> dict[str, Any]:
    """The cache's cut in follow-up TTFT, and ours against each peer's."""
    off = summary[CACHE_OFF]["rounds >= 2"]
    on = summary[TIERED]["rounds >= 2"]
    headline: dict[str, Any] = {
        "ttft_p50_reduction": report.reduction(on["p50_ms"], off["p50_ms"]),
        "ttft_p95_reduction": report.reduction(on["p95_ms"], off["p95_ms"]),
    }
    lines += [
        "",
        f"Rounds ≥ 2, tiered KV cache vs cache off: TTFT p50 "
        f"{headline['ttft_p50_reduction']:.1%} lower, p95 {headline['ttft_p95_reduction']:.1%} "
        "lower.",
    ]
    for peer in ("llama_cpp.server", "llama_cpp.server --cache"):
        if peer in summary:
            ratio = on["p50_ms"] / summary[peer]["rounds >= 2"]["p50_ms"]
            headline[f"ttft_p50_ratio_vs {peer}"] = round(ratio, 4)
            lines.append(f"Against {peer}: our TTFT p50 is {ratio:.2f}× theirs.")
    return headline


def _budgets(tight: report.Run, lines: list[str]) -> dict[str, Any]:
    """What the RAM and disk tiers held at most against their budgets, and evicted."""
    budgets = {
        tier: {
            "peak_bytes": tight["peak_bytes"].get(tier, 0),
            "budget_bytes": s["budget_bytes"],
            "evictions": s["evictions"],
        }
        for tier, s in tight["cache"]["tiers"].items()
        if tier != "live"
    }
    lines += ["", "Tight budgets (the same workload; states saved far exceed them):", ""]
    lines += report.table(
        ["tier", "peak bytes", "budget bytes", "evictions"],
        [[t, b["peak_bytes"], b["budget_bytes"], b["evictions"]] for t, b in budgets.items()],
    )
    return budgets
