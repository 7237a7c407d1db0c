"""The conversation API as the fast tests drive it: plain HTTP, nothing of the server's
internals, so these tests hold while the code behind the API is reorganised."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import httpx

from tests.sse import parse_events

Event = tuple[str, Any]


def new_conversation(client: httpx.Client, **body: Any) -> str:
    response = client.post("/v1/conversations", json=body)
    assert response.status_code == 201, response.text
    return cast(str, response.json()["id"])


def messages_path(conversation_id: str) -> str:
    return f"/v1/conversations/{conversation_id}/messages"


def stream_turn(client: httpx.Client, conversation_id: str, content: str) -> list[Event]:
    """One streamed turn, read to its end: ``(event name, data)`` in order."""
    path = messages_path(conversation_id)
    with client.stream("POST", path, json={"content": content}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(parse_events(response.iter_lines()))


@contextmanager
def open_turn(
    client: httpx.Client, conversation_id: str, content: str
) -> Iterator[Iterator[Event]]:
    """A streamed turn left open: yields its events as they come; leaving the block
    closes the connection, as a client that goes away or presses Stop does."""
    path = messages_path(conversation_id)
    with client.stream("POST", path, json={"content": content}) as response:
        assert response.status_code == 200, response.read()
        yield parse_events(response.iter_lines())


def messages(client: httpx.Client, conversation_id: str) -> list[dict[str, Any]]:
    response = client.get(messages_path(conversation_id))
    assert response.status_code == 200, response.text
    return cast(list[dict[str, Any]], response.json()["data"])


def ends(events: list[Event]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``message.start`` and ``message.end`` payloads of a turn that ended well."""
    names = [name for name, _ in events]
    assert names[0] == "message.start", events
    assert names[-1] == "message.end", events
    assert set(names[1:-1]) <= {"token"}, events
    return events[0][1], events[-1][1]


def streamed_text(events: list[Event]) -> str:
    return "".join(data["delta"] for name, data in events if name == "token")
