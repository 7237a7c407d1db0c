"""``python -m benchmarks typing`` (this module is ``composing``: ``typing`` is Python's):
users compose their messages as people do, and the server reads what they write before they
press Enter (drafts, ``PUT .../draft``).

C users compose at once, each in conversations of their own, one after another until
there have been ``--pastes`` long pastes (with one user composing, that many conversations):

- round 1, a long paste: a document of about ``--document-tokens`` tokens pasted at once,
  then a short question typed over 3 to 6 s;
- then short follow-ups, typed at about 5 characters a second;
- drafts go as the chat page sends them: on a paste at once, else after a 300 ms pause or
  three more words, at most once a second; Enter right after the last key.

Meanwhile S other users ask short questions back to back and read the answers: their time
per output token is what drafts may cost others. The chatbot runs with drafts on and off,
on its native API; llama-server, which has no drafts (the best it can do is its prompt
cache), gets the very prompt tokens the chatbot's engine reads at Enter on its
``/completion`` endpoint. Reported: TTFT on Enter (p50, p95) for the long pastes and the
follow-ups, the others' time per output token (p50, p95), and on the chatbot the draft
tokens computed, used by a message, and wasted.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from matplotlib import pyplot as plt
from testbed.llama_server import ensure_binary
from testbed.servers import Target

from benchmarks import report
from benchmarks.chats import Prompts, llama_server_asker
from benchmarks.client import Reply
from benchmarks.concurrent import llama_server_peer
from benchmarks.long_prompt import long_message
from benchmarks.runner import RESULTS, AnswerTokens, cache_dir, each, header, model_path, write
from benchmarks.servers import Factory, chatbot
from benchmarks.workloads import SYSTEM_PROMPT, question
from chatbot.agents import layout
from chatbot.agents.documents import DocumentIndex
from chatbot.agents.router import RuleRouter
from chatbot.models.domain import Message
from chatbot.sse import parse_sse

STREAMING_USERS = 2
CHARS_PER_S = 5.0
PAUSE_S, DRAFT_WORDS, DRAFT_INTERVAL_S = 0.3, 3, 1.0  # as the chat page (web/app.js)
PASTE_QUESTIONS = (
    "What does it say about costs?",
    "Summarise the risks.",
    "Which day is the hardest?",
    "Who should read this?",
)


@dataclass(frozen=True, slots=True)
class Answer:
    reply: Reply
    draft_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Composed:
    """One message a composing user sent: TTFT from Enter."""

    user: int
    kind: str  # "paste" or "follow-up"
    ttft_ms: float
    prompt_tokens: int
    cached_tokens: int | None
    draft_tokens: int
    drafts: int


@dataclass(slots=True)
class Keys:
    """What a user does before Enter: (seconds before, text added), a paste being one."""

    strokes: list[tuple[float, str]] = field(default_factory=list)

    def paste(self, text: str) -> None:
        self.strokes.append((0.5, text))

    def type(self, text: str, seconds: float, rng: random.Random) -> None:
        gaps = [rng.uniform(0.5, 1.5) for _ in text]
        scale = seconds / sum(gaps)  # pauses vary; the whole takes ``seconds``
        self.strokes += [(gap * scale, char) for gap, char in zip(gaps, text, strict=True)]


def compose(keys: Keys, send: Callable[[str], bool]) -> tuple[str, int]:
    """Plays ``keys`` in real time, sending drafts by the chat page's rules (``send`` says
    whether it sent one); returns the text at Enter and how many drafts were sent."""
    text, sent, sent_at, due, drafts = "", "", -1e9, None, 0
    for delay, added in keys.strokes:
        until = time.perf_counter() + delay
        if due is not None and due <= until:
            time.sleep(max(0.0, due - time.perf_counter()))
            drafts += send(text)
            sent, sent_at, due = text, time.perf_counter(), None
        time.sleep(max(0.0, until - time.perf_counter()))
        text += added
        now = time.perf_counter()
        grown = len(text.split()) - len(sent.split()) >= DRAFT_WORDS
        if len(added) > 1 or (grown and now - sent_at >= DRAFT_INTERVAL_S):
            drafts += send(text)
            sent, sent_at, due = text, time.perf_counter(), None
        else:
            due = now + max(PAUSE_S, DRAFT_INTERVAL_S - (now - sent_at))
    return text, drafts


def messages_of(
    user: int, rounds: int, document: str, seed: int, chars_per_s: float = CHARS_PER_S
) -> list[tuple[str, Keys]]:
    rng = random.Random(seed * 1000 + user)
    paste = Keys()
    paste.paste(document + "\n\n")
    asked = rng.choice(PASTE_QUESTIONS)
    paste.type(asked, rng.uniform(3.0, 6.0) * CHARS_PER_S / chars_per_s, rng)
    turns = [("paste", paste)]
    for r in range(2, rounds + 1):
        follow_up = Keys()
        text = question(user, r)
        follow_up.type(text, len(text) / chars_per_s, rng)
        turns.append(("follow-up", follow_up))
    return turns


# --- talking to the servers ----------------------------------------------------------------


class Chatbot:
    """The chatbot's native API: a conversation per user, drafts, streamed turns."""

    def __init__(self, target: Target, drafts: bool) -> None:
        self.target = target
        self.drafts = drafts
        self.root = target.url.removesuffix("/v1")
        self.conversations: dict[int, str] = {}

    def client(self, user: int) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.target.keys[user]}"}
        return httpx.Client(base_url=self.root, headers=headers, timeout=600)

    def begin(self, http: httpx.Client, user: int) -> None:
        """A new conversation for ``user``: the next messages go there."""
        created = http.post("/v1/conversations", json={"agent": "auto"})
        created.raise_for_status()
        self.conversations[user] = created.json()["id"]

    def draft(self, http: httpx.Client, user: int, text: str) -> bool:
        if not (self.drafts and text.strip()):
            return False
        path = f"/v1/conversations/{self.conversations[user]}/draft"
        http.put(path, json={"content": text}).raise_for_status()
        return True

    def ask(
        self, http: httpx.Client, user: int, history: list[Message], text: str, n: int
    ) -> Answer:
        del history  # the server holds the conversation
        path = f"/v1/conversations/{self.conversations[user]}/messages"
        sent = time.perf_counter()
        arrivals: list[float] = []
        end: dict[str, Any] = {}
        with http.stream("POST", path, json={"content": text, "max_tokens": n}) as response:
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code}: {response.read().decode()}")
            for event in parse_sse(response.iter_lines()):
                if event.event == "token":
                    arrivals.append(time.perf_counter())
                elif event.event == "message.end":
                    end = json.loads(event.data)
                elif event.event == "error":
                    raise RuntimeError(event.data)
        ended = time.perf_counter()
        usage = end.get("usage") or {}
        reply = Reply(
            text=end.get("content", ""),
            ttft_ms=round(((arrivals[0] if arrivals else ended) - sent) * 1000, 1),
            total_ms=round((ended - sent) * 1000, 1),
            prompt_tokens=usage.get("prompt_tokens", 0),
            cached_tokens=usage.get("cached_tokens"),
            completion_tokens=usage.get("completion_tokens", 0),
            sent_at=sent,
            arrivals=tuple(arrivals),
        )
        return Answer(reply, usage.get("draft_tokens", 0))

    def draft_tokens(self) -> dict[str, float]:
        """The engine's draft counters, from /metrics (loopback)."""
        scraped = httpx.get(f"{self.root}/metrics").text
        wanted = {
            "chatbot_engine_draft_tokens_total": "computed",
            "chatbot_engine_draft_tokens_used_total": "used",
            "chatbot_engine_drafts_prefilled_total": "prefilled",
            "chatbot_engine_drafts_dropped_total": "dropped",
            "chatbot_drafts_received_total": "received",
        }
        counts = {name: 0.0 for name in wanted.values()}
        for line in scraped.splitlines():
            metric, _, value = line.partition(" ")
            if metric in wanted:
                counts[wanted[metric]] = float(value)
        return counts


