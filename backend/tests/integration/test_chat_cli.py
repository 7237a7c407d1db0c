"""``chatbot chat`` as a person uses it: a real process in a pseudo-terminal, typing into it
and reading what it shows, against the session's live server (and once on an engine of its
own). No timing is asserted: only what the screen says."""

from __future__ import annotations

import io
import os
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pexpect
import pytest

from chatbot.client.local_server import free_port
from tests.conftest import CAROL_KEY, LiveServer

PROMPT = "you> "
SEP = r"(?: · | \| )"  # the second on a terminal whose encoding has no middle dot
# The line after each answer, e.g. "TTFT 93 ms · 612/630 prompt tokens cached (97 %, RAM)".
SUMMARY = re.compile(
    rf"TTFT (?P<ttft>[\d,]+) ms{SEP}(?P<cached>[\d,]+)/(?P<prompt>[\d,]+) prompt tokens "
    rf"cached \((?P<share><1|\d+) %[^)]*\){SEP}agent (?P<agent>\w+)"
)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# A slow, shared 2-core machine: starting Python, loading a model, answering in a queue.
TIMEOUT = 240


def number(text: str) -> int:
    return int(text.replace(",", ""))


class Terminal:
    """One ``chatbot chat`` process on a pseudo-terminal, with everything it has shown."""

    def __init__(self, args: list[str], env: Mapping[str, str], cwd: Path) -> None:
        self.screen = io.StringIO()
        self.child = pexpect.spawn(
            sys.executable,
            ["-m", "chatbot", "chat", *args],
            env=dict(env),
            cwd=str(cwd),
            encoding="utf-8",
            timeout=TIMEOUT,
            # Wide enough that no line the tests read is wrapped.
            dimensions=(60, 300),
        )
        self.child.logfile_read = self.screen

    @property
    def shown(self) -> str:
        return ANSI.sub("", self.screen.getvalue())

    def expect(self, pattern: str | re.Pattern[str]) -> re.Match[str]:
        try:
            self.child.expect(pattern)
        except (pexpect.TIMEOUT, pexpect.EOF) as exc:
            what = "timed out" if isinstance(exc, pexpect.TIMEOUT) else "the process ended"
            raise AssertionError(
                f"{what} waiting for {pattern!r}; the terminal showed:\n{self.shown}"
            ) from None
        match = self.child.match
        assert isinstance(match, re.Match)
        return match

    def before(self) -> str:
        """What was shown between the last two matches, without colours."""
        before = self.child.before
        return ANSI.sub("", before if isinstance(before, str) else "")

    def command(self, line: str) -> None:
        self.expect(PROMPT)
        self.child.sendline(line)

    def ask(self, question: str) -> tuple[str, re.Match[str]]:
        """Sends a question at the prompt; the answer as shown, and its summary line."""
        self.command(question)
        self.expect(re.escape(question))
        summary = self.expect(SUMMARY)
        return self.before().strip(), summary

    def exit_status(self) -> int | None:
        """Waits for the process to end by itself."""
        try:
            self.child.expect(pexpect.EOF)
        except pexpect.TIMEOUT:
            raise AssertionError(f"the process did not end; it showed:\n{self.shown}") from None
        self.child.close()
        status = self.child.exitstatus
        return status if isinstance(status, int) else None

    def close(self) -> None:
        if self.child.isalive():
            self.child.close(force=True)


