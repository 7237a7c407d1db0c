"""Stop strings over a token stream whose text arrives in arbitrary pieces, and the one rule
by which every engine builds a request's stops."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from chatbot.engines.chat_format import LINE_BREAKS, STOPS, turn_line


@dataclass(frozen=True, slots=True)
class Stops:
    """Where an answer ends, besides the model's end-of-generation tokens."""

    strings: tuple[str, ...] = ()
    """Exact strings, the prompt format's first, then the client's, each once. A model
    server is handed the first few of them (as many as it takes)."""
    turns: bool = False
    """Also end at any line that reads as a turn of the transcript (``turn_line``): any
    case, quoted, after blanks or invisible characters. The exact strings cannot list
    those forms, so the engines' own scanners watch for them."""


def request_stops(prompt_format: Stops, client: Sequence[str]) -> Stops:
    """The one rule every engine follows: the prompt format's stops, then the client's, in
    order, each once."""
    strings = tuple(dict.fromkeys(s for s in (*prompt_format.strings, *client) if s))
    return Stops(strings, prompt_format.turns)


class StopScanner:
    """Passes text through until a stop appears, holding back a possible prefix of one.

    Text that could still become the start of a stop is kept until the next piece decides
    it, so a stop is never streamed to a client, even split over tokens.
    """

    def __init__(self, stops: Stops) -> None:
        self._stops = stops.strings
        self._turns = stops.turns
        self._held = ""
        self.stopped = False
        self.matched: str | None = None
        """The stop that ended the text: one of the strings, or the head of a line read as
        a turn (from its line break to the colon)."""

    def feed(self, piece: str) -> str:
        """Add a piece; returns the text that is now safe to emit."""
        if self.stopped:
            return ""
        text = self._held + piece
        found = [(i, stop) for stop in self._stops if (i := text.find(stop)) >= 0]
        if self._turns and (turn := self._first_turn(text)) is not None:
            found.append(turn)
        if found:
            cut, self.matched = min(found)
            self.stopped = True
            self._held = ""
            return text[:cut]
        keep = max(self._longest_partial_stop(text), self._open_turn(text))
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    @property
    def holding(self) -> bool:
        """Text is held back until the next piece says whether it starts a stop."""
        return bool(self._held)

    def flush(self) -> str:
        """The held-back text, once the stream ends without a stop."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_partial_stop(self, text: str) -> int:
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    @staticmethod
    def _first_turn(text: str) -> tuple[int, str] | None:
        for i, c in enumerate(text):
            if c in LINE_BREAKS and turn_line(text[i + 1 :]):
                colon = text.index(":", i)
                return i, text[i : colon + 1]
        return None

    @staticmethod
    def _open_turn(text: str) -> int:
        """How much of the text's tail is a line that may still become a turn, from its
        line break on."""
        for i in range(len(text) - 1, -1, -1):
            if text[i] in LINE_BREAKS:
                return len(text) - i if turn_line(text[i + 1 :]) is None else 0
        return 0


TRANSCRIPT_STOPS = Stops(STOPS, turns=True)
"""The transcript's: where the model starts a turn of its own, or copies a quoted one."""