class LlamaServer:
    """llama-server on ``/completion``, given the very tokens the chatbot's engine reads at
    Enter: the native API's prompt (preamble, earlier turns, the agent's instruction)."""

    def __init__(self, prompts: Prompts) -> None:
        self._ask = llama_server_asker(prompts)
        self._preamble = layout.preamble(SYSTEM_PROMPT, ())
        self._router = RuleRouter(DocumentIndex(()))

    def client(self, user: int, target: Target) -> httpx.Client:
        del user
        return httpx.Client(base_url=target.url, timeout=600)

    def begin(self, http: httpx.Client, user: int) -> None:
        del http, user  # the client sends the whole conversation each time

    def draft(self, http: httpx.Client, user: int, text: str) -> bool:
        del http, user, text  # no drafts: only its prompt cache
        return False

    def ask(
        self, http: httpx.Client, user: int, history: list[Message], text: str, n: int
    ) -> Answer:
        previous = next((m.agent for m in reversed(history) if m.agent), None)
        agent = self._router.route(text, previous).agent
        prompt = layout.turn_prompt(self._preamble, history, None, agent, text)
        reply = self._ask(http, user, prompt.messages, n)
        history.append(Message(conversation_id="c", role="user", content=text))
        history.append(
            Message(conversation_id="c", role="assistant", content=reply.text, agent=agent)
        )
        return Answer(reply)


