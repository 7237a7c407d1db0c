"""The load benchmark's client: users, each an asyncio protocol on a raw socket, so that the
client costs far less than the server it measures. HTTP/1.1 is parsed by ``httptools`` (the
parser uvicorn serves with), the streamed answers by the chatbot's one SSE parser
(``chatbot.sse``). Each user creates a conversation through the native API, then sends a
message, reads the streamed answer to its end, thinks for a while (uniformly 0.5-1.5 times
``think_s``), and sends the next, one connection a request."""

from __future__ import annotations

import asyncio
import codecs
import json
import multiprocessing
import random
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.sharedctypes import Synchronized
from typing import Any, cast

import httptools

from chatbot.sse import SSEDecoder

LAG_BUCKET_MS = 1.0
LAG_BUCKETS = 60_000  # 1 ms buckets up to a minute; later lands in the last one

OnTokens = Callable[[float, int], None]
"""Called with (arrival time, tokens) for each ``token`` event."""


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


class _Exchange(asyncio.Protocol):
    """One HTTP/1.1 request on its own connection; reads a JSON body or an SSE stream."""

    def __init__(self, request: bytes, on_tokens: OnTokens | None = None) -> None:
        self._request = request
        self._on_tokens = on_tokens
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.status = 0
        self.body = bytearray()
        self.events: list[tuple[str, str]] = []  # (event, data) other than tokens
        self.complete = False
        self._http = httptools.HttpResponseParser(self)
        self._text = codecs.getincrementaldecoder("utf-8")()
        self._partial_line = ""
        self._sse = SSEDecoder()
        self.transport: asyncio.Transport | None = None
        self.heard_at = time.monotonic()
        """When the request was sent or the server last sent something."""
        self.retry_after = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it
        self.transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        self.heard_at = time.monotonic()
        try:
            self._http.feed_data(data)
        except httptools.HttpParserError:
            self._finish(False)

    # httptools' callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"retry-after":
            self.retry_after = float(value)

    def on_headers_complete(self) -> None:
        self.status = self._http.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self.status == 200 and self._on_tokens is not None:
            self._sse_received(body, self._on_tokens)
        else:
            self.body += body

    def on_message_complete(self) -> None:
        self._finish(True)

    def _sse_received(self, body: bytes, on_tokens: OnTokens) -> None:
        now = time.perf_counter()
        *lines, self._partial_line = (self._partial_line + self._text.decode(body)).split("\n")
        for line in lines:
            data = self._sse.feed(line)
            if data is None:
                continue
            if self._sse.event == "token":
                # Every simulated token is a space and a word: count the spaces.
                on_tokens(now, max(1, data.count(" ")))
            else:
                self.events.append((self._sse.event, data))

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

    async def _exchange(self, request: bytes, on_tokens: OnTokens | None = None) -> _Exchange:
        loop = asyncio.get_running_loop()
        exchange = _Exchange(request, on_tokens)
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
        end = next((json.loads(d) for e, d in exchange.events if e == "message.end"), None)
        failure = next((json.loads(d) for e, d in exchange.events if e == "error"), None)
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


def client_process(
    settings: LoadSettings,
    port: int,
    start_at: float,
    users: list[tuple[int, str]],
    open_streams: Synchronized[int],
    results: multiprocessing.Queue[dict[str, Any]],
) -> None:
    """One client process: drives ``users`` (index, key) and puts what it saw
    (``ClientStats`` as a dict) on ``results``."""
    import uvloop

    raise_open_files()
    client = _Client(settings, port, start_at, open_streams)
    rng = random.Random(settings.seed * 1_000_003 + users[0][0] if users else 0)

    async def main() -> None:
        await asyncio.gather(*(client.user(i, key, rng) for i, key in users))

    before = resource.getrusage(resource.RUSAGE_SELF)
    uvloop.run(main())
    after = resource.getrusage(resource.RUSAGE_SELF)
    client.stats.cpu_s = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    results.put(asdict(client.stats))


def raise_open_files() -> int:
    """Raise this process's open-files limit to its hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard
