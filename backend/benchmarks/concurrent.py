"""``python -m benchmarks concurrent``: users chatting at once (or taking turns), the embedded
engine with one sequence and with the default ``CHATBOT_PARALLEL`` against llama-server with
``--cache-ram``.

- ``--workload chat`` (the default): each user's conversation (``chats``); follow-up TTFT,
  time per output token, decode throughput.
- ``--workload long-prompt``: S users stream back to back while one more sends a long
  message (``long_prompt``): how long the others' tokens stop, and the long prompt's TTFT
  beside its TTFT alone.
- ``--busy-neighbour``: each target runs twice, quiet and then beside one process spinning
  on a core for the run's duration, and both are reported.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer
from testbed.llama_server import ensure_binary, llama_server
from testbed.servers import Target

from benchmarks import chats, long_prompt, report
from benchmarks.runner import (
    RESULTS,
    AnswerTokens,
    cache_dir,
    each,
    header,
    model_path,
    write,
)
from benchmarks.servers import Factory, chatbot
from benchmarks.workloads import SYSTEM_PROMPT, as_dicts
from chatbot.config import Settings

CACHE_RAM_MIB = 2048
BUSY = ", busy neighbour"


class Workload(StrEnum):
    chat = "chat"
    long_prompt = "long-prompt"


UsersAtOnce = Annotated[
    str | None,
    typer.Option(
        help="Users at once, comma-separated: one run per value; default 1,2,4,8,16, and "
        "for long-prompt 4 (streaming beside the one sending the long message)."
    ),
]


def command(
    users: UsersAtOnce = None,
    rounds: Annotated[
        int, typer.Option(help="Turns per conversation: a note, then follow-ups.")
    ] = 4,
    follow_ups: Annotated[
        int,
        typer.Option(
            help="Follow-ups per run at least: with few users, each has as many "
            "conversations, one after another, as it takes (users at once only)."
        ),
    ] = 24,
    answer_tokens: AnswerTokens = 32,
    interleaved: Annotated[
        bool,
        typer.Option(help="Users take turns one request at a time (multi-round) instead."),
    ] = False,
    llama_server: Annotated[
        Path | None, typer.Option(help="A llama-server binary; default: built from the pin.")
    ] = None,
    workload: Annotated[
        Workload, typer.Option(help="chat: conversations; long-prompt: one long message.")
    ] = Workload.chat,
    prompt_tokens: Annotated[
        int, typer.Option(help="long-prompt: tokens of the long message.")
    ] = 6000,
    busy_neighbour: Annotated[
        bool, typer.Option(help="Also run each target beside one busy-looping process.")
    ] = False,
) -> dict[str, Any]:
    """Users chatting at once (or taking turns): the embedded engine with one sequence and
    with the default CHATBOT_PARALLEL, against llama-server with --cache-ram."""
    default_users = "4" if workload == Workload.long_prompt else "1,2,4,8,16"
    counts = [int(u) for u in (users or default_users).split(",")]
    binary = llama_server or ensure_binary(cache_dir())
    prompts = chats.Prompts(model_path())
    neighbours = [False, True] if busy_neighbour else [False]
    if workload == Workload.long_prompt:
        return _long_prompt(counts, answer_tokens, prompt_tokens, binary, prompts, neighbours)
    return _chat(
        counts, rounds, follow_ups, answer_tokens, interleaved, binary, prompts, neighbours
    )


def _chat(
    counts: list[int],
    rounds: int,
    follow_ups: int,
    answer_tokens: int,
    interleaved: bool,
    binary: Path,
    prompts: chats.Prompts,
    neighbours: list[bool],
) -> dict[str, Any]:
    parallel = Settings(_env_file=None).parallel
    title = "Users taking turns" if interleaved else "Users chatting at the same time"
    settings: dict[str, Any] = {
        "users": ",".join(map(str, counts)),
        "rounds": rounds,
        "follow_ups_at_least": "-" if interleaved else follow_ups,
        "answer_tokens": answer_tokens,
        "interleaved": interleaved,
        "think_s": "none" if interleaved else "1-3",
        "default_parallel": parallel,
    }
    if True in neighbours:
        settings["busy_neighbour"] = True
    result, lines = header(f"{title}: the embedded engine against llama-server", settings)
    body: list[list[object]] = []
    runs: list[dict[str, Any]] = []
    for count in counts:
        if interleaved:
            game = chats.take_turns
        else:
            conversations = math.ceil(follow_ups / (count * max(1, rounds - 1)))
            game = partial(chats.play, conversations=conversations)
        ours_parallel = [parallel] if interleaved else [1, parallel]
        targets = dict(_ours(p, count, answer_tokens) for p in dict.fromkeys(ours_parallel))
        # With one slot, llama-server consults its RAM cache only when the slot would keep
        # less than half of what it holds; a long shared preamble keeps more, so its cache
        # is also run the way a user tuning it would: slots picked by age, not similarity.
        variants = [(), ("--slot-prompt-similarity", "0")] if interleaved else [()]
        targets.update(
            llama_server_peer(binary, count, 1 if interleaved else count, x) for x in variants
        )
        for busy in neighbours:
            for target in each(targets, f"{count} users{BUSY if busy else ''}: "):
                ask = _asker(target, prompts)
                with neighbour(busy):
                    turns, wall = game(
                        target, ask, users=count, rounds=rounds, answer_tokens=answer_tokens
                    )
                numbers = chats.summary(turns, wall)
                numbers["peak_rss_mib"] = target.peak_rss_mib()
                name = target.name + (BUSY if busy else "")
                runs.append(
                    {
                        "users": count,
                        "target": name,
                        "notes": target.notes,
                        "summary": numbers,
                        "rows": as_dicts(turns),
                    }
                )
                body.append([count, name, *(numbers[k] for k in _CHAT_COLUMNS)])
    lines += report.table(_CHAT_HEADER, body)
    result["runs"] = runs
    name = _result_name("multi-round-peer" if interleaved else "concurrent", neighbours)
    if len(counts) > 1:
        # The same server as one line: "CHATBOT_PARALLEL=1", the default, and llama-server
        # whose --parallel follows the users.
        series = [{**run, "target": _series(run["target"])} for run in runs]
        report.plot_by_users(
            series, RESULTS / f"{name}_ttft.png", "Follow-up TTFT, p50 (solid) and p95 (dashed)"
        )
        lines += ["", f"![Follow-up TTFT by users]({name}_ttft.png)"]
    write(name, result, lines)
    return result


_CHAT_HEADER = [
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
_CHAT_COLUMNS = [
    "follow_up_ttft_p50_ms",
    "follow_up_ttft_p95_ms",
    "tpot_p50_ms",
    "tpot_p95_ms",
    "decode_tokens_per_s",
    "wall_s",
    "peak_rss_mib",
]


def _long_prompt(
    counts: list[int],
    answer_tokens: int,
    prompt_tokens: int,
    binary: Path,
    prompts: chats.Prompts,
    neighbours: list[bool],
) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "users": ",".join(map(str, counts)),
        "answer_tokens": answer_tokens,
        "prompt_tokens": prompt_tokens,
        "think_s": "none",
    }
    if True in neighbours:
        settings["busy_neighbour"] = True
    result, lines = header(
        "One long message while other users stream: the embedded engine against llama-server",
        settings,
    )
    alone = long_prompt.long_message(prompts, prompt_tokens, seed=1)
    beside = long_prompt.long_message(prompts, prompt_tokens, seed=2)
    runs: list[dict[str, Any]] = []
    body: list[list[object]] = []
    for count in counts:
        # Room for the long message, and for a conversation that grows while it is prefilled.
        context = max(8192, prompt_tokens + 2048)
        env = {"CHATBOT_MAX_MESSAGE_CHARS": str(16 * prompt_tokens)}
        targets = dict(
            [
                _ours(Settings(_env_file=None).parallel, count + 1, answer_tokens, context, env),
                llama_server_peer(binary, count + 1, count + 1, (), context),
            ]
        )
        for busy in neighbours:
            for target in each(targets, f"{count} users{BUSY if busy else ''}: "):
                ask = _asker(target, prompts)
                with neighbour(busy):
                    solo = long_prompt.solo(
                        target, ask, alone, user=count, answer_tokens=answer_tokens
                    )
                    reply, streams = long_prompt.play(
                        target, ask, beside, users=count, answer_tokens=answer_tokens
                    )
                numbers = long_prompt.summary(reply, streams, solo)
                numbers["peak_rss_mib"] = target.peak_rss_mib()
                name = target.name + (BUSY if busy else "")
                runs.append(
                    {"users": count, "target": name, "notes": target.notes, "summary": numbers}
                )
                during = numbers["others_ttft_during_ms"]
                body.append(
                    [
                        count,
                        name,
                        numbers["long_prompt_tokens"],
                        numbers["long_ttft_ms"],
                        numbers["solo_long_ttft_ms"],
                        numbers["others_largest_gap_ms"],
                        numbers["others_gap_p95_ms"],
                        f"{len(during)}: " + ", ".join(f"{t:.0f}" for t in sorted(during)),
                    ]
                )
    lines += report.table(
        [
            "users streaming",
            "server",
            "long prompt tokens",
            "long prompt TTFT (ms)",
            "alone (ms)",
            "others: largest gap between two tokens (ms)",
            "gap p95 (ms)",
            "others' requests sent during the prefill: TTFT (ms)",
        ],
        body,
    )
    lines += [
        "",
        "The others' gaps are those between two tokens of one answer that overlap the long "
        "prompt's prefill (its request sent → its first token). Alone: the same server, "
        "before, with nobody else and another text of the same length.",
    ]
    result["runs"] = runs
    write(_result_name("concurrent-long-prompt", neighbours), result, lines)
    return result


def _ours(
    parallel: int,
    users: int,
    answer_tokens: int,
    context_tokens: int = 8192,
    env: dict[str, str] | None = None,
) -> tuple[str, Factory]:
    name = f"chatbot, CHATBOT_PARALLEL={parallel}"
    return name, partial(
        chatbot,
        name,
        users=users,
        system_prompt=SYSTEM_PROMPT,
        max_tokens=answer_tokens,
        cache="tiered",
        context_tokens=context_tokens,
        env={
            "CHATBOT_PARALLEL": str(parallel),
            "CHATBOT_QUEUE_SIZE": str(4 * users),
            **(env or {}),
        },
    )


def llama_server_peer(
    binary: Path,
    users: int,
    parallel: int,
    extra: tuple[str, ...],
    context_tokens: int = 4096,
) -> tuple[str, Factory]:
    """llama-server with ``--parallel`` slots and its RAM prompt cache, as a target."""
    name = " ".join([f"llama-server --parallel {parallel} --cache-ram {CACHE_RAM_MIB}", *extra])
    return name, partial(
        llama_server,
        name,
        binary=binary,
        users=users,
        model_path=model_path(),
        parallel=parallel,
        cache_ram_mib=CACHE_RAM_MIB,
        context_tokens=context_tokens,
        extra=extra,
    )


def _asker(target: Target, prompts: chats.Prompts) -> chats.Ask:
    """The chatbot through its OpenAI-compatible API; llama-server with its very tokens."""
    return chats.chatbot_asker(target) if target.is_chatbot else chats.llama_server_asker(prompts)


@contextmanager
def neighbour(busy: bool) -> Iterator[None]:
    """One process spinning on a core for as long as the block runs (none unless ``busy``):
    a neighbour that takes a core from the server's threads."""
    if not busy:
        yield
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


def _series(name: str) -> str:
    """A run's line in the plot: the server without its --parallel, busy or not."""
    return name.split(" --parallel")[0] + (BUSY if name.endswith(BUSY) else "")


def _result_name(base: str, neighbours: list[bool]) -> str:
    return f"{base}-busy-neighbour" if True in neighbours else base
