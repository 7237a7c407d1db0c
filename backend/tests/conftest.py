"""Shared fixtures: the real bundled model, and a real server on loopback driven over HTTP."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from chatbot.api.app import create_app
from chatbot.api.deps import Services
from chatbot.client.local_server import BackgroundServer
from chatbot.config import Settings
from chatbot.engines.model_files import bundled_model_path

ALICE_KEY = "alice-key-0123456789abcdef"
BOB_KEY = "bob-key-0123456789abcdef00"
CAROL_KEY = "carol-key-0123456789abcdef"
DAVE_KEY = "dave-key-0123456789abcdef0"  # used by one test only: a user with no history


@pytest.fixture
def anyio_backend() -> str:
    """The async tests run on asyncio only, the loop the server runs on: anyio's plugin would
    also run them on trio, which is installed (Selenium depends on it)."""
    return "asyncio"


@pytest.fixture(scope="session")
def model_path() -> Path:
    cache = Path(os.environ.get("CHATBOT_CACHE_DIR", Path.home() / ".cache" / "lmcache-chatbot"))
    return bundled_model_path(cache)


def make_settings(model_path: Path | None, kv_dir: Path, **overrides: object) -> Settings:
    """Settings for tests: small limits, short answers, greedy decoding, four users (Carol
    an operator), and the KV cache's disk tier in a folder of the test's own."""
    values: dict[str, object] = {
        "model_path": model_path,
        "kv_dir": kv_dir,
        "api_keys": f"{ALICE_KEY}=alice,{BOB_KEY}=bob,{CAROL_KEY}=carol,{DAVE_KEY}=dave",
        "operators": "carol",  # sees the whole cache's counters; the others their own
        "context_tokens": 4096,
        # One sequence: a conversation loses it to the next one and comes back from RAM,
        # which the tier tests count on; tests/integration/test_batching.py runs several.
        "parallel": 1,
        "kv_pool_tokens": 8192,
        "max_tokens": 32,
        "temperature": 0.0,
        "queue_size": 1,
        "max_streams_per_user": 2,
        "max_message_chars": 4000,
        "max_body_bytes": 64 * 1024,
        "threads": os.cpu_count() or 1,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A listening socket that nobody accepts on: its accept queue is the test's to fill."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock


@dataclass
class LiveServer:
    url: str
    app: FastAPI

    @property
    def services(self) -> Services:
        services: Services = self.app.state.services
        return services

    def client(self, key: str | None = ALICE_KEY, **kwargs: object) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kwargs)  # type: ignore[arg-type]

    def async_client(self, key: str | None = ALICE_KEY) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=60)


def serve_in_thread(app: FastAPI) -> Iterator[str]:
    server = BackgroundServer(
        app,
        ready_path=None,  # listening is enough: not every test app has /readyz
        ready_timeout=60,
        name="the test server",
        log_level="warning",
        graceful_shutdown_s=None,
        daemon=True,
    )
    server.start()
    try:
        yield server.url
    finally:
        server.stop(timeout=30)


@pytest.fixture(scope="session")
def live_server(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One real server on the real model for the whole session (loading it once)."""
    app = create_app(make_settings(model_path, tmp_path_factory.mktemp("kv")))
    for url in serve_in_thread(app):
        yield LiveServer(url=url, app=app)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server of the test session's own (see tests/postgres.py)."""
    from tests.postgres import postgres_server

    with postgres_server() as url:
        yield url


def store_url_for(request: pytest.FixtureRequest, kind: str, folder: Path) -> str:
    """A fresh, empty store of ``kind``: memory, sqlite or postgresql (a new database on the
    session's own server)."""
    if kind == "memory":
        return "memory://"
    if kind == "sqlite":
        return f"sqlite:///{folder / 'chatbot.db'}"
    from tests.postgres import fresh_database

    return fresh_database(request.getfixturevalue("postgres_url"))
