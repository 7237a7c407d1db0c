"""A server of the client's own: any ASGI app on a free loopback port, on a background
thread, for ``chatbot chat`` without ``--url``. The app is passed in, so the client still
knows nothing of what it serves; it talks to it over HTTP like to any other server."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import uvicorn


class ServerDidNotStart(Exception):
    pass


class BackgroundServer:
    def __init__(self, app: Callable[..., Any], *, ready_timeout: float = 300.0) -> None:
        self.port = _free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._ready_timeout = ready_timeout
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            # The terminal belongs to the conversation: only failures are worth printing.
            log_level="error",
            access_log=False,
            timeout_graceful_shutdown=5,
        )
        self._server = uvicorn.Server(config)
        # Not a daemon: the app's shutdown (the engine, the store) must run to its end.
        self._thread = threading.Thread(target=self._server.run, name="chatbot-server")

    def start(self) -> None:
        """Returns once ``/readyz`` says the model is loaded."""
        self._thread.start()
        deadline = time.monotonic() + self._ready_timeout
        try:
            while not self._ready():
                if not self._thread.is_alive():
                    raise ServerDidNotStart("the embedded server stopped while starting")
                if time.monotonic() > deadline:
                    raise ServerDidNotStart(
                        f"the embedded server was not ready after {self._ready_timeout:.0f} s"
                    )
                time.sleep(0.1)
        except BaseException:
            # Ctrl-C while the model loads included: the thread must not outlive the command.
            self.stop()
            raise

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join()

    def _ready(self) -> bool:
        if not self._server.started:
            return False
        try:
            return httpx.get(f"{self.url}/readyz", timeout=5).status_code == httpx.codes.OK
        except httpx.TransportError:
            return False


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
