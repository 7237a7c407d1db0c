"""Server-Sent Events, read line by line as they arrive: the one parser of the chat client,
the ``openai`` engine (a model server's stream), the tests and the benchmarks.

A leaf: it imports nothing of the chatbot, so any layer may use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    event: str
    data: str


class SSEDecoder:
    """Fed one line at a time (without its line ending), returns an event's data when the
    blank line that ends it arrives, and None otherwise; ``event`` then names it ("message"
    when none is given). Comments (keep-alives) and unknown fields are skipped.

    A model server's stream runs through here once per token, so nothing is made per event
    but its data, and the usual line, ``data:`` with one line of data, costs one call, one
    comparison and one slice. ``parse_sse`` gives whole events."""

    __slots__ = ("_data", "_event", "event")

    def __init__(self) -> None:
        self.event = "message"
        self._event = "message"
        self._data: str | None = None

    def feed(self, line: str) -> str | None:
        if line.startswith("data:"):
            # The format allows one space after the colon; it is not part of the value.
            self._append(line[6:] if line[5:6] == " " else line[5:])
            return None
        if line:
            if line[0] != ":":  # not a comment
                field, _, value = line.partition(":")
                value = value[1:] if value[:1] == " " else value
                if field == "event":
                    self._event = value
                elif field == "data":  # "data" alone: an empty line of data
                    self._append(value)
            return None
        data = self._data
        if data is not None:
            self.event = self._event
            self._data = None
        self._event = "message"
        return data

    def _append(self, value: str) -> None:
        self._data = value if self._data is None else f"{self._data}\n{value}"


def parse_sse(lines: Iterable[str]) -> Iterator[ServerSentEvent]:
    """Each event of ``lines`` as soon as the blank line that ends it arrives. An event the
    stream cut off before its blank line is dropped, as browsers do."""
    decoder = SSEDecoder()
    for line in lines:
        data = decoder.feed(line)
        if data is not None:
            yield ServerSentEvent(decoder.event, data)
