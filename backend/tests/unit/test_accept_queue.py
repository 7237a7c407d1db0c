"""The accept queue as the overload signal: read from a real listening socket's TCP_INFO."""

from __future__ import annotations

import socket
from contextlib import ExitStack

import pytest

from chatbot.models.errors import ServiceUnavailable
from chatbot.services.limits import AcceptQueue


def connect(listener: socket.socket, count: int, stack: ExitStack) -> None:
    """``count`` connections the kernel completes and nobody accepts."""
    for _ in range(count):
        stack.enter_context(socket.create_connection(listener.getsockname(), timeout=5))


def test_it_counts_the_connections_nobody_has_accepted(listener: socket.socket) -> None:
    queue = AcceptQueue(limit=3)
    queue.watch(listener)
    assert queue.waiting() == 0
    with ExitStack() as stack:
        connect(listener, 2, stack)
        assert queue.waiting() == 2
        queue.check()  # under the limit
        connect(listener, 1, stack)
        with pytest.raises(ServiceUnavailable) as refused:
            queue.check()
        assert refused.value.code == "server_overloaded"
        assert refused.value.retry_after == 2
        accepted, _ = listener.accept()
        accepted.close()
        assert queue.waiting() == 2
        queue.check()


def test_no_limit_or_no_socket_never_refuses(listener: socket.socket) -> None:
    unwatched = AcceptQueue(limit=1)
    assert unwatched.waiting() is None
    unwatched.check()
    off = AcceptQueue(limit=0)
    off.watch(listener)
    with ExitStack() as stack:
        connect(listener, 2, stack)
        off.check()
