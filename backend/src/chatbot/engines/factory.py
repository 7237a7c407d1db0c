"""Builds the configured engine by name."""

from __future__ import annotations

from pathlib import Path
from typing import assert_never

from chatbot.config import EngineKind, Settings
from chatbot.engines.base import Engine
from chatbot.engines.embedded import EmbeddedEngine, state_namespace
from chatbot.engines.model_files import resolve_model_path
from chatbot.kvcache import KVCache


def create_engine(settings: Settings) -> Engine:
    match settings.engine:
        case EngineKind.EMBEDDED:
            path = resolve_model_path(settings.model_path, settings.cache_dir)
            return EmbeddedEngine(
                path,
                model_id=settings.model_id or path.stem,
                context_tokens=settings.context_tokens,
                batch_tokens=settings.batch_tokens,
                threads=settings.threads,
                queue_size=settings.queue_size,
                few_shot=settings.few_shot,
                kv_cache=_kv_cache(settings, path) if settings.prefix_cache else None,
            )
    # Settings refuse an unknown engine name, listing the valid ones (EngineKind).
    assert_never(settings.engine)


def _kv_cache(settings: Settings, model_path: Path) -> KVCache:
    return KVCache(
        namespace=state_namespace(model_path),
        chunk_tokens=settings.kv_chunk_tokens,
        ram_bytes=settings.kv_ram_bytes,
        disk_bytes=settings.kv_disk_bytes,
        disk_dir=settings.kv_folder,
    )
