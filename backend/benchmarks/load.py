"""The load benchmark: how many users and open streams the API tier holds, and what it adds.

The chatbot runs as its own process on loopback (uvicorn with uvloop and httptools, as
``chatbot serve`` runs it) on the ``simulated`` engine, so that the model costs no CPU and
what is measured is the API tier: HTTP, auth, the agents' graph, SSE. Client processes
drive the users, each an asyncio protocol on a raw socket (no HTTP library: the client
must cost far less than the server it measures). Each user creates a conversation through
the native API, then sends a message, reads the streamed answer to its end, thinks for a
while (uniformly 0.5-1.5 times ``think_s``), and sends the next, one connection a request.

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

import asyncio
import json
import math
import multiprocessing
import os
import queue
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any, cast

from chatbot.client.local_server import ServerProcess, free_port

LAG_BUCKET_MS = 1.0
LAG_BUCKETS = 60_000  # 1 ms buckets up to a minute; later lands in the last one
SERVER_COMMAND = [sys.executable, "-m", "chatbot", "serve"]
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True, slots=True)
class LoadSettings:
    users: int = 10_000
    think_s: float = 30.0
    """Mean pause between an answer's end and the next message; 0: none."""
    ramp_s: float = 30.0
    """Users start evenly over this long."""
    duration_s: float = 90.0
    """How long after the ramp users keep sending messages."""
    answer_tokens: int = 200
    decode_tokens_per_s: float = 40.0
    stream_interval_ms: float = 0.0
    """The server's ``CHATBOT_STREAM_INTERVAL_MS``: tokens within it go out as one delta."""
    clients: int = 1
    """Client processes; the users are split among them."""
    timeout_s: float = 120.0
    """Longest wait for a response or the next chunk of a stream."""
    seed: int = 1


@dataclass(slots=True)
class ClientStats:
    """What one client process saw."""

    conversations: int = 0
    messages: int = 0
    """Answers streamed to their end, sent after the ramp."""
    tokens: int = 0
    all_tokens: int = 0
    all_messages: int = 0
    """Tokens and answers received, the ramp's included (for CPU per token)."""
    errors: dict[str, int] = field(default_factory=dict)
    client_ttft_ms: list[float] = field(default_factory=list)
    engine_ttft_ms: list[float] = field(default_factory=list)
    added_ttft_ms: list[float] = field(default_factory=list)
    lag_counts: list[int] = field(default_factory=lambda: [0] * LAG_BUCKETS)
    cached_tokens: int = 0
    prompt_tokens: int = 0
    agents: dict[str, int] = field(default_factory=dict)
    cpu_s: float = 0.0


# --- the client ----------------------------------------------------------------------------


class _Exchange(asyncio.Protocol):
    """One HTTP/1.1 request on its own connection; reads a JSON body or an SSE stream."""

    def __init__(self, request: bytes, on_token: Any = None) -> None:
        self._request = request
        self._on_token = on_token
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.status = 0
        self.body = bytearray()
        self.events: list[tuple[bytes, bytes]] = []  # (event, data) other than tokens
        self.complete = False
        self._head = bytearray()
        self._chunked = False
        self._length: int | None = None
        self._raw = bytearray()
        self._chunk_left = -1  # -1: expecting a chunk-size line
        self._sse = bytearray()
        self.transport: asyncio.Transport | None = None
        self.heard_at = time.monotonic()
        """When the request was sent or the server last sent something."""
        self.retry_after = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it
        self.transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        self.heard_at = time.monotonic()
        if not self.status:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self._head[:end]).split(b"\r\n")
            self.status = int(lines[0].split(b" ", 2)[1])
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"transfer-encoding" and b"chunked" in value.lower():
                    self._chunked = True
                elif name == b"content-length":
                    self._length = int(value)
                elif name == b"retry-after":
                    self.retry_after = float(value)
            data = bytes(self._head[end + 4 :])
            self._head.clear()
        if self._chunked:
            self._raw += data
            self._dechunk()
        else:
            self.body += data
            if self._length is not None and len(self.body) >= self._length:
                self._finish(True)

    def _dechunk(self) -> None:
        raw = self._raw
        while True:
            if self._chunk_left < 0:
                end = raw.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(raw[:end]).split(b";")[0], 16)
                del raw[: end + 2]
                if size == 0:
                    self._finish(True)
                    return
                self._chunk_left = size
            if len(raw) < self._chunk_left + 2:
                return
            payload = bytes(raw[: self._chunk_left])
            del raw[: self._chunk_left + 2]
            self._chunk_left = -1
            if self.status == 200 and self._on_token is not None:
                self._sse_received(payload)
            else:
                self.body += payload

    def _sse_received(self, payload: bytes) -> None:
        self._sse += payload
        now = time.perf_counter()
        while (end := self._sse.find(b"\n\n")) >= 0:
            event = bytes(self._sse[:end])
            del self._sse[: end + 2]
            head, _, data = event.partition(b"\ndata: ")
            if head == b"event: token":
                # Every simulated token is a space and a word: count the spaces.
                self._on_token(now, max(1, data.count(b" ")))
            else:
                self.events.append((head.removeprefix(b"event: "), data))

    def _finish(self, complete: bool) -> None:
        self.complete = complete
        if not self.done.done():
            self.done.set_result(None)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(self.complete)


