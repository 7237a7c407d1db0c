"""The tiers that hold saved sequence states outside the llama.cpp context.

Each tier is a ``Tier``: a least-recently-used map from entry id to bytes within a byte
budget. The cache (``store.KVCache``) keeps the index (which tokens each entry holds) and
moves entries between tiers; a tier only holds bytes and says what it had to push out to
make room.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from array import array
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple, Protocol

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EntryMeta:
    """What an entry's bytes are the KV state of."""

    id: str
    tokens: Sequence[int]
    public_tokens: int
    owner: bytes
    drafted_from: int | None = None
    """Where the tokens a draft computed start (nobody's message has used them yet)."""


class Evicted(NamedTuple):
    """An entry a tier pushed out to make room."""

    id: str
    payload: bytearray | None
    """Its bytes, where the tier held them in memory (to move to a slower tier); None where
    they are gone (a file deleted)."""


class Tier(Protocol):
    """A least-recently-used map from entry id to bytes, within ``budget_bytes``."""

    budget_bytes: int
    used_bytes: int

    def __len__(self) -> int: ...

    def fits(self, size: int) -> bool:
        """Whether a payload of ``size`` bytes could be held at all (with the tier empty)."""
        ...

    def put(self, meta: EntryMeta, payload: bytearray) -> list[Evicted]:
        """Hold ``payload`` as entry ``meta.id``; returns what was pushed out to make room,
        least recently used first. Raises OSError if it could not be written."""
        ...

    def get(self, entry_id: str) -> bytearray | None:
        """The entry's bytes, now the most recently used; None if it is not held (or was
        damaged, and dropped)."""
        ...

    def remove(self, entry_id: str) -> None:
        """Drop the entry if held."""
        ...


class RamTier(Tier):
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self._payloads: OrderedDict[str, bytearray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._payloads)

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._payloads

    def fits(self, size: int) -> bool:
        return size <= self.budget_bytes

    def put(self, meta: EntryMeta, payload: bytearray) -> list[Evicted]:
        evicted: list[Evicted] = []
        while self._payloads and self.used_bytes + len(payload) > self.budget_bytes:
            old_id, old = self._payloads.popitem(last=False)
            self.used_bytes -= len(old)
            evicted.append(Evicted(old_id, old))
        self._payloads[meta.id] = payload
        self.used_bytes += len(payload)
        return evicted

    def get(self, entry_id: str) -> bytearray | None:
        payload = self._payloads.get(entry_id)
        if payload is not None:
            self._payloads.move_to_end(entry_id)
        return payload

    def drain(self) -> list[tuple[str, bytearray]]:
        """Give up every payload, least recently used first."""
        drained = list(self._payloads.items())
        self._payloads.clear()
        self.used_bytes = 0
        return drained

    def remove(self, entry_id: str) -> None:
        payload = self._payloads.pop(entry_id, None)
        if payload is not None:
            self.used_bytes -= len(payload)


# A file: magic, header length, JSON header (what the state holds and its checksum), bytes.
_MAGIC = b"CBKV\x01"
_LENGTH = struct.Struct("<I")
_SUFFIX = ".kv"


class CorruptEntry(Exception):
    pass


