"""The interactive loop of ``chatbot chat``: read a line, run a command or stream an answer."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

from rich.console import Console
from rich.text import Text

from chatbot.client.api import (
    AGENT_CHOICES,
    AnswerDelta,
    AnswerEnded,
    AnswerStarted,
    ApiError,
    ChatApi,
    Conversation,
)
from chatbot.client.format import (
    ASCII_SEPARATOR,
    SEPARATOR,
    answer_summary,
    conversation_lines,
    stats_lines,
)

PROMPT = "you> "

HELP = """\
Type a message and press Enter; the answer streams in, followed by one line of figures:
time to first token, how much of the prompt was already in the KV cache, and the agent.

  /new [title]       start a new conversation (created with your next message)
  /list              your conversations, newest first (* marks the current one)
  /switch <n or id>  continue conversation n of /list, or the one with that id
  /agent <name>      auto, assistant, knowledge or summarizer, for new conversations
  /stats             your KV cache hit rate and tokens served by each tier
  /help              this text
  /quit              leave (or Ctrl-D)

Ctrl-C stops an answer (what was streamed is kept); at the prompt it leaves.
Start a message with // to send a line that begins with /."""

# After Ctrl-C the server needs a moment to notice the closed stream and store the stopped
# answer; until then a new message in that conversation is refused with 409.
_BUSY_RETRY_SECONDS = 10.0


