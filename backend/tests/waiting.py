"""Waiting, bounded, for something a server does after a client has gone."""

from __future__ import annotations

import time
from collections.abc import Callable

from chatbot.engines.base import Engine


def wait_until(condition: Callable[[], bool], *, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {condition}")
        time.sleep(0.05)


def engine_running(engine: Engine) -> int:
    """Requests holding one of the engine's sequences (prefilling or answering), from the
    batch counters an engine that batches reports; 0 for one that reports none."""
    stats = engine.batch_stats()
    return stats.running if stats is not None else 0


def engine_idle(engine: Engine) -> bool:
    """Nothing running and nothing waiting."""
    return engine_running(engine) == 0 and engine.queue_depth == 0
