"""Builds the configured engine by name."""

from __future__ import annotations

from typing import assert_never

from chatbot.config import EngineKind, Settings
from chatbot.engines.base import Engine
from chatbot.engines.embedded import EmbeddedEngine
from chatbot.engines.model_files import resolve_model_path


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
                prefix_cache=settings.prefix_cache,
            )
    # Settings refuse an unknown engine name, listing the valid ones (EngineKind).
    assert_never(settings.engine)
