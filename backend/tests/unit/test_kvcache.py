"""The tiered KV-state cache against a fake sequence whose "state" is its own token list
(padded to a fixed size per token, so that byte budgets behave as with llama.cpp). The fake
keeps what it holds between turns as a resident sequence of the engine does (the live
tier), and offers it to the cache the way the engine does."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pytest

from chatbot.kvcache import KVCache, PromptKey, Reuse, owner_digest
from chatbot.kvcache.keys import shareable_prefix
from chatbot.models.cache import CacheTier

BYTES_PER_TOKEN = 100
CHUNK = 4
NS = b"model-a"
PUBLIC = list(range(1000, 1010))  # ten tokens of public preamble
ALICE = owner_digest("alice")
BOB = owner_digest("bob")


class FakeContext:
    """Stands in for one sequence of a llama.cpp context: the saved state encodes the
    tokens it holds."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.held = PromptKey([], 0, b"")
        self.imports = 0

    def held_tokens(self) -> Sequence[int]:
        return self.tokens

    def truncate(self, n_tokens: int) -> bool:
        del self.tokens[n_tokens:]
        return True

    def export_state(self) -> bytearray:
        body = json.dumps(self.tokens).encode()
        return bytearray(body.ljust(len(self.tokens) * BYTES_PER_TOKEN, b" "))

    def import_state(self, payload: bytearray, tokens: Sequence[int]) -> bool:
        self.imports += 1
        self.tokens = json.loads(payload)
        assert self.tokens == list(tokens)
        return True

    def clear(self) -> None:
        """Another conversation took the sequence (or it was evicted)."""
        self.tokens = []
        self.held = PromptKey([], 0, b"")

    def prepare(self, cache: KVCache, key: PromptKey) -> Reuse:
        """As the engine does: keep in place what the owner may use, then load a saved state
        if the cache has one that serves more."""
        live = min(shareable_prefix(self.held, key), len(key.tokens) - 1)
        self.truncate(live)
        reuse = Reuse(live, CacheTier.LIVE if live else None)
        restore = cache.find(key, live)
        if restore is not None:
            payload = cache.fetch(restore).result()
            if payload is not None:
                reuse = cache.load(self, restore, payload)
        cache.count(key, reuse)
        assert self.tokens == list(key.tokens[: reuse.tokens])
        self.held = PromptKey(self.tokens, key.public_tokens, key.owner)
        return reuse

    def run(self, cache: KVCache, key: PromptKey, answer: Sequence[int] = (7, 7)) -> int:
        """One turn: prepare, "prefill" the rest, "generate", save. Returns tokens reused."""
        reuse = self.prepare(cache, key)
        self.tokens = [*key.tokens, *answer]
        self.held = PromptKey(self.tokens, key.public_tokens, key.owner)
        if cache.worth_saving(len(self.tokens)):
            cache.save(self.held, self.export_state()).result()
        return reuse.tokens


def prompt(owner: bytes, *private: int) -> PromptKey:
    return PromptKey([*PUBLIC, *private], public_tokens=len(PUBLIC), owner=owner)


def make_cache(tmp_path: Path, *, ram: int = 10**6, disk: int = 10**6) -> KVCache:
    return KVCache(
        namespace=NS,
        chunk_tokens=CHUNK,
        ram_bytes=ram,
        disk_bytes=disk,
        disk_dir=tmp_path,
        min_load_gain=1,
    )


def test_a_conversation_reuses_its_whole_history_from_the_live_context(tmp_path: Path) -> None:
    cache, ctx = make_cache(tmp_path), FakeContext()
    first = prompt(ALICE, 1, 2, 3)
    ctx.run(cache, first)
    second = prompt(ALICE, 1, 2, 3, 7, 7, 4, 5)
    reuse = ctx.prepare(cache, second)
    assert (reuse.tokens, reuse.tier) == (len(first.tokens) + 2, CacheTier.LIVE)
    assert ctx.imports == 0


def test_a_conversation_comes_back_from_ram_after_another_one_ran(tmp_path: Path) -> None:
    cache, ctx = make_cache(tmp_path), FakeContext()
    ctx.run(cache, prompt(ALICE, 1, 2, 3))
    ctx.run(cache, prompt(BOB, 9, 9, 9))
    reuse = ctx.prepare(cache, prompt(ALICE, 1, 2, 3, 7, 7, 4))
    assert (reuse.tokens, reuse.tier) == (len(PUBLIC) + 5, CacheTier.RAM)
    assert ctx.tokens == prompt(ALICE, 1, 2, 3, 7, 7).tokens


def test_the_public_prefix_is_shared_across_users(tmp_path: Path) -> None:
    cache, ctx = make_cache(tmp_path), FakeContext()
    ctx.run(cache, prompt(ALICE, 1, 2, 3, 4, 5, 6))
    ctx.clear()
    reuse = ctx.prepare(cache, prompt(BOB, 8, 8))
    assert (reuse.tokens, reuse.tier) == (len(PUBLIC), CacheTier.RAM)


