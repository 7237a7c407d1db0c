"""How prompts are keyed: chained hashes of fixed-size token chunks, salted per owner.

The hash of chunk ``i`` covers the hash of chunk ``i - 1`` and the chunk's tokens, so equal
hashes mean equal prefixes (as in LMCache and vLLM's prefix caching). A chunk that lies
wholly inside the prompt's public part (the server's system prompt, agent instructions,
shared documents) is hashed unsalted and is shared by every user; any other chunk is
hashed with its owner's salt, so one user's content can never match another user's, and
nobody can time whether someone else sent the same words.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

DIGEST_BYTES = 16


def owner_digest(salt: str) -> bytes:
    """What a cache keeps of a user's salt: never the user id itself."""
    return hashlib.blake2b(salt.encode(), digest_size=DIGEST_BYTES, person=b"kv-owner").digest()


@dataclass(frozen=True, slots=True)
class PromptKey:
    """A prompt as the cache sees it."""

    tokens: Sequence[int]
    public_tokens: int  # the leading tokens anyone may share
    owner: bytes  # owner_digest() of whose private content the rest is


def chunk_hashes(key: PromptKey, *, namespace: bytes, chunk_tokens: int) -> list[bytes]:
    """The chain hash at the end of every full chunk of ``key.tokens``."""
    hashes: list[bytes] = []
    previous = namespace
    for end in range(chunk_tokens, len(key.tokens) + 1, chunk_tokens):
        h = hashlib.blake2b(previous, digest_size=DIGEST_BYTES)
        h.update(b"" if end <= key.public_tokens else key.owner)
        h.update(array("i", key.tokens[end - chunk_tokens : end]).tobytes())
        previous = h.digest()
        hashes.append(previous)
    return hashes


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def shareable_prefix(held: PromptKey, wanted: PromptKey) -> int:
    """How many leading tokens of ``held``'s KV state may serve ``wanted``: their common
    prefix, and beyond the public part only when both belong to the same owner."""
    n = common_prefix_length(held.tokens, wanted.tokens)
    if held.owner != wanted.owner:
        n = min(n, held.public_tokens, wanted.public_tokens)
    return n
