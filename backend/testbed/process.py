"""A command run as a server process of its own: the tests that kill or stop the chatbot, the
benchmarks' servers, the model-server stack."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from chatbot.client.local_server import answers, wait_until_ready


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
