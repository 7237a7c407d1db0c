"""The tiered KV-state cache: saved sequence states in RAM, then on disk, behind the live
tier that the engine keeps itself (the sequences still resident in its context).

A saved entry is the llama.cpp sequence state of a whole token sequence (a conversation
as far as it got), indexed under the chain hash of each of its full chunks. A prompt is
looked up by its own chunk hashes, deepest first; the entries found there share at least
that many chunks with it, and the longest token-for-token match among them wins. After a
load, the sequence is truncated to the matched prefix and only the rest is prefilled.

RAM evicts least recently used entries to disk, disk evicts them for good; each stays
within its byte budget. An entry that is a prefix of a newer one of the same owner is
dropped when the newer one is saved, so a long conversation keeps one entry, not one per
turn.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from array import array
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from chatbot.kvcache.counters import LookupCounters
from chatbot.kvcache.keys import PromptKey, chunk_hashes, common_prefix_length, shareable_prefix
from chatbot.kvcache.tiers import DiskTier, EntryMeta, RamTier, Tier
from chatbot.models.cache import CacheStats, CacheTier, LookupStats, TierStats

logger = logging.getLogger(__name__)

# Entries compared token for token per lookup: all share the matched chunks, the most
# recent ones are the likeliest to share more.
_CANDIDATES = 8
_FASTEST_FIRST = {tier: rank for rank, tier in enumerate(CacheTier)}


class SequenceState(Protocol):
    """One sequence of the llama.cpp context, as a load drives it."""

    def truncate(self, n_tokens: int) -> bool:
        """Keep the first ``n_tokens``; False if the context cannot."""
        ...

    def import_state(self, payload: bytearray, tokens: Sequence[int]) -> bool:
        """Replace the sequence with a saved state of ``tokens``; False if it was refused
        (the sequence is then empty)."""
        ...


@dataclass(frozen=True, slots=True)
class Reuse:
    """What a prompt got from the cache: the context now holds its first ``tokens``."""

    tokens: int
    tier: CacheTier | None


@dataclass(frozen=True, slots=True)
class Restore:
    """A saved state that serves more of a prompt than the live context does: load it, then
    keep its first ``tokens``."""

    entry_id: str
    tokens: int
    state_tokens: Sequence[int]
    """What the saved state holds, all of it (llama.cpp loads a state whole)."""
    tier: CacheTier
    """Where it was found; it may have moved on by the time it is fetched."""
    drafted_from: int | None = None
    """Where the tokens a draft computed start in it."""


@dataclass(eq=False, slots=True)
class _Entry:
    meta: EntryMeta
    hashes: list[bytes]
    tier: CacheTier

    @property
    def key(self) -> PromptKey:
        return PromptKey(self.meta.tokens, self.meta.public_tokens, self.meta.owner)


class KVCache:
    """The index is shared by the engine's worker thread (lookups, counters) and one I/O
    thread of the cache's own, which alone touches the tiers: every read and write of a
    state's bytes, every spill to disk, runs there, never inside a step. The lock guards
    the index and the counters only, and is never held across I/O: ``stats()`` and a lookup
    wait for no disk write."""

    def __init__(
        self,
        *,
        namespace: bytes,
        chunk_tokens: int = 64,
        ram_bytes: int = 0,
        disk_bytes: int = 0,
        disk_dir: Path | None = None,
        min_load_gain: int = 4,
    ) -> None:
        """``namespace`` names what the states are valid for (model file, KV layout);
        states saved under another namespace are never seen. A saved state is loaded only
        when it serves at least ``min_load_gain`` more tokens than the live context: on the
        2-core CPU a load takes about 7 ms and prefill about 2 ms a token (``python -m benchmarks
        state-io``; 1.4 s for a 660-token prompt in the multi-round benchmark)."""
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be at least 1, not {chunk_tokens}")
        if disk_bytes > 0 and disk_dir is None:
            raise ValueError("a disk budget needs a disk_dir")
        self.namespace = namespace
        self.chunk_tokens = chunk_tokens
        self.min_load_gain = min_load_gain
        self._lock = threading.Lock()
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-io")
        self._entries: dict[str, _Entry] = {}
        self._by_hash: dict[bytes, dict[str, None]] = {}  # insertion-ordered sets
        self._by_last_hash: dict[bytes, set[str]] = {}
        self._ram = RamTier(ram_bytes)
        # The saved tiers, fastest first: what one pushes out moves to the next.
        self._tiers: dict[CacheTier, Tier] = {CacheTier.RAM: self._ram}
        self._counters = LookupCounters()
        if disk_dir is not None and disk_bytes > 0:
            disk = DiskTier(disk_dir / namespace.hex(), disk_bytes)
            self._tiers[CacheTier.DISK] = disk
            for meta in disk.scan():
                self._index(meta, CacheTier.DISK)
            logger.info("KV cache: saved states found on disk: %d", len(disk))

    @property
    def stores_states(self) -> bool:
        return any(tier.budget_bytes > 0 for tier in self._tiers.values())

    # -- the turn: find a saved state for a prompt, load it, save what the sequence holds --

    def find(self, key: PromptKey, live: int) -> Restore | None:
        """A saved state that serves ``key``'s owner at least ``min_load_gain`` more tokens
        than the ``live`` ones a resident sequence already holds; no I/O. At least one
        token is always left to evaluate."""
        limit = len(key.tokens) - 1
        with self._lock:
            found = self._find(key, limit)
        if found is None or found[1] < min(live, limit) + max(1, self.min_load_gain):
            return None
        entry, n = found
        return Restore(entry.meta.id, n, entry.meta.tokens, entry.tier, entry.meta.drafted_from)

    def fetch(self, restore: Restore) -> Future[bytearray | None]:
        """The saved state's bytes, read on the I/O thread; None if it is gone (evicted for
        good since it was found, or a damaged file)."""
        return self._io.submit(self._read, restore.entry_id)

    def load(self, sequence: SequenceState, restore: Restore, payload: bytearray) -> Reuse:
        """Replace ``sequence``'s contents with the fetched state, kept to the prefix the
        prompt uses. On the engine's thread: this is the one copy into llama.cpp."""
        if sequence.import_state(payload, restore.state_tokens) and sequence.truncate(
            restore.tokens
        ):
            return Reuse(restore.tokens, restore.tier)
        logger.warning("llama.cpp refused a saved KV state; dropping it")
        self._io.submit(self._drop, restore.entry_id)
        return Reuse(0, None)

    def count(self, key: PromptKey, reuse: Reuse) -> None:
        """Record what a prompt got, for the hit-rate counters."""
        hits = {reuse.tier: reuse.tokens} if reuse.tier is not None else {}
        with self._lock:
            self._counters.count(key.owner, len(key.tokens), hits)

    def worth_saving(self, tokens: int) -> bool:
        """Whether a sequence of ``tokens`` would be saved at all."""
        return self.stores_states and tokens >= self.chunk_tokens

    def save(
        self, key: PromptKey, payload: bytearray, *, drafted_from: int | None = None
    ) -> Future[None]:
        """Save ``payload``, the state of a sequence holding ``key.tokens`` (exported by the
        caller, the one step that must be on the engine's thread), on the I/O thread,
        unless a tier already holds it. ``drafted_from``: where tokens a draft computed
        start, if any."""
        return self._io.submit(self._store, key, payload, drafted_from)

    def flush(self) -> None:
        """Move what RAM holds to disk, within its budget (on a graceful shutdown), so that
        the next process starts warm. The most recently used states are kept first."""
        self._io.submit(self._flush).result()

    def close(self) -> None:
        """Finish the saves already asked for, then stop the I/O thread."""
        self._io.shutdown(wait=True)

    # -- on the I/O thread -----------------------------------------------------------------

    def _read(self, entry_id: str) -> bytearray | None:
        with self._lock:
            entry = self._entries.get(entry_id)
        if entry is None:
            return None
        payload = self._tiers[entry.tier].get(entry_id)
        if payload is None:  # a damaged file, already reported by the tier
            with self._lock:
                self._unindex(entry_id)
        return payload

    def _store(self, key: PromptKey, payload: bytearray, drafted_from: int | None) -> None:
        with self._lock:
            hashes = self._hashes(key)
            found = self._find(key, len(key.tokens), hashes)
            entry_id = _entry_id(self.namespace, key)
            if (found is not None and found[1] >= len(key.tokens)) or entry_id in self._entries:
                return
            meta = EntryMeta(
                entry_id, array("i", key.tokens), key.public_tokens, key.owner, drafted_from
            )
            superseded = self._supersede(meta, hashes)
        for old in superseded:
            self._tiers[old.tier].remove(old.meta.id)
        self._save(meta, payload, hashes, list(self._tiers))

    def _flush(self) -> None:
        disk = self._tiers.get(CacheTier.DISK)
        if disk is None:
            return
        for entry_id, payload in self._ram.drain():
            self._spill(entry_id, payload, [CacheTier.DISK])
        logger.info("KV cache: saved states on disk: %d", len(disk))

    def _save(
        self, meta: EntryMeta, payload: bytearray, hashes: list[bytes], order: list[CacheTier]
    ) -> None:
        """Into the first tier of ``order`` that can hold ``payload``; what that pushes out
        moves on to the tiers after it, or is gone after the last."""
        for rank, name in enumerate(order):
            tier = self._tiers[name]
            if not tier.fits(len(payload)):
                continue
            try:
                evicted = tier.put(meta, payload)
            except OSError as exc:
                logger.warning("could not save a KV state to %s: %s", name, exc)
                return
            with self._lock:
                self._index(meta, name, hashes)
                counters = self._counters.tiers[name]
                counters.stores += 1
                counters.evictions += len(evicted)
                for old in evicted:
                    if old.payload is None:
                        self._unindex(old.id)
            for old in evicted:
                if old.payload is not None:
                    self._spill(old.id, old.payload, order[rank + 1 :])
            return

    def _spill(self, entry_id: str, payload: bytearray, order: list[CacheTier]) -> None:
        """Move an entry, given up by its tier, to the first of ``order`` that holds it."""
        with self._lock:
            entry = self._entries.get(entry_id)
            if entry is None:
                return
            self._unindex(entry_id)
        self._save(entry.meta, payload, entry.hashes, order)

    def _drop(self, entry_id: str) -> None:
        with self._lock:
            entry = self._entries.get(entry_id)
            if entry is None:
                return
            self._unindex(entry_id)
        self._tiers[entry.tier].remove(entry_id)

    # -- lookup (under the lock) -----------------------------------------------------------

    def _hashes(self, key: PromptKey) -> list[bytes]:
        return chunk_hashes(key, namespace=self.namespace, chunk_tokens=self.chunk_tokens)

    def _find(
        self, key: PromptKey, limit: int, hashes: list[bytes] | None = None
    ) -> tuple[_Entry, int] | None:
        for h in reversed(hashes if hashes is not None else self._hashes(key)):
            ids = self._by_hash.get(h)
            if not ids:
                continue
            candidates = [self._entries[i] for i in list(reversed(ids))[:_CANDIDATES]]
            scored = [(min(shareable_prefix(e.key, key), limit), e) for e in candidates]
            n, entry = max(scored, key=lambda s: (s[0], -_FASTEST_FIRST[s[1].tier]))
            return entry, n
        return None

    def _supersede(self, meta: EntryMeta, hashes: list[bytes]) -> list[_Entry]:
        """Unindex the entries that ``meta`` (whose chunk hashes are ``hashes``) makes
        redundant, earlier states of the same conversation; their bytes are the caller's
        to remove."""
        superseded: list[_Entry] = []
        for h in hashes:
            for old_id in list(self._by_last_hash.get(h, ())):
                old = self._entries[old_id]
                same_owner = old.meta.owner == meta.owner and (
                    old.meta.public_tokens <= meta.public_tokens
                )
                public = len(old.meta.tokens) <= min(old.meta.public_tokens, meta.public_tokens)
                is_prefix = common_prefix_length(old.meta.tokens, meta.tokens) == len(
                    old.meta.tokens
                )
                if is_prefix and (same_owner or public):
                    self._unindex(old_id)
                    superseded.append(old)
        return superseded

    # -- the index -------------------------------------------------------------------------

    def _index(self, meta: EntryMeta, tier: CacheTier, hashes: list[bytes] | None = None) -> None:
        if hashes is None:
            hashes = self._hashes(PromptKey(meta.tokens, meta.public_tokens, meta.owner))
        if not hashes:  # shorter than a chunk: no prompt could ever find it
            self._tiers[tier].remove(meta.id)
            return
        self._entries[meta.id] = _Entry(meta, hashes, tier)
        for h in hashes:
            self._by_hash.setdefault(h, {})[meta.id] = None
        self._by_last_hash.setdefault(hashes[-1], set()).add(meta.id)

    def _unindex(self, entry_id: str) -> None:
        entry = self._entries.pop(entry_id, None)
        if entry is None:
            return
        for h in entry.hashes:
            ids = self._by_hash[h]
            del ids[entry_id]
            if not ids:
                del self._by_hash[h]
        last = self._by_last_hash[entry.hashes[-1]]
        last.discard(entry_id)
        if not last:
            del self._by_last_hash[entry.hashes[-1]]

    # -- counters --------------------------------------------------------------------------

    def stats(self, resident_sequences: int) -> CacheStats:
        """``resident_sequences``: what the live tier holds, which the engine knows."""
        with self._lock:
            total = self._counters.total
            held: dict[CacheTier, tuple[int, int, int | None]] = {
                CacheTier.LIVE: (resident_sequences, 0, None),
                CacheTier.RAM: (0, 0, 0),
                CacheTier.DISK: (0, 0, 0),
            }
            for name, tier in self._tiers.items():
                held[name] = (len(tier), tier.used_bytes, tier.budget_bytes)
            tiers = {
                tier: TierStats(
                    hits=c.hits,
                    hit_tokens=c.hit_tokens,
                    entries=held[tier][0],
                    bytes=held[tier][1],
                    budget_bytes=held[tier][2],
                    stores=c.stores,
                    evictions=c.evictions,
                )
                for tier, c in self._counters.tiers.items()
            }
            return CacheStats(
                chunk_tokens=self.chunk_tokens,
                lookups=total.lookups,
                requested_tokens=total.requested_tokens,
                hit_tokens=total.hit_tokens,
                hit_rate=round(total.hit_rate, 6),
                tiers=tiers,
            )

    def owner_stats(self, owner: bytes) -> LookupStats:
        """One owner's own lookups; nobody else's are ever shown to them."""
        with self._lock:
            return self._counters.owner(owner)


def _entry_id(namespace: bytes, key: PromptKey) -> str:
    h = hashlib.blake2b(namespace, digest_size=16)
    h.update(key.owner)
    h.update(key.public_tokens.to_bytes(4, "little"))
    h.update(array("i", key.tokens).tobytes())
    return h.hexdigest()
