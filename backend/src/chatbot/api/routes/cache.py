"""What the KV cache holds and how often it hits: ``GET /v1/cache/stats``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from chatbot.api.deps import CurrentUser, GenerationsDep
from chatbot.models.schemas import CacheStatsResponse, ErrorResponse

router = APIRouter(prefix="/v1/cache", tags=["cache"])

_ERRORS: dict[int | str, dict[str, Any]] = {401: {"model": ErrorResponse}}


@router.get("/stats", responses=_ERRORS)
async def cache_stats(user: CurrentUser, generations: GenerationsDep) -> CacheStatsResponse:
    """Counters per tier (live context, RAM, disk), and the caller's own hit rate; other
    users' lookups are counted in the totals but never shown one by one."""
    return generations.cache_stats(user)
