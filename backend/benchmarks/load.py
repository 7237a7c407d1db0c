"""``python -m benchmarks load``: how many users and open streams the API tier holds, and what
it adds.

The chatbot runs as its own process on loopback (uvicorn with uvloop and httptools, as
``chatbot serve`` runs it) on the ``simulated`` engine, so that the model costs no CPU and
what is measured is the API tier: HTTP, auth, the agents' graph, SSE. Client processes
drive the users (``load_client``): each creates a conversation through the native API, then
sends a message, reads the streamed answer to its end, thinks for a while (uniformly 0.5-1.5
times ``think_s``), and sends the next, one connection a request.

Measured:

- **open streams**: answers streaming at once, counted by the clients between response
  headers and the stream's end, sampled every 0.5 s; its maximum is the connections held;
- **errors** by kind: any status but 200/201, an ``error`` event, a stream cut short;
- **added TTFT**: TTFT as the client sees it (request written → first ``token`` event)
  minus the engine's own ``timing.ttft_ms`` from ``message.end`` (the simulated GPU's queue
  and prefill): what the API tier adds to the first token;
- **token-delivery lag**: for every token after a stream's first, how much later than the
  engine's schedule it reached the client, the schedule anchored at the first token's
  arrival: ``lag_i = (arrival_i - arrival_0) - i / rate``. The simulated engine emits token
  ``i`` exactly ``i / rate`` after its first, so this is the delay the server (a busy event
  loop, socket buffers) and the client add between tokens; added TTFT is the rest;
- **memory per stream**: the server's RSS at the sample with the most open streams, less its
  RSS before the users started, divided by those streams (conversations created meanwhile
  are counted in it too, so it is an upper bound);
- **CPU**: server and clients, in cores (CPU seconds a second) over the run.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Annotated, Any

import typer
from testbed.process import ServerProcess

from benchmarks.load_client import LoadSettings, client_process, raise_open_files
from benchmarks.load_report import report_lines, summarise
from benchmarks.runner import header, write
from chatbot.client.local_server import free_port

SERVER_COMMAND = [sys.executable, "-m", "chatbot", "serve"]
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")

SCENARIOS: dict[str, dict[str, Any]] = {
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


def command(
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
    if scenario not in (*SCENARIOS, "all"):
        raise typer.BadParameter(f"scenario must be one of {', '.join(SCENARIOS)}, all")
    names = list(SCENARIOS) if scenario == "all" else [scenario]
    runs: dict[str, Any] = {}
    for name in names:
        values: dict[str, Any] = {"duration_s": 60.0, **SCENARIOS[name]}
        overrides = {
            "users": users,
            "duration_s": duration_s,
            "think_s": think_s,
            "answer_tokens": answer_tokens,
            "decode_tokens_per_s": tokens_per_s,
            "ramp_s": ramp_s,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = LoadSettings(
            stream_interval_ms=stream_interval_ms,
            clients=clients,
            **values,
        )
        typer.echo(f"load: {name} ({settings.users} users)", err=True)
        runs[name] = run(settings)
    shown = {"scenarios": ", ".join(names), "stream_interval_ms": stream_interval_ms}
    shown["clients"] = clients
    result, lines = header(
        "Load: the API tier on the simulated engine",
        shown,
        "One server process (uvicorn, uvloop, httptools) on loopback, the clients on the "
        "same machine.",
    )
    result["runs"] = runs
    lines += report_lines(runs)
    write(output, result, lines)
    return result


def user_keys(users: int) -> list[str]:
    return [f"load-user-{u:06d}-key-0123456789" for u in range(users)]


@dataclass
class Server:
    port: int
    process: subprocess.Popen[bytes]

    def rss_bytes(self) -> int:
        fields = Path(f"/proc/{self.process.pid}/statm").read_text().split()
        return int(fields[1]) * _PAGE

    def cpu_s(self) -> float:
        stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))


@contextmanager
def simulated_server(settings: LoadSettings) -> Iterator[Server]:
    """The chatbot on the simulated engine, sized so that only the API tier can limit it:
    as many sequences and streams as users, a user's own limits above what a user sends."""
    port = free_port()
    keys = user_keys(settings.users)
    with tempfile.TemporaryDirectory(prefix="bench-load-") as folder:
        # 10,000 keys are too long for one environment variable (128 KiB on Linux): they go
        # in the .env file that Settings reads from the working directory.
        env_file = Path(folder) / ".env"
        env_file.write_text(
            "CHATBOT_API_KEYS=" + ",".join(f"{k}=user{u}" for u, k in enumerate(keys)) + "\n"
        )
        env_file.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHATBOT_")}
        env.update(
            {
                "CHATBOT_HOST": "127.0.0.1",
                "CHATBOT_PORT": str(port),
                "CHATBOT_ENGINE": "simulated",
                "CHATBOT_LOG_LEVEL": "warning",
                "CHATBOT_CACHE_DIR": str(Path(folder) / "cache"),
                "CHATBOT_SIMULATED_DECODE_TOKENS_PER_S": str(settings.decode_tokens_per_s),
                "CHATBOT_SIMULATED_ANSWER_TOKENS": str(settings.answer_tokens),
                "CHATBOT_STREAM_INTERVAL_MS": str(settings.stream_interval_ms),
                "CHATBOT_SIMULATED_MAX_SEQUENCES": str(settings.users * 2),
                "CHATBOT_MAX_TOKENS": str(settings.answer_tokens),
                "CHATBOT_MAX_TOKENS_LIMIT": str(max(2048, settings.answer_tokens)),
                "CHATBOT_QUEUE_SIZE": str(settings.users),
                "CHATBOT_MAX_STREAMS": str(settings.users * 2),
                "CHATBOT_MAX_STREAMS_PER_USER": "4",
                "CHATBOT_REQUESTS_PER_MINUTE": "100000",
            }
        )
        ready = f"http://127.0.0.1:{port}/readyz"
        with ServerProcess(SERVER_COMMAND, ready_url=ready, env=env, cwd=folder) as server:
            assert server.popen is not None
            yield Server(port, server.popen)


