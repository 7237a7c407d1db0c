"""What every benchmark shares: the options they have in common, the header that records the
command, machine and settings, starting and stopping each target in turn, running a workload
against it, and writing the result as JSON and Markdown into ``results/``.

A benchmark is a module of its own (``multi_round``, ``concurrent``, ...) that declares its
workload, its targets and its report with these; ``cli`` lists them as commands.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
from testbed.servers import Target

from benchmarks import report
from benchmarks.machine import describe
from benchmarks.servers import Factory
from benchmarks.workloads import Row, as_dicts

RESULTS = Path(__file__).parent / "results"
MIB = 1024**2

Users = Annotated[int, typer.Option(help="Simulated users.")]
Rounds = Annotated[int, typer.Option(help="Questions per user.")]
AnswerTokens = Annotated[int, typer.Option(help="Longest answer.")]
Peers = Annotated[bool, typer.Option(help="Also run llama_cpp.server.")]

Observer = Callable[[Target], None]
Workload = Callable[[Target, Observer], list[Row]]

TIMING_NOTE = "Greedy decoding; TTFT as the client sees it (request sent → first content token)."


def command() -> str:
    return "python -m benchmarks " + shlex.join(sys.argv[1:])


def cache_dir() -> Path:
    from chatbot.config import Settings

    return Settings().cache_dir


def model_path() -> Path:
    from chatbot.config import Settings
    from chatbot.engines.model_files import resolve_model_path

    settings = Settings()
    return resolve_model_path(settings.model_path, settings.cache_dir)


def header(
    title: str, settings: dict[str, Any], note: str = TIMING_NOTE
) -> tuple[dict[str, Any], list[str]]:
    """The result's opening: (its JSON with the command, machine and settings, the Markdown
    lines that say the same)."""
    RESULTS.mkdir(exist_ok=True)
    machine = describe()
    described = ", ".join(f"{k}={v}" for k, v in settings.items())
    lines = [
        f"# {title}",
        "",
        f"`{command()}` — {machine['cores']} cores ({machine['cpu']}), "
        f"{machine['memory_gib']} GiB, {machine['date']}. Settings: {described}. {note}",
        "",
    ]
    return {"command": command(), "machine": machine, "settings": settings}, lines


def each(targets: Mapping[str, Factory], label: str = "") -> Iterator[Target]:
    """Each target started in turn, and stopped before the next starts."""
    for factory in targets.values():
        with factory() as target:
            typer.echo(f"  {label}{target.name} ...", err=True)
            yield target


def measure(target: Target, workload: Workload) -> report.Run:
    """``workload`` against ``target``: its rows, and on the chatbot what its KV cache did
    meanwhile (the tiers' peak bytes, where the prompt tokens came from)."""
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


def measure_each(targets: Mapping[str, Factory], workload: Workload) -> list[report.Run]:
    return [measure(target, workload) for target in each(targets)]


def _token_sources(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    sources = {
        tier: after["tiers"][tier]["hit_tokens"] - before["tiers"][tier]["hit_tokens"]
        for tier in after["tiers"]
    }
    requested = after["requested_tokens"] - before["requested_tokens"]
    sources["computed"] = requested - sum(sources.values())
    return sources


def write(name: str, result: dict[str, Any], lines: list[str]) -> None:
    """``results/NAME.json`` and ``results/NAME.md``; the Markdown is also printed."""
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    typer.echo("\n".join(lines))