def client_env() -> dict[str, str]:
    """The test run's environment without any CHATBOT_* setting, as a user's shell would be."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CHATBOT_")}


@pytest.fixture
def terminals(tmp_path: Path) -> Iterator[list[Terminal]]:
    opened: list[Terminal] = []
    yield opened
    for terminal in opened:
        terminal.close()


@pytest.fixture
def chat(live_server: LiveServer, terminals: list[Terminal], tmp_path: Path) -> Iterator[Terminal]:
    terminal = Terminal(["--url", live_server.url, "--api-key", CAROL_KEY], client_env(), tmp_path)
    terminals.append(terminal)
    terminal.expect(f"Connected to {re.escape(live_server.url)}")
    yield terminal
    assert "Traceback" not in terminal.shown


def test_two_turns_then_list_stats_and_quit(chat: Terminal) -> None:
    first_question = "Name three colours of the rainbow, please."
    answer, summary = chat.ask(first_question)
    assert re.search(r"\w", answer), chat.shown  # the streamed text came before the line
    assert number(summary["prompt"]) > 0

    answer, summary = chat.ask("Which of them is the warmest?")
    assert re.search(r"\w", answer), chat.shown
    # The second turn's prompt starts with the first turn, question and answer: cached.
    assert 0 < number(summary["cached"]) <= number(summary["prompt"]), summary[0]
    assert summary["share"] != "0"

    chat.command("/list")
    # The current conversation is marked, titled after its first message.
    chat.expect(re.compile(r"\* +\d+  " + re.escape(first_question)))

    chat.command("/stats")
    stats = chat.expect(
        r"Your prompts: (?P<hit>[\d,]+) of (?P<requested>[\d,]+) tokens served from the "
        r"cache \((?P<rate><1|\d+) % hit rate\) over (?P<lookups>[\d,]+) lookups?"
    )
    assert number(stats["hit"]) > 0
    assert number(stats["lookups"]) >= 2
    chat.expect(rf"tokens by tier: live context [\d,]+{SEP}RAM [\d,]+{SEP}disk [\d,]+")
    chat.expect(r"The cache \(all users\): live context")

    chat.command("/quit")
    assert chat.exit_status() == 0


def test_agent_applies_to_the_next_conversation(chat: Terminal) -> None:
    chat.command("/agent knowledge")
    chat.expect("The new conversation will use agent knowledge")
    _, summary = chat.ask("How does the KV cache keep saved states in RAM and on disk?")
    assert summary["agent"] == "knowledge"

    # The API sets a conversation's agent at creation: the client says when it applies.
    chat.command("/agent summarizer")
    chat.expect("applies from your next /new")
    chat.command("/new Summaries")
    chat.expect("New conversation \\(agent summarizer\\)")
    _, summary = chat.ask("Summarise: the cache has a live tier, a RAM tier and a disk tier.")
    assert summary["agent"] == "summarizer"

    chat.command("/list")
    chat.expect(re.compile(r"\* +1  Summaries  \[summarizer"))
    chat.command("/switch 2")
    chat.expect("Now in 'How does the KV cache")
    chat.command("/agent nobody")
    chat.expect("error: /agent takes one of: auto, assistant, knowledge, summarizer")
    chat.child.sendeof()  # Ctrl-D leaves too
    assert chat.exit_status() == 0


def test_ctrl_c_stops_an_answer_and_then_leaves(chat: Terminal) -> None:
    question = "Tell me a long story about a lighthouse keeper."
    chat.command(question)
    chat.expect(re.escape(question))
    # Ctrl-C once the answer shows: sent while the line is still being read, the terminal
    # would drop the Enter still queued with it, and the question would never be sent.
    chat.expect(re.compile(r"\w"))
    chat.child.sendintr()
    # Usually the answer is cut short; on a fast engine it may have ended already.
    chat.expect(re.compile(r"stopped \(what was streamed is kept\)|" + SUMMARY.pattern))

    # The conversation goes on (the client waits while the server stores the stopped answer).
    _, summary = chat.ask("Just one sentence, then.")
    assert number(summary["prompt"]) > 0

    # At the prompt Ctrl-C leaves, even sent the moment the prompt shows (readline sees a
    # signal only while it waits for a key: the client sends it again until it does).
    chat.expect(PROMPT)
    chat.child.sendintr()
    assert chat.exit_status() == 0


def test_a_wrong_key_is_refused_clearly(
    live_server: LiveServer, terminals: list[Terminal], tmp_path: Path
) -> None:
    terminal = Terminal(
        ["--url", live_server.url, "--api-key", "not-a-key-of-this-server-0000"],
        client_env(),
        tmp_path,
    )
    terminals.append(terminal)
    terminal.expect(r"error: .*\(401 invalid_api_key\)")
    assert terminal.exit_status() == 1
    assert "Traceback" not in terminal.shown
    assert PROMPT not in terminal.shown


def test_an_unreachable_server_is_reported_clearly(
    terminals: list[Terminal], tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    terminal = Terminal(["--url", url], client_env(), tmp_path)
    terminals.append(terminal)
    terminal.expect(f"error: cannot reach {re.escape(url)}")
    assert terminal.exit_status() == 1
    assert "Traceback" not in terminal.shown


def test_in_process_engine_when_no_url_is_given(
    model_path: Path, terminals: list[Terminal], tmp_path: Path
) -> None:
    env = client_env() | {
        "CHATBOT_MODEL_PATH": str(model_path),
        "CHATBOT_CACHE_DIR": str(tmp_path / "cache"),
        "CHATBOT_KV_DIR": str(tmp_path / "kv"),
        "CHATBOT_CONTEXT_TOKENS": "4096",
        "CHATBOT_MAX_TOKENS": "16",
        "CHATBOT_TEMPERATURE": "0",
    }
    terminal = Terminal([], env, tmp_path)
    terminals.append(terminal)
    terminal.expect("Starting the embedded engine in this process")
    terminal.expect(r"Connected to http://127\.0\.0\.1:\d+ \(model ")
    _, summary = terminal.ask("What is the capital of France?")
    assert number(summary["prompt"]) > 0
    _, summary = terminal.ask("And of Italy?")
    assert number(summary["cached"]) > 0
    terminal.command("/quit")
    # Leaving stops the server it started: the process ends on its own.
    assert terminal.exit_status() == 0
    assert "Traceback" not in terminal.shown
