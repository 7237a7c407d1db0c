"""Builds the configured engine by name."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import assert_never

from chatbot.config import EngineKind, Settings
from chatbot.engines.base import Engine
from chatbot.engines.openai import OpenAIEngine
from chatbot.engines.simulated import GpuModel, SimulatedEngine
from chatbot.kvcache import KVCache


def create_engine(settings: Settings) -> Engine:
    match settings.engine:
        case EngineKind.EMBEDDED:
            # llama.cpp is the optional extra `embedded`: a server on the openai engine (the
            # production image) runs without it.
            try:
                from chatbot.engines.embedded import EmbeddedEngine
                from chatbot.engines.model_files import resolve_model_path
            except ModuleNotFoundError as exc:
                raise RuntimeError(
                    f"CHATBOT_ENGINE=embedded needs the embedded extra ({exc.name} is missing): "
                    "pip install 'lmcache-chatbot[embedded]'"
                ) from exc
            path = resolve_model_path(settings.model_path, settings.cache_dir)
            return EmbeddedEngine(
                path,
                model_id=settings.model_id or path.stem,
                context_tokens=settings.context_tokens,
                batch_tokens=settings.batch_tokens,
                step_bound_s=settings.step_bound_ms / 1000,
                threads=settings.threads,
                parallel=settings.parallel,
                pool_tokens=settings.kv_pool_tokens,
                queue_size=settings.queue_size,
                few_shot=settings.few_shot,
                kv_cache=_kv_cache(settings, path) if settings.prefix_cache else None,
                template=settings.chat_template,
                side_read=settings.side_read,
            )
        case EngineKind.OPENAI:
            assert settings.openai_base_url is not None  # Settings refuse it otherwise
            return OpenAIEngine(
                settings.openai_base_url,
                api_key=settings.openai_api_key,
                model=settings.openai_model,
                model_id=settings.model_id,
                context_tokens=settings.context_tokens,
                affinity_header=settings.openai_affinity_header,
                max_connections=settings.openai_max_connections,
                connect_timeout=settings.openai_connect_timeout,
                read_timeout=settings.openai_read_timeout,
                retries=settings.openai_retries,
                # The server's template cannot be read from here: only 'model' says it is
                # the model's own, with no turn markers to stop at.
                transcript=settings.chat_template != "model",
            )
        case EngineKind.SIMULATED:
            return _simulated(settings)
    # Settings refuse an unknown engine name, listing the valid ones (EngineKind).
    assert_never(settings.engine)


def _kv_cache(settings: Settings, model_path: Path) -> KVCache:
    from chatbot.engines.embedded import state_namespace

    return KVCache(
        namespace=state_namespace(model_path),
        chunk_tokens=settings.kv_chunk_tokens,
        ram_bytes=settings.kv_ram_bytes,
        disk_bytes=settings.kv_disk_bytes,
        disk_dir=settings.kv_folder,
    )


def _simulated(settings: Settings) -> SimulatedEngine:
    gpu = replace(
        GpuModel(),
        decode_tokens_per_s=settings.simulated_decode_tokens_per_s,
        prefill_s_per_token=settings.simulated_prefill_us_per_token / 1e6,
        load_s_per_token=settings.simulated_load_us_per_token / 1e6,
        max_sequences=settings.simulated_max_sequences,
    )
    return SimulatedEngine(
        model_id=settings.model_id or "simulated-8b",
        context_tokens=settings.context_tokens,
        queue_size=settings.queue_size,
        answer_tokens=settings.simulated_answer_tokens,
        gpu=gpu,
        gpu_cache_tokens=settings.simulated_gpu_cache_tokens,
        cpu_cache_tokens=settings.simulated_cpu_cache_tokens,
    )