class ChatSession:
    def __init__(
        self,
        api: ChatApi,
        console: Console,
        *,
        read_line: Callable[[str], str] = input,
    ) -> None:
        self.api = api
        self.console = console
        self.read_line = read_line
        # None until the first message: a conversation is created with it, so that /new
        # leaves no empty conversations behind.
        self.current: Conversation | None = None
        self.next_title: str | None = None
        self.agent = "auto"
        self.listing: list[Conversation] = []
        self._stopped_in: str | None = None  # the conversation whose answer Ctrl-C stopped
        self._mid_line = False  # part of an answer is on the screen, its line not ended
        self.separator = SEPARATOR if _can_encode(console, SEPARATOR) else ASCII_SEPARATOR

    # --- the loop

    def run(self) -> int:
        """Until /quit, Ctrl-D or Ctrl-C at the prompt; the exit status."""
        while True:
            try:
                line = self.read_line(PROMPT)
            except (EOFError, KeyboardInterrupt):
                self.console.print()
                return 0
            try:
                if not self.handle(line.strip()):
                    return 0
            except KeyboardInterrupt:  # between the line and its handler: nothing was sent
                self.console.print()
                self.note("stopped")

    def handle(self, line: str) -> bool:
        """Runs one line: a command or a message; False to leave."""
        if line.startswith("/") and not line.startswith("//"):
            return self.command(line)
        if line:
            self.say(line.removeprefix("/") if line.startswith("//") else line)
        return True

    def command(self, line: str) -> bool:
        """Runs one slash command; False to leave."""
        name, _, argument = line.partition(" ")
        argument = argument.strip()
        handlers: dict[str, Callable[[str], None]] = {
            "/new": self.new_conversation,
            "/list": lambda _: self.list_conversations(),
            "/switch": self.switch_to,
            "/agent": self.choose_agent,
            "/stats": lambda _: self.show_stats(),
            "/help": lambda _: self.console.print(HELP, markup=False, highlight=False),
        }
        if name in ("/quit", "/exit"):
            return False
        handler = handlers.get(name)
        if handler is None:
            self.error(f"unknown command {name}: /help lists them")
            return True
        try:
            handler(argument)
        except ApiError as exc:
            self.error(str(exc))
        except KeyboardInterrupt:
            self.console.print()
            self.note(f"{name} interrupted")
        return True

    # --- commands

    def new_conversation(self, title: str) -> None:
        self.current = None
        self.next_title = title or None
        self.note(f"New conversation (agent {self.agent}): it starts with your next message.")

    def list_conversations(self) -> None:
        conversations, has_more = self.api.list_conversations()
        self.listing = conversations
        if not conversations:
            self.note("No conversations yet: type a message to start one.")
            return
        current_id = self.current.id if self.current else None
        for line in conversation_lines(conversations, current_id):
            style = "bold" if line.startswith("*") else None
            self.console.print(line, style=style, markup=False, highlight=False, soft_wrap=True)
        if has_more:
            self.note("(older ones not shown)")

    def switch_to(self, target: str) -> None:
        if not target:
            self.error("/switch needs a number from /list or a conversation id")
            return
        if target.isdigit():
            if not self.listing:
                self.listing, _ = self.api.list_conversations()
            number = int(target)
            if not 1 <= number <= len(self.listing):
                self.error(f"no conversation {number}: /list shows {len(self.listing)}")
                return
            conversation = self.listing[number - 1]
        else:
            conversation = self.api.get_conversation(target)
        messages = self.api.messages(conversation.id)
        self.current = conversation
        self.note(
            f"Now in '{conversation.title}' (agent {conversation.agent}, {len(messages)} messages)."
        )
        for message in messages[-2:]:
            who = "you" if message.role == "user" else (message.agent or message.role)
            text = " ".join(message.content.split())
            shown = text if len(text) <= 200 else text[:197] + "..."
            self.console.print(
                f"  {who}: {shown}", style="dim", markup=False, highlight=False, soft_wrap=True
            )

    def choose_agent(self, name: str) -> None:
        if name not in AGENT_CHOICES:
            self.error(f"/agent takes one of: {', '.join(AGENT_CHOICES)} (now {self.agent})")
            return
        self.agent = name
        if self.current is None:
            self.note(f"The new conversation will use agent {name}.")
        elif self.current.agent == name:
            self.note(f"This conversation already uses agent {name}.")
        else:
            self.note(
                f"Agent {name} applies from your next /new: a conversation's agent is set "
                f"when it is created, and this one stays on {self.current.agent}."
            )

    def show_stats(self) -> None:
        for line in stats_lines(self.api.cache_stats(), self.separator):
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    # --- a turn

    def say(self, content: str) -> None:
        try:
            if self.current is None:
                title = self.next_title or _title_from(content)
                self.current = self.api.create_conversation(title, self.agent)
                self.next_title = None
            self._stream_answer(self.current.id, content)
        except ApiError as exc:
            self._end_line()
            self.error(str(exc))
        except KeyboardInterrupt:
            # Leaving the stream's block closed the connection: the server stops generating.
            if self.current is not None:
                self._stopped_in = self.current.id
            # A new line whatever was on screen: the terminal has echoed ^C where it was.
            self.console.print()
            self._mid_line = False
            self.note("stopped (what was streamed is kept)")

    def _stream_answer(self, conversation_id: str, content: str) -> None:
        deadline = time.monotonic() + _BUSY_RETRY_SECONDS
        while True:
            try:
                self._stream_once(conversation_id, content)
                return
            except ApiError as exc:
                retry = (
                    exc.status == 409
                    and self._stopped_in == conversation_id
                    and time.monotonic() < deadline
                )
                if not retry:
                    raise
                time.sleep(0.2)

    def _stream_once(self, conversation_id: str, content: str) -> None:
        wrote_text = False
        ended: AnswerEnded | None = None
        with self.api.send_message(conversation_id, content) as events:
            for event in events:
                if isinstance(event, AnswerStarted):
                    self._stopped_in = None
                elif isinstance(event, AnswerDelta):
                    # The model often opens with a space or a newline after the prompt.
                    text = event.text if wrote_text else event.text.lstrip()
                    self.console.print(text, end="", markup=False, highlight=False, soft_wrap=True)
                    wrote_text = wrote_text or bool(text)
                    self._mid_line = self._mid_line or bool(text)
                elif isinstance(event, AnswerEnded):
                    ended = event
        self._end_line()
        if ended is None:
            self.error("the stream ended before the answer did")
            return
        self.console.print(Text(answer_summary(ended, self.separator), style="dim"), soft_wrap=True)

    # --- output

    def _end_line(self) -> None:
        if self._mid_line:
            self.console.print()
            self._mid_line = False

    def note(self, text: str) -> None:
        self.console.print(text, style="dim", markup=False, highlight=False, soft_wrap=True)

    def error(self, text: str) -> None:
        self.console.print(
            f"error: {text}", style="bold red", markup=False, highlight=False, soft_wrap=True
        )


