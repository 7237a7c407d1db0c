"""Reading Server-Sent Events in tests: the product's parser (``chatbot.sse``), with each
event's data decoded."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from chatbot.sse import parse_sse


def parse_events(lines: Iterable[str]) -> Iterator[tuple[str, Any]]:
    """(event name, decoded data) for each event; the name is "message" when none is given,
    and OpenAI's closing ``[DONE]`` is kept as the string."""
    for event in parse_sse(lines):
        yield event.event, event.data if event.data == "[DONE]" else json.loads(event.data)
