"""The ``openai`` engine: any OpenAI-compatible server; in production, vLLM with LMCache.

The server owns the KV cache (vLLM's prefix cache, LMCache's CPU, disk and remote tiers).
This engine's part is to let it work and to report what it did:

- every request of a conversation carries the same key in an affinity header, so that a
  router with session affinity (vLLM production-stack's ``session`` routing) sends the
  conversation back to the replica that holds its KV cache;
- ``cached_tokens`` is read from ``usage.prompt_tokens_details`` of the stream's last chunk
  (``stream_options.include_usage``; vLLM fills it with ``--enable-prompt-tokens-details``);
- TTFT is measured here, at the first content token, so that it includes the network and
  the server's queue as the user sees them.

``submit`` sends the request and waits for the response headers, so that a server that is
down, full or refuses the prompt becomes a 503 or 400 before our own response has started.
A request is retried only while nothing of its answer has been streamed: an answer is never
sent twice. Closing a generation closes its connection, which makes vLLM abort the request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from functools import partial
from typing import Any

import httpx

from chatbot.engines.base import (
    DraftStatus,
    Engine,
    EngineEvent,
    Finished,
    FinishReason,
    Generation,
    GenerationRequest,
    TokenDelta,
)
from chatbot.engines.stops import TRANSCRIPT_STOPS, Stops, StopScanner, request_stops
from chatbot.models.domain import Timing, Usage
from chatbot.models.errors import (
    ChatbotError,
    ContextLengthExceeded,
    EngineFailure,
    EngineOverloaded,
    InvalidRequest,
    ServiceUnavailable,
)
from chatbot.sse import SSEDecoder

logger = logging.getLogger(__name__)

SERVER_STOPS = 4
"""Stop strings sent to the server: vLLM's default limit (VLLM_MAX_STOP_STRINGS), and
OpenAI's."""

RETRYABLE_STATUSES = frozenset({502, 503, 504})
UNSENT = "error sending request"
"""What vllm-router's 500 says when it could not send a request to the replica it chose (one
that is down until its health check takes it off the ring, about a second): the request never
ran, so it is a 502 in all but its number, and retried as one."""
LONGEST_RETRY_WAIT_S = 1.0
"""Our client waits while we retry: a server that asks for a longer pause is not retried,
its ``Retry-After`` is passed on instead."""
PROBE_INTERVAL_S = 5.0


def affinity_key(session: str) -> str:
    """A stable, opaque key for a conversation: routers and their logs see neither our
    conversation ids nor anything a user wrote."""
    return hashlib.blake2b(session.encode(), digest_size=12).hexdigest()


