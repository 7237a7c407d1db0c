"""What the KV-state cache reports: which tier served a prompt, and counters per tier."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field, computed_field


class CacheTier(StrEnum):
    """Where reused KV state came from, fastest first."""

    LIVE = "live"  # still in the llama.cpp context: free
    RAM = "ram"  # a saved sequence state in memory: copied back into the context
    DISK = "disk"  # a saved sequence state on disk: read, then copied back


class TierStats(BaseModel):
    hits: int = Field(default=0, description="Lookups this tier served.")
    hit_tokens: int = Field(default=0, description="Prompt tokens this tier served.")
    entries: int = Field(default=0, description="Saved states held now (the live tier holds one).")
    bytes: int = Field(default=0, description="Bytes held now.")
    budget_bytes: int | None = Field(default=None, description="Most bytes the tier may hold.")
    stores: int = Field(default=0, description="States written to this tier.")
    evictions: int = Field(default=0, description="States pushed out to stay within the budget.")


class LookupStats(BaseModel):
    lookups: int = Field(default=0, description="Prompts looked up.")
    requested_tokens: int = Field(default=0, description="Prompt tokens looked up.")
    hit_tokens: int = Field(default=0, description="Prompt tokens served from any tier.")
    hit_tokens_by_tier: dict[CacheTier, int] = Field(default_factory=dict)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def hit_rate(self) -> float:
        """hit_tokens / requested_tokens."""
        return round(self.hit_tokens / self.requested_tokens, 6) if self.requested_tokens else 0.0


class CacheStats(BaseModel):
    chunk_tokens: int = Field(description="Tokens per hashed chunk of a prompt.")
    lookups: int
    requested_tokens: int
    hit_tokens: int
    hit_rate: float = Field(description="hit_tokens / requested_tokens.")
    tiers: dict[CacheTier, TierStats]
