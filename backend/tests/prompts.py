"""How many tokens of a prompt are public, as the embedded engine of a live server counts them."""

from __future__ import annotations

from collections.abc import Sequence

from chatbot.agents.documents import load_documents
from chatbot.agents.layout import preamble
from chatbot.engines.base import GenerationRequest, SamplingParams
from chatbot.engines.embedded import EmbeddedEngine
from chatbot.models.domain import ChatMessage
from tests.conftest import LiveServer


def public_tokens(
    server: LiveServer, messages: Sequence[ChatMessage] | None = None, public: int = 1
) -> int:
    """Tokens of the public part of ``messages``; by default, of the prefix every conversation
    shares (system prompt, documents, few-shot examples)."""
    engine = server.state.engine
    assert isinstance(engine, EmbeddedEngine)
    if messages is None:
        settings = server.state.settings
        documents = load_documents(settings.docs_dir, max_chars=settings.docs_max_chars)
        messages = [preamble(settings.system_prompt, documents)]
    request = GenerationRequest(
        messages=tuple(messages),
        sampling=SamplingParams(max_tokens=1, temperature=0.0, top_p=1.0),
        cache_salt="anyone",
        public_messages=public,
    )
    return engine.prompt_key(request).public_tokens
