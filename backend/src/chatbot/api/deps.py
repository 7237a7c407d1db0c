"""Typed dependencies, so that a route reads like its signature."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from chatbot.config import LOCAL_USER, Settings
from chatbot.engines.base import Engine
from chatbot.models.errors import AuthenticationFailed
from chatbot.observability.metrics import Metrics
from chatbot.observability.tracing import Tracer
from chatbot.services.conversations import ConversationService
from chatbot.services.generation import GenerationService
from chatbot.services.limits import RequestRateLimiter


@dataclass(frozen=True, slots=True)
class Services:
    """What the app's lifespan builds and every request uses."""

    settings: Settings
    metrics: Metrics
    engine: Engine
    generations: GenerationService
    conversations: ConversationService
    tracer: Tracer
    rate_limiter: RequestRateLimiter


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


_bearer = HTTPBearer(auto_error=False, description="An API key from CHATBOT_API_KEYS.")


def get_current_user(
    services: Annotated[Services, Depends(get_services)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    keys = services.settings.api_keys
    if not keys:
        services.rate_limiter.check(LOCAL_USER)
        return LOCAL_USER
    if credentials is None:
        raise AuthenticationFailed(
            "an API key is required: 'Authorization: Bearer <key>'", code="missing_api_key"
        )
    offered = credentials.credentials.encode()
    user: str | None = None
    # Every key is compared, in constant time, so the time taken says nothing about them.
    for key, name in keys.items():
        if hmac.compare_digest(key.encode(), offered):
            user = name
    if user is None:
        raise AuthenticationFailed("the API key is not valid")
    services.rate_limiter.check(user)
    return user


def _settings(services: Annotated[Services, Depends(get_services)]) -> Settings:
    return services.settings


def _conversations(services: Annotated[Services, Depends(get_services)]) -> ConversationService:
    return services.conversations


def _generations(services: Annotated[Services, Depends(get_services)]) -> GenerationService:
    return services.generations


ServicesDep = Annotated[Services, Depends(get_services)]
CurrentUser = Annotated[str, Depends(get_current_user)]
SettingsDep = Annotated[Settings, Depends(_settings)]
ConversationsDep = Annotated[ConversationService, Depends(_conversations)]
GenerationsDep = Annotated[GenerationService, Depends(_generations)]
