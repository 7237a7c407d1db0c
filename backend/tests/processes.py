"""The chatbot as a process of its own (``chatbot serve``), for tests that kill it, stop it
or run several of it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.conftest import ALICE_KEY, BOB_KEY, free_port


class ChatbotProcess:
    def __init__(self, model_path: Path, kv_dir: Path, log: Path, **settings: object) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        values: dict[str, object] = {
            "HOST": "127.0.0.1",
            "PORT": self.port,
            "MODEL_PATH": model_path,
            "KV_DIR": kv_dir,
            "API_KEYS": f"{ALICE_KEY}=alice,{BOB_KEY}=bob",
            "CONTEXT_TOKENS": 4096,
            "TEMPERATURE": 0,
            "MAX_TOKENS": 16,
            "LOG_LEVEL": "info",
        }
        values.update({k.upper(): v for k, v in settings.items()})
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHATBOT_")}
        env |= {f"CHATBOT_{k}": str(v) for k, v in values.items()}
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "chatbot", "serve"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chatbot exited with {self.process.returncode}: {self.logs()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"chatbot did not become ready: {self.logs()}")

    def client(self, key: str = ALICE_KEY) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=60
        )

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: nothing of the process runs after it."""
        self.process.kill()
        self.process.wait(timeout=30)

    def terminate(self, timeout: float = 60) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


@contextmanager
def chatbot_process(
    model_path: Path, kv_dir: Path, log: Path, **settings: object
) -> Iterator[ChatbotProcess]:
    server = ChatbotProcess(model_path, kv_dir, log, **settings)
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.kill()


__all__ = ["ALICE_KEY", "BOB_KEY", "ChatbotProcess", "chatbot_process"]