def _title_from(content: str) -> str:
    """The first words of the first message: /list then tells conversations apart."""
    words = " ".join(content.split())
    return words if len(words) <= 60 else words[:57].rstrip() + "..."


def _can_encode(console: Console, text: str) -> bool:
    try:
        text.encode(console.encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def run_chat(base_url: str, api_key: str | None, console: Console) -> int:
    """Checks that the server answers and accepts the key, then runs the loop; the exit
    status (1 when the server cannot be used)."""
    with ChatApi(base_url, api_key) as api:
        try:
            # Any authenticated request would do: this one also proves the key is valid.
            api.list_conversations(limit=1)
        except ApiError as exc:
            Console(stderr=True).print(
                f"error: {exc}", style="bold red", markup=False, highlight=False, soft_wrap=True
            )
            return 1
        try:
            model = api.model_id()
        except ApiError:  # only for the greeting: not worth stopping for
            model = None
        served = f" (model {model})" if model else ""
        console.print(
            f"Connected to {api.base_url}{served}. /help lists the commands; "
            "Ctrl-C stops an answer, Ctrl-D leaves.",
            style="dim",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        return ChatSession(api, console, read_line=_line_reader()).run()


def _line_reader() -> Callable[[str], str]:
    """``input`` with line editing and history when a person is typing; when the lines come
    from a pipe or a file, each is echoed after the prompt so that the output reads as a
    transcript."""
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):  # not on every platform
            import readline  # noqa: F401  (importing it is what turns editing on for input)

            return _InterruptibleInput().read
        return input

    def read_and_echo(prompt: str) -> str:
        line = input(prompt)
        sys.stdout.write(line + "\n")
        return line

    return read_and_echo


class _InterruptibleInput:
    """``input`` under readline, where Ctrl-C always interrupts.

    CPython's readline loop looks at signals only when its ``select()`` on the terminal is
    interrupted. A Ctrl-C that lands while it is doing anything else (showing the prompt,
    reading a key) is recorded and then ignored until the next key press: Ctrl-C pressed as
    the prompt appears did nothing. Here the signal also wakes a thread (through Python's
    signal wakeup fd) that sends it again while the same line is still being read, until the
    loop has seen it. A repeat that arrives once the line is over is dropped.
    """

    _RESEND_EVERY_S = 0.1

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reading = 0  # the line being read, 0 when none
        self._lines = 0
        self._main = threading.main_thread().ident
        self._wakeup_r, wakeup_w = os.pipe()
        os.set_blocking(wakeup_w, False)
        signal.set_wakeup_fd(wakeup_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGINT, self._on_sigint)
        threading.Thread(target=self._watch, name="ctrl-c", daemon=True).start()

    def read(self, prompt: str) -> str:
        with self._lock:
            self._lines += 1
            self._reading = self._lines
        try:
            return input(prompt)
        finally:
            with self._lock:
                self._reading = 0

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        del signum, frame
        with self._lock:
            resent_too_late = self._resent and not self._reading
            self._resent = False
        if not resent_too_late:
            raise KeyboardInterrupt

    _resent = False

    def _watch(self) -> None:
        while os.read(self._wakeup_r, 64):
            with self._lock:
                line = self._reading
            while line:
                time.sleep(self._RESEND_EVERY_S)
                with self._lock:
                    if self._reading != line:
                        break
                    self._resent = True
                assert self._main is not None
                signal.pthread_kill(self._main, signal.SIGINT)