class DiskTier(Tier):
    """Entries as files in one folder, one per entry, written atomically; they outlive the
    process, and ``scan()`` finds them again after a restart."""

    def __init__(self, folder: Path, budget_bytes: int) -> None:
        self.folder = folder
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self._sizes: OrderedDict[str, int] = OrderedDict()
        folder.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return len(self._sizes)

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._sizes

    def fits(self, size: int) -> bool:
        return size <= self.budget_bytes

    def _path(self, entry_id: str) -> Path:
        return self.folder / f"{entry_id}{_SUFFIX}"

    def scan(self) -> Iterator[EntryMeta]:
        """Entries left by an earlier process, least recently used first. Unreadable files
        are deleted with a warning."""
        files = sorted(self.folder.glob(f"*{_SUFFIX}"), key=lambda p: p.stat().st_mtime_ns)
        for path in files:
            try:
                with path.open("rb") as f:
                    header = _Header.read(f, path.stem)
                size = path.stat().st_size
                if size != header.size + header.payload_bytes:
                    raise CorruptEntry("truncated")
            except (OSError, CorruptEntry, ValueError, KeyError) as exc:
                logger.warning("ignoring unreadable KV state file %s: %s", path.name, exc)
                path.unlink(missing_ok=True)
                continue
            self._sizes[header.meta.id] = size
            self.used_bytes += size
            yield header.meta

    def put(self, meta: EntryMeta, payload: bytearray) -> list[Evicted]:
        """Write ``payload`` to a file; what is evicted is deleted (its payload is None)."""
        header = json.dumps(
            {
                "tokens": list(meta.tokens),
                "public_tokens": meta.public_tokens,
                "owner": meta.owner.hex(),
                "drafted_from": meta.drafted_from,
                "payload_bytes": len(payload),
                "blake2b": hashlib.blake2b(payload).hexdigest(),
            }
        ).encode()
        size = len(_MAGIC) + _LENGTH.size + len(header) + len(payload)
        evicted = self._make_room(size)
        path = self._path(meta.id)
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            f.write(_MAGIC + _LENGTH.pack(len(header)) + header)
            f.write(payload)
        os.replace(tmp, path)
        self._sizes[meta.id] = size
        self.used_bytes += size
        return evicted

    def _make_room(self, size: int) -> list[Evicted]:
        evicted: list[Evicted] = []
        while self._sizes and self.used_bytes + size > self.budget_bytes:
            old_id = next(iter(self._sizes))
            self.remove(old_id)
            evicted.append(Evicted(old_id, None))
        return evicted

    def get(self, entry_id: str) -> bytearray | None:
        """The entry's bytes, checked against their checksum; a damaged file is deleted
        with a warning and reads as a miss."""
        if entry_id not in self._sizes:
            return None
        path = self._path(entry_id)
        try:
            with path.open("rb") as f:
                header = _Header.read(f, entry_id)
                payload = bytearray(header.payload_bytes)
                if f.readinto(payload) != header.payload_bytes:
                    raise CorruptEntry("truncated")
            if hashlib.blake2b(payload).hexdigest() != header.checksum:
                raise CorruptEntry("checksum mismatch")
        except (OSError, CorruptEntry, ValueError, KeyError) as exc:
            logger.warning("dropping damaged KV state file %s: %s", path.name, exc)
            self.remove(entry_id)
            return None
        self._sizes.move_to_end(entry_id)
        os.utime(path)  # so that the order of use survives a restart
        return payload

    def remove(self, entry_id: str) -> None:
        size = self._sizes.pop(entry_id, None)
        if size is not None:
            self.used_bytes -= size
            self._path(entry_id).unlink(missing_ok=True)


@dataclass(frozen=True, slots=True)
class _Header:
    meta: EntryMeta
    payload_bytes: int
    checksum: str
    size: int  # bytes before the payload

    @classmethod
    def read(cls, f: BinaryIO, entry_id: str) -> _Header:
        if f.read(len(_MAGIC)) != _MAGIC:
            raise CorruptEntry("not a KV state file")
        (length,) = _LENGTH.unpack(f.read(_LENGTH.size))
        header = json.loads(f.read(length))
        meta = EntryMeta(
            id=entry_id,
            tokens=array("i", header["tokens"]),
            public_tokens=int(header["public_tokens"]),
            owner=bytes.fromhex(header["owner"]),
            drafted_from=header.get("drafted_from"),
        )
        return cls(
            meta=meta,
            payload_bytes=int(header["payload_bytes"]),
            checksum=str(header["blake2b"]),
            size=len(_MAGIC) + _LENGTH.size + length,
        )
