"""Past what the process keeps up with, new answers are refused at once: 503
``server_overloaded`` with ``Retry-After`` while connections wait in the accept queue.

The queue watched here is a real listening socket's, filled with connections nobody has
accepted, given to the app as ``chatbot serve`` gives it its own."""

from __future__ import annotations

import socket
from contextlib import ExitStack
from pathlib import Path

from fastapi.testclient import TestClient

from chatbot.api.app import create_app
from chatbot.services.limits import AcceptQueue
from tests.conftest import ALICE_KEY, make_settings


def test_new_answers_are_refused_while_connections_wait_to_be_accepted(
    model_path: Path, tmp_path: Path, listener: socket.socket
) -> None:
    queue = AcceptQueue(limit=2)
    queue.watch(listener)
    app = create_app(make_settings(model_path, tmp_path / "kv"), accept_queue=queue)
    headers = {"Authorization": f"Bearer {ALICE_KEY}"}
    with TestClient(app, headers=headers) as http, ExitStack() as waiting:
        conversation = http.post("/v1/conversations", json={"title": "busy"}).json()["id"]
        send = f"/v1/conversations/{conversation}/messages"
        completion = {"model": "any", "messages": [{"role": "user", "content": "Hi"}]}
        for _ in range(2):
            waiting.enter_context(socket.create_connection(listener.getsockname(), timeout=5))

        for refused in (
            http.post(send, json={"content": "Hello?", "stream": False}),
            http.post("/v1/chat/completions", json=completion),
        ):
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "2"
            assert refused.json()["error"]["code"] == "server_overloaded"
        # What starts no answer is still served, and the refused question was not stored.
        listed = http.get(f"/v1/conversations/{conversation}/messages")
        assert listed.status_code == 200
        assert listed.json()["data"] == []

        for _ in range(2):  # the process catches up
            accepted, _ = listener.accept()
            accepted.close()
        answered = http.post(send, json={"content": "Hello?", "stream": False, "max_tokens": 4})
        assert answered.status_code == 200, answered.text
