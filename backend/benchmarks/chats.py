"""The ``concurrent`` benchmark's workloads: users chatting at the same time (or taking
turns), against the chatbot's embedded engine or llama-server.

Each of U users has their own conversation: a note of about 300 tokens with a question in
round 1, then short follow-ups, with a think time of 1 to 3 s between an answer and the
next question; greedy answers. All users start together, so their requests overlap as
they would on a busy server.

The chatbot is driven through its OpenAI-compatible API. llama-server gets the very
prompt tokens the chatbot's engine evaluates (the same transcript, tokenized segment by
segment with the same vocabulary) on its ``/completion`` endpoint with ``cache_prompt``,
the same stop strings and the same repeat penalty, so both do the same work.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import llama_cpp
from testbed.servers import Target

from benchmarks.client import Reply, chat
from benchmarks.workloads import SYSTEM_PROMPT, Row, question, user_document
from chatbot.engines import chat_format
from chatbot.engines.llama_context import PENALTY_LAST_N, REPEAT_PENALTY
from chatbot.models.domain import ChatMessage
from chatbot.sse import parse_sse


def note(user: int) -> str:
    """About 300 tokens a user pastes in round 1: their order history and trip plans."""
    rng = random.Random(7000 + user)
    days = [
        f"Day {d}: we walk {rng.randint(8, 25)} km and climb {rng.randint(300, 1400)} m, "
        f"then camp near a lake at {rng.randint(900, 2400)} m where nights drop to "
        f"{rng.randint(-6, 8)} degrees."
        for d in range(1, 8)
    ]
    return " ".join([user_document(user), "My plan so far:", *days])


class Prompts:
    """Renders a conversation to the chatbot engine's prompt tokens, for llama-server."""

    def __init__(self, model_path: Path) -> None:
        self._llm: Any = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)

    def tokens(self, messages: list[ChatMessage]) -> list[int]:
        rendered = chat_format.render(messages, few_shot=True, public_messages=1)
        tokens, _ = chat_format.prompt_tokens(
            rendered, bos=self._llm.token_bos(), tokenize=self._tokenize
        )
        return tokens

    def count(self, text: str) -> int:
        """Tokens of ``text`` as a message's words."""
        return len(self._tokenize(text))

    def _tokenize(self, text: str, *, special: bool = False) -> list[int]:
        tokens: list[int] = self._llm.tokenize(text.encode(), add_bos=False, special=special)
        return tokens


Ask = Callable[[httpx.Client, int, list[ChatMessage], int], Reply]


def turn(user: int, round_: int) -> str:
    """What ``user`` says in round ``round_``: the first round also carries their note."""
    content = question(user, round_)
    return f"{note(user)}\n\n{content}" if round_ == 1 else content


def chatbot_asker(target: Target) -> Ask:
    def ask(client: httpx.Client, user: int, messages: list[ChatMessage], n: int) -> Reply:
        history = [m.model_dump() for m in messages if m.role != "system"]
        return chat(client, target.keys[user], history, model=target.model, max_tokens=n)

    return ask


@contextmanager
def _post_streamed(
    client: httpx.Client, path: str, body: dict[str, Any]
) -> Iterator[httpx.Response]:
    """``body`` POSTed to ``path``, its response streamed. llama-server at times closes a
    kept-alive connection as a request goes out on it (two typing runs ended on httpx's
    "Server disconnected without sending a response", its other clients unharmed): as a
    browser would, a request that got no response at all goes once more, on a new
    connection. An error once the response has begun is not retried."""
    try:
        response = client.send(client.build_request("POST", path, json=body), stream=True)
    except httpx.RemoteProtocolError as exc:
        print(f"  {path}: {exc}; sent again on a new connection", file=sys.stderr)
        response = client.send(client.build_request("POST", path, json=body), stream=True)
    try:
        yield response
    finally:
        response.close()