def _request(method: str, path: str, key: str, body: dict[str, Any] | None) -> bytes:
    payload = json.dumps(body).encode() if body is not None else b""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + payload


class _Client:
    def __init__(
        self,
        settings: LoadSettings,
        port: int,
        start_at: float,
        open_streams: Synchronized[int],
    ) -> None:
        self.settings = settings
        self.port = port
        self.start_at = start_at  # time.time() at which the ramp begins
        self.measure_from = start_at + settings.ramp_s
        self.stop_at = self.measure_from + settings.duration_s
        self.stats = ClientStats()
        self.open_streams = open_streams
        self.interval_ms = 1000 / settings.decode_tokens_per_s

    async def _exchange(self, request: bytes, on_token: Any = None) -> _Exchange:
        loop = asyncio.get_running_loop()
        exchange = _Exchange(request, on_token)
        await loop.create_connection(lambda: exchange, "127.0.0.1", self.port)
        try:
            # The timeout is a silence: a stream may last longer, a chunk a while apart.
            while True:
                silent_for = time.monotonic() - exchange.heard_at
                wait = self.settings.timeout_s - silent_for
                if wait <= 0:
                    raise TimeoutError
                done, _ = await asyncio.wait((exchange.done,), timeout=wait)
                if done:
                    break
        finally:
            if exchange.transport is not None:
                exchange.transport.close()
        return exchange

    def _error(self, kind: str) -> None:
        self.stats.errors[kind] = self.stats.errors.get(kind, 0) + 1

    async def user(self, index: int, key: str, rng: random.Random) -> None:
        s = self.settings
        await _sleep_until(self.start_at + s.ramp_s * index / max(1, s.users))
        try:
            created = await self._exchange(
                _request("POST", "/v1/conversations", key, {"title": f"load {index}"})
            )
        except (OSError, TimeoutError) as exc:
            self._error(f"create: {type(exc).__name__}")
            return
        if created.status != 201:
            self._error(f"create: HTTP {created.status} {_code(created.body)}")
            return
        self.stats.conversations += 1
        conversation = json.loads(created.body)["id"]
        next_at = time.time() + (rng.uniform(0, s.think_s) if s.think_s else 0)
        turn = 0
        while True:
            await _sleep_until(next_at)
            if time.time() >= self.stop_at:
                return
            turn += 1
            retry_after = await self.message(key, conversation, index, turn)
            # A refused user waits as long as the server asked, if that is longer.
            next_at = time.time() + max(retry_after, s.think_s * rng.uniform(0.5, 1.5))

    async def message(self, key: str, conversation: str, index: int, turn: int) -> float:
        """One turn; the ``Retry-After`` of a refusal, else 0."""
        content = (
            f"Hello, this is visitor {index}, message {turn}. Could you tell me a short "
            f"story about a lighthouse keeper and a cat, number {turn}?"
        )
        request = _request(
            "POST", f"/v1/conversations/{conversation}/messages", key, {"content": content}
        )
        counted = time.time() >= self.measure_from
        first: float | None = None
        received = 0
        lags = self.stats.lag_counts
        interval_ms = self.interval_ms

        def on_token(now: float, n: int) -> None:
            nonlocal first, received
            if first is None:
                first = now
                self.open_streams.value += 1
                received = n
                return
            if counted:
                elapsed_ms = (now - first) * 1000
                for i in range(received, received + n):
                    lag = elapsed_ms - i * interval_ms
                    bucket = 0 if lag <= 0 else min(LAG_BUCKETS - 1, int(lag / LAG_BUCKET_MS))
                    lags[bucket] += 1
            received += n

        sent = time.perf_counter()
        try:
            exchange = await self._exchange(request, on_token)
        except (OSError, TimeoutError) as exc:
            self._error(f"message: {type(exc).__name__}")
            return 0.0
        finally:
            if first is not None:
                self.open_streams.value -= 1
            self.stats.all_tokens += received
            self.stats.all_messages += 1
        if exchange.status != 200:
            self._error(f"message: HTTP {exchange.status} {_code(exchange.body)}")
            return exchange.retry_after
        end = next((json.loads(d) for e, d in exchange.events if e == b"message.end"), None)
        failure = next((json.loads(d) for e, d in exchange.events if e == b"error"), None)
        if failure is not None:
            self._error(f"message: error event {failure['error'].get('code')}")
            return 0.0
        if end is None or not exchange.complete or first is None:
            self._error("message: stream ended early")
            return 0.0
        if end["status"] != "complete":
            self._error(f"message: answer {end['status']}")
            return 0.0
        if not counted:
            return 0.0
        stats = self.stats
        stats.messages += 1
        stats.tokens += received
        client_ttft = (first - sent) * 1000
        engine_ttft = end["timing"]["ttft_ms"]
        stats.client_ttft_ms.append(round(client_ttft, 3))
        stats.engine_ttft_ms.append(engine_ttft)
        stats.added_ttft_ms.append(round(client_ttft - engine_ttft, 3))
        stats.prompt_tokens += end["usage"]["prompt_tokens"]
        stats.cached_tokens += end["usage"]["cached_tokens"]
        stats.agents[end["agent"]] = stats.agents.get(end["agent"], 0) + 1
        return 0.0


