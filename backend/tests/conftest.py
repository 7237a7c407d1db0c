"""Shared fixtures: the real bundled model, servers on loopback driven over HTTP, stores, and
the test tiers.

Tiers, marked here by what a test needs (see ``pytest_collection_modifyitems``): ``model``
(the real llama.cpp model), ``postgres`` (a PostgreSQL server of the session's own),
``browser`` (tests/e2e: Chromium), ``vllm`` (tests/production: vLLM and LMCache),
``prometheus`` (Debian's prometheus, promtool or docker-compose). What has none of them is the
fast tier: ``make test-fast``."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import httpx
import pytest
from fastapi import FastAPI

from chatbot.api.app import create_app
from chatbot.api.deps import AppState
from chatbot.client.local_server import BackgroundServer
from chatbot.config import Settings
from chatbot.engines.base import Engine
from chatbot.engines.model_files import bundled_model_path

ALICE_KEY = "alice-key-0123456789abcdef"
BOB_KEY = "bob-key-0123456789abcdef00"
CAROL_KEY = "carol-key-0123456789abcdef"
DAVE_KEY = "dave-key-0123456789abcdef0"  # used by one test only: a user with no history

TESTS = Path(__file__).resolve().parent
TIER_BY_FOLDER = {"e2e": "browser", "production": "vllm"}
"""Every test in these folders needs what the marker names."""
TOOL_FIXTURES = frozenset({"prometheus_binary", "promtool", "docker_compose"})
"""A test using one of these fixtures runs a tool ``make prometheus docker-compose`` installs."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks each test with the tiers it needs: ``browser`` and ``vllm`` by its folder,
    ``model`` when it uses the real model (its fixtures reach ``model_path``), ``postgres``
    when it starts PostgreSQL (``postgres_url``, or the ``postgresql`` store), ``prometheus``
    when it runs one of the ``TOOL_FIXTURES``."""
    for item in items:
        folder = item.path.relative_to(TESTS).parts[0] if item.path.is_relative_to(TESTS) else ""
        if folder in TIER_BY_FOLDER:
            item.add_marker(TIER_BY_FOLDER[folder])
        names = getattr(item, "fixturenames", ())
        if "model_path" in names:
            item.add_marker("model")
        callspec = getattr(item, "callspec", None)
        store = callspec.params.get("store_url") if callspec is not None else None
        if "postgres_url" in names or store == "postgresql":
            item.add_marker("postgres")
        if TOOL_FIXTURES & set(names):
            item.add_marker("prometheus")


@pytest.fixture
def anyio_backend() -> str:
    """The async tests run on asyncio only, the loop the server runs on: anyio's plugin would
    also run them on trio, which is installed (Selenium depends on it)."""
    return "asyncio"


@pytest.fixture(scope="session")
def model_path() -> Path:
    cache = Path(os.environ.get("CHATBOT_CACHE_DIR", Path.home() / ".cache" / "lmcache-chatbot"))
    return bundled_model_path(cache)


def make_settings(model_path: Path | None, kv_dir: Path, **overrides: Any) -> Settings:
    """Settings for tests: small limits, short answers, greedy decoding, four users (Carol
    an operator), and the KV cache's disk tier in a folder of the test's own."""
    values: dict[str, Any] = {
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
    return Settings(_env_file=None, **values)


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
    def state(self) -> AppState:
        state: AppState = self.app.state.chatbot
        return state

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


class Servers:
    """Starts chatbot servers for tests, the one way: ``make_settings`` with the test's
    overrides, ``create_app``, and the app served by uvicorn in a thread on loopback. Every
    server it started stops when it is closed (the ``server`` fixtures close it after the
    test or module)."""

    def __init__(self, folders: pytest.TempPathFactory) -> None:
        self._folders = folders
        self._stack = ExitStack()
        self._running: dict[str, ExitStack] = {}

    def __call__(self, model_path: Path | None = None, /, **overrides: object) -> LiveServer:
        """A running server on ``make_settings(model_path, <a new kv folder>, **overrides)``.
        ``model_path``: the real model (the ``model_path`` fixture); none for a server on
        another engine (``engine="simulated"``, ``engine="openai"``)."""
        return self._start(model_path, None, overrides)

    def on_engine(
        self,
        engine: Engine | Callable[[Settings], Engine],
        model_path: Path | None = None,
        /,
        **overrides: object,
    ) -> LiveServer:
        """As calling it, with ``engine`` in place of the configured one: an Engine, or a
        function of the settings that makes one (to wrap the configured engine)."""
        return self._start(model_path, engine, overrides)

    def _start(
        self,
        model_path: Path | None,
        engine: Engine | Callable[[Settings], Engine] | None,
        overrides: dict[str, object],
    ) -> LiveServer:
        settings = make_settings(model_path, self._folders.mktemp("kv"), **overrides)
        chosen = engine(settings) if callable(engine) else engine
        app = create_app(settings, engine=chosen)
        serving = ExitStack()
        url = serving.enter_context(contextmanager(serve_in_thread)(app))
        self._running[url] = self._stack.enter_context(serving)
        return LiveServer(url=url, app=app)

    def stop(self, server: LiveServer) -> None:
        """Stop one server now, as a process stopping would (its lifespan's shutdown runs)."""
        self._running.pop(server.url).close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


@pytest.fixture
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """``server(**settings) -> LiveServer``: servers of the test's own, stopped after it."""
    with Servers(tmp_path_factory) as servers:
        yield servers


@pytest.fixture(scope="module")
def module_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """As ``server``, for servers a module's tests share."""
    with Servers(tmp_path_factory) as servers:
        yield servers


@pytest.fixture(scope="session")
def live_server(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One real server on the real model for the whole session (loading it once)."""
    with Servers(tmp_path_factory) as servers:
        yield servers(model_path)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server of the test session's own (see tests/postgres.py)."""
    from tests.postgres import postgres_server

    with postgres_server() as url:
        yield url


def debian_tool(name: str, make_target: str) -> str:
    """The path of a tool the tests run; missing, an error naming the target installing it."""
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run `make {make_target}`")
    return found


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    """Debian's Prometheus (``make prometheus``)."""
    return debian_tool("prometheus", "prometheus")


@pytest.fixture(scope="session")
def promtool() -> str:
    """Prometheus' checker, from the same Debian package."""
    return debian_tool("promtool", "prometheus")


@pytest.fixture(scope="session")
def docker_compose() -> str:
    """Debian's ``docker-compose`` (``make docker-compose``): ``config`` needs no daemon."""
    return debian_tool("docker-compose", "docker-compose")


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store of each kind: memory, sqlite, and postgresql (a new database on
    the session's own server; those tests are marked ``postgres``). A test that needs only
    some kinds narrows them: ``@pytest.mark.parametrize("store_url", ["sqlite"],
    indirect=True)``."""
    kind = request.param
    if kind == "memory":
        return "memory://"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'chatbot.db'}"
    if kind != "postgresql":
        raise ValueError(f"no store of kind {kind!r}: memory, sqlite or postgresql")
    from tests.postgres import fresh_database

    return fresh_database(request.getfixturevalue("postgres_url"))
