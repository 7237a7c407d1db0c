"""What the fast tier's tests share: a small folder of documents, and a server on a scripted
engine of its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatbot.engines.base import GenerationRequest
from tests.conftest import LiveServer, Servers
from tests.fakes import FakeEngine


@pytest.fixture
def docs_dir(tmp_path: Path) -> Path:
    """One short document: a small preamble, and a subject the router can recognise."""
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "tea.md").write_text(
        "# Tea\n\nGreen tea leaves are steamed; black tea leaves are oxidised.\n"
    )
    return folder


def fake_server(
    server: Servers, docs_dir: Path, context_tokens: int = 4096, **settings: object
) -> tuple[LiveServer, FakeEngine]:
    """A server on a scripted engine of its own, whose window is ``context_tokens``."""
    engine = FakeEngine(context_tokens=context_tokens)
    chatbot = server.on_engine(engine, docs_dir=docs_dir, context_tokens=context_tokens, **settings)
    return chatbot, engine


def contents(request: GenerationRequest) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in request.messages]
