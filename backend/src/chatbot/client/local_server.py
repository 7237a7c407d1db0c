"""Servers on this machine's loopback, started, waited for and stopped one way.

- ``BackgroundServer``: any ASGI app on a background thread, for ``chatbot chat`` without
  ``--url`` (and the tests' in-process servers). The app is passed in, so the client still
  knows nothing of what it serves; it talks to it over HTTP like to any other server.
- ``ServerProcess``: a command run as a process of its own (the tests that kill or stop the
  chatbot, the benchmarks' servers, the model-server stack).

Both listen on a ``free_port()``, are ready once a URL answers 200 (``wait_until_ready``),
and fail at once, with what the server said, if it stops before that.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import Any, Self

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


class ServerProcess:
    """``command`` as a server process of its own: ``start`` returns once ``ready_url``
    answers 200, and raises ``ServerDidNotStart`` with the end of its log if it exits first
    or is not ready within ``ready_timeout`` (the process is then killed). ``stop`` asks it
    to end (SIGTERM) and kills it (SIGKILL) if it has not within its timeout. As a context
    manager: started on entry, stopped on exit.

    ``log``: a file its output is appended to (None: its output is dropped and its errors go
    where this process's go). ``own_session``: it leads a session of its own and every
    signal goes to its whole process group, so that stopping it also stops what it forked.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        ready_url: str,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        log: Path | None = None,
        name: str | None = None,
        ready_timeout: float = 180.0,
        poll_interval: float = 0.2,
        own_session: bool = False,
    ) -> None:
        self.command = list(command)
        self.ready_url = ready_url
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.log = log
        self.name = name or Path(self.command[0]).name
        self.ready_timeout = ready_timeout
        self.poll_interval = poll_interval
        self.own_session = own_session
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        if self.log is None:
            self.popen = self._spawn(subprocess.DEVNULL, None)
        else:
            with self.log.open("ab") as out:
                self.popen = self._spawn(out, subprocess.STDOUT)
        popen = self.popen
        try:
            wait_until_ready(
                lambda: answers(self.ready_url),
                alive=lambda: popen.poll() is None,
                timeout=self.ready_timeout,
                name=self.name,
                interval=self.poll_interval,
                details=self._failure_details,
            )
        except BaseException:
            self.kill()
            raise
        return self

    def _spawn(self, stdout: Any, stderr: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self.command,
            env=self.env,
            cwd=self.cwd,
            stdout=stdout,
            stderr=stderr,
            start_new_session=self.own_session,
        )

    def _failure_details(self) -> str:
        code = self.popen.poll() if self.popen is not None else None
        status = f" (exit status {code})" if code is not None else ""
        tail = self.tail()
        return f"{status}:\n{tail}" if tail else status

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def tail(self, lines: int = 40) -> str:
        """The last ``lines`` of its log ("" without one)."""
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def signal(self, signum: int) -> None:
        """To the process, or with ``own_session`` to its whole group."""
        if self.popen is None:
            return
        with suppress(ProcessLookupError):
            if self.own_session:
                os.killpg(self.popen.pid, signum)
            else:
                self.popen.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL: nothing of it runs after this."""
        if self.popen is None:
            return
        self.signal(signal.SIGKILL)
        self.popen.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL to whatever is left after ``timeout``; its exit status."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)
        # What it forked may outlive it: the group's SIGKILL reaches them too.
        if self.own_session or self.popen.poll() is None:
            self.signal(signal.SIGKILL)
        return self.popen.wait(timeout=30)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