# --- the workload ----------------------------------------------------------------------------


def play(
    target: Target,
    server: Chatbot | LlamaServer,
    *,
    composers: int,
    conversations: int = 1,
    rounds: int,
    answer_tokens: int,
    document: Callable[[int], str],
    chars_per_s: float = CHARS_PER_S,
    seed: int = 1,
) -> tuple[list[Composed], list[Reply], float]:
    """C users composing, each in ``conversations`` conversations one after another, and S
    others reading answers, all at once; (what the composers sent, the others' answers while
    anyone composed, wall seconds). ``document(n)``: the n-th document pasted."""
    composed: list[Composed] = []
    others: list[Reply] = []
    lock = threading.Lock()
    done = threading.Event()
    start = threading.Barrier(composers + STREAMING_USERS)
    failures: list[BaseException] = []

    def connect(user: int) -> httpx.Client:
        if isinstance(server, Chatbot):
            return server.client(user)
        return server.client(user, target)

    def write_and_send(user: int) -> None:
        try:
            with connect(user) as http:
                start.wait()
                for n in range(conversations):
                    compose_conversation(http, user, document(user * conversations + n), n)
        except BaseException as exc:
            failures.append(exc)
            raise

    def compose_conversation(http: httpx.Client, user: int, pasted: str, n: int) -> None:
        history: list[Message] = []
        server.begin(http, user)
        turns = messages_of(user, rounds, pasted, seed + n, chars_per_s)
        for kind, keys in turns:
            text, drafts = compose(keys, partial(server.draft, http, user))
            answer = server.ask(http, user, history, text, answer_tokens)
            reply = answer.reply
            with lock:
                composed.append(
                    Composed(
                        user,
                        kind,
                        reply.ttft_ms,
                        reply.prompt_tokens,
                        reply.cached_tokens,
                        answer.draft_tokens,
                        drafts,
                    )
                )
            time.sleep(random.Random(seed + user).uniform(1.0, 2.0))  # reading it

    def read_answers(user: int) -> None:
        history: list[Message] = []
        try:
            with connect(user) as http:
                server.begin(http, user)
                start.wait()
                n = 0
                while not done.is_set():
                    n += 1
                    text = question(user, 2 + n % 5)
                    reply = server.ask(http, user, history, text, 2 * answer_tokens).reply
                    if not done.is_set():
                        with lock:
                            others.append(reply)
                    if n % 6 == 0:  # a new conversation now and then: prompts stay short
                        history.clear()
                        server.begin(http, user)
        except BaseException as exc:
            failures.append(exc)
            raise

    writers = [threading.Thread(target=write_and_send, args=(u,)) for u in range(composers)]
    readers = [
        threading.Thread(target=read_answers, args=(composers + s,)) for s in range(STREAMING_USERS)
    ]
    began = time.perf_counter()
    for thread in writers + readers:
        thread.start()
    for thread in writers:
        thread.join()
    done.set()
    for thread in readers:
        thread.join()
    if failures:
        raise RuntimeError(f"{len(failures)} users failed") from failures[0]
    return composed, others, time.perf_counter() - began


