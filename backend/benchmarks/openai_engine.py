"""``python -m benchmarks openai``: the multi-round workload through the chatbot's ``openai``
engine, beside the model server alone: what the API tier adds to TTFT, and the cached share
the server reports. By default the model server is llama_cpp.server on the bundled model (and
the chatbot's own embedded engine, chained); ``--base-url`` points it at one already running,
vLLM with LMCache, say."""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from typing import Annotated, Any

import typer
from testbed.servers import MODEL_ID, Target, llama_cpp_server

from benchmarks import report
from benchmarks.runner import (
    AnswerTokens,
    Observer,
    Rounds,
    Users,
    Workload,
    each,
    header,
    measure,
    model_path,
    write,
)
from benchmarks.servers import Factory, chatbot, chatbot_in_front, engine_ttft, model_server
from benchmarks.workloads import SYSTEM_PROMPT, Row, multi_round

BaseUrl = Annotated[
    str | None,
    typer.Option(
        help="A model server already running, e.g. vLLM with LMCache at "
        "http://gpu-node:8000/v1; default: llama_cpp.server on the bundled model."
    ),
]


def command(
    users: Users = 6,
    rounds: Rounds = 4,
    answer_tokens: AnswerTokens = 24,
    base_url: BaseUrl = None,
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
    result, lines = header("Multi-round QA through the openai engine", settings)
    typer.echo("openai", err=True)
    alone, upstreams = _upstreams(users, answer_tokens, base_url, model, api_key)
    targets: dict[str, Factory] = {alone: upstreams[alone]}
    fronts = [name for name in upstreams if name != alone]
    for name in fronts:
        targets[name] = partial(_in_front, name, upstreams[name], users, answer_tokens)

    seen_by_engine: dict[str, list[float]] = {}  # chatbot: (seconds, requests) its engine saw

    def workload(target: Target, observe: Observer) -> list[Row]:
        before = engine_ttft(target)
        rows = multi_round(
            target, users=users, rounds=rounds, answer_tokens=answer_tokens, observe=observe
        )
        if before is not None and (after := engine_ttft(target)) is not None:
            seen = seen_by_engine.setdefault(target.name, [0.0, 0.0])
            seen[0] += after[0] - before[0]
            seen[1] += after[1] - before[1]
        return rows

    runs = _in_turns(targets, workload, repeats)
    result["runs"] = runs
    summary = {run["target"]: report.rounds(run) for run in runs}
    result["summary"] = summary
    base = summary[alone]["rounds >= 2"]["p50_ms"]
    lines += report.table(
        report.ROUNDS_HEADER, [report.rounds_row(n, s) for n, s in summary.items()]
    )
    front = fronts[0]
    added = round(summary[front]["rounds >= 2"]["p50_ms"] - base, 1)
    run = next(r for r in runs if r["target"] == front)
    client_mean = statistics.fmean(r["ttft_ms"] for r in run["rows"])
    seconds, requests = seen_by_engine[front]
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
    write("openai_engine", result, lines)
    return result


def _upstreams(
    users: int, answer_tokens: int, base_url: str | None, model: str, api_key: str | None
) -> tuple[str, dict[str, Factory]]:
    """(the model server's name, the model server alone first, then each upstream the
    chatbot's openai engine fronts, under the front's name)."""
    if base_url is not None:
        alone = "model server"

        def server() -> AbstractContextManager[Target]:
            return model_server(
                alone, users=users, base_url=base_url, api_key=api_key, model=model or MODEL_ID
            )

        return alone, {alone: server, "chatbot, openai engine → model server": server}
    alone = "llama_cpp.server"

    def llama() -> AbstractContextManager[Target]:
        # Gemma's turn markers: with the fallback format the model answers follow-ups
        # with nothing, and the conversations would not grow.
        return llama_cpp_server(
            alone, users=users, model_path=model_path(), cache=False, chat_format="gemma"
        )

    def chained() -> AbstractContextManager[Target]:
        return chatbot(
            "chatbot, embedded, tiered KV cache",
            users=1,
            system_prompt=SYSTEM_PROMPT,
            max_tokens=answer_tokens,
            cache="tiered",
        )

    return alone, {
        alone: llama,
        "chatbot, openai engine → llama_cpp.server": llama,
        "chatbot, openai engine → chatbot (embedded, tiered KV cache)": chained,
    }


@contextmanager
def _in_front(name: str, upstream: Factory, users: int, answer_tokens: int) -> Iterator[Target]:
    with (
        upstream() as server,
        chatbot_in_front(name, server, users=users, answer_tokens=answer_tokens) as front,
    ):
        yield front


def _in_turns(targets: dict[str, Factory], workload: Workload, repeats: int) -> list[report.Run]:
    """Each target runs the workload ``repeats`` times in turns (A, B, C, A, B, C), so that a
    drift of the machine over the run does not land on one server alone; each target's rows
    are pooled."""
    runs: list[report.Run] = []
    for _ in range(repeats):
        for target in each(targets):
            rows = measure(target, workload)["rows"]
            pooled = next((run for run in runs if run["target"] == target.name), None)
            if pooled is None:
                runs.append({"target": target.name, "rows": rows})
            else:
                pooled["rows"] += rows
    return runs
