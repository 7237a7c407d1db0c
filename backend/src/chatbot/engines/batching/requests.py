"""A request as the batching engine sees it, split as vLLM splits it: what was asked
(``Request``, never changed) and how far it has got (``Progress``, the scheduler's)."""

from __future__ import annotations

import codecs
import threading
import time
from array import array
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum

from chatbot.engines.base import EngineEvent, SamplingParams
from chatbot.engines.stops import Stops, StopScanner
from chatbot.kvcache import PromptKey, Restore, Reuse

Emit = Callable[[EngineEvent | BaseException | None], None]
"""Hands an event to the request's consumer, from the worker thread; None ends the stream."""


@dataclass(frozen=True, eq=False)
class Request:
    key: PromptKey
    sampling: SamplingParams
    stops: Stops
    emit: Emit
    submitted_at: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    pin: bool = False
    """Compute the prompt into a pinned sequence and answer nothing (the public prefix)."""
    draft: bool = False
    """Compute the prompt and answer nothing, at the lowest priority: what a user is still
    writing, read ahead of their message."""

    @property
    def answers(self) -> bool:
        return not (self.pin or self.draft)


class Phase(Enum):
    RESTORING = "restoring"
    """Waiting for a saved state to be read from its tier, off the worker thread."""
    SIDE = "side"
    """Being read by the side reader (``side.py``), whose state then comes into the sequence."""
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(eq=False)
class Slot:
    """A sequence of the context and what it holds (the tokens whose KV is in the pool)."""

    seq_id: int
    tokens: array[int] = field(default_factory=lambda: array("i"))
    public_tokens: int = 0
    owner: bytes = b""
    progress: Progress | None = None
    used_at: int = 0
    pinned: bool = False
    borrowed: int = 0
    """Leading tokens whose cells a pinned sequence holds too: they cost the pool nothing."""
    saving: Future[None] | None = None
    """The save of what the sequence held after its last answer, until it is done: the
    sequence is not evicted before, so that no lookup misses a state in between."""
    drafted_from: int | None = None
    """Where the tokens a draft computed start, until a message uses them; they are saved
    only when the sequence is evicted."""

    @property
    def key(self) -> PromptKey:
        return PromptKey(self.tokens, self.public_tokens, self.owner)

    @property
    def evictable(self) -> bool:
        return self.progress is None and (self.saving is None or self.saving.done())


@dataclass(eq=False)
class Progress:
    """An admitted request: its sequence and how far it has got."""

    request: Request
    slot: Slot
    max_new: int
    admitted_at: float
    text: AnswerText
    phase: Phase = Phase.PREFILL
    reuse: Reuse = field(default_factory=lambda: Reuse(0, None))
    restore: Restore | None = None
    fetched: Future[bytearray | None] | None = None
    next_token: int = -1
    completion: list[int] = field(default_factory=list)
    first_sample_at: float | None = None
    draft_tokens: int = 0
    """Of the tokens the sequence held for it at admission, those a draft had computed."""
    read_beside: bool = False
    """Handed to the side reader once: never again, whatever came of it."""
    passed_over: bool = False
    """A question left for the next answers' step, for a cheaper one: never twice."""

    @property
    def prompt_left(self) -> int:
        return len(self.request.key.tokens) - len(self.slot.tokens)

    @property
    def reserved(self) -> int:
        """Cells it may take in the pool: its prompt and answer, but what it borrows."""
        return len(self.request.key.tokens) + self.max_new - self.slot.borrowed


class AnswerText:
    """Turns sampled tokens into streamed text: UTF-8 across token boundaries, stop
    strings, and whitespace held until something follows it (so an answer ends without the
    blank line the model writes before the next turn, and starts without a leading space)."""

    def __init__(self, stops: Stops) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._scanner = StopScanner(stops)
        self._held_space = ""
        self.first_text_at: float | None = None

    @property
    def stopped(self) -> bool:
        return self._scanner.stopped

    @property
    def holding(self) -> bool:
        """Text sampled but not shown yet (a line break that may start a stop, spaces)."""
        return bool(self._held_space) or self._scanner.holding

    def feed(self, piece: bytes) -> str:
        text = self._held_space + self._scanner.feed(self._decoder.decode(piece))
        if self.first_text_at is None:
            text = text.lstrip()
        body = text.rstrip()
        self._held_space = text[len(body) :]
        return self._out(body)

    def flush(self) -> str:
        tail = (self._scanner.flush() + self._decoder.decode(b"", final=True)).rstrip()
        if self.first_text_at is None:
            tail = tail.lstrip()
        return self._out(self._held_space + tail if tail else "")

    def _out(self, text: str) -> str:
        if text and self.first_text_at is None:
            self.first_text_at = time.perf_counter()
        return text
