"""Turns every error into the OpenAI-shaped JSON body ``{"error": {type, message, code}}``."""

from __future__ import annotations

import logging
import math
import re
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from chatbot.models.errors import ChatbotError
from chatbot.models.schemas import ErrorDetail, ErrorResponse

logger = logging.getLogger(__name__)

_HTTP_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
}


def error_body(error: ChatbotError) -> dict[str, object]:
    detail = ErrorDetail(type=error.type, message=error.message, code=error.code)
    return ErrorResponse(error=detail).model_dump()


def error_response(
    status: int, type_: str, message: str, code: str, retry_after: float | None = None
) -> JSONResponse:
    headers = {"Retry-After": str(math.ceil(retry_after))} if retry_after else None
    if status == HTTPStatus.UNAUTHORIZED:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    body = ErrorResponse(error=ErrorDetail(type=type_, message=message, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


async def _chatbot_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ChatbotError)
    if exc.status >= 500:
        logger.warning("%s: %s", exc.code, exc.message)
    return error_response(exc.status, exc.type, exc.message, exc.code, exc.retry_after)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_response(
            400, "invalid_request_error", "the body is not valid JSON", "invalid_json"
        )
    # A value that fits no branch of a union fails each branch: the branch of the value's
    # own type says what is wrong with it (a stop string too short, not "not a list").
    fitting = [e for e in errors if not str(e.get("type", "")).endswith("_type")]
    first = (fitting or errors or [{}])[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if _is_field(p))
    message = f"{where}: {first.get('msg', 'invalid value')}" if where else str(first.get("msg"))
    return error_response(422, "invalid_request_error", message, "validation_error")


def _is_field(part: object) -> bool:
    """A field name or an index in an error's location, not where it sits ("body") nor a
    validator's or a union branch's tag ("function-after[...]", "list[TextPart]")."""
    return isinstance(part, int) or (
        isinstance(part, str) and part != "body" and _FIELD.match(part) is not None
    )


_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    phrase = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")
    type_ = _HTTP_TYPES.get(exc.status_code, "invalid_request_error")
    response = error_response(exc.status_code, type_, str(exc.detail), phrase)
    response.headers.update(exc.headers or {})
    if exc.status_code == HTTPStatus.METHOD_NOT_ALLOWED:
        # RFC 9110: every method of the resource. Starlette names only those of the first
        # route on the path, and each method of a path is a route of its own here.
        response.headers["Allow"] = _allowed_methods(request)
    return response


def _allowed_methods(request: Request) -> str:
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods:
            match, _ = route.matches(request.scope)
            if match is not Match.NONE:
                methods |= route.methods
    return ", ".join(sorted(methods))


async def _unexpected_error(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error", exc_info=exc)
    return error_response(500, "server_error", "internal server error", "internal_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ChatbotError, _chatbot_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
