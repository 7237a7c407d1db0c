"""Per-user limits on concurrent generations."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from chatbot.models.errors import RateLimited


class StreamLimiter:
    """At most ``per_user`` generations at once for each user; past it, 429."""

    def __init__(self, per_user: int) -> None:
        self._per_user = per_user
        self._active: Counter[str] = Counter()

    def acquire(self, user_id: str) -> Callable[[], None]:
        """Take a slot or raise RateLimited; returns the (idempotent) release."""
        if self._active[user_id] >= self._per_user:
            raise RateLimited(
                f"at most {self._per_user} answers can be generated at once per user",
                code="too_many_streams",
                retry_after=1,
            )
        self._active[user_id] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._active[user_id] -= 1
                if not self._active[user_id]:
                    del self._active[user_id]

        return release
