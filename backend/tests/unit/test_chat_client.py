"""The terminal client without a server: reading SSE, the lines it prints, and how a
session reacts to what the API answers (through httpx's mock transport)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from rich.console import Console

from chatbot.client.api import AnswerEnded, CacheReport, ChatApi, Conversation, Timing, Usage
from chatbot.client.format import answer_summary, conversation_lines, percent, stats_lines
from chatbot.client.repl import ChatSession
from chatbot.sse import ServerSentEvent, parse_sse


def test_sse_events_names_multi_line_data_and_comments() -> None:
    lines = [
        ": keep-alive",
        "event: message.start",
        'data: {"a": 1}',
        "",
        "data:first",
        "data: second",
        "id: 7",
        "",
        "",  # a blank line with nothing pending is no event
        "event: token",
        'data: {"delta": "cut off"}',  # no blank line: the stream ended mid-event
    ]
    assert list(parse_sse(lines)) == [
        ServerSentEvent("message.start", '{"a": 1}'),
        ServerSentEvent("message", "first\nsecond"),
    ]


def test_percent_is_rounded_down_and_never_hides_a_little() -> None:
    assert percent(612, 630) == "97"
    assert percent(629, 630) == "99"
    assert percent(630, 630) == "100"
    assert percent(1, 1000) == "<1"
    assert percent(0, 0) == "0"


def answer(**changes: Any) -> AnswerEnded:
    values: dict[str, Any] = {
        "status": "complete",
        "content": "Paris.",
        "usage": Usage(prompt_tokens=630, cached_tokens=612, completion_tokens=3, cache_tier="ram"),
        "timing": Timing(queue_ms=1.0, prefill_ms=90.0, ttft_ms=93.4, total_ms=150.0),
        "agent": "knowledge",
        "source": None,
    }
    return AnswerEnded(**(values | changes))


def test_the_line_after_an_answer() -> None:
    assert answer_summary(answer()) == (
        "TTFT 93 ms · 612/630 prompt tokens cached (97 %, RAM) · agent knowledge"
    )
    nothing_cached = Usage(prompt_tokens=947, cached_tokens=0, completion_tokens=3, cache_tier=None)
    assert answer_summary(answer(usage=nothing_cached, timing=None, agent=None), " | ") == (
        "0/947 prompt tokens cached (0 %)"
    )
    assert answer_summary(answer(status="cancelled")).startswith("stopped · TTFT 93 ms")


def test_conversations_are_numbered_and_the_current_one_marked() -> None:
    made = [
        Conversation(f"conv_{n}", f"Title {n}", "auto", "", "2026-01-02T03:04:05Z")
        for n in range(1, 11)
    ]
    lines = conversation_lines(made, "conv_2")
    assert lines[0] == "   1  Title 1  [auto, 2026-01-02 03:04 UTC, conv_1]"
    assert lines[1].startswith("*  2  Title 2")
    assert lines[9].startswith("  10  Title 10")


def test_stats_for_a_person() -> None:
    report = CacheReport.from_json(
        {
            "engine": "embedded",
            "enabled": True,
            "cache": {
                "tiers": {
                    "live": {"entries": 1, "bytes": 0},
                    "ram": {"entries": 2, "bytes": 3 << 20, "budget_bytes": 1 << 30},
                    "disk": {"entries": 0, "bytes": 0, "budget_bytes": 8 << 30},
                }
            },
            "user": {
                "lookups": 4,
                "requested_tokens": 2000,
                "hit_tokens": 1500,
                "hit_rate": 0.75,
                "hit_tokens_by_tier": {"live": 1400, "ram": 100},
            },
        }
    )
    assert stats_lines(report) == [
        "Your prompts: 1,500 of 2,000 tokens served from the cache (75 % hit rate) over 4 lookups",
        "  tokens by tier: live context 1,400 · RAM 100 · disk 0",
        "The cache (all users): live context 1 entry, 0 B · RAM 2 entries, 3.0 MiB of "
        "1.0 GiB · disk 0 entries, 0 B of 8.0 GiB",
    ]
    no_cache = CacheReport.from_json({"engine": "openai", "enabled": False})
    assert stats_lines(no_cache) == [
        "The openai engine keeps no KV cache of its own: no figures here."
    ]


# --- a session against a scripted API

CONVERSATION = {
    "id": "conv_1",
    "title": "Hello",
    "agent": "knowledge",
    "created_at": "2026-01-02T03:04:05Z",
    "updated_at": "2026-01-02T03:04:05Z",
}


def sse(*events: tuple[str, dict[str, Any]]) -> bytes:
    return "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events).encode()


class Script:
    """Answers the client's requests; records what it was sent."""

    def __init__(self, stream: Callable[[], httpx.Response]) -> None:
        self.stream = stream
        self.sent: list[tuple[str, str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.sent.append((request.method, request.url.path, body))
        if request.url.path == "/v1/conversations" and request.method == "POST":
            assert body is not None, "a conversation is created with a body"
            return httpx.Response(201, json=CONVERSATION | {"agent": body["agent"]})
        if request.url.path.endswith("/messages") and request.method == "POST":
            return self.stream()
        return httpx.Response(404, json={"error": {"type": "x", "message": "no", "code": "nf"}})


def run_session(script: Script, lines: list[str]) -> str:
    screen = io.StringIO()
    console = Console(file=screen, width=200)
    typed: Iterator[str] = iter(lines)

    def read_line(prompt: str) -> str:
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    api = ChatApi("http://chatbot.test", "key", transport=httpx.MockTransport(script))
    with api:
        assert ChatSession(api, console, read_line=read_line).run() == 0
    return screen.getvalue()


def test_an_answer_streams_then_its_line_and_the_agent_is_pinned_at_creation() -> None:
    ended = {
        "status": "complete",
        "content": "Hi there",
        "usage": {"prompt_tokens": 10, "cached_tokens": 5, "completion_tokens": 2},
        "timing": {"queue_ms": 0, "prefill_ms": 1, "ttft_ms": 12, "total_ms": 20},
        "agent": "knowledge",
    }
    body = sse(
        ("message.start", {"conversation_id": "conv_1", "message_id": "m", "agent": "knowledge"}),
        ("token", {"delta": "\n Hi"}),
        ("token", {"delta": " there"}),
        ("message.end", ended),
    )
    script = Script(lambda: httpx.Response(200, content=body))
    shown = run_session(script, ["/agent knowledge", "hello"])
    assert "Hi there\nTTFT 12 ms · 5/10 prompt tokens cached (50 %) · agent knowledge\n" in shown
    assert ("POST", "/v1/conversations", {"agent": "knowledge", "title": "hello"}) in script.sent


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (
            httpx.Response(
                200,
                content=sse(
                    ("token", {"delta": "Half"}),
                    (
                        "error",
                        {"error": {"type": "e", "message": "the engine failed", "code": "x"}},
                    ),
                ),
            ),
            "Half\nerror: the engine failed (x)\n",
        ),
        (
            httpx.Response(
                409, json={"error": {"type": "c", "message": "still answering", "code": "busy"}}
            ),
            "error: still answering (409 busy)\n",
        ),
        (httpx.Response(502, text="Bad gateway"), "error: Bad gateway (502)\n"),
        (httpx.Response(200, content=sse(("token", {"delta": "cut"}))), "the stream ended"),
    ],
)
def test_failures_are_printed_and_the_session_goes_on(
    response: httpx.Response, expected: str
) -> None:
    shown = run_session(Script(lambda: response), ["hello", "/quit"])
    assert expected in shown
    assert "Traceback" not in shown
