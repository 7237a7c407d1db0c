"""How many of the machine's cores the engine's steps should use, from what the rest of the
machine keeps busy.

llama.cpp's threads meet at a barrier after every operation of a step: when another process
takes one of the cores, the step waits for the thread that lost it, and on a 2-core machine a
single busy neighbour made every step several times slower (a decode step's p90 went from 14
to 144 ms). One thread fewer than the cores the others leave free avoids that: measured with
one busy-looping process beside it, one thread decoded at 19 ms (p90 20 ms) and prefilled 512
tokens in 1.4 s, against 1.7 s for two. When the machine is quiet, all cores are faster (14 ms,
0.8 s), so the count follows the load: sampled from ``/proc/stat`` about once a second, less
this process's own CPU time, with some hysteresis so that a short burst changes nothing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

SAMPLE_EVERY_S = 1.0
# Cores' worth of other work above which a thread is given up, and below which it is
# taken back.
_GIVE_UP_ABOVE = 0.5
_TAKE_BACK_BELOW = 0.3
_PROC_STAT = Path("/proc/stat")


class CoreShare:
    """Decides the thread count, up to ``max_threads``; ``None`` from ``update`` means no
    change. Where ``/proc/stat`` cannot be read, it never changes anything."""

    def __init__(self, max_threads: int) -> None:
        self.max_threads = max_threads
        self.threads = max_threads
        self.others = 0.0
        """Cores the rest of the machine kept busy over the last sample."""
        self._cores = os.cpu_count() or 1
        self._last = self._read()

    def update(self) -> int | None:
        if self._last is None or time.monotonic() - self._last[0] < SAMPLE_EVERY_S:
            return None
        now = self._read()
        if now is None:
            return None
        at, busy, total, own = now
        then_at, then_busy, then_total, then_own = self._last
        if total <= then_total:
            return None
        self._last = now
        machine = (busy - then_busy) / (total - then_total) * self._cores
        self.others = max(0.0, machine - (own - then_own) / (at - then_at))
        spare = self._cores - self.others
        if self.threads > 1 and self.others > _GIVE_UP_ABOVE + (self._cores - self.threads):
            wanted = max(1, min(self.max_threads, int(spare)))
        elif self.threads < self.max_threads and self.others < _TAKE_BACK_BELOW:
            wanted = self.max_threads
        else:
            return None
        if wanted == self.threads:
            return None
        self.threads = wanted
        return wanted

    def _read(self) -> tuple[float, int, int, float] | None:
        """(monotonic time, busy and total jiffies of the machine, this process's CPU s)."""
        try:
            fields = _PROC_STAT.read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return None
        jiffies = [int(f) for f in fields]
        idle = jiffies[3] + (jiffies[4] if len(jiffies) > 4 else 0)  # idle + iowait
        # guest time is already counted in user time
        total = sum(jiffies[:8])
        return time.monotonic(), total - idle, total, time.process_time()
