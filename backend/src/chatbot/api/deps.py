"""Typed dependencies, so that a route reads like its signature."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from chatbot.api.server import Drain
from chatbot.config import LOCAL_USER, Settings
from chatbot.engines.base import Engine
from chatbot.models.errors import AuthenticationFailed, Forbidden
from chatbot.observability.metrics import Metrics
from chatbot.observability.tracing import Tracer
from chatbot.services.completions import CompletionService
from chatbot.services.conversations import ConversationService
from chatbot.services.drafts import DraftService
from chatbot.services.limits import AcceptQueue, RequestRateLimiter


@dataclass(frozen=True, slots=True)
class AppState:
    """What the app's lifespan builds and every request uses (``app.state.chatbot``)."""

    settings: Settings
    metrics: Metrics
    engine: Engine
    conversations: ConversationService
    drafts: DraftService
    completions: CompletionService
    tracer: Tracer
    rate_limiter: RequestRateLimiter
    draft_rate_limiter: RequestRateLimiter
    """Drafts have a bucket of their own, at the same rate: a user typing never spends the
    requests their messages need."""
    accept_queue: AcceptQueue | None = None
    """The listening socket's accept queue, when the app knows its socket."""
    drain: Drain = field(default_factory=Drain)
    """Expires when a graceful stop runs out: open streams then end with a last event."""
    key_index: dict[bytes, str] = field(init=False, repr=False)
    """SHA-256 of each API key → its user."""

    def __post_init__(self) -> None:
        index = {_key_digest(key.encode()): user for key, user in self.settings.api_keys.items()}
        object.__setattr__(self, "key_index", index)


def _key_digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


# The dependencies are coroutines although they never wait: FastAPI runs a plain function
# dependency on a worker thread, a thread hop per dependency and request.


async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.chatbot
    return state


_bearer = HTTPBearer(auto_error=False, description="An API key from CHATBOT_API_KEYS.")


async def get_current_user(
    state: Annotated[AppState, Depends(get_state)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    user = _authenticated(state, credentials)
    state.rate_limiter.check(user)
    return user


async def get_drafting_user(
    state: Annotated[AppState, Depends(get_state)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The caller, as ``get_current_user``, counted against the drafts' rate instead."""
    user = _authenticated(state, credentials)
    state.draft_rate_limiter.check(user)
    return user


def _authenticated(state: AppState, credentials: HTTPAuthorizationCredentials | None) -> str:
    keys = state.settings.api_keys
    if not keys:
        return LOCAL_USER
    if credentials is None:
        raise AuthenticationFailed(
            "an API key is required: 'Authorization: Bearer <key>'", code="missing_api_key"
        )
    # Looked up by the offered key's SHA-256: the time taken depends on that digest alone,
    # which says nothing about any valid key, and stays the same with 10,000 keys as with 2.
    user = state.key_index.get(_key_digest(credentials.credentials.encode()))
    if user is None:
        raise AuthenticationFailed("the API key is not valid")
    return user


async def metrics_reader(state: Annotated[AppState, Depends(get_state)], request: Request) -> None:
    """/metrics counts every user's activity together: with CHATBOT_METRICS_TOKEN it needs
    that token; without, it answers loopback clients only (a scraper beside the server).
    The header is read here, not declared as a security scheme: the schema would then say
    /metrics always needs one."""
    token = state.settings.metrics_token
    if token is not None:
        scheme, _, offered = request.headers.get("authorization", "").partition(" ")
        presented = offered.strip().encode() if scheme.lower() == "bearer" else b""
        if not hmac.compare_digest(_key_digest(presented), _key_digest(token.encode())):
            raise AuthenticationFailed(
                "/metrics needs 'Authorization: Bearer <CHATBOT_METRICS_TOKEN>'",
                code="invalid_metrics_token",
            )
        return
    if not _is_loopback(request.client.host if request.client else ""):
        raise Forbidden(
            "/metrics answers loopback clients only; set CHATBOT_METRICS_TOKEN to scrape it "
            "from elsewhere",
            code="metrics_loopback_only",
        )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def not_overloaded(state: Annotated[AppState, Depends(get_state)]) -> None:
    """Refuses a new answer (503) while the process falls behind: first, so that a refusal
    costs next to nothing and the backlog drains."""
    if state.accept_queue is not None:
        state.accept_queue.check()


async def _settings(state: Annotated[AppState, Depends(get_state)]) -> Settings:
    return state.settings


async def _conversations(state: Annotated[AppState, Depends(get_state)]) -> ConversationService:
    return state.conversations


async def _drafts(state: Annotated[AppState, Depends(get_state)]) -> DraftService:
    return state.drafts


async def _completions(state: Annotated[AppState, Depends(get_state)]) -> CompletionService:
    return state.completions


StateDep = Annotated[AppState, Depends(get_state)]
CurrentUser = Annotated[str, Depends(get_current_user)]
DraftingUser = Annotated[str, Depends(get_drafting_user)]
SettingsDep = Annotated[Settings, Depends(_settings)]
ConversationsDep = Annotated[ConversationService, Depends(_conversations)]
DraftsDep = Annotated[DraftService, Depends(_drafts)]
CompletionsDep = Annotated[CompletionService, Depends(_completions)]