def summary(composed: list[Composed], others: list[Reply], wall_s: float) -> dict[str, Any]:
    def ttft(kind: str) -> list[float]:
        return [c.ttft_ms for c in composed if c.kind == kind]

    per_token = [
        (b - a) * 1000 for reply in others for a, b in pairwise(reply.arrivals)
    ]  # each gap between two tokens of one answer
    numbers: dict[str, Any] = {"wall_s": round(wall_s, 1)}
    for kind in ("paste", "follow-up"):
        key = kind.replace("-", "_")
        numbers[f"{key}_ttft_p50_ms"] = _p(ttft(kind), 0.5)
        numbers[f"{key}_ttft_p95_ms"] = _p(ttft(kind), 0.95)
    numbers["others_tpot_p50_ms"] = _p(per_token, 0.5)
    numbers["others_tpot_p95_ms"] = _p(per_token, 0.95)
    numbers["drafts_sent"] = sum(c.drafts for c in composed)
    numbers["draft_tokens_used"] = sum(c.draft_tokens for c in composed)
    return numbers


def _p(values: list[float], q: float) -> float | None:
    return round(report.percentile(values, q), 1) if values else None


# --- the command -------------------------------------------------------------------------------


def command(
    users: Annotated[
        str, typer.Option(help="Users composing at once, comma-separated: one run per value.")
    ] = "1,8",
    rounds: Annotated[
        int, typer.Option(help="Messages per conversation: a long paste, then follow-ups.")
    ] = 4,
    document_tokens: Annotated[int, typer.Option(help="Tokens of the pasted document.")] = 1500,
    answer_tokens: AnswerTokens = 32,
    llama_server_binary: Annotated[
        Path | None,
        typer.Option("--llama-server", help="A llama-server binary; default: built from the pin."),
    ] = None,
    pastes: Annotated[
        int,
        typer.Option(
            help="Long pastes per server at least: each user composing pastes in as many "
            "conversations, one after another, as it takes."
        ),
    ] = 6,
    peers: Annotated[bool, typer.Option(help="Also run llama-server.")] = True,
    typing_speed: Annotated[
        float, typer.Option(help="Characters a second users type (a quick check: more).")
    ] = CHARS_PER_S,
) -> dict[str, Any]:
    """Users compose as people do; the chatbot with drafts on and off, and llama-server."""
    counts = [int(u) for u in users.split(",")]
    slower = CHARS_PER_S / typing_speed  # how much longer than 3-6 s the question takes
    prompts = Prompts(model_path())
    documents: dict[int, str] = {}

    def document(n: int) -> str:
        if n not in documents:
            documents[n] = long_message(prompts, document_tokens, seed=100 + n)
        return documents[n]

    settings: dict[str, Any] = {
        "users_composing": users,
        "others_streaming": STREAMING_USERS,
        "rounds": rounds,
        "pastes": pastes,
        "document_tokens": document_tokens,
        "answer_tokens": answer_tokens,
        "typing_chars_per_s": typing_speed,
        "paste_question_s": f"{3 * slower:g}-{6 * slower:g}",
    }
    result, lines = header("Answers that start before Enter: drafts while users type", settings)
    runs: list[dict[str, Any]] = []
    body: list[list[object]] = []
    binary = ensure_binary(cache_dir()) if peers and llama_server_binary is None else None
    with tempfile.TemporaryDirectory(prefix="bench-typing-docs-") as no_documents:
        for count in counts:
            everyone = count + STREAMING_USERS
            targets = dict(
                _ours(everyone, answer_tokens, no_documents, drafts) for drafts in (True, False)
            )
            if peers:
                peer = llama_server_binary or binary
                assert peer is not None
                targets.update([llama_server_peer(peer, everyone, everyone, (), 8192)])
            for target in each(targets, f"{count} composing: "):
                server: Chatbot | LlamaServer
                if target.is_chatbot:
                    server = Chatbot(target, drafts=target.notes["CHATBOT_DRAFTS"] == "true")
                    before = server.draft_tokens()
                else:
                    server = LlamaServer(prompts)
                composed, others, wall = play(
                    target,
                    server,
                    composers=count,
                    conversations=math.ceil(pastes / count),
                    rounds=rounds,
                    answer_tokens=answer_tokens,
                    document=document,
                    chars_per_s=typing_speed,
                )
                numbers = summary(composed, others, wall)
                if isinstance(server, Chatbot):
                    after = server.draft_tokens()
                    spent = {k: after[k] - before[k] for k in after}
                    numbers["draft_tokens_computed"] = spent["computed"]
                    numbers["draft_tokens_wasted"] = spent["computed"] - spent["used"]
                    numbers["drafts_prefilled"] = spent["prefilled"]
                    numbers["drafts_dropped"] = spent["dropped"]
                numbers["peak_rss_mib"] = target.peak_rss_mib()
                runs.append(
                    {
                        "users": count,
                        "target": target.name,
                        "notes": target.notes,
                        "summary": numbers,
                        "composed": [asdict(c) for c in composed],
                    }
                )
                body.append([count, target.name, *(numbers.get(k, "") for k in _COLUMNS)])
    lines += report.table(_HEADER, body)
    lines += [
        "",
        "TTFT from Enter to the first token. The others: users asking short questions back "
        "to back while the composers write; their time per output token is every gap between "
        "two tokens of one answer. Wasted: draft tokens computed that no message reused "
        "(text changed, or read again after a pause).",
    ]
    result["runs"] = runs
    plot(runs, RESULTS / "typing_ttft.png")
    lines += ["", "![TTFT on Enter](typing_ttft.png)"]
    write("typing", result, lines)
    return result


