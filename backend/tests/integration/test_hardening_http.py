"""Requests are bounded before the app sees them: a request head too large gets 431, a request
that does not arrive in time gets 408, connections past the cap get 503; each with the API's
JSON error, then a close. Real sockets against a real ``chatbot serve`` process on the real
model, whose memory is read from /proc."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.processes import ALICE_KEY, ChatbotProcess, chatbot_process

RECEIVE_TIMEOUT_S = 2.0
MAX_HEADER_BYTES = 8192
MAX_CONNECTIONS = 40


@pytest.fixture(scope="module")
def server(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatbotProcess]:
    folder = tmp_path_factory.mktemp("bounded")
    with chatbot_process(
        model_path,
        folder / "kv",
        folder / "server.log",
        receive_timeout_seconds=RECEIVE_TIMEOUT_S,
        max_header_bytes=MAX_HEADER_BYTES,
        max_connections=MAX_CONNECTIONS,
    ) as process:
        yield process


def connect(server: ChatbotProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], Any, float]:
    """Status, headers, JSON body, and the seconds until the server closed the connection."""
    started = time.monotonic()
    data = b""
    while chunk := _recv(sock):
        data += chunk
    closed_after = time.monotonic() - started
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, json.loads(body), closed_after


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except ConnectionResetError:
        return b""


def rss_kib(server: ChatbotProcess) -> int:
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_slow_header_is_cut_off_within_the_receive_timeout(server: ChatbotProcess) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        # A byte every 0.3 s: each one would reset uvicorn's own keep-alive timer.
        for _ in range(int(RECEIVE_TIMEOUT_S / 0.3) + 3):
            try:
                sock.sendall(b"x")
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.3)
        status, headers, body, _ = read_response(sock)
        elapsed = time.monotonic() - started
    assert status == 408
    assert body["error"]["code"] == "request_timeout"
    assert headers["connection"] == "close"
    assert RECEIVE_TIMEOUT_S - 0.5 < elapsed < RECEIVE_TIMEOUT_S + 1.5


def test_a_connection_that_sends_nothing_is_closed_within_the_receive_timeout(
    server: ChatbotProcess,
) -> None:
    with connect(server) as sock:
        status, _, body, closed_after = read_response(sock)
    assert status == 408
    assert body["error"]["code"] == "request_timeout"
    assert closed_after < RECEIVE_TIMEOUT_S + 1.5


def test_a_slow_body_is_cut_off_and_its_part_never_handled(server: ChatbotProcess) -> None:
    with server.client() as client:
        before = len(client.get("/v1/conversations", params={"limit": 100}).json()["data"])
        with connect(server) as sock:
            # "{}" is a whole JSON body: were the part that came taken for the body, a
            # conversation would be created.
            sock.sendall(
                b"POST /v1/conversations HTTP/1.1\r\nHost: x\r\n"
                b"Authorization: Bearer " + ALICE_KEY.encode() + b"\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{}"
            )
            status, _, body, closed_after = read_response(sock)
        after = len(client.get("/v1/conversations", params={"limit": 100}).json()["data"])
    assert status == 408, body
    assert closed_after < RECEIVE_TIMEOUT_S + 1.5
    assert after == before


def test_an_oversized_header_is_refused_with_431(server: ChatbotProcess) -> None:
    with connect(server) as sock:
        sock.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "
            + b"a" * (MAX_HEADER_BYTES + 1)
            + b"\r\n\r\n"
        )
        status, headers, body, _ = read_response(sock)
    assert status == 431
    assert body["error"] == {
        "type": "invalid_request_error",
        "message": f"the request line and headers exceed {MAX_HEADER_BYTES} bytes",
        "code": "headers_too_large",
    }
    assert headers["connection"] == "close"


def test_a_header_just_under_the_limit_is_served(server: ChatbotProcess) -> None:
    with connect(server) as sock:
        sock.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: "
            + b"a" * (MAX_HEADER_BYTES - 200)
            + b"\r\n\r\n"
        )
        status, _, body, _ = read_response(sock)
    assert (status, body) == (200, {"status": "ok"})


def _send_endless_header(server: ChatbotProcess, outcome: dict[int, int], index: int) -> None:
    """Sends up to 5 MB of one header, 64 KiB at a time, until the server answers."""
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            for _ in range(80):
                sock.sendall(b"a" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            outcome[index] = read_response(sock)[0]
        except (ValueError, IndexError):
            outcome[index] = 0  # reset before the answer could be read: refused all the same


def test_thirty_endless_headers_leave_memory_flat_and_other_users_served(
    server: ChatbotProcess,
) -> None:
    with server.client() as client:
        conversation = client.post("/v1/conversations", json={"agent": "assistant"}).json()["id"]
        assert client.get("/v1/conversations").status_code == 200  # warm
        before = rss_kib(server)
        outcome: dict[int, int] = {}
        threads = [
            threading.Thread(target=_send_endless_header, args=(server, outcome, i))
            for i in range(30)
        ]
        for thread in threads:
            thread.start()
        # Meanwhile, another user is served: a listing and a real answer.
        assert client.get("/v1/conversations").status_code == 200
        answer = client.post(
            f"/v1/conversations/{conversation}/messages",
            json={"content": "What is the capital of France?", "stream": False, "max_tokens": 4},
        )
        assert answer.status_code == 200, answer.text
        for thread in threads:
            thread.join(timeout=60)
        after = rss_kib(server)
    assert set(outcome.values()) <= {431, 0}
    assert list(outcome.values()).count(431) >= 25
    # 30 x 5 MB would be 150 MB held; what is bounded is a few MiB of buffers at most.
    assert after - before < 20 * 1024, f"RSS grew from {before} KiB to {after} KiB"


def test_past_the_connection_cap_a_request_gets_503_and_the_rest_are_served(
    server: ChatbotProcess,
) -> None:
    with ExitStack() as stack:
        idle = [stack.enter_context(connect(server)) for _ in range(MAX_CONNECTIONS)]
        time.sleep(0.2)  # the server has accepted them all
        with connect(server) as extra:
            extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, body, _ = read_response(extra)
        assert status == 503
        assert body["error"]["code"] == "too_many_connections"
        assert headers["retry-after"] == "2"
        # One of the held connections, still under the cap, is served.
        idle[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, _, body, _ = read_response(idle[0])
        assert (status, body) == (200, {"status": "ok"})


def test_keep_alive_between_requests_is_unchanged(server: ChatbotProcess) -> None:
    """A second request on a kept-alive connection is served, and the receive timeout does
    not run while the connection waits between requests."""
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        time.sleep(1.0)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, _, body, _ = read_response(sock)
    assert (status, body) == (200, {"status": "ok"})