class OpenAIEngine(Engine):
    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        model: str,
        model_id: str,
        context_tokens: int,
        affinity_header: str,
        max_connections: int,
        connect_timeout: float,
        read_timeout: float,
        retries: int,
        retry_backoff: float = 0.2,
        transport: httpx.AsyncBaseTransport | None = None,
        transcript: bool = True,
    ) -> None:
        """``model``: the name the server serves; empty: the first it lists. ``model_id``:
        the name our own API shows; empty: the server's. ``context_tokens``: the window
        used until the server reports its own (vLLM's ``max_model_len``). ``transcript``:
        the server renders the transcript (``deploy/vllm/transcript.jinja``), whose turn
        markers are stops; otherwise it renders the model's own chat template, and the
        model's end-of-turn token ends its answers."""
        self._base_url = base_url.rstrip("/") + "/"
        self._api_key = api_key
        self._model = model
        self._named = bool(model_id)
        self.model_id = model_id or model
        self._context_tokens = context_tokens
        self._affinity_header = affinity_header
        self._limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        # read: the longest silence allowed between two chunks, the first one included
        # (a long prompt waiting in the server's queue); pool: how long a request may wait
        # for one of our connections before the engine counts as full.
        self._timeout = httpx.Timeout(read_timeout, connect=connect_timeout, pool=connect_timeout)
        self._retries = retries
        self._retry_backoff = retry_backoff
        self._format_stops = TRANSCRIPT_STOPS if transcript else Stops()
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._prober: asyncio.Task[None] | None = None
        self._ready = False
        self._vllm = False  # what /v1/models says of the server
        self._waiting = 0
        self._drafts: dict[str, asyncio.Task[None]] = {}  # the conversation's draft in flight

    # --- Engine

    @property
    def context_tokens(self) -> int:
        return self._context_tokens

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def queue_depth(self) -> int:
        """Requests sent and still waiting for their first token."""
        return self._waiting

    async def start(self) -> None:
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self._base_url,
            headers=headers,
            limits=self._limits,
            timeout=self._timeout,
            transport=self._transport,
        )
        # The API starts even when the model server does not answer yet (replicas start in
        # any order); /readyz says so until it does.
        if not await self._discover():
            self._prober = asyncio.create_task(self._probe(), name="openai-engine-probe")

    async def aclose(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
        if self._client is not None:
            await self._client.aclose()  # closing the connections aborts upstream requests
            self._client = None
        self._ready = False

    async def submit(self, request: GenerationRequest) -> Generation:
        if request.session:
            # The message its draft read ahead of. Left to run, the draft's request would
            # compute again, beside the message, what the message computes anyway.
            await self.drop_draft(request.session)
        body = self._body(request)
        headers = {self._affinity_header: affinity_key(request.session)} if request.session else {}
        stops = request_stops(self._format_stops, request.sampling.stop)
        generation = _RemoteGeneration(
            partial(self._open, body, headers),
            retries=self._retries,
            count_waiting=self._count_waiting,
            stops=stops,
            server_stops=set(body["stop"]),
        )
        await generation.send()
        return generation

    async def prefill_draft(self, request: GenerationRequest) -> DraftStatus:
        """The draft's prompt as a request for one token, discarded, on the conversation's
        replica (its affinity header): the server's prefix cache and LMCache then hold the
        draft when the message comes. vLLM renders it without the assistant's opening."""
        if not request.session:
            return DraftStatus.UNSUPPORTED
        await self.drop_draft(request.session)
        if not self._ready or self._waiting:
            return DraftStatus.SKIPPED  # the server has requests waiting for a first token
        body = self._body(request) | {"max_tokens": 1, "stream": False}
        del body["stream_options"]
        if self._vllm:
            body["add_generation_prompt"] = False
        headers = {self._affinity_header: affinity_key(request.session)}
        task = asyncio.create_task(self._prefill(body, headers), name="openai-engine-draft")
        self._drafts[request.session] = task
        task.add_done_callback(partial(self._forget_draft, request.session))
        return DraftStatus.PREFILLING

    async def drop_draft(self, session: str) -> None:
        task = self._drafts.pop(session, None)
        if task is not None:
            task.cancel()  # closing the connection aborts the request upstream

    async def _prefill(self, body: dict[str, Any], headers: dict[str, str]) -> None:
        try:
            response = await self._send(body, headers)
            await response.aread()
            await response.aclose()
        except (ChatbotError, _Retryable, httpx.HTTPError) as exc:
            # Nobody waits for a draft: a failed one only means the message reads it all.
            logger.info("model server: a draft was not read: %s", exc)

    def _forget_draft(self, session: str, task: asyncio.Task[None]) -> None:
        if self._drafts.get(session) is task:
            del self._drafts[session]

    def _count_waiting(self, change: int) -> None:
        self._waiting += change

    # --- the model server

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise ServiceUnavailable("the engine is not started")
        return self._client

    async def _discover(self) -> bool:
        """Find the served model and its window; False if the server does not answer."""
        try:
            response = await self.client.get("models")
            response.raise_for_status()
            cards: list[dict[str, Any]] = response.json()["data"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            logger.warning("the model server at %s does not answer: %s", self._base_url, exc)
            return False
        served = [str(card.get("id")) for card in cards]
        if not self._model:
            if not served:
                logger.warning("the model server at %s serves no model yet", self._base_url)
                return False
            self._model = served[0]
        if not self._named:
            self.model_id = self._model
        if self._model not in served:
            logger.error(
                "the model server at %s does not serve %r (it serves %s)",
                self._base_url,
                self._model,
                ", ".join(served) or "nothing",
            )
            return False
        card = next(card for card in cards if card["id"] == self._model)
        self._vllm = card.get("owned_by") == "vllm"
        window = card.get("max_model_len")
        if isinstance(window, int) and window > 0:
            self._context_tokens = window
        self._ready = True
        logger.info(
            "openai engine ready: %s at %s, %d-token context",
            self._model,
            self._base_url,
            self._context_tokens,
        )
        return True

    async def _probe(self) -> None:
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            if await self._discover():
                return

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        sampling = request.sampling
        body: dict[str, Any] = {
            "model": self._model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        # The transcript template (deploy/vllm/transcript.jinja) needs its turn markers as
        # stops, or the model goes on to write the user's next turn; the caller's own follow.
        # The server gets the first few (vLLM refuses more than VLLM_MAX_STOP_STRINGS, 4 by
        # default, as OpenAI does); every one is also watched for here.
        stops = request_stops(self._format_stops, request.sampling.stop)
        body["stop"] = list(stops.strings[:SERVER_STOPS])
        if self._vllm:
            # Otherwise vLLM holds back as many characters as the longest stop string before
            # it streams any (so as never to stream a stop): 150-200 ms more to the first
            # token for these stops on the CPU, measured. The stop is cut off here instead.
            body["include_stop_str_in_output"] = True
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if sampling.frequency_penalty:
            body["frequency_penalty"] = sampling.frequency_penalty
        if sampling.presence_penalty:
            body["presence_penalty"] = sampling.presence_penalty
        return body

    async def _open(self, body: dict[str, Any], headers: dict[str, str]) -> httpx.Response:
        """POST the request until the server accepts it (status 200, stream open)."""
        attempt = 0
        while True:
            try:
                response = await self._send(body, headers)
            except _Retryable as exc:
                delay = exc.retry_after or self._retry_backoff * 2**attempt
                if attempt >= self._retries or delay > LONGEST_RETRY_WAIT_S:
                    raise exc.error from exc
                logger.info("model server: %s; retry %d in %.2f s", exc.error, attempt + 1, delay)
                attempt += 1
                await asyncio.sleep(delay)
                continue
            return response

    async def _send(self, body: dict[str, Any], headers: dict[str, str]) -> httpx.Response:
        request = self.client.build_request("POST", "chat/completions", json=body, headers=headers)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.PoolTimeout as exc:
            raise EngineOverloaded(
                "every connection to the model server is busy", retry_after=1
            ) from exc
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise _Retryable(
                ServiceUnavailable(
                    "the model server cannot be reached", code="engine_unreachable", retry_after=5
                )
            ) from exc
        except httpx.TransportError as exc:
            # The request may have reached the server: sending it again could run it twice.
            raise ServiceUnavailable(
                f"the model server did not answer ({type(exc).__name__})",
                code="engine_unreachable",
                retry_after=5,
            ) from exc
        if response.status_code == 200:
            return response
        await response.aread()
        await response.aclose()
        raise _refusal(response)


class _Retryable(Exception):
    def __init__(self, error: ChatbotError, retry_after: float | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry_after = retry_after


def _refusal(response: httpx.Response) -> Exception:
    """What a model server's non-200 answer means for our caller."""
    status = response.status_code
    message = _error_message(response)
    retry_after = _retry_after(response)
    if status in RETRYABLE_STATUSES or (status == 500 and UNSENT in message.lower()):
        error = ServiceUnavailable(
            f"the model server answered {status}: {message}",
            code="engine_unavailable",
            retry_after=retry_after or 5,
        )
        return _Retryable(error, retry_after)
    if status == 429:
        return EngineOverloaded(
            f"the model server is full: {message}", retry_after=retry_after or 1
        )
    if status == 400 and "context" in message.lower():
        return ContextLengthExceeded(message)
    if status in (400, 422):
        return InvalidRequest(f"the model server refused the request: {message}")
    # 401, 403, 404 and the rest are this server's configuration, not the user's request.
    logger.error("the model server answered %d: %s", status, message)
    return EngineFailure(f"the model server answered {status}", code="engine_misconfigured")


def _error_message(response: httpx.Response) -> str:
    try:
        payload = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    error = payload.get("error", payload) if isinstance(payload, dict) else payload
    if isinstance(error, dict):
        return str(error.get("message") or error.get("detail") or error)[:500]
    return str(error)[:500]


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return min(float(response.headers["retry-after"]), 30.0)
    except (KeyError, ValueError):
        return None


class _RemoteGeneration(Generation):
    """One streamed chat completion; counted as waiting until its first token."""

    def __init__(
        self,
        open_stream: Callable[[], Awaitable[httpx.Response]],
        *,
        retries: int,
        count_waiting: Callable[[int], None],
        stops: Stops,
        server_stops: set[str],
    ) -> None:
        """``open_stream``: sends the request and returns once the server accepted it; it is
        called again if the stream breaks before its first token, up to ``retries`` times.
        ``count_waiting``: told +1 when it starts waiting for its first token, -1 when it
        stops. ``stops``: every stop string, watched for here; ``server_stops``: those the
        server was given too, at which it ends the stream itself."""
        self._open_stream = open_stream
        self._retries = retries
        self._count_waiting = count_waiting
        self._stops = stops
        self._server_stops = server_stops
        self._response: httpx.Response | None = None
        self._submitted_at = time.perf_counter()
        self._accepted_at = self._submitted_at
        self._waiting = False
        self._closed = False

    async def send(self) -> None:
        self._set_waiting(True)
        try:
            self._response = await self._open_stream()
        except BaseException:
            self._set_waiting(False)
            raise
        self._accepted_at = time.perf_counter()

    def _set_waiting(self, waiting: bool) -> None:
        if waiting != self._waiting:
            self._count_waiting(1 if waiting else -1)
            self._waiting = waiting

    def closed(self) -> bool:
        """Closed by the consumer (which may happen while a read is awaited)."""
        return self._closed

    def __aiter__(self) -> AsyncIterator[EngineEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[EngineEvent]:
        first_at: float | None = None
        attempt = 0
        while True:
            if self.closed():
                return
            stream = _Stream()
            scanner = StopScanner(self._stops)
            try:
                async with aclosing(stream.read(self._require_response())) as deltas:
                    async for delta in deltas:
                        text = scanner.feed(delta)
                        if text:
                            if first_at is None:
                                first_at = time.perf_counter()
                                self._set_waiting(False)
                            yield TokenDelta(text)
                        if scanner.stopped and scanner.matched not in self._server_stops:
                            # A stop the server was not given: closing the stream aborts
                            # the request there (its usage, sent last, is then not known).
                            stream.finish_reason = "stop"
                            break
                        # At one it was given, the server ends the stream itself, with the
                        # usage last: the rest is read, and nothing more is passed on.
                tail = scanner.flush()
                if tail:
                    first_at = first_at or time.perf_counter()
                    yield TokenDelta(tail)
                break
            except (httpx.HTTPError, httpx.StreamError, _StreamBroken) as exc:
                if self.closed():
                    return  # closed by our consumer while reading: cancelled, not failed
                await self._close_response()
                if isinstance(exc, httpx.TimeoutException):
                    # Silent, not gone: it may still be computing, so it is not asked twice.
                    raise EngineFailure(
                        "the model server sent nothing for too long", code="engine_timeout"
                    ) from exc
                if first_at is not None or attempt >= self._retries:
                    raise EngineFailure(
                        "the model server failed while answering", code="engine_failed"
                    ) from exc
                # Nothing has reached our client: the request can be sent again.
                attempt += 1
                logger.info("model server stream broke before its first token: %s", exc)
                await self.send()
        ended = time.perf_counter()
        self._set_waiting(False)
        await self._close_response()
        first = first_at or ended
        yield Finished(
            usage=stream.usage,
            timing=Timing.measured(
                submitted=self._submitted_at,
                admitted=self._accepted_at,
                prefilled=first,
                first_token=first,
                ended=ended,
            ),
            finish_reason=stream.finish_reason,
        )

    def _require_response(self) -> httpx.Response:
        if self._response is None:
            raise ServiceUnavailable("the request was not sent")
        return self._response

    async def _close_response(self) -> None:
        if self._response is not None:
            response, self._response = self._response, None
            await response.aclose()

    async def aclose(self) -> None:
        self._closed = True
        self._set_waiting(False)
        await self._close_response()


class _StreamBroken(Exception):
    """The server ended the stream without finishing the answer."""


class _Stream:
    """Reads one Server-Sent-Events chat completion stream."""

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.finish_reason: FinishReason = "stop"
        self._finished = False

    async def read(self, response: httpx.Response) -> AsyncGenerator[str, None]:
        feed = SSEDecoder().feed
        async for line in response.aiter_lines():
            data = feed(line)
            if data is None:
                continue  # an event's first lines, comments (keep-alives)
            if data == "[DONE]":
                break
            try:
                chunk = json.loads(data)
            except ValueError as exc:
                raise _StreamBroken(f"the stream sent malformed JSON: {data[:100]!r}") from exc
            if "error" in chunk:
                # vLLM reports a failure inside the stream once the headers are sent.
                raise EngineFailure(
                    f"the model server failed: {_chunk_error(chunk['error'])}",
                    code="engine_failed",
                )
            for choice in chunk.get("choices") or ():
                content = (choice.get("delta") or {}).get("content")
                if content:
                    yield content
                if choice.get("finish_reason"):
                    self._finished = True
                    self.finish_reason = "length" if choice["finish_reason"] == "length" else "stop"
            if chunk.get("usage"):
                self.usage = _usage(chunk["usage"])
        if not self._finished:
            raise _StreamBroken("the stream ended before the answer finished")


def _chunk_error(error: Any) -> str:
    return str(error.get("message", error) if isinstance(error, dict) else error)[:500]


def _usage(usage: dict[str, Any]) -> Usage:
    details = usage.get("prompt_tokens_details") or {}
    return Usage(
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        cached_tokens=int(details.get("cached_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
    )