_HEADER = [
    "users composing",
    "server",
    "long paste TTFT p50 (ms)",
    "p95 (ms)",
    "follow-up TTFT p50 (ms)",
    "p95 (ms)",
    "others' time per token p50 (ms)",
    "p95 (ms)",
    "drafts sent",
    "draft tokens computed",
    "wasted",
]
_COLUMNS = [
    "paste_ttft_p50_ms",
    "paste_ttft_p95_ms",
    "follow_up_ttft_p50_ms",
    "follow_up_ttft_p95_ms",
    "others_tpot_p50_ms",
    "others_tpot_p95_ms",
    "drafts_sent",
    "draft_tokens_computed",
    "draft_tokens_wasted",
]


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """TTFT on Enter, p50, for each server: the long pastes and the follow-ups, by users."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, kind in zip(axes, ("paste", "follow_up"), strict=True):
        for server in dict.fromkeys(run["target"] for run in runs):
            mine = sorted((r for r in runs if r["target"] == server), key=lambda r: r["users"])
            ax.plot(
                [r["users"] for r in mine],
                [r["summary"][f"{kind}_ttft_p50_ms"] for r in mine],
                marker="o",
                label=server,
            )
        title = "long paste + question" if kind == "paste" else "typed follow-up"
        ax.set(title=title, xlabel="users composing at once", yscale="log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set(ylabel="TTFT on Enter, p50 (ms)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ours(users: int, answer_tokens: int, docs_dir: str, drafts: bool) -> tuple[str, Factory]:
    name = f"chatbot, drafts {'on' if drafts else 'off'}"
    return name, partial(
        chatbot,
        name,
        users=users,
        system_prompt=SYSTEM_PROMPT,
        max_tokens=2 * answer_tokens,
        cache="tiered",
        env={
            "CHATBOT_DRAFTS": "true" if drafts else "false",
            "CHATBOT_DOCS_DIR": docs_dir,  # the preamble is the system prompt, as llama-server's
            "CHATBOT_QUEUE_SIZE": str(4 * users),
            "CHATBOT_REQUESTS_PER_MINUTE": "100000",
        },
    )
