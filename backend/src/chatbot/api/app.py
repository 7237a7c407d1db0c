"""The app factory: builds the FastAPI app; its lifespan owns the engine and the services."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from chatbot import __version__
from chatbot.agents.documents import load_documents
from chatbot.agents.graph import TurnGraph
from chatbot.agents.state import checkpoint_serializer
from chatbot.api.deps import AppState
from chatbot.api.errors import install_error_handlers
from chatbot.api.middleware import RequestContextMiddleware, SecurityHeadersMiddleware
from chatbot.api.routes import cache, conversations, health, openai_compat
from chatbot.api.server import Drain
from chatbot.config import Settings
from chatbot.engines.base import Engine
from chatbot.engines.factory import create_engine
from chatbot.models.domain import ChatMessage
from chatbot.observability.metrics import Metrics
from chatbot.observability.tracing import Tracer
from chatbot.persistence.storage import open_storage
from chatbot.services.completions import CompletionService
from chatbot.services.conversations import ConversationService
from chatbot.services.drafts import DraftService
from chatbot.services.generation import GenerationService
from chatbot.services.limits import (
    AcceptQueue,
    RequestRateLimiter,
    StreamLimiter,
    TokenBudget,
)
from chatbot.web import install_page


def create_app(
    settings: Settings, *, engine: Engine | None = None, accept_queue: AcceptQueue | None = None
) -> FastAPI:
    """``engine`` replaces the configured one (tests wrap the real engine to inject faults);
    ``accept_queue`` watches the listening socket, when the caller made it (``chatbot serve``)."""
    metrics = Metrics()
    # Started by the server when a stop begins (chatbot serve); open streams end at its
    # deadline with a last event.
    drain = Drain()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        documents = load_documents(settings.docs_dir, max_chars=settings.docs_max_chars)
        running = engine if engine is not None else create_engine(settings)
        async with AsyncExitStack() as stack:
            await running.start()
            stack.push_async_callback(running.aclose)
            tracer = Tracer(
                public_key=settings.langfuse_public_key,
                secret_key=settings.langfuse_secret_key,
                base_url=settings.langfuse_base_url,
            )
            stack.callback(tracer.shutdown)
            storage = await stack.enter_async_context(
                open_storage(
                    settings.store_url,
                    serde=checkpoint_serializer(),
                    pool_size=settings.store_pool_size,
                )
            )
            metrics.watch_queue(lambda: running.queue_depth)
            metrics.watch_kv_cache(running.cache_stats)
            metrics.watch_batches(running.batch_stats)
            metrics.watch_drafts(running.draft_stats)
            budget = TokenBudget(settings.tokens_per_minute)
            generations = GenerationService(
                running,
                settings,
                metrics,
                StreamLimiter(settings.max_streams_per_user, settings.max_streams),
                budget,
            )
            graph = TurnGraph(settings, documents, storage.checkpointer, metrics, generations)
            # The preambles every conversation starts with (the agents', with the documents;
            # the OpenAI-compatible API's, the system prompt alone) are read before the
            # first user arrives; the app is ready only once they are in.
            server_prompt = ChatMessage(role="system", content=settings.system_prompt)
            for preamble in dict.fromkeys((graph.preamble, server_prompt)):
                await running.warm((preamble,))
            drafts = DraftService(storage.index, graph, generations, budget, metrics, settings)
            conversations = ConversationService(
                storage.index, generations, graph, tracer, settings, drafts
            )
            # Turns cut short at shutdown are stored before the store closes.
            stack.push_async_callback(conversations.aclose)
            app.state.chatbot = AppState(
                settings=settings,
                metrics=metrics,
                engine=running,
                conversations=conversations,
                drafts=drafts,
                completions=CompletionService(generations, settings),
                tracer=tracer,
                rate_limiter=RequestRateLimiter(settings.requests_per_minute),
                draft_rate_limiter=RequestRateLimiter(settings.requests_per_minute),
                accept_queue=accept_queue,
                drain=drain,
            )
            yield

    app = FastAPI(
        title="lmcache-chatbot",
        version=__version__,
        summary="A chatbot backend whose answers start fast because the KV cache of what "
        "the model has already read is reused.",
        lifespan=lifespan,
    )
    app.state.drain = drain
    install_error_handlers(app)
    # Outermost last: security headers on every response, CORS headers on every response
    # (a 413 included, so that a browser can read it), then ids, the body limit and metrics.
    app.add_middleware(
        RequestContextMiddleware, max_body_bytes=settings.max_body_bytes, metrics=metrics
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    docs = (app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url)
    app.add_middleware(SecurityHeadersMiddleware, csp_exempt=[path for path in docs if path])
    app.include_router(conversations.router)
    app.include_router(openai_compat.router)
    app.include_router(cache.router)
    app.include_router(health.router)
    install_page(app)
    _state_limits_in_openapi(app, settings)
    return app


def _state_limits_in_openapi(app: FastAPI, settings: Settings) -> None:
    """The schema states this server's own ``max_tokens`` limit, a setting, so that a value
    the schema allows is one the server takes."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schemas = build().get("components", {}).get("schemas", {})
            for name in ("MessageCreate", "ChatCompletionRequest"):
                properties = schemas.get(name, {}).get("properties", {})
                for field in ("max_tokens", "max_completion_tokens"):
                    prop = properties.get(field, {})
                    for branch in prop.get("anyOf", [prop]):
                        if branch.get("type") == "integer":
                            branch["maximum"] = settings.max_tokens_limit
        return app.openapi_schema or build()

    app.openapi = openapi  # type: ignore[method-assign]
