"""The product's one exception hierarchy; the API turns each into an OpenAI-shaped error.

::

    ChatbotError                      500 server_error
    ├── InvalidRequest                400 invalid_request_error
    │   └── ContextLengthExceeded     400 invalid_request_error / context_length_exceeded
    ├── AuthenticationFailed          401 authentication_error
    ├── Forbidden                     403 permission_error
    ├── NotFound                      404 not_found_error
    ├── Conflict                      409 conflict_error
    ├── PayloadTooLarge               413 invalid_request_error / payload_too_large
    ├── RateLimited                   429 rate_limit_error (Retry-After)
    ├── ServiceUnavailable            503 service_unavailable (Retry-After)
    │   └── EngineOverloaded          503 .../ engine_overloaded
    └── EngineFailure                 500 engine_error (a failure inside generation)
"""

from __future__ import annotations

from http import HTTPStatus


class ChatbotError(Exception):
    status: HTTPStatus = HTTPStatus.INTERNAL_SERVER_ERROR
    type: str = "server_error"
    code: str = "internal_error"

    def __init__(
        self, message: str, *, code: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.retry_after = retry_after


class InvalidRequest(ChatbotError):
    status = HTTPStatus.BAD_REQUEST
    type = "invalid_request_error"
    code = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class AuthenticationFailed(ChatbotError):
    status = HTTPStatus.UNAUTHORIZED
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(ChatbotError):
    status = HTTPStatus.FORBIDDEN
    type = "permission_error"
    code = "forbidden"


class NotFound(ChatbotError):
    status = HTTPStatus.NOT_FOUND
    type = "not_found_error"
    code = "not_found"


class Conflict(ChatbotError):
    status = HTTPStatus.CONFLICT
    type = "conflict_error"
    code = "conflict"


class PayloadTooLarge(ChatbotError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    type = "invalid_request_error"
    code = "payload_too_large"


class RateLimited(ChatbotError):
    status = HTTPStatus.TOO_MANY_REQUESTS
    type = "rate_limit_error"
    code = "rate_limited"


class ServiceUnavailable(ChatbotError):
    status = HTTPStatus.SERVICE_UNAVAILABLE
    type = "service_unavailable"
    code = "not_ready"


class EngineOverloaded(ServiceUnavailable):
    code = "engine_overloaded"


class EngineFailure(ChatbotError):
    type = "engine_error"
    code = "generation_failed"


class ConfigurationError(Exception):
    """The server cannot start as configured; the message says which setting to change."""