def test_the_same_private_words_never_hit_for_another_user(tmp_path: Path) -> None:
    cache, ctx = make_cache(tmp_path), FakeContext()
    ctx.run(cache, prompt(ALICE, 1, 2, 3, 4, 5, 6, 7, 8))
    # From the live context and from RAM alike, Bob gets the public part and no more.
    assert ctx.prepare(cache, prompt(BOB, 1, 2, 3, 4, 5, 6, 7, 8)).tokens == len(PUBLIC)
    ctx.clear()
    assert ctx.prepare(cache, prompt(BOB, 1, 2, 3, 4, 5, 6, 7, 8)).tokens == len(PUBLIC)
    assert ctx.prepare(cache, prompt(ALICE, 1, 2, 3, 4, 5, 6, 7, 8, 9)).tokens == len(PUBLIC) + 8


def test_private_content_is_never_shared_even_without_a_public_prefix(tmp_path: Path) -> None:
    cache, ctx = make_cache(tmp_path), FakeContext()
    mine = PromptKey(list(range(20)), public_tokens=0, owner=ALICE)
    ctx.run(cache, mine)
    ctx.clear()
    theirs = PromptKey(list(range(20)), public_tokens=0, owner=BOB)
    assert ctx.prepare(cache, theirs).tier is None


def test_states_of_another_model_are_never_used(tmp_path: Path) -> None:
    ctx = FakeContext()
    ctx.run(make_cache(tmp_path), prompt(ALICE, 1, 2, 3, 4, 5, 6))
    other = KVCache(namespace=b"model-b", chunk_tokens=CHUNK, disk_bytes=10**6, disk_dir=tmp_path)
    assert FakeContext().prepare(other, prompt(ALICE, 1, 2, 3, 4, 5, 6, 7)).tier is None


def test_at_least_one_prompt_token_is_left_to_evaluate(tmp_path: Path) -> None:
    cache, ctx = make_cache(tmp_path), FakeContext()
    key = prompt(ALICE, 1, 2, 3)
    ctx.run(cache, key)
    assert ctx.prepare(cache, key).tokens == len(key.tokens) - 1


def test_a_newer_state_of_a_conversation_replaces_the_older_one(tmp_path: Path) -> None:
    cache, ctx = make_cache(tmp_path), FakeContext()
    ctx.run(cache, prompt(ALICE, 1, 2, 3))
    ctx.run(cache, prompt(ALICE, 1, 2, 3, 7, 7, 4, 5))
    ram = cache.stats(resident_sequences=1).tiers[CacheTier.RAM]
    assert (ram.entries, ram.stores) == (1, 2)
    assert ram.bytes == (len(PUBLIC) + 9) * BYTES_PER_TOKEN


def test_ram_evicts_least_recently_used_to_disk_within_budgets(tmp_path: Path) -> None:
    entry = (len(PUBLIC) + 5) * BYTES_PER_TOKEN  # one conversation of three words + answer
    cache, ctx = make_cache(tmp_path, ram=2 * entry, disk=entry + 1000), FakeContext()
    a, b, c, d = (prompt(owner_digest(u), 1, 2, 3) for u in "abcd")
    for key in (a, b):
        ctx.run(cache, key)
    # Using a again makes b the least recently used one.
    ctx.clear()
    assert ctx.prepare(cache, PromptKey([*a.tokens, 7, 7, 0], a.public_tokens, a.owner)).tier
    ctx.run(cache, c)
    stats = cache.stats(resident_sequences=1)
    assert stats.tiers[CacheTier.RAM].evictions == 1
    assert stats.tiers[CacheTier.RAM].bytes <= 2 * entry
    assert _tier_of(cache, b) is CacheTier.DISK
    assert _tier_of(cache, a) is CacheTier.RAM
    ctx.run(cache, d)  # a goes to disk, and disk evicts b for good
    stats = cache.stats(resident_sequences=1)
    assert stats.tiers[CacheTier.DISK].evictions == 1
    assert stats.tiers[CacheTier.DISK].bytes <= entry + 1000
    assert _tier_of(cache, b) is None
    assert _tier_of(cache, a) is CacheTier.DISK


def test_a_state_larger_than_ram_goes_straight_to_disk(tmp_path: Path) -> None:
    cache, ctx = make_cache(tmp_path, ram=100), FakeContext()
    key = prompt(ALICE, 1, 2, 3)
    ctx.run(cache, key)
    assert _tier_of(cache, key) is CacheTier.DISK
    assert cache.stats(resident_sequences=1).tiers[CacheTier.RAM].bytes == 0


def test_the_disk_tier_survives_a_restart(tmp_path: Path) -> None:
    cache, ctx = make_cache(tmp_path, ram=0), FakeContext()
    ctx.run(cache, prompt(ALICE, 1, 2, 3, 4, 5))
    restarted, fresh = make_cache(tmp_path, ram=0), FakeContext()
    reuse = fresh.prepare(restarted, prompt(ALICE, 1, 2, 3, 4, 5, 7, 7, 9))
    assert (reuse.tokens, reuse.tier) == (len(PUBLIC) + 7, CacheTier.DISK)
    assert fresh.tokens == prompt(ALICE, 1, 2, 3, 4, 5, 7, 7).tokens


