"""``python -m benchmarks`` (run from ``backend/``): the KV-cache benchmarks.

Each workload runs, in one invocation and on the same machine, against the chatbot with
its cache off, with its tiered KV cache, and against llama-cpp-python's own server with
and without its cache, and writes JSON, a Markdown table and PNG plots to ``results/``.
"""

from __future__ import annotations

import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from benchmarks import concurrent, report
from benchmarks.llama_server import ensure_binary as ensure_llama_server
from benchmarks.llama_server import llama_server as llama_server_peer
from benchmarks.machine import describe
from benchmarks.servers import MODEL_ID, Target, chatbot, llama_cpp_server, model_server
from benchmarks.workloads import (
    SYSTEM_PROMPT,
    Row,
    as_dicts,
    long_conversation,
    multi_round,
    repeated_prompts,
)

RESULTS = Path(__file__).parent / "results"
MIB = 1024**2

app = typer.Typer(
    help="Benchmarks of the KV cache: TTFT, hit rate and prefill compute, side by side with "
    "the cache off and with llama-cpp-python's server.",
    add_completion=False,
    pretty_exceptions_enable=False,
)

Factory = Callable[[], AbstractContextManager[Target]]
Workload = Callable[[Target, Callable[[Target], None]], list[Row]]


def _command() -> str:
    return "python -m benchmarks " + shlex.join(sys.argv[1:])


def _cache_dir() -> Path:
    from chatbot.config import Settings

    return Settings().cache_dir


def _model_path() -> Path:
    from chatbot.config import Settings
    from chatbot.engines.model_files import resolve_model_path

    settings = Settings()
    return resolve_model_path(settings.model_path, settings.cache_dir)


def _ours(
    name: str,
    cache: str,
    users: int,
    answer_tokens: int,
    *,
    ram_bytes: int = 2 * 1024**3,
    disk_bytes: int = 8 * 1024**3,
) -> Factory:
    return lambda: chatbot(
        name,
        users=users,
        system_prompt=SYSTEM_PROMPT,
        max_tokens=answer_tokens,
        cache=cache,
        ram_bytes=ram_bytes,
        disk_bytes=disk_bytes,
    )


def _targets(users: int, answer_tokens: int, *, peers: bool = True) -> dict[str, Factory]:
    def theirs(name: str, cache: bool) -> Factory:
        return lambda: llama_cpp_server(name, users=users, model_path=_model_path(), cache=cache)

    targets = {
        name: _ours(name, cache, users, answer_tokens)
        for name, cache in (("chatbot, cache off", "off"), ("chatbot, tiered KV cache", "tiered"))
    }
    if peers:
        targets["llama_cpp.server"] = theirs("llama_cpp.server", False)
        targets["llama_cpp.server --cache"] = theirs("llama_cpp.server --cache", True)
    return targets


def _run(factory: Factory, workload: Workload) -> report.Run:
    with factory() as target:
        typer.echo(f"  {target.name} ...", err=True)
        before = target.cache_stats()
        peak_bytes: dict[str, int] = {}

        def observe(t: Target) -> None:
            stats = t.cache_stats()
            if stats and stats["cache"]:
                for tier, s in stats["cache"]["tiers"].items():
                    peak_bytes[tier] = max(peak_bytes.get(tier, 0), s["bytes"])

        rows = as_dicts(workload(target, observe))
        after = target.cache_stats()
        run: report.Run = {
            "target": target.name,
            "notes": target.notes,
            "rows": rows,
            "peak_rss_mib": target.peak_rss_mib(),
        }
        if before and after and after["cache"]:
            run["cache"] = after["cache"]
            run["peak_bytes"] = peak_bytes
            run["token_sources"] = _token_sources(before["cache"], after["cache"])
        return run


