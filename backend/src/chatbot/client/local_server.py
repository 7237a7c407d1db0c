"""A server on this machine's loopback: ``BackgroundServer`` runs any ASGI app on a
background thread, for ``chatbot chat`` without ``--url`` (and the tests' in-process
servers). The app is passed in, so the client still knows nothing of what it serves; it
talks to it over HTTP like to any other server.

It listens on a ``free_port()``, is ready once a URL answers 200 (``wait_until_ready``), and
fails at once if it stops before that. The tests' and benchmarks' server processes
(``testbed.process.ServerProcess``) are started and waited for with the same functions.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import uvicorn


class ServerDidNotStart(RuntimeError):
    pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (now: take it soon)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def answers(url: str) -> bool:
    """Whether ``url`` answers a GET with 200."""
    try:
        return httpx.get(url, timeout=5).status_code == httpx.codes.OK
    except httpx.TransportError:
        return False


def wait_until_ready(
    ready: Callable[[], bool],
    *,
    alive: Callable[[], bool],
    timeout: float,
    name: str,
    interval: float = 0.2,
    details: Callable[[], str] = lambda: "",
) -> None:
    """Returns once ``ready()``; raises ``ServerDidNotStart`` as soon as the server is not
    ``alive()``, or after ``timeout`` seconds, with ``details()`` (its log, say)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if not alive():
            raise ServerDidNotStart(f"{name} stopped while starting{details()}")
        if time.monotonic() > deadline:
            raise ServerDidNotStart(f"{name} was not ready after {timeout:.0f} s{details()}")
        time.sleep(interval)


class BackgroundServer:
    def __init__(
        self,
        app: Callable[..., Any],
        *,
        ready_path: str | None = "/readyz",
        ready_timeout: float = 300.0,
        name: str = "the embedded server",
        log_level: str = "error",
        graceful_shutdown_s: int | None = 5,
        daemon: bool = False,
    ) -> None:
        """``ready_path``: what must answer 200 before ``start`` returns (None: uvicorn
        listening is enough). ``graceful_shutdown_s``: how long ``stop`` lets open
        connections finish before uvicorn cancels them (None: as long as they take)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._ready_url = None if ready_path is None else f"{self.url}{ready_path}"
        self._ready_timeout = ready_timeout
        self._name = name
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            # The terminal belongs to the conversation: only failures are worth printing.
            log_level=log_level,
            access_log=False,
            timeout_graceful_shutdown=graceful_shutdown_s,
        )
        self._server = uvicorn.Server(config)
        # Not a daemon by default: the app's shutdown (the engine, the store) must run to
        # its end.
        self._thread = threading.Thread(
            target=self._server.run, name="chatbot-server", daemon=daemon
        )

    def start(self) -> None:
        """Returns once ``ready_path`` (by default ``/readyz``: the model is loaded)
        answers."""
        self._thread.start()
        try:
            wait_until_ready(
                self._ready,
                alive=self._thread.is_alive,
                timeout=self._ready_timeout,
                name=self._name,
                interval=0.1,
            )
        except BaseException:
            # Ctrl-C while the model loads included: the thread must not outlive the command.
            self.stop()
            raise

    def stop(self, timeout: float | None = None) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _ready(self) -> bool:
        if not self._server.started:
            return False
        return self._ready_url is None or answers(self._ready_url)
