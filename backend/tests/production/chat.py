"""Talking to the chatbot in front of vLLM, as the production tests do: one streamed turn
through the native API, checked to have ended by itself, and texts of known length."""

from __future__ import annotations

import re
from typing import Any

import httpx

from tests.conftest import ALICE_KEY
from tests.sse import parse_events

# A turn of the model's own making: the template's role words at a line start.
INVENTED_TURN = re.compile(r"^\s*(User|Assistant|System)\s*:", re.MULTILINE)
# About 350 tokens of the user's own text, so that a first prompt spans two or more of
# LMCache's 256-token chunks.
NOTES = "My notes on the workshop: " + " ".join(
    f"Shelf {n} holds {n * 3} widgets, {n + 2} gears and {n * 7} screws." for n in range(1, 21)
)
# A question the model answers at length, on one line (hundreds of tokens, where most
# questions get one short sentence): an answer still being written when a test acts.
LONG_ANSWER = (
    "Write the numbers from one to two hundred in words, separated by commas, on one line: "
    "one, two, three, four, five,"
)


def client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ALICE_KEY}"}, timeout=180)


def turn(http: httpx.Client, conversation_id: str, content: str, **options: Any) -> dict[str, Any]:
    """One streamed turn through the native API; the ``message.end`` event's data."""
    path = f"/v1/conversations/{conversation_id}/messages"
    with http.stream("POST", path, json={"content": content, **options}) as response:
        assert response.status_code == 200, response.read()
        events = list(parse_events(response.iter_lines()))
    name, data = events[-1]
    assert name == "message.end", events
    assert data["status"] == "complete"
    assert data["content"].strip()
    # The answer stopped by itself: no turn of the model's invention after it.
    assert not INVENTED_TURN.search(data["content"]), data["content"]
    end: dict[str, Any] = data
    return end


def hang_up_at_first_token(http: httpx.Client, conversation_id: str, content: str) -> None:
    """A streamed turn the client leaves at its first token: the answer ends ``cancelled``."""
    path = f"/v1/conversations/{conversation_id}/messages"
    with http.stream("POST", path, json={"content": content}) as response:
        assert response.status_code == 200, response.read()
        names = (name for name, _ in parse_events(response.iter_lines()))
        assert "token" in names  # stops reading at the first token