def _code(body: bytes | bytearray) -> str:
    try:
        return str(json.loads(body)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return ""


async def _sleep_until(when: float) -> None:
    delay = when - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


def _client_process(
    settings: LoadSettings,
    port: int,
    start_at: float,
    users: list[tuple[int, str]],
    open_streams: Synchronized[int],
    results: multiprocessing.Queue[dict[str, Any]],
) -> None:
    import uvloop

    _raise_open_files()
    client = _Client(settings, port, start_at, open_streams)
    rng = random.Random(settings.seed * 1_000_003 + users[0][0] if users else 0)

    async def main() -> None:
        await asyncio.gather(*(client.user(i, key, rng) for i, key in users))

    before = resource.getrusage(resource.RUSAGE_SELF)
    uvloop.run(main())
    after = resource.getrusage(resource.RUSAGE_SELF)
    client.stats.cpu_s = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    results.put(asdict(client.stats))


# --- the server ----------------------------------------------------------------------------


def _raise_open_files() -> int:
    """Raise this process's open-files limit to its hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


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
    limit = _raise_open_files()
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
                target=_client_process,
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
        samples = _Sampler(server, counters)
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


class _Sampler(threading.Thread):
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


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))]


def _histogram_percentile(counts: list[int], q: float) -> float | None:
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    for bucket, count in enumerate(counts):
        seen += count
        if seen >= rank:
            return (bucket + 1) * LAG_BUCKET_MS  # the bucket's upper edge
    return LAG_BUCKETS * LAG_BUCKET_MS


def summarise(
    settings: LoadSettings,
    stats: list[dict[str, Any]],
    samples: _Sampler,
    *,
    server_cpu_s: float,
    wall_s: float,
) -> dict[str, Any]:
    errors: Counter[str] = Counter()
    agents: Counter[str] = Counter()
    added: list[float] = []
    client_ttft: list[float] = []
    engine_ttft: list[float] = []
    lags = [0] * LAG_BUCKETS
    for s in stats:
        errors.update(s["errors"])
        agents.update(s["agents"])
        added += s["added_ttft_ms"]
        client_ttft += s["client_ttft_ms"]
        engine_ttft += s["engine_ttft_ms"]
        lags = [a + b for a, b in zip(lags, s["lag_counts"], strict=True)]
    messages = sum(s["messages"] for s in stats)
    all_tokens = sum(s["all_tokens"] for s in stats)
    all_messages = sum(s["all_messages"] for s in stats)
    tokens = sum(s["tokens"] for s in stats)
    prompt = sum(s["prompt_tokens"] for s in stats)
    peak = samples.peak
    streams = int(peak["open_streams"])
    per_stream = (peak["rss_bytes"] - samples.rss_baseline) / streams if streams else None
    window = settings.duration_s

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value, 1)

    return {
        "settings": asdict(settings),
        "conversations": sum(s["conversations"] for s in stats),
        "messages": messages,
        "messages_per_s": round(messages / window, 1),
        "tokens_per_s": round(tokens / window, 1),
        "errors": dict(errors),
        "error_count": sum(errors.values()),
        "max_open_streams": streams,
        "server_open_fds_at_peak": int(peak["open_fds"]),
        "added_ttft_ms": {
            "p50": ms(_percentile(added, 0.5)),
            "p99": ms(_percentile(added, 0.99)),
            "mean": ms(statistics.fmean(added)) if added else None,
        },
        "client_ttft_ms": {
            "p50": ms(_percentile(client_ttft, 0.5)),
            "p99": ms(_percentile(client_ttft, 0.99)),
        },
        "engine_ttft_ms": {
            "p50": ms(_percentile(engine_ttft, 0.5)),
            "p99": ms(_percentile(engine_ttft, 0.99)),
        },
        "token_lag_ms": {
            "p50": _histogram_percentile(lags, 0.5),
            "p99": _histogram_percentile(lags, 0.99),
            "p999": _histogram_percentile(lags, 0.999),
            "tokens": sum(lags),
        },
        "cached_share": round(sum(s["cached_tokens"] for s in stats) / prompt, 4)
        if prompt
        else None,
        "agents": dict(agents),
        "server": {
            "rss_baseline_mib": round(samples.rss_baseline / 2**20, 1),
            "rss_at_peak_mib": round(peak["rss_bytes"] / 2**20, 1),
            "rss_max_mib": round(samples.max_rss / 2**20, 1),
            "memory_per_stream_kib": round(per_stream / 1024, 1) if per_stream else None,
            "cpu_cores": round(server_cpu_s / wall_s, 2),
            "cpu_us_per_token": round(server_cpu_s / all_tokens * 1e6, 1) if all_tokens else None,
            "cpu_ms_per_message": round(server_cpu_s / all_messages * 1e3, 2)
            if all_messages
            else None,
        },
        "clients": {
            "processes": settings.clients,
            "cpu_cores": round(sum(s["cpu_s"] for s in stats) / wall_s, 2),
        },
        "wall_s": round(wall_s, 1),
        "timeline": samples.timeline,
    }


def report_lines(runs: dict[str, dict[str, Any]]) -> list[str]:
    """The Markdown table of one or more runs, and what the columns mean."""
    body = []
    for name, r in runs.items():
        s = r["settings"]
        body.append(
            [
                name,
                f"{s['users']:,}",
                f"{s['think_s']:g} s",
                f"{s['answer_tokens']} @ {s['decode_tokens_per_s']:g}/s",
                f"{r['max_open_streams']:,}",
                f"{r['messages_per_s']:g}",
                f"{r['tokens_per_s']:,.0f}",
                r["error_count"],
                f"{r['added_ttft_ms']['p50']} / {r['added_ttft_ms']['p99']}",
                r["token_lag_ms"]["p99"],
                r["server"]["memory_per_stream_kib"],
                r["server"]["cpu_cores"],
                r["clients"]["cpu_cores"],
            ]
        )
    lines = [
        "| run | users | think | answer (tokens @ rate) | max open streams | messages/s "
        "| tokens/s | errors | added TTFT p50 / p99 (ms) | token lag p99 (ms) "
        "| server KiB / stream | server cores | client cores |",
        "|" + "---|" * 13,
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in body]
    for name, r in runs.items():
        if r["errors"]:
            errors = ", ".join(f"{kind}: {n}" for kind, n in r["errors"].items())
            lines.append(f"\nErrors in {name}: {errors}.")
    lines += [
        "",
        "Added TTFT: client-seen TTFT (request written → first token event) minus the "
        "engine's own `timing.ttft_ms` (the simulated GPU's queue and prefill). Token lag: "
        "for each token after a stream's first, its arrival minus the engine's schedule "
        "anchored at the first token, `(arrival_i − arrival_0) − i / rate`; 1 ms buckets. "
        "Memory per stream: server RSS at the most open streams minus before the users "
        "started, over those streams (conversations created meanwhile included). Cores: CPU "
        "seconds a second over the run. Figures after the ramp only.",
    ]
    return lines
