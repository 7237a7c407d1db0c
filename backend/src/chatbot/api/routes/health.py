"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response

from chatbot.api.deps import ServicesDep
from chatbot.models.errors import ServiceUnavailable

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "The model is not loaded yet."}})
async def readyz(services: ServicesDep) -> dict[str, str]:
    if not services.engine.ready:
        raise ServiceUnavailable("the model is not loaded yet", retry_after=1)
    return {"status": "ready", "model": services.engine.model_id}


@router.get("/metrics", response_class=Response)
async def metrics(services: ServicesDep) -> Response:
    return Response(
        services.metrics.export(), media_type="text/plain; version=0.0.4; charset=utf-8"
    )