def llama_server_asker(prompts: Prompts) -> Ask:
    def ask(client: httpx.Client, user: int, messages: list[ChatMessage], n: int) -> Reply:
        body = {
            "prompt": prompts.tokens(messages),
            "n_predict": n,
            "cache_prompt": True,
            "temperature": 0,
            "repeat_penalty": REPEAT_PENALTY,
            "repeat_last_n": PENALTY_LAST_N,
            "stop": list(chat_format.STOPS),
            "stream": True,
        }
        sent = time.perf_counter()
        first: float | None = None
        parts: list[str] = []
        arrivals: list[float] = []
        final: dict[str, Any] = {}
        with _post_streamed(client, "/completion", body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code}: {response.read().decode()}")
            for event in parse_sse(response.iter_lines()):
                chunk = json.loads(event.data)
                text = chunk.get("content") or ""
                parts.append(text)
                if text:
                    arrivals.append(time.perf_counter())
                # The chatbot streams no leading whitespace: the first token counts once
                # there is text.
                if first is None and "".join(parts).strip():
                    first = arrivals[-1]
                if chunk.get("stop"):
                    final = chunk
        ended = time.perf_counter()
        timings = final.get("timings") or {}
        prompt_n = int(timings.get("prompt_n", 0))
        cached = int(timings.get("cache_n", 0))
        return Reply(
            text="".join(parts).strip(),
            ttft_ms=round(((first or ended) - sent) * 1000, 1),
            total_ms=round((ended - sent) * 1000, 1),
            prompt_tokens=prompt_n + cached,
            cached_tokens=cached,
            completion_tokens=int(final.get("tokens_predicted", timings.get("predicted_n", 0))),
            sent_at=sent,
            arrivals=tuple(arrivals),
        )

    return ask


def take_turns(
    target: Target, ask: Ask, *, users: int, rounds: int, answer_tokens: int
) -> tuple[list[Row], float]:
    """The multi-round workload: users take turns, one request at a time, round-robin, so
    each user's next question comes after every other user's turn; (turns, wall seconds)."""
    conversations = [[ChatMessage(role="system", content=SYSTEM_PROMPT)] for _ in range(users)]
    turns: list[Row] = []
    began = time.perf_counter()
    with httpx.Client(base_url=target.url, timeout=600) as http:
        for r in range(1, rounds + 1):
            for user, messages in enumerate(conversations):
                messages.append(ChatMessage(role="user", content=turn(user, r)))
                reply = ask(http, user, messages, answer_tokens)
                messages.append(ChatMessage(role="assistant", content=reply.text))
                turns.append(Row.of(user, r, reply))
    return turns, time.perf_counter() - began


def play(
    target: Target,
    ask: Ask,
    *,
    users: int,
    rounds: int,
    answer_tokens: int,
    conversations: int = 1,
    seed: int = 1,
) -> tuple[list[Row], float]:
    """Every user's conversations at once, each user on its own thread going through
    ``conversations`` of them one after another, each with a note of its own; (turns, wall
    seconds)."""
    turns: list[Row] = []
    lock = threading.Lock()
    start = threading.Barrier(users)
    failures: list[BaseException] = []

    def converse(user: int) -> None:
        rng = random.Random(seed * 1000 + user)
        try:
            with httpx.Client(base_url=target.url, timeout=600) as http:
                start.wait()
                for c in range(conversations):
                    writer = user + c * users  # whose note and questions: new each time
                    messages = [ChatMessage(role="system", content=SYSTEM_PROMPT)]
                    for r in range(1, rounds + 1):
                        messages.append(ChatMessage(role="user", content=turn(writer, r)))
                        reply = ask(http, user, messages, answer_tokens)
                        messages.append(ChatMessage(role="assistant", content=reply.text))
                        with lock:
                            turns.append(Row.of(user, r, reply))
                        time.sleep(rng.uniform(1.0, 3.0))
        except BaseException as exc:
            failures.append(exc)
            raise

    threads = [threading.Thread(target=converse, args=(u,)) for u in range(users)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(f"{len(failures)} users failed") from failures[0]
    return turns, time.perf_counter() - began


def summary(turns: list[Row], wall_s: float) -> dict[str, Any]:
    follow_ups = [t for t in turns if t.round >= 2]
    ttft = sorted(t.ttft_ms for t in follow_ups)
    per_token = sorted(
        (t.total_ms - t.ttft_ms) / (t.completion_tokens - 1)
        for t in turns
        if t.completion_tokens > 1
    )
    generated = sum(t.completion_tokens for t in turns)
    return {
        "follow_up_ttft_p50_ms": _p(ttft, 0.5),
        "follow_up_ttft_p95_ms": _p(ttft, 0.95),
        "tpot_p50_ms": _p(per_token, 0.5),
        "tpot_p95_ms": _p(per_token, 0.95),
        "decode_tokens_per_s": round(generated / wall_s, 1),
        "wall_s": round(wall_s, 1),
        "turns": len(turns),
        "completion_tokens": generated,
    }


def _p(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if q == 0.5:
        return round(statistics.median(values), 1)
    return round(values[max(0, min(len(values) - 1, round(q * (len(values) - 1))))], 1)
