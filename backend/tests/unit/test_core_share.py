"""The engine's thread count follows what the rest of the machine keeps busy, on readings
of /proc/stat and the process's CPU time played by the test (a 2-core machine, 100
jiffies a second per core)."""

from __future__ import annotations

import pytest

from chatbot.engines.batching.cores import CoreShare


class Machine:
    def __init__(self) -> None:
        self.at = 0.0
        self.busy = 0
        self.total = 0
        self.own = 0.0

    def second(self, *, others: float, ours: float) -> None:
        """One second in which other processes kept ``others`` cores busy, we ``ours``."""
        self.at += 1.0
        self.total += 200
        self.busy += round((others + ours) * 100)
        self.own += ours

    def read(self) -> tuple[float, int, int, float]:
        return self.at, self.busy, self.total, self.own


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> Machine:
    played = Machine()
    monkeypatch.setattr("chatbot.engines.batching.cores.os.cpu_count", lambda: 2)
    monkeypatch.setattr("chatbot.engines.batching.cores.time.monotonic", lambda: played.at)
    monkeypatch.setattr(CoreShare, "_read", lambda self: played.read())
    return played


def test_a_busy_neighbour_takes_a_thread_and_gives_it_back(machine: Machine) -> None:
    share = CoreShare(max_threads=2)
    machine.second(others=0.1, ours=1.9)
    assert share.update() is None  # a quiet machine: all cores
    machine.second(others=1.0, ours=1.0)  # a busy loop beside us
    assert share.update() == 1
    machine.second(others=1.0, ours=1.0)
    assert share.update() is None
    assert share.others == pytest.approx(1.0)
    machine.second(others=0.4, ours=1.0)  # between the two thresholds: no change
    assert share.update() is None
    machine.second(others=0.1, ours=1.0)
    assert share.update() == 2


def test_it_samples_at_most_once_a_second(machine: Machine) -> None:
    share = CoreShare(max_threads=2)
    machine.at += 0.5
    machine.busy += 200
    machine.total += 200
    assert share.update() is None
    assert share.threads == 2
