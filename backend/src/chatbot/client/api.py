"""The native API over HTTP: conversations, streamed turns and cache stats, as plain values.

Every failure, whether the server answered with an error body, sent an ``error`` event in
the middle of a stream, or could not be reached at all, comes out as one ``ApiError`` with
a message meant for a person.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from chatbot.sse import parse_sse

AGENT_CHOICES = ("auto", "assistant", "knowledge", "summarizer")

# Waiting for the first token may take long on a busy CPU server (a queue, a long
# prefill), and Ctrl-C ends the wait anyway, so a streamed turn has no read timeout.
_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
_STREAM_TIMEOUT = httpx.Timeout(60.0, connect=10.0, read=None)


class ApiError(Exception):
    """What went wrong, as the server put it; ``status`` is None when no HTTP answer came."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code

    def __str__(self) -> str:
        label = " ".join(str(part) for part in (self.status, self.code) if part is not None)
        return f"{self.message} ({label})" if label else self.message


@dataclass(frozen=True)
class Conversation:
    id: str
    title: str
    agent: str
    created_at: str
    updated_at: str

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Conversation:
        return cls(
            id=str(body["id"]),
            title=str(body["title"]),
            agent=str(body.get("agent") or "auto"),
            created_at=str(body.get("created_at", "")),
            updated_at=str(body.get("updated_at", "")),
        )


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cache_tier: str | None

    @classmethod
    def from_json(cls, body: dict[str, Any] | None) -> Usage | None:
        if not body:
            return None
        return cls(
            prompt_tokens=int(body.get("prompt_tokens", 0)),
            cached_tokens=int(body.get("cached_tokens", 0)),
            completion_tokens=int(body.get("completion_tokens", 0)),
            cache_tier=body.get("cache_tier"),
        )


@dataclass(frozen=True)
class Timing:
    queue_ms: float
    prefill_ms: float
    ttft_ms: float
    total_ms: float

    @classmethod
    def from_json(cls, body: dict[str, Any] | None) -> Timing | None:
        if not body:
            return None
        return cls(
            queue_ms=float(body.get("queue_ms", 0.0)),
            prefill_ms=float(body.get("prefill_ms", 0.0)),
            ttft_ms=float(body.get("ttft_ms", 0.0)),
            total_ms=float(body.get("total_ms", 0.0)),
        )


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    status: str
    agent: str | None


# --- the events of a streamed turn


@dataclass(frozen=True)
class AnswerStarted:
    conversation_id: str
    message_id: str
    agent: str | None
    route_reason: str | None


@dataclass(frozen=True)
class AnswerDelta:
    text: str


@dataclass(frozen=True)
class AnswerEnded:
    status: str  # complete, cancelled or failed
    content: str
    usage: Usage | None
    timing: Timing | None
    agent: str | None
    source: str | None


AnswerEvent = AnswerStarted | AnswerDelta | AnswerEnded


# --- cache stats


@dataclass(frozen=True)
class TierFigures:
    hits: int
    hit_tokens: int
    entries: int
    bytes: int
    budget_bytes: int | None


@dataclass(frozen=True)
class UserCacheFigures:
    lookups: int
    requested_tokens: int
    hit_tokens: int
    hit_rate: float
    hit_tokens_by_tier: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class CacheReport:
    engine: str
    enabled: bool
    user: UserCacheFigures | None
    tiers: dict[str, TierFigures]

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> CacheReport:
        user = body.get("user")
        cache = body.get("cache") or {}
        return cls(
            engine=str(body.get("engine", "")),
            enabled=bool(body.get("enabled", False)),
            user=UserCacheFigures(
                lookups=int(user.get("lookups", 0)),
                requested_tokens=int(user.get("requested_tokens", 0)),
                hit_tokens=int(user.get("hit_tokens", 0)),
                hit_rate=float(user.get("hit_rate", 0.0)),
                hit_tokens_by_tier={
                    str(k): int(v) for k, v in (user.get("hit_tokens_by_tier") or {}).items()
                },
            )
            if user
            else None,
            tiers={
                str(name): TierFigures(
                    hits=int(tier.get("hits", 0)),
                    hit_tokens=int(tier.get("hit_tokens", 0)),
                    entries=int(tier.get("entries", 0)),
                    bytes=int(tier.get("bytes", 0)),
                    budget_bytes=tier.get("budget_bytes"),
                )
                for name, tier in (cache.get("tiers") or {}).items()
            },
        )


