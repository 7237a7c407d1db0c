"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from chatbot.api.deps import StateDep, metrics_reader
from chatbot.models.errors import ServiceUnavailable
from chatbot.models.schemas import ErrorResponse

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "The model is not loaded yet."}})
async def readyz(state: StateDep) -> dict[str, str]:
    if not state.engine.ready:
        raise ServiceUnavailable("the model is not loaded yet", retry_after=1)
    return {"status": "ready", "model": state.engine.model_id}


@router.get(
    "/metrics",
    response_class=Response,
    dependencies=[Depends(metrics_reader)],
    responses={
        401: {
            "model": ErrorResponse,
            "description": "CHATBOT_METRICS_TOKEN is set and the request does not carry it.",
        },
        403: {
            "model": ErrorResponse,
            "description": "No token is set and the client is not on loopback.",
        },
    },
)
async def metrics(state: StateDep) -> Response:
    """Prometheus metrics of the whole process, all users together: with
    CHATBOT_METRICS_TOKEN it needs `Authorization: Bearer <token>`; without, it answers
    loopback clients only."""
    return Response(state.metrics.export(), media_type="text/plain; version=0.0.4; charset=utf-8")