def test_a_graceful_shutdown_moves_ram_to_disk(tmp_path: Path) -> None:
    cache, ctx = make_cache(tmp_path), FakeContext()
    ctx.run(cache, prompt(ALICE, 1, 2, 3, 4, 5))
    ctx.run(cache, prompt(BOB, 6, 7, 8, 9))
    cache.flush()
    assert cache.stats(resident_sequences=1).tiers[CacheTier.RAM].bytes == 0
    restarted = make_cache(tmp_path)
    assert restarted.stats(resident_sequences=1).tiers[CacheTier.DISK].entries == 2
    reuse = FakeContext().prepare(restarted, prompt(BOB, 6, 7, 8, 9, 7, 7, 1))
    assert (reuse.tokens, reuse.tier) == (len(PUBLIC) + 6, CacheTier.DISK)


def test_a_damaged_disk_entry_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache, ctx = make_cache(tmp_path, ram=0), FakeContext()
    key = prompt(ALICE, 1, 2, 3, 4, 5)
    ctx.run(cache, key)
    (path,) = tmp_path.rglob("*.kv")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(data)
    restarted, fresh = make_cache(tmp_path, ram=0), FakeContext()
    with caplog.at_level(logging.WARNING):
        reuse = fresh.prepare(restarted, prompt(ALICE, 1, 2, 3, 4, 5, 7, 7, 9))
    assert reuse.tier is None
    assert fresh.tokens == []
    assert "damaged KV state" in caplog.text
    assert not path.exists()


def test_an_unreadable_disk_file_is_skipped_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = FakeContext()
    ctx.run(make_cache(tmp_path, ram=0), prompt(ALICE, 1, 2, 3, 4, 5))
    (path,) = tmp_path.rglob("*.kv")
    path.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        restarted = make_cache(tmp_path, ram=0)
    assert restarted.stats(resident_sequences=1).tiers[CacheTier.DISK].entries == 0
    assert "unreadable KV state" in caplog.text


def test_counters_per_tier_and_per_owner(tmp_path: Path) -> None:
    cache, ctx = make_cache(tmp_path), FakeContext()
    ctx.run(cache, prompt(ALICE, 1, 2, 3))
    ctx.run(cache, prompt(ALICE, 1, 2, 3, 7, 7, 4))  # live: 15 of 16
    ctx.run(cache, prompt(BOB, 5))  # live, the public part: 10 of 11
    ctx.run(cache, prompt(ALICE, 1, 2, 3, 7, 7, 4, 7, 7, 6))  # ram: 18 of 19
    stats = cache.stats(resident_sequences=1)
    assert (stats.lookups, stats.requested_tokens) == (4, 13 + 16 + 11 + 19)
    assert stats.hit_tokens == 15 + 10 + 18
    assert (stats.tiers[CacheTier.LIVE].hits, stats.tiers[CacheTier.LIVE].hit_tokens) == (2, 25)
    assert (stats.tiers[CacheTier.RAM].hits, stats.tiers[CacheTier.RAM].hit_tokens) == (1, 18)
    alice = cache.owner_stats(ALICE)
    assert (alice.lookups, alice.hit_tokens) == (3, 33)
    assert alice.hit_tokens_by_tier == {CacheTier.LIVE: 15, CacheTier.RAM: 18}
    assert cache.owner_stats(owner_digest("carol")).lookups == 0


def test_a_saved_state_is_loaded_only_when_it_beats_the_live_context_enough(
    tmp_path: Path,
) -> None:
    cache = KVCache(namespace=NS, chunk_tokens=CHUNK, ram_bytes=10**6, min_load_gain=6)
    ctx = FakeContext()
    ctx.run(cache, prompt(ALICE, 1, 2, 3), answer=(7, 7, 7))  # saves public + 6 tokens
    ctx.run(cache, prompt(BOB, 9))  # the live context now holds Bob's
    # A saved state 2 tokens longer than the live context's public part: not worth a copy.
    assert ctx.prepare(cache, prompt(ALICE, 1, 2, 8, 8)).tier is CacheTier.LIVE
    reuse = ctx.prepare(cache, prompt(ALICE, 1, 2, 3, 7, 7, 7, 4))
    assert (reuse.tokens, reuse.tier) == (len(PUBLIC) + 6, CacheTier.RAM)


def test_a_bad_chunk_size_is_refused() -> None:
    with pytest.raises(ValueError, match="chunk_tokens"):
        KVCache(namespace=NS, chunk_tokens=0)


def _tier_of(cache: KVCache, key: PromptKey) -> CacheTier | None:
    """Which tier holds the state saved after ``key``'s turn (found without touching it)."""
    probe = PromptKey([*key.tokens, 7, 7, 0], key.public_tokens, key.owner)
    restore = cache.find(probe, 0)
    if restore is None or restore.tokens < len(key.tokens) + 2:
        return None
    return restore.tier
