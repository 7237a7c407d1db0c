"""``python -m benchmarks long``: one long conversation, and the prefill compute it costs
with and without the cache."""

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
    header,
    measure_each,
    model_path,
    write,
)
from benchmarks.servers import CACHE_OFF, TIERED, cache_targets
from benchmarks.workloads import Row, long_conversation


def command(
    turns: Annotated[int, typer.Option(help="Turns of the one conversation.")] = 24,
    answer_tokens: AnswerTokens = 24,
    peers: Peers = True,
) -> dict[str, Any]:
    """One long conversation: prefill compute spent with and without the cache."""
    settings = {"turns": turns, "answer_tokens": answer_tokens}
    result, lines = header("One long conversation: prefill compute", settings)
    typer.echo("long", err=True)

    def workload(target: Target, observe: Observer) -> list[Row]:
        return long_conversation(target, turns=turns, answer_tokens=answer_tokens, observe=observe)

    runs = measure_each(cache_targets(1, answer_tokens, model_path(), peers=peers), workload)
    result["runs"] = runs
    lines += report.table(
        ["server", "prompt tokens", "prompt tokens computed", "Σ TTFT (s)", "TTFT p50 (ms)"],
        [_row(run) for run in runs],
    )
    off, on = (next(r for r in runs if r["target"] == n) for n in (CACHE_OFF, TIERED))
    cut = report.reduction(on["prompt_tokens_computed"], off["prompt_tokens_computed"])
    ttft_cut = report.reduction(
        sum(r["ttft_ms"] for r in on["rows"]), sum(r["ttft_ms"] for r in off["rows"])
    )
    result["headline"] = {"prefill_tokens_reduction": cut, "ttft_sum_reduction": ttft_cut}
    lines += [
        "",
        f"Prefill compute with the tiered KV cache: {cut:.1%} fewer prompt tokens computed "
        f"than with the cache off ({ttft_cut:.1%} less time to first token in total).",
        "",
        "![prefill](long_prefill.png)",
    ]
    report.plot_prefill(runs, RESULTS / "long_prefill.png", "Long conversation: prefill")
    write("long_conversation", result, lines)
    return result


def _row(run: report.Run) -> list[object]:
    """Prompt tokens sent and computed (also kept in the run), and TTFT."""
    rows = run["rows"]
    known = all(r["cached_tokens"] is not None for r in rows)
    computed = sum(r["prompt_tokens"] - (r["cached_tokens"] or 0) for r in rows)
    run["prompt_tokens_computed"] = computed if known else None
    prompt_tokens = sum(r["prompt_tokens"] for r in rows)
    return [
        run["target"],
        prompt_tokens or "not reported",
        computed if known else "n/a",
        round(sum(r["ttft_ms"] for r in rows) / 1000, 2),
        report.ttft_summary(rows).get("p50_ms"),
    ]