class ChatApi:
    """A blocking client: the terminal waits for each answer anyway, and a blocking read is
    what Ctrl-C interrupts most simply."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=_TIMEOUT, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ChatApi:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- requests

    def model_id(self) -> str | None:
        """The served model, or None when the server does not say."""
        data = self._request("GET", "/v1/models").get("data") or []
        return str(data[0]["id"]) if data else None

    def create_conversation(self, title: str | None = None, agent: str = "auto") -> Conversation:
        body: dict[str, Any] = {"agent": agent}
        if title:
            body["title"] = title
        return Conversation.from_json(self._request("POST", "/v1/conversations", json=body))

    def list_conversations(self, limit: int = 20) -> tuple[list[Conversation], bool]:
        """The newest ``limit`` conversations, and whether there are more."""
        body = self._request("GET", "/v1/conversations", params={"limit": limit})
        return [Conversation.from_json(c) for c in body["data"]], bool(body.get("has_more"))

    def get_conversation(self, conversation_id: str) -> Conversation:
        return Conversation.from_json(self._request("GET", f"/v1/conversations/{conversation_id}"))

    def messages(self, conversation_id: str) -> list[Message]:
        body = self._request("GET", f"/v1/conversations/{conversation_id}/messages")
        return [
            Message(
                role=str(m["role"]),
                content=str(m.get("content", "")),
                status=str(m.get("status", "")),
                agent=m.get("agent"),
            )
            for m in body["data"]
        ]

    def cache_stats(self) -> CacheReport:
        return CacheReport.from_json(self._request("GET", "/v1/cache/stats"))

    @contextmanager
    def send_message(self, conversation_id: str, content: str) -> Iterator[Iterator[AnswerEvent]]:
        """The answer's events as they stream. Leaving the block closes the connection,
        which is how the server learns to stop generating (and keeps what was streamed)."""
        url = f"/v1/conversations/{conversation_id}/messages"
        body = {"content": content, "stream": True}
        try:
            with self._http.stream("POST", url, json=body, timeout=_STREAM_TIMEOUT) as response:
                if response.status_code != httpx.codes.OK:
                    response.read()
                    raise _error_from(response)
                yield _answer_events(response)
        except httpx.HTTPError as exc:
            raise _unreachable(self.base_url, exc) from exc

    def _request(self, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise _unreachable(self.base_url, exc) from exc
        if response.is_error:
            raise _error_from(response)
        try:
            body = response.json()
        except ValueError as exc:
            raise ApiError(
                f"the server's answer to {method} {url} is not JSON", status=response.status_code
            ) from exc
        if not isinstance(body, dict):
            raise ApiError(f"unexpected answer to {method} {url}", status=response.status_code)
        return body


def _answer_events(response: httpx.Response) -> Iterator[AnswerEvent]:
    for event in parse_sse(response.iter_lines()):
        try:
            data = json.loads(event.data)
        except ValueError as exc:
            raise ApiError(f"the stream sent something that is not JSON: {event.data!r}") from exc
        if event.event == "message.start":
            yield AnswerStarted(
                conversation_id=str(data.get("conversation_id", "")),
                message_id=str(data.get("message_id", "")),
                agent=data.get("agent"),
                route_reason=data.get("route_reason"),
            )
        elif event.event == "token":
            yield AnswerDelta(str(data.get("delta", "")))
        elif event.event == "message.end":
            yield AnswerEnded(
                status=str(data.get("status", "complete")),
                content=str(data.get("content", "")),
                usage=Usage.from_json(data.get("usage")),
                timing=Timing.from_json(data.get("timing")),
                agent=data.get("agent"),
                source=data.get("source"),
            )
            return
        elif event.event == "error":
            raise _error_from_body(data, status=None)
        # Events this client does not know are skipped: the server may add some.


def _error_from(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return _error_from_body(body, status=response.status_code)
    text = response.text.strip()[:200] or response.reason_phrase
    # Not this API's error body: a proxy's page, say; its first words are the best clue.
    return ApiError(text, status=response.status_code)


def _error_from_body(body: dict[str, Any], *, status: int | None) -> ApiError:
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    assert isinstance(error, dict)
    message = str(error.get("message") or "the server reported an error")
    code = error.get("code")
    return ApiError(message, status=status, code=str(code) if code else None)


def _unreachable(base_url: str, exc: httpx.HTTPError) -> ApiError:
    if isinstance(exc, httpx.ConnectError):
        return ApiError(f"cannot reach {base_url}: is the server running? ({exc})")
    if isinstance(exc, httpx.TimeoutException):
        return ApiError(f"{base_url} did not answer in time")
    return ApiError(f"the connection to {base_url} failed: {exc}")
