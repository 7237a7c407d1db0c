"""What the KV cache holds and how often it hits: ``GET /v1/cache/stats``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from chatbot.api.deps import CurrentUser, StateDep
from chatbot.models.schemas import CacheStatsResponse, ErrorResponse

router = APIRouter(prefix="/v1/cache", tags=["cache"])

_ERRORS: dict[int | str, dict[str, Any]] = {401: {"model": ErrorResponse}}


@router.get("/stats", responses=_ERRORS)
async def cache_stats(user: CurrentUser, state: StateDep) -> CacheStatsResponse:
    """The caller's own lookups and hits; for an operator (CHATBOT_OPERATORS) also the
    whole cache: counters per tier (live context, RAM, disk) for all users together, whose
    changes would otherwise show one user what the others do."""
    cache = state.engine.cache_stats()
    return CacheStatsResponse(
        engine=state.settings.engine.value,
        enabled=cache is not None,
        cache=cache if state.settings.is_operator(user) else None,
        user=state.engine.user_cache_stats(user),
    )
