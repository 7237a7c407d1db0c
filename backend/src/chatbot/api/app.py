"""The app factory: builds the FastAPI app; its lifespan owns the engine and the services."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from langgraph.checkpoint.memory import InMemorySaver

from chatbot import __version__
from chatbot.agents.documents import load_documents
from chatbot.agents.graph import Agents
from chatbot.agents.state import checkpoint_serializer
from chatbot.api.deps import Services
from chatbot.api.errors import install_error_handlers
from chatbot.api.middleware import RequestContextMiddleware
from chatbot.api.routes import cache, conversations, health, openai_compat
from chatbot.config import Settings
from chatbot.engines.base import Engine
from chatbot.engines.factory import create_engine
from chatbot.observability.metrics import Metrics
from chatbot.observability.tracing import Tracer
from chatbot.services.conversations import ConversationService
from chatbot.services.generation import GenerationService
from chatbot.services.limits import StreamLimiter
from chatbot.services.store import InMemoryStore


def create_app(settings: Settings, *, engine: Engine | None = None) -> FastAPI:
    """``engine`` replaces the configured one (tests wrap the real engine to inject faults)."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        documents = load_documents(settings.docs_dir, max_chars=settings.docs_max_chars)
        running = engine if engine is not None else create_engine(settings)
        await running.start()
        tracer = Tracer(settings)
        try:
            metrics.watch_queue(lambda: running.queue_depth)
            metrics.watch_kv_cache(running.cache_stats)
            generations = GenerationService(
                running, settings, metrics, StreamLimiter(settings.max_streams_per_user)
            )
            app.state.services = Services(
                settings=settings,
                metrics=metrics,
                engine=running,
                generations=generations,
                conversations=ConversationService(
                    InMemoryStore(),
                    generations,
                    Agents(
                        settings,
                        documents,
                        InMemorySaver(serde=checkpoint_serializer()),
                        metrics,
                        running,
                    ),
                    tracer,
                    settings,
                ),
                tracer=tracer,
            )
            yield
        finally:
            tracer.shutdown()
            await running.aclose()

    app = FastAPI(
        title="lmcache-chatbot",
        version=__version__,
        summary="A chatbot backend whose answers start fast because the KV cache of what "
        "the model has already read is reused.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(
        RequestContextMiddleware, max_body_bytes=settings.max_body_bytes, metrics=metrics
    )
    app.include_router(conversations.router)
    app.include_router(openai_compat.router)
    app.include_router(cache.router)
    app.include_router(health.router)
    return app
