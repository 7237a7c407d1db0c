"""The chatbot as a process of its own (``chatbot serve``), for tests that kill it, stop it
or run several of it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from testbed.process import ServerProcess

from chatbot.client.local_server import free_port
from tests.conftest import ALICE_KEY, BOB_KEY


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
        self.server = ServerProcess(
            [sys.executable, "-m", "chatbot", "serve"],
            ready_url=f"{self.url}/readyz",
            env=env,
            log=log,
            name="chatbot",
            ready_timeout=120,
        ).start()

    @property
    def process(self) -> subprocess.Popen[bytes]:
        assert self.server.popen is not None
        return self.server.popen

    def client(self, key: str = ALICE_KEY) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=60
        )

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: nothing of the process runs after it."""
        self.server.kill()

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
