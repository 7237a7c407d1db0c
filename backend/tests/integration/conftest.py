from __future__ import annotations

import pytest

from chatbot.engines.embedded import EmbeddedEngine
from tests.conftest import LiveServer
from tests.waiting import wait_until


@pytest.fixture(autouse=True)
def idle_engine(live_server: LiveServer) -> None:
    """Each test starts on an idle engine: a stream an earlier test left is cancelled by the
    server once it notices the client has gone, which takes a moment."""
    engine = live_server.services.engine
    assert isinstance(engine, EmbeddedEngine)
    wait_until(lambda: not engine.busy and engine.queue_depth == 0)
