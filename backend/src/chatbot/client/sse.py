"""Server-Sent Events, read line by line as they arrive."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSentEvent:
    event: str
    data: str


def parse_sse(lines: Iterable[str]) -> Iterator[ServerSentEvent]:
    """Each event as soon as the blank line that ends it arrives; the name is "message"
    when none is given. Comments (keep-alives) and unknown fields are skipped."""
    event, data = "message", list[str]()
    for line in lines:
        if not line:
            if data:
                yield ServerSentEvent(event, "\n".join(data))
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        # The format allows one space after the colon; it is not part of the value.
        value = value.removeprefix(" ")
        if field == "event":
            event = value
        elif field == "data":
            data.append(value)
    # An event the stream cut off before its blank line is dropped, as browsers do.
