"""Admission limits: requests per user per minute, tokens computed per user per minute, and
answers generated at once (per user and in all). Each refusal says when to come back
(``Retry-After``).

All count in this process: behind N replicas a user gets up to N times the per-minute
rate, which is why the load balancer's own limits (or session affinity) sit in front.
"""

from __future__ import annotations

import math
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable

from chatbot.models.errors import RateLimited, ServiceUnavailable


class StreamLimiter:
    """At most ``per_user`` generations at once for each user (past it, 429) and ``total``
    for everyone (past it, 503: the server, not the user, is at its limit)."""

    def __init__(self, per_user: int, total: int) -> None:
        self._per_user = per_user
        self._total = total
        self._active: Counter[str] = Counter()
        self._count = 0

    def acquire(self, user_id: str) -> Callable[[], None]:
        """Take a slot or raise; returns the (idempotent) release."""
        if self._active[user_id] >= self._per_user:
            raise RateLimited(
                f"at most {self._per_user} answers can be generated at once per user",
                code="too_many_streams",
                retry_after=1,
            )
        if self._count >= self._total:
            raise ServiceUnavailable(
                f"the server is generating its maximum of {self._total} answers at once",
                code="server_busy",
                retry_after=1,
            )
        self._active[user_id] += 1
        self._count += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._count -= 1
                self._active[user_id] -= 1
                if not self._active[user_id]:
                    del self._active[user_id]

        return release


class AcceptQueue:
    """The connections waiting in the kernel's accept queue of the server's listening socket.

    When one process cannot keep up, new requests wait there, before any handler sees them:
    a full queue (uvicorn's backlog, 2,048) is seconds of latency the app cannot observe,
    then connections the kernel drops. Its depth is the earliest sign of overload that the
    app can read (``TCP_INFO`` of a listening socket gives it), so past ``limit`` new answers
    are refused at once with a 503 and ``Retry-After``: a refusal costs the server a small
    fraction of an answer, so the queue drains and the answers already admitted keep their
    pace."""

    # struct tcp_info: eight one-byte fields, then rto, ato, snd_mss, rcv_mss (4 bytes
    # each), then tcpi_unacked, which for a listening socket is its accept queue's length.
    _WAITING_OFFSET = 24

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._listener: socket.socket | None = None

    def watch(self, listener: socket.socket) -> None:
        if listener.family in (socket.AF_INET, socket.AF_INET6):
            self._listener = listener

    def waiting(self) -> int | None:
        """Connections accepted by the kernel and not yet by the server; None if unknown."""
        if self._listener is None:
            return None
        info = self._listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
        waiting: int = struct.unpack_from("I", info, self._WAITING_OFFSET)[0]
        return waiting

    def check(self) -> None:
        """Raise ServiceUnavailable while ``limit`` or more connections wait."""
        if not self._limit:
            return
        waiting = self.waiting()
        if waiting is not None and waiting >= self._limit:
            raise ServiceUnavailable(
                f"the server is overloaded ({waiting} connections waiting to be accepted)",
                code="server_overloaded",
                retry_after=2,
            )


class _Buckets:
    """A token bucket per user: ``capacity`` at most, refilled at ``capacity`` a minute. A
    level may go below zero (a debt paid back by the refill). Idle users' buckets, full
    again, are dropped, so memory follows the active users."""

    def __init__(self, capacity: float, clock: Callable[[], float]) -> None:
        self.capacity = capacity
        self.rate = capacity / 60.0
        self._clock = clock
        self._levels: dict[str, tuple[float, float]] = {}
        self._next_sweep = clock() + 60.0

    def level(self, user_id: str) -> float:
        now = self._clock()
        if now >= self._next_sweep:
            self._levels = {
                u: (level, then)
                for u, (level, then) in self._levels.items()
                if level + (now - then) * self.rate < self.capacity
            }
            self._next_sweep = now + 60.0
        level, then = self._levels.get(user_id, (self.capacity, now))
        return min(self.capacity, level + (now - then) * self.rate)

    def take(self, user_id: str, amount: float) -> None:
        self._levels[user_id] = (self.level(user_id) - amount, self._clock())

    def wait_for(self, user_id: str, amount: float) -> int:
        """Whole seconds until ``amount`` is in the bucket (0: it is now)."""
        missing = amount - self.level(user_id)
        return max(0, math.ceil(missing / self.rate))


class RequestRateLimiter:
    """``per_minute`` requests a minute per user, in bursts of up to as many."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._buckets = _Buckets(float(per_minute), clock)

    def check(self, user_id: str) -> None:
        """Spend one request or raise RateLimited with the seconds until the next."""
        wait = self._buckets.wait_for(user_id, 1.0)
        if wait:
            raise RateLimited(
                f"at most {int(self._buckets.capacity)} requests a minute per user; "
                f"try again in {wait} s",
                code="too_many_requests",
                retry_after=wait,
            )
        self._buckets.take(user_id, 1.0)


class TokenBudget:
    """The tokens the engine may compute for each user: ``per_minute`` a minute, in bursts of
    as many. What a generation computed is known only once it has finished, so it is
    charged then, and the balance may go below zero; a new generation is refused while it
    is not above zero. A draft is charged its estimate up front, and only if that fits."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._buckets = _Buckets(float(per_minute), clock)

    def check(self, user_id: str) -> None:
        """Raise RateLimited, with the seconds until the balance is positive again, while it
        is not."""
        if self._buckets.level(user_id) > 0:
            return
        wait = max(1, self._buckets.wait_for(user_id, 1.0))
        raise RateLimited(
            f"this user's budget of {int(self._buckets.capacity)} tokens a minute is spent; "
            f"try again in {wait} s",
            code="token_budget_exhausted",
            retry_after=wait,
        )

    def charge(self, user_id: str, tokens: int) -> None:
        self._buckets.take(user_id, float(tokens))

    def try_charge(self, user_id: str, tokens: int) -> bool:
        """Charge ``tokens`` if the balance covers them; False (nothing charged) if not."""
        if self._buckets.level(user_id) < tokens:
            return False
        self._buckets.take(user_id, float(tokens))
        return True
