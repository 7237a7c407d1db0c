"""Log set-up: one line per record, with the request id when there is one.

What is logged: ids (request, conversation), paths, statuses, counts, timings and errors.
Never an API key, a header, a query string or a body: what users write stays out of logs.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar

request_id: ContextVar[str] = ContextVar("request_id", default="-")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class RequestIdFilter(logging.Filter):
    """Stamps each record with the id of the request being served (``-`` outside one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


def log_handler() -> logging.Handler:
    """A handler writing ``LOG_FORMAT`` lines to stderr."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    return handler


def configure_logging(level: str) -> None:
    root = logging.getLogger("chatbot")
    root.handlers[:] = [log_handler()]
    root.setLevel(level.upper())
    root.propagate = False