def _token_sources(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    sources = {
        tier: after["tiers"][tier]["hit_tokens"] - before["tiers"][tier]["hit_tokens"]
        for tier in after["tiers"]
    }
    requested = after["requested_tokens"] - before["requested_tokens"]
    sources["computed"] = requested - sum(sources.values())
    return sources


def _write(name: str, result: dict[str, Any], lines: list[str]) -> None:
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    typer.echo("\n".join(lines))


_TIMING_NOTE = "Greedy decoding; TTFT as the client sees it (request sent → first content token)."


def _header(
    title: str, settings: dict[str, Any], note: str = _TIMING_NOTE
) -> tuple[dict[str, Any], list[str]]:
    RESULTS.mkdir(exist_ok=True)
    machine = describe()
    described = ", ".join(f"{k}={v}" for k, v in settings.items())
    lines = [
        f"# {title}",
        "",
        f"`{_command()}` — {machine['cores']} cores ({machine['cpu']}), "
        f"{machine['memory_gib']} GiB, {machine['date']}. Settings: {described}. {note}",
        "",
    ]
    return {"command": _command(), "machine": machine, "settings": settings}, lines


def _follow_ups(row: dict[str, Any]) -> bool:
    return bool(row["round"] >= 2)


_ROUNDS_HEADER = [
    "server",
    "round 1 TTFT p50 (ms)",
    "rounds ≥ 2 TTFT p50 (ms)",
    "rounds ≥ 2 TTFT p95 (ms)",
    "cached share, rounds ≥ 2",
]


def _rounds(run: report.Run) -> dict[str, Any]:
    """TTFT of the first round and of the follow-ups, and the follow-ups' cached share."""
    rows = run["rows"]
    return {
        "round 1": report.ttft_summary(r for r in rows if r["round"] == 1),
        "rounds >= 2": report.ttft_summary(r for r in rows if _follow_ups(r)),
        "cached share, rounds >= 2": report.cached_share(r for r in rows if _follow_ups(r)),
    }


def _rounds_row(name: str, summary: dict[str, Any]) -> list[object]:
    return [
        name,
        summary["round 1"].get("p50_ms"),
        summary["rounds >= 2"].get("p50_ms"),
        summary["rounds >= 2"].get("p95_ms"),
        report.pct(summary["cached share, rounds >= 2"]),
    ]


@app.command("multi-round")
def multi_round_bench(
    users: Annotated[int, typer.Option(help="Simulated users.")] = 6,
    rounds: Annotated[int, typer.Option(help="Questions per user.")] = 4,
    answer_tokens: Annotated[int, typer.Option(help="Longest answer.")] = 24,
    peers: Annotated[bool, typer.Option(help="Also run llama_cpp.server.")] = True,
) -> dict[str, Any]:
    """U users × R rounds, round-robin: the live context alone cannot serve them."""
    settings = {"users": users, "rounds": rounds, "answer_tokens": answer_tokens}
    result, lines = _header("Multi-round QA: U users × R rounds, interleaved", settings)
    typer.echo("multi-round", err=True)
    targets = _targets(users, answer_tokens, peers=peers)
    live = "chatbot, live context only"
    targets[live] = _ours(live, "live", users, answer_tokens)
    # Budgets far below what the workload saves: RAM and disk must evict and stay within.
    tight = "chatbot, tiered, tight budgets (16 MiB RAM, 24 MiB disk)"
    targets[tight] = _ours(
        tight, "tiered", users, answer_tokens, ram_bytes=16 * MIB, disk_bytes=24 * MIB
    )

    def workload(target: Target, observe: Callable[[Target], None]) -> list[Row]:
        return multi_round(
            target, users=users, rounds=rounds, answer_tokens=answer_tokens, observe=observe
        )

    runs = [_run(factory, workload) for factory in targets.values()]
    result["runs"] = runs

    summary = {
        run["target"]: {**_rounds(run), "peak RSS (MiB)": run["peak_rss_mib"]} for run in runs
    }
    result["summary"] = summary
    lines += report.table(
        [*_ROUNDS_HEADER, "peak RSS (MiB)"],
        [[*_rounds_row(name, s), s["peak RSS (MiB)"]] for name, s in summary.items()],
    )
    off = summary["chatbot, cache off"]["rounds >= 2"]
    on = summary["chatbot, tiered KV cache"]["rounds >= 2"]
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
    tight_run = next(r for r in runs if r["target"] == tight)
    budgets = {
        tier: {
            "peak_bytes": tight_run["peak_bytes"].get(tier, 0),
            "budget_bytes": s["budget_bytes"],
            "evictions": s["evictions"],
        }
        for tier, s in tight_run["cache"]["tiers"].items()
        if tier != "live"
    }
    headline["tight_budgets"] = budgets
    lines += ["", "Tight budgets (the same workload; states saved far exceed them):", ""]
    lines += report.table(
        ["tier", "peak bytes", "budget bytes", "evictions"],
        [[t, b["peak_bytes"], b["budget_bytes"], b["evictions"]] for t, b in budgets.items()],
    )
    result["headline"] = headline
    report.plot_ttft_by_round(
        runs, RESULTS / "multi_round_ttft.png", "Multi-round QA: TTFT by round", "round"
    )
    report.plot_cdf(
        runs, RESULTS / "multi_round_cdf.png", "Multi-round QA: TTFT CDF, rounds ≥ 2", _follow_ups
    )
    lines += ["", "![TTFT by round](multi_round_ttft.png) ![CDF](multi_round_cdf.png)"]
    _write("multi_round", result, lines)
    return result


@app.command("repeated")
def repeated_bench(
    users: Annotated[int, typer.Option(help="Simulated users.")] = 8,
    prompts: Annotated[int, typer.Option(help="Distinct questions each user sends.")] = 3,
    answer_tokens: Annotated[int, typer.Option(help="Longest answer.")] = 16,
    peers: Annotated[bool, typer.Option(help="Also run llama_cpp.server.")] = True,
) -> dict[str, Any]:
    """Many users sending the same questions after the same shared system prompt."""
    settings = {"users": users, "prompts": prompts, "answer_tokens": answer_tokens}
    result, lines = _header("Repeated prompts: U users × the same P questions", settings)
    typer.echo("repeated", err=True)

    def workload(target: Target, observe: Callable[[Target], None]) -> list[Row]:
        return repeated_prompts(
            target, users=users, prompts=prompts, answer_tokens=answer_tokens, observe=observe
        )

    runs = [_run(f, workload) for f in _targets(users, answer_tokens, peers=peers).values()]
    result["runs"] = runs
    body = []
    for run in runs:
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
        body.append([run["target"], report.pct(hit), split, ttft["p50_ms"], ttft["p95_ms"]])
    lines += report.table(
        [
            "server",
            "token hit rate",
            "where prompt tokens came from",
            "TTFT p50 (ms)",
            "TTFT p95 (ms)",
        ],
        body,
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
    _write("repeated", result, lines)
    return result


@app.command("long")
def long_bench(
    turns: Annotated[int, typer.Option(help="Turns of the one conversation.")] = 24,
    answer_tokens: Annotated[int, typer.Option(help="Longest answer.")] = 24,
    peers: Annotated[bool, typer.Option(help="Also run llama_cpp.server.")] = True,
) -> dict[str, Any]:
    """One long conversation: prefill compute spent with and without the cache."""
    settings = {"turns": turns, "answer_tokens": answer_tokens}
    result, lines = _header("One long conversation: prefill compute", settings)
    typer.echo("long", err=True)

    def workload(target: Target, observe: Callable[[Target], None]) -> list[Row]:
        return long_conversation(target, turns=turns, answer_tokens=answer_tokens, observe=observe)

    runs = [_run(f, workload) for f in _targets(1, answer_tokens, peers=peers).values()]
    result["runs"] = runs
    body = []
    for run in runs:
        rows = run["rows"]
        known = all(r["cached_tokens"] is not None for r in rows)
        computed = sum(r["prompt_tokens"] - (r["cached_tokens"] or 0) for r in rows)
        run["prompt_tokens_computed"] = computed if known else None
        prompt_tokens = sum(r["prompt_tokens"] for r in rows)
        body.append(
            [
                run["target"],
                prompt_tokens or "not reported",
                computed if known else "n/a",
                round(sum(r["ttft_ms"] for r in rows) / 1000, 2),
                report.ttft_summary(rows).get("p50_ms"),
            ]
        )
    lines += report.table(
        ["server", "prompt tokens", "prompt tokens computed", "Σ TTFT (s)", "TTFT p50 (ms)"],
        body,
    )
    off, on = (next(r for r in runs if r["target"] == n) for n in _targets(1, 1, peers=False))
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
    _write("long_conversation", result, lines)
    return result


@app.command("state-io")
def state_io_bench(
    lengths: Annotated[str, typer.Option(help="Comma-separated token counts.")] = "200,1000,2000",
) -> dict[str, Any]:
    """Saving and loading KV state: our sequence-state path vs llama-cpp-python's caches."""
    from benchmarks.state_io import measure

    settings = {"lengths": lengths}
    result, lines = _header(
        "KV state in and out of the context",
        settings,
        "Median of 3 (a LlamaDiskCache read pops its entry, so its read and every write "
        "are timed once).",
    )
    rows = measure(_model_path(), [int(n) for n in lengths.split(",")])
    result["rows"] = rows
    lines += report.table(
        [
            "tokens",
            "ours: bytes",
            "ours: save / load (ms)",
            "ours: disk write / read (ms)",
            "save_state: bytes (counted by LlamaRAMCache)",
            "save_state / load_state (ms)",
            "LlamaDiskCache write / read (ms)",
        ],
        [
            [
                r["tokens"],
                f"{r['ours_bytes'] / MIB:.1f} MiB",
                f"{r['ours_save_ms']} / {r['ours_load_ms']}",
                f"{r['ours_disk_put_ms']} / {r['ours_disk_get_ms']}",
                f"{r['llama_state_bytes'] / MIB:.1f} MiB "
                f"({r['llama_state_counted_bytes'] / MIB:.1f})",
                f"{r['save_state_ms']} / {r['load_state_ms']}",
                f"{r['disk_cache_put_ms']} / {r['disk_cache_get_ms']}",
            ]
            for r in rows
        ],
    )
    lines += [
        "",
        "`save_state` copies the whole context state plus the logits buffer (Gemma's 262k "
        "vocabulary); `LlamaRAMCache` counts only the state against its budget. Ours is the "
        "one sequence's KV state (`llama_state_seq_get_data`), nothing else.",
    ]
    _write("state_io", result, lines)
    return result


@app.command("agents")
def agents_bench(
    users: Annotated[int, typer.Option(help="Simulated users, one conversation each.")] = 4,
    answer_tokens: Annotated[int, typer.Option(help="Longest answer.")] = 24,
) -> dict[str, Any]:
    """The router's added TTFT, and the cache across agent switches."""
    from benchmarks.agents import PLACES, TURNS, agent_switches, prefix_breaks
    from chatbot.agents.documents import DocumentIndex, load_documents
    from chatbot.agents.router import RuleRouter
    from chatbot.config import Settings

    settings = {"users": users, "turns": len(TURNS), "answer_tokens": answer_tokens}
    result, lines = _header(
        "Agents: the router's cost and the cache across agent switches", settings
    )
    typer.echo("agents", err=True)
    configs: dict[str, tuple[str, dict[str, str], str | None]] = {
        "pinned to assistant (no routing)": ("tiered", {}, "assistant"),
        "rule router": ("tiered", {"CHATBOT_ROUTER": "rules"}, None),
        "LLM router": ("tiered", {"CHATBOT_ROUTER": "llm"}, None),
        "rule router, cache off": ("off", {"CHATBOT_ROUTER": "rules"}, None),
    }
    system_prompt = str(Settings.model_fields["system_prompt"].default)
    runs: list[report.Run] = []
    for name, (cache, env, pinned) in configs.items():
        with chatbot(
            name,
            users=users,
            system_prompt=system_prompt,
            max_tokens=answer_tokens,
            cache=cache,
            env=env,
        ) as target:
            typer.echo(f"  {name} ...", err=True)
            rows = agent_switches(target, users=users, answer_tokens=answer_tokens, pinned=pinned)
            runs.append(
                {
                    "target": name,
                    "notes": target.notes,
                    "rows": rows,
                    "prefix_breaks": prefix_breaks(target),
                    "peak_rss_mib": target.peak_rss_mib(),
                }
            )

    # The rule router's own decision time, in process: it makes no model call.
    router = RuleRouter(DocumentIndex(load_documents(None, max_chars=16_000)))
    questions = [t.format(place=p) for t in TURNS for p in PLACES]
    started = time.perf_counter()
    for _ in range(200):
        for q in questions:
            router.route(q, None)
    rules_us = (time.perf_counter() - started) / (200 * len(questions)) * 1e6

    pinned_p50 = report.ttft_summary(r for r in runs[0]["rows"] if _follow_ups(r))["p50_ms"]
    body = []
    for run in runs:
        follow = [r for r in run["rows"] if _follow_ups(r)]
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
        body.append(
            [
                run["target"],
                f"{ttft['p50_ms']:.0f} / {ttft['p95_ms']:.0f}",
                f"{run['summary']['added_ttft_p50_ms']:+.0f}",
                report.pct(run["summary"]["hit_rate_follow_ups"]),
                f"{len(switches)}",
                report.pct(run["summary"]["hit_rate_switch_turns"]),
                f"{covered}/{len(switches)}",
                f"{run['prefix_breaks']:.0f}",
            ]
        )
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
        body,
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
    _write("agents", result, lines)
    return result


def _engine_ttft(target: Target) -> tuple[float, float] | None:
    """(seconds, requests) of ``chatbot_ttft_seconds`` so far, all labels together."""
    if not target.is_chatbot:
        return None
    text = httpx.get(f"{target.url.removesuffix('/v1')}/metrics", timeout=10).text
    totals = {"_sum": 0.0, "_count": 0.0}
    for line in text.splitlines():
        for suffix in totals:
            if line.startswith(f"chatbot_ttft_seconds{suffix}"):
                totals[suffix] += float(line.rsplit(" ", 1)[1])
    return totals["_sum"], totals["_count"]


@contextmanager
def _through_chatbot(
    name: str, upstream: Factory, users: int, answer_tokens: int
) -> Iterator[Target]:
    """The chatbot on its ``openai`` engine, in front of the model server ``upstream``."""
    with upstream() as server:
        env = {
            "CHATBOT_ENGINE": "openai",
            "CHATBOT_OPENAI_BASE_URL": server.url,
            "CHATBOT_OPENAI_MODEL": server.model,
        }
        if server.keys[0] != "unused":
            env["CHATBOT_OPENAI_API_KEY"] = server.keys[0]
        with chatbot(
            name,
            users=users,
            system_prompt=SYSTEM_PROMPT,
            max_tokens=answer_tokens,
            cache="off",  # the embedded engine's setting; the model server keeps the cache
            env=env,
        ) as front:
            front.notes = {"engine": "openai", "model server": server.name, **server.notes}
            yield front


@app.command("openai")
def openai_bench(
    users: Annotated[int, typer.Option(help="Simulated users.")] = 6,
    rounds: Annotated[int, typer.Option(help="Questions per user.")] = 4,
    answer_tokens: Annotated[int, typer.Option(help="Longest answer.")] = 24,
    base_url: Annotated[
        str | None,
        typer.Option(
            help="A model server already running, e.g. vLLM with LMCache at "
            "http://gpu-node:8000/v1; default: llama_cpp.server on the bundled model."
        ),
    ] = None,
    model: Annotated[str, typer.Option(help="The model that server serves.")] = "",
    api_key: Annotated[str | None, typer.Option(help="That server's API key.")] = None,
    repeats: Annotated[
        int, typer.Option(help="Times each server runs the workload, in turns.")
    ] = 2,
) -> dict[str, Any]:
    """The multi-round workload through the chatbot's openai engine, beside the model
    server alone: what the API tier adds to TTFT, and the cached share the server reports."""
    settings = {
        "users": users,
        "rounds": rounds,
        "answer_tokens": answer_tokens,
        "repeats": repeats,
    }
    result, lines = _header("Multi-round QA through the openai engine", settings)
    typer.echo("openai", err=True)
    if base_url is None:
        alone = "llama_cpp.server"

        def server() -> AbstractContextManager[Target]:
            # Gemma's turn markers: with the fallback format the model answers follow-ups
            # with nothing, and the conversations would not grow.
            return llama_cpp_server(
                alone, users=users, model_path=_model_path(), cache=False, chat_format="gemma"
            )

        def chained() -> AbstractContextManager[Target]:
            return chatbot(
                "chatbot, embedded, tiered KV cache",
                users=1,
                system_prompt=SYSTEM_PROMPT,
                max_tokens=answer_tokens,
                cache="tiered",
            )

        fronts = {
            "chatbot, openai engine → llama_cpp.server": server,
            "chatbot, openai engine → chatbot (embedded, tiered KV cache)": chained,
        }
    else:
        alone = "model server"

        def server() -> AbstractContextManager[Target]:
            return model_server(
                alone, users=users, base_url=base_url, api_key=api_key, model=model or MODEL_ID
            )

        fronts = {"chatbot, openai engine → model server": server}
    targets: dict[str, Factory] = {alone: server}
    for name, upstream in fronts.items():
        targets[name] = partial(_through_chatbot, name, upstream, users, answer_tokens)

    engine_ttft: dict[str, list[float]] = {}  # chatbot: (seconds, requests) its engine saw

    def workload(target: Target, observe: Callable[[Target], None]) -> list[Row]:
        before = _engine_ttft(target)
        rows = multi_round(
            target, users=users, rounds=rounds, answer_tokens=answer_tokens, observe=observe
        )
        if before is not None and (after := _engine_ttft(target)) is not None:
            seen = engine_ttft.setdefault(target.name, [0.0, 0.0])
            seen[0] += after[0] - before[0]
            seen[1] += after[1] - before[1]
        return rows

    # In turns (A, B, C, A, B, C), so that a drift of the machine over the run does not
    # land on one server alone; each server's rows are pooled.
    runs: list[report.Run] = []
    for _ in range(repeats):
        for name, factory in targets.items():
            rows = _run(factory, workload)["rows"]
            pooled = next((run for run in runs if run["target"] == name), None)
            if pooled is None:
                runs.append({"target": name, "rows": rows})
            else:
                pooled["rows"] += rows
    result["runs"] = runs
    summary = {run["target"]: _rounds(run) for run in runs}
    result["summary"] = summary
    base = summary[alone]["rounds >= 2"]["p50_ms"]
    lines += report.table(_ROUNDS_HEADER, [_rounds_row(n, s) for n, s in summary.items()])
    front = next(iter(fronts))
    added = round(summary[front]["rounds >= 2"]["p50_ms"] - base, 1)
    run = next(r for r in runs if r["target"] == front)
    client_mean = statistics.fmean(r["ttft_ms"] for r in run["rows"])
    seconds, requests = engine_ttft[front]
    own = round(client_mean - seconds / requests * 1000, 1)
    result["headline"] = {"added_ttft_p50_ms": added, "api_tier_ttft_mean_ms": own}
    lines += [
        "",
        f"Rounds ≥ 2: TTFT p50 through the chatbot minus {alone} alone: {added} ms. "
        "On the same requests, TTFT as the client saw it "
        f"minus TTFT as the chatbot's engine saw it (request sent upstream → first token): "
        f"{own} ms mean, the API tier's own share (auth, routing, prompt layout, re-streaming; "
        "the extra loopback hop is on the engine's side of that line). The cached share is "
        "what the model server reports; llama_cpp.server reports none.",
        "",
        "Point the same workload at vLLM with LMCache: `python -m benchmarks openai "
        "--base-url http://<gpu-node>:8000/v1 --model <served model>`.",
    ]
    _write("openai_engine", result, lines)
    return result


@app.command("vllm")
def vllm_command(
    users: Annotated[int, typer.Option(help="Simulated users.")] = 6,
    rounds: Annotated[int, typer.Option(help="Questions per user.")] = 4,
    answer_tokens: Annotated[int, typer.Option(help="Longest answer.")] = 24,
    kv_blocks: Annotated[
        int,
        typer.Option(
            help="vLLM's KV pool, in blocks: Gemma 3's six KV groups share them, so about 110 "
            "hold one 2,048-token prompt, and 128 about 2,400 tokens, a few users' worth."
        ),
    ] = 128,
    embedded: Annotated[bool, typer.Option(help="Also run the embedded engine.")] = True,
) -> dict[str, Any]:
    """The multi-round workload against vLLM (CPU build) alone and with LMCache, the chatbot
    in front of each, and the embedded engine, in one run (see benchmarks/vllm_bench.py).
    Needs `make vllm`; about 5 vLLM starts of a minute each on 2 cores."""
    from benchmarks.vllm_bench import vllm_bench

    return vllm_bench(users, rounds, answer_tokens, kv_blocks, embedded)


_LOAD_SCENARIOS: dict[str, dict[str, Any]] = {
    # (a) users with open conversations, each sending a message after a think time; at 30 s
    # one process on 2 cores holds about 3,000 of them (README), so 10,000 think for 120 s
    "users": {
        "users": 10_000,
        "think_s": 120.0,
        "answer_tokens": 200,
        "decode_tokens_per_s": 40.0,
        "ramp_s": 120.0,
    },
    "busy": {
        "users": 3_000,
        "think_s": 30.0,
        "answer_tokens": 200,
        "decode_tokens_per_s": 40.0,
        "ramp_s": 30.0,
    },
    # past what one process serves: 10,000 users at 30 s; refused at once (503) while the
    # accept queue is long (CHATBOT_SHED_ACCEPT_QUEUE), the rest answered at pace
    "overload": {
        "users": 10_000,
        "think_s": 30.0,
        "answer_tokens": 200,
        "decode_tokens_per_s": 40.0,
        "ramp_s": 30.0,
        "duration_s": 40.0,
    },
    # (b) every user's stream open at once: no think time, and answers that trickle for
    # 250 s while the last users arrive, so that what is measured is the streams held; the
    # users arrive over 240 s, as many a second as one process starts answers for while
    # it streams to thousands
    "streams": {
        "users": 10_000,
        "think_s": 0.0,
        "answer_tokens": 100,
        "decode_tokens_per_s": 0.4,
        "ramp_s": 240.0,
        "duration_s": 10.0,
    },
}


@app.command("load")
def load_bench(
    scenario: Annotated[
        str,
        typer.Option(
            help="users: 10,000 users sending a message after 120 s of thought; busy: 3,000 "
            "after 30 s; overload: 10,000 after 30 s, more than one process serves; streams: "
            "10,000 answers streaming at once (a token every 2.5 s); all."
        ),
    ] = "all",
    users: Annotated[
        int | None, typer.Option(help="Users, each with one open conversation.")
    ] = None,
    think_s: Annotated[
        float | None, typer.Option(help="Mean think time (s); default: the scenario's.")
    ] = None,
    answer_tokens: Annotated[
        int | None, typer.Option(help="Tokens per answer; default: the scenario's.")
    ] = None,
    tokens_per_s: Annotated[
        float | None, typer.Option(help="Each stream's token rate; default: the scenario's.")
    ] = None,
    stream_interval_ms: Annotated[
        float, typer.Option(help="The server's CHATBOT_STREAM_INTERVAL_MS.")
    ] = 100.0,
    ramp_s: Annotated[
        float | None, typer.Option(help="Users start evenly over this long (s).")
    ] = None,
    duration_s: Annotated[
        float | None, typer.Option(help="Measured time after the ramp (s); default 60.")
    ] = None,
    clients: Annotated[int, typer.Option(help="Client processes.")] = 1,
    output: Annotated[str, typer.Option(help="Results file name in results/.")] = "load",
) -> dict[str, Any]:
    """The API tier under many concurrent users on the simulated engine: streams held,
    errors, added TTFT, token-delivery lag, memory per stream, CPU (see benchmarks/load.py).
    About 4 to 6 minutes a scenario; run on a quiet machine."""
    from benchmarks import load

    if scenario not in (*_LOAD_SCENARIOS, "all"):
        raise typer.BadParameter(f"scenario must be one of {', '.join(_LOAD_SCENARIOS)}, all")
    names = list(_LOAD_SCENARIOS) if scenario == "all" else [scenario]
    runs: dict[str, Any] = {}
    for name in names:
        values: dict[str, Any] = {"duration_s": 60.0, **_LOAD_SCENARIOS[name]}
        overrides = {
            "users": users,
            "duration_s": duration_s,
            "think_s": think_s,
            "answer_tokens": answer_tokens,
            "decode_tokens_per_s": tokens_per_s,
            "ramp_s": ramp_s,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = load.LoadSettings(
            stream_interval_ms=stream_interval_ms,
            clients=clients,
            **values,
        )
        typer.echo(f"load: {name} ({settings.users} users)", err=True)
        runs[name] = load.run(settings)
    shown = {"scenarios": ", ".join(names), "stream_interval_ms": stream_interval_ms}
    shown["clients"] = clients
    result, lines = _header(
        "Load: the API tier on the simulated engine",
        shown,
        "One server process (uvicorn, uvloop, httptools) on loopback, the clients on the "
        "same machine.",
    )
    result["runs"] = runs
    lines += load.report_lines(runs)
    _write(output, result, lines)
    return result


@app.command("capacity")
def capacity_command(
    users: Annotated[int, typer.Option(help="Users of the service.")],
    messages_per_minute: Annotated[
        float, typer.Option(help="Messages each user sends a minute (at the busy hour).")
    ],
    context_tokens: Annotated[
        int, typer.Option(help="Prompt tokens of a request: system prompt, documents, history.")
    ],
    hit_rate: Annotated[float, typer.Option(help="Share of prompt tokens found in the cache.")],
    answer_tokens: Annotated[int, typer.Option(help="Tokens of an answer.")] = 200,
    tokens_per_s: Annotated[
        float | None, typer.Option(help="Decode rate each stream must get; default 40.")
    ] = None,
    cpu_share: Annotated[
        float, typer.Option(help="Share of cached tokens copied in from LMCache's CPU RAM.")
    ] = 0.5,
    utilisation: Annotated[
        float, typer.Option(help="Share of a replica's time that may be busy.")
    ] = 0.8,
) -> None:
    """How many vLLM + LMCache replicas (Llama-3.1-8B bf16, one H100 each) a workload
    needs, from the simulated engine's timing model: prefill (38/138/614 ms at 1k/4k/16k
    tokens), KV copies from CPU RAM (54 GB/s, 128 KiB a token), memory-bound decode (3.35
    TB/s at 70 %), ~50 GiB of KV and 256 sequences a replica.

    Assumes: requests spread evenly; every request carries the whole context; the hit rate
    holds as replicas are added (session affinity); prefill and decode share a replica's
    time up to --utilisation; a running sequence keeps its prompt and answer's KV on the
    GPU; the API tier and network are not counted. Replicas = the largest of what compute,
    KV memory and the sequence limit need (see benchmarks/capacity.py)."""
    from benchmarks.capacity import Workload, describe, plan

    try:
        workload = Workload(
            users=users,
            messages_per_minute=messages_per_minute,
            context_tokens=context_tokens,
            hit_rate=hit_rate,
            answer_tokens=answer_tokens,
            tokens_per_s=tokens_per_s,
            cpu_share=cpu_share,
            utilisation=utilisation,
        )
        result = plan(workload)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo("\n".join(describe(workload, result)))


@app.command("concurrent")
def concurrent_bench(
    users: Annotated[
        str, typer.Option(help="Users at once, comma-separated: one run per value.")
    ] = "1,2,4,8,16",
    rounds: Annotated[int, typer.Option(help="Turns per user: a note, then follow-ups.")] = 4,
    answer_tokens: Annotated[int, typer.Option(help="Longest answer.")] = 32,
    interleaved: Annotated[
        bool,
        typer.Option(help="Users take turns one request at a time (multi-round) instead."),
    ] = False,
    llama_server: Annotated[
        Path | None, typer.Option(help="A llama-server binary; default: built from the pin.")
    ] = None,
) -> dict[str, Any]:
    """Users chatting at once (or taking turns): the embedded engine with one sequence and
    with the default CHATBOT_PARALLEL, against llama-server with --cache-ram."""
    from chatbot.config import Settings

    counts = [int(u) for u in users.split(",")]
    parallel = Settings(_env_file=None).parallel
    title = "Users taking turns" if interleaved else "Users chatting at the same time"
    settings = {
        "users": users,
        "rounds": rounds,
        "answer_tokens": answer_tokens,
        "interleaved": interleaved,
        "think_s": "none" if interleaved else "1-3",
        "default_parallel": parallel,
    }
    result, lines = _header(f"{title}: the embedded engine against llama-server", settings)
    binary = llama_server or ensure_llama_server(_cache_dir())
    prompts = concurrent.Prompts(_model_path())
    header = [
        "users",
        "server",
        "follow-up TTFT p50 (ms)",
        "p95 (ms)",
        "time per output token p50 (ms)",
        "p95 (ms)",
        "decode tokens/s",
        "whole run (s)",
        "peak RSS (MiB)",
    ]
    body: list[list[object]] = []
    runs: list[dict[str, Any]] = []
    for count in counts:
        ours_parallel = [1, parallel] if not interleaved else [parallel]
        peers = [1] if interleaved else [count]
        factories: dict[str, Factory] = {
            f"chatbot, CHATBOT_PARALLEL={p}": partial(
                chatbot,
                f"chatbot, CHATBOT_PARALLEL={p}",
                users=count,
                system_prompt=SYSTEM_PROMPT,
                max_tokens=answer_tokens,
                cache="tiered",
                env={"CHATBOT_PARALLEL": str(p), "CHATBOT_QUEUE_SIZE": str(4 * count)},
            )
            for p in dict.fromkeys(ours_parallel)
        }
        # With one slot, llama-server consults its RAM cache only when the slot would keep
        # less than half of what it holds; a long shared preamble keeps more, so its cache
        # is also run the way a user tuning it would: slots picked by age, not similarity.
        variants = [()] if not interleaved else [(), ("--slot-prompt-similarity", "0")]
        for n in peers:
            for extra in variants:
                name = " ".join([f"llama-server --parallel {n} --cache-ram 2048", *extra])
                factories[name] = partial(
                    llama_server_peer,
                    name,
                    binary=binary,
                    users=count,
                    model_path=_model_path(),
                    parallel=n,
                    cache_ram_mib=2048,
                    extra=extra,
                )
        for name, factory in factories.items():
            with factory() as target:
                typer.echo(f"  {count} users: {name} ...", err=True)
                ask = (
                    concurrent.chatbot_asker(target)
                    if target.is_chatbot
                    else concurrent.llama_server_asker(prompts)
                )
                game = concurrent.take_turns if interleaved else concurrent.play
                turns, wall = game(
                    target, ask, users=count, rounds=rounds, answer_tokens=answer_tokens
                )
                numbers = concurrent.summary(turns, wall)
                numbers["peak_rss_mib"] = target.peak_rss_mib()
            runs.append(
                {
                    "users": count,
                    "target": name,
                    "notes": target.notes,
                    "summary": numbers,
                    "rows": as_dicts(turns),
                }
            )
            body.append(
                [
                    count,
                    name,
                    numbers["follow_up_ttft_p50_ms"],
                    numbers["follow_up_ttft_p95_ms"],
                    numbers["tpot_p50_ms"],
                    numbers["tpot_p95_ms"],
                    numbers["decode_tokens_per_s"],
                    numbers["wall_s"],
                    numbers["peak_rss_mib"],
                ]
            )
    lines += report.table(header, body)
    result["runs"] = runs
    name = "multi-round-peer" if interleaved else "concurrent"
    if len(counts) > 1:
        # The same server as one line: "CHATBOT_PARALLEL=1", the default, and llama-server
        # whose --parallel follows the users.
        series = [{**run, "target": run["target"].split(" --parallel")[0]} for run in runs]
        report.plot_by_users(
            series, RESULTS / f"{name}_ttft.png", "Follow-up TTFT, p50 (solid) and p95 (dashed)"
        )
        lines += ["", f"![Follow-up TTFT by users]({name}_ttft.png)"]
    _write(name, result, lines)
    return result


@app.command("all")
def all_benchmarks(
    peers: Annotated[bool, typer.Option(help="Also run llama_cpp.server.")] = True,
) -> None:
    """Every benchmark with its default sizes."""
    state_io_bench()
    multi_round_bench(peers=peers)
    repeated_bench(peers=peers)
    long_bench(peers=peers)
    agents_bench()
    openai_bench()
    load_bench()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
