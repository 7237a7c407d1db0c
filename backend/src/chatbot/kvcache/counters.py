"""What a prefix cache counts of its lookups: in total, per owner (each user sees only their
own), and per tier. The embedded engine's ``KVCache`` and the simulated replica's prefix
cache count with the same counters, so their stats mean the same things."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from chatbot.models.cache import CacheTier, LookupStats


@dataclass(slots=True)
class TierCounters:
    hits: int = 0
    """Lookups this tier served some tokens of."""
    hit_tokens: int = 0
    stores: int = 0
    evictions: int = 0


class LookupCounters:
    def __init__(self) -> None:
        self.total = LookupStats()
        self.tiers = {tier: TierCounters() for tier in CacheTier}
        self._by_owner: dict[bytes, LookupStats] = {}

    def count(self, owner: bytes, requested_tokens: int, hits: Mapping[CacheTier, int]) -> None:
        """One lookup of ``requested_tokens`` by ``owner``; ``hits``: the tokens each tier
        served (a tier that served none may be left out)."""
        served = {tier: tokens for tier, tokens in hits.items() if tokens}
        owner_stats = self._by_owner.setdefault(owner, LookupStats())
        for stats in (self.total, owner_stats):
            stats.lookups += 1
            stats.requested_tokens += requested_tokens
            for tier, tokens in served.items():
                stats.hit_tokens += tokens
                stats.hit_tokens_by_tier[tier] = stats.hit_tokens_by_tier.get(tier, 0) + tokens
        for tier, tokens in served.items():
            self.tiers[tier].hits += 1
            self.tiers[tier].hit_tokens += tokens

    def owner(self, owner: bytes) -> LookupStats:
        """A copy of one owner's own lookups."""
        return self._by_owner.get(owner, LookupStats()).model_copy(deep=True)
