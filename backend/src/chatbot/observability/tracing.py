"""Langfuse tracing of conversation turns, through its LangChain callback handler.

Off unless both Langfuse keys are set; off means no client, no handler and no warning per
request. Every turn becomes one trace: session id = conversation id, user id, a span per
graph node (the router, the agent that answered) and a generation with its usage, cached
tokens included, and its completion start time at the first token.
"""

from __future__ import annotations

import logging
from typing import Any

from langchain_core.runnables import RunnableConfig

logger = logging.getLogger(__name__)


class Tracer:
    def __init__(
        self,
        *,
        public_key: str | None = None,
        secret_key: str | None = None,
        base_url: str | None = None,
    ) -> None:
        """On when both keys are given; ``base_url``: Langfuse's, or its cloud when None."""
        self._public_key = public_key
        self._client: Any = None
        if public_key and secret_key:
            # Imported only when on: the SDK sets up OpenTelemetry as it loads.
            from langfuse import Langfuse

            self._client = Langfuse(public_key=public_key, secret_key=secret_key, base_url=base_url)
            logger.info("Langfuse tracing on, exporting to %s", base_url or "the cloud")

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def run_config(self, *, user_id: str, session_id: str) -> RunnableConfig:
        """The callbacks and trace attributes of one turn's graph run."""
        if self._client is None:
            return {"run_name": "turn"}
        from langfuse.langchain import CallbackHandler

        return {
            "run_name": "turn",
            "callbacks": [CallbackHandler(public_key=self._public_key)],
            "metadata": {"langfuse_session_id": session_id, "langfuse_user_id": user_id},
        }

    def flush(self) -> None:
        if self._client is not None:
            self._client.flush()

    def shutdown(self) -> None:
        if self._client is not None:
            self._client.shutdown()
