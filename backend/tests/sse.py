"""Reading Server-Sent Events in tests."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any


def parse_events(lines: Iterable[str]) -> Iterator[tuple[str, Any]]:
    """(event name, decoded data) for each event; the name is "message" when none is given."""
    event, data = "message", []
    for line in lines:
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            payload = "\n".join(data)
            yield event, payload if payload == "[DONE]" else json.loads(payload)
            event, data = "message", []