# --- a run ---------------------------------------------------------------------------------


def run(settings: LoadSettings) -> dict[str, Any]:
    """Start the server, drive the users, and summarise what was seen."""
    limit = raise_open_files()
    per_process = math.ceil(settings.users / settings.clients)
    if per_process + 64 > limit or settings.users + 64 > limit:
        raise RuntimeError(
            f"the open-files limit is {limit}; {settings.users} users need more "
            "(raise the hard limit: ulimit -Hn)"
        )
    context = multiprocessing.get_context("spawn")
    keys = list(enumerate(user_keys(settings.users)))
    with simulated_server(settings) as server:
        results: multiprocessing.Queue[dict[str, Any]] = context.Queue()
        counters = [context.Value("i", 0, lock=False) for _ in range(settings.clients)]
        start_at = time.time() + 2.0  # the clients' processes start meanwhile
        processes = [
            context.Process(
                target=client_process,
                args=(
                    settings,
                    server.port,
                    start_at,
                    keys[c :: settings.clients],
                    counters[c],
                    results,
                ),
                daemon=True,
            )
            for c in range(settings.clients)
        ]
        for process in processes:
            process.start()
        samples = Sampler(server, counters)
        _sleep_wall(start_at - 0.5)
        samples.baseline()
        samples.start()
        cpu_from = server.cpu_s()
        wall_from = time.time()
        stats = _collect(results, processes, settings.ramp_s + settings.duration_s + 600)
        wall = time.time() - wall_from
        cpu = server.cpu_s() - cpu_from
        samples.stop()
        for process in processes:
            process.join(timeout=30)
    return summarise(settings, stats, samples, server_cpu_s=cpu, wall_s=wall)


def _collect(
    results: multiprocessing.Queue[dict[str, Any]],
    processes: Sequence[multiprocessing.process.BaseProcess],
    timeout_s: float,
) -> list[dict[str, Any]]:
    """Every client's stats; raises if one dies without reporting."""
    deadline = time.monotonic() + timeout_s
    stats: list[dict[str, Any]] = []
    while len(stats) < len(processes):
        try:
            stats.append(results.get(timeout=1))
        except queue.Empty:
            failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                raise RuntimeError(f"a client process failed (exit codes {failed})") from None
    return stats


def _sleep_wall(when: float) -> None:
    delay = when - time.time()
    if delay > 0:
        time.sleep(delay)


class Sampler(threading.Thread):
    """Every 0.5 s: streams open at the clients, the server's RSS and open descriptors."""

    def __init__(self, server: Server, counters: list[Synchronized[int]]) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.counters = counters
        self.rss_baseline = 0
        self.peak: dict[str, float] = {"open_streams": 0, "rss_bytes": 0, "open_fds": 0}
        self.max_rss = 0
        self.timeline: list[tuple[float, int, int]] = []
        self._stopped = threading.Event()

    def baseline(self) -> None:
        self.rss_baseline = self.server.rss_bytes()

    def run(self) -> None:
        started = time.time()
        while not self._stopped.wait(0.5):
            try:
                rss, fds = self.server.rss_bytes(), self.server.open_fds()
            except OSError:
                return
            streams = sum(c.value for c in self.counters)
            self.max_rss = max(self.max_rss, rss)
            self.timeline.append((round(time.time() - started, 1), streams, rss))
            if streams >= self.peak["open_streams"]:
                self.peak = {"open_streams": streams, "rss_bytes": rss, "open_fds": fds}

    def stop(self) -> None:
        self._stopped.set()
        self.join()
