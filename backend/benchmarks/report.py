"""Summaries, Markdown tables and plots of benchmark runs."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

Run = dict[str, Any]  # {"target": name, "rows": [...], "cache": {...}, "peak_rss_mib": ...}


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))]


def ttft_summary(rows: Iterable[dict[str, Any]]) -> dict[str, float]:
    ttft = [r["ttft_ms"] for r in rows]
    if not ttft:
        return {"n": 0}
    return {
        "n": len(ttft),
        "p50_ms": round(statistics.median(ttft), 1),
        "p95_ms": round(percentile(ttft, 0.95), 1),
        "mean_ms": round(statistics.fmean(ttft), 1),
    }


def cached_share(rows: Iterable[dict[str, Any]]) -> float | None:
    rows = list(rows)
    if any(r["cached_tokens"] is None for r in rows):
        return None
    prompt = sum(r["prompt_tokens"] for r in rows)
    return round(sum(r["cached_tokens"] for r in rows) / prompt, 4) if prompt else None


def follow_ups(row: dict[str, Any]) -> bool:
    return bool(row["round"] >= 2)


ROUNDS_HEADER = [
    "server",
    "round 1 TTFT p50 (ms)",
    "rounds ≥ 2 TTFT p50 (ms)",
    "rounds ≥ 2 TTFT p95 (ms)",
    "cached share, rounds ≥ 2",
]


def rounds(run: Run) -> dict[str, Any]:
    """TTFT of the first round and of the follow-ups, and the follow-ups' cached share."""
    rows = run["rows"]
    return {
        "round 1": ttft_summary(r for r in rows if r["round"] == 1),
        "rounds >= 2": ttft_summary(r for r in rows if follow_ups(r)),
        "cached share, rounds >= 2": cached_share(r for r in rows if follow_ups(r)),
    }


def rounds_row(name: str, summary: dict[str, Any]) -> list[object]:
    """``rounds``' summary as a row under ``ROUNDS_HEADER``."""
    return [
        name,
        summary["round 1"].get("p50_ms"),
        summary["rounds >= 2"].get("p50_ms"),
        summary["rounds >= 2"].get("p95_ms"),
        pct(summary["cached share, rounds >= 2"]),
    ]


def reduction(new: float, old: float) -> float:
    return round(1 - new / old, 4) if old else 0.0


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def table(header: Sequence[str], body: Iterable[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in body]
    return lines


def plot_ttft_by_round(runs: list[Run], path: Path, title: str, xlabel: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        rounds = sorted({r["round"] for r in run["rows"]})
        p50 = [
            statistics.median(r["ttft_ms"] for r in run["rows"] if r["round"] == n) for n in rounds
        ]
        ax.plot(rounds, p50, marker="o", label=run["target"])
    ax.set(title=title, xlabel=xlabel, ylabel="TTFT p50 (ms)", yscale="log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_cdf(runs: list[Run], path: Path, title: str, keep: Any) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        values = sorted(r["ttft_ms"] for r in run["rows"] if keep(r))
        ax.step(values, [(i + 1) / len(values) for i in range(len(values))], label=run["target"])
    ax.set(title=title, xlabel="TTFT (ms)", ylabel="share of requests", xscale="log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_hit_split(runs: list[Run], path: Path, title: str) -> None:
    """Prompt tokens by where they came from, per chatbot run."""
    fig, ax = plt.subplots(figsize=(7, 4))
    names, bottoms = [], []
    sources = ["live", "ram", "disk", "computed"]
    shares: dict[str, list[float]] = {s: [] for s in sources}
    for run in runs:
        split = run.get("token_sources")
        if not split:
            continue
        total = sum(split.values()) or 1
        names.append(run["target"])
        for s in sources:
            shares[s].append(split.get(s, 0) / total)
    bottoms = [0.0] * len(names)
    for s in sources:
        ax.bar(names, shares[s], bottom=bottoms, label=s)
        bottoms = [b + v for b, v in zip(bottoms, shares[s], strict=True)]
    ax.set(title=title, ylabel="share of prompt tokens", ylim=(0, 1))
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), fontsize=8)
    _save(fig, path)


def plot_prefill(runs: list[Run], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        rows = [r for r in run["rows"] if r["cached_tokens"] is not None]
        if not rows:
            continue
        total = 0
        cumulative = []
        for r in rows:
            total += r["prompt_tokens"] - r["cached_tokens"]
            cumulative.append(total)
        ax.plot([r["round"] for r in rows], cumulative, marker="o", label=run["target"])
    ax.set(title=title, xlabel="turn", ylabel="prompt tokens computed (cumulative)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_by_users(runs: list[Run], path: Path, title: str) -> None:
    """Follow-up TTFT p50 (solid) and p95 (dashed) against users at once, per server."""
    fig, ax = plt.subplots(figsize=(7, 4))
    servers = list(dict.fromkeys(run["target"] for run in runs))
    for server in servers:
        mine = sorted((r for r in runs if r["target"] == server), key=lambda r: r["users"])
        users = [r["users"] for r in mine]
        (line,) = ax.plot(
            users, [r["summary"]["follow_up_ttft_p50_ms"] for r in mine], marker="o", label=server
        )
        ax.plot(
            users,
            [r["summary"]["follow_up_ttft_p95_ms"] for r in mine],
            linestyle="--",
            color=line.get_color(),
        )
    ax.set(title=title, xlabel="users at once", ylabel="follow-up TTFT (ms)", yscale="log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
