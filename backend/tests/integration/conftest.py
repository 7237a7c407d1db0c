from __future__ import annotations

import pytest

from tests.conftest import LiveServer
from tests.waiting import engine_idle, wait_until


@pytest.fixture(autouse=True)
def idle_engine(request: pytest.FixtureRequest) -> None:
    """A test on the shared real-model server starts on an idle engine: a stream an earlier
    test left is cancelled by the server once it notices the client has gone, which takes a
    moment. Tests that do not use that server are left alone (the model is not loaded for
    them)."""
    if "live_server" not in request.fixturenames:
        return
    live_server: LiveServer = request.getfixturevalue("live_server")
    engine = live_server.state.engine
    wait_until(lambda: engine_idle(engine))
