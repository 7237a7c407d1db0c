"""``python -m benchmarks`` (run from ``backend/``): the KV-cache benchmarks.

Each workload runs, in one invocation and on the same machine, against the chatbot with
its cache off, with its tiered KV cache, and against llama-cpp-python's own server with
and without its cache, and writes JSON, a Markdown table and PNG plots to ``results/``.
Each benchmark is a module of its own; this one lists them as commands.
"""

from __future__ import annotations

import typer

from benchmarks import (
    agents,
    capacity,
    composing,
    concurrent,
    load,
    long,
    multi_round,
    openai_engine,
    repeated,
    state_io,
    vllm_bench,
)
from benchmarks.runner import Peers

app = typer.Typer(
    help="Benchmarks of the KV cache: TTFT, hit rate and prefill compute, side by side with "
    "the cache off and with llama-cpp-python's server.",
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("multi-round")(multi_round.command)
app.command("repeated")(repeated.command)
app.command("long")(long.command)
app.command("state-io")(state_io.command)
app.command("agents")(agents.command)
app.command("openai")(openai_engine.command)
app.command("vllm")(vllm_bench.command)
app.command("load")(load.command)
app.command("capacity")(capacity.command)
app.command("concurrent")(concurrent.command)
app.command("typing")(composing.command)


@app.command("all")
def all_benchmarks(peers: Peers = True) -> None:
    """Every benchmark with its default sizes."""
    state_io.command()
    multi_round.command(peers=peers)
    repeated.command(peers=peers)
    long.command(peers=peers)
    agents.command()
    openai_engine.command()
    load.command()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
