"""The documents the knowledge agent answers from, loaded once at start-up.

They are placed in the prompt prefix that every conversation shares, whatever its agent, so
their KV cache is computed once per server and then served to every user and every turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from chatbot.models.errors import ConfigurationError

SUFFIXES = (".md", ".txt")


@dataclass(frozen=True, slots=True)
class Document:
    name: str
    """The file name; answers cite it."""
    title: str
    text: str


def load_documents(folder: Path | None, *, max_chars: int) -> tuple[Document, ...]:
    """The documents of ``folder`` (the bundled set when None), in file-name order so that
    the shared prefix is the same on every start and every replica."""
    if folder is None:
        root = resources.files("chatbot.agents") / "documents"
        files = [(entry.name, entry.read_text("utf-8")) for entry in root.iterdir()]
    else:
        files = [(path.name, path.read_text("utf-8")) for path in folder.iterdir()]
    documents = tuple(
        _document(name, text)
        for name, text in sorted(files)
        if name.endswith(SUFFIXES) and text.strip()
    )
    total = sum(len(d.text) for d in documents)
    if total > max_chars:
        raise ConfigurationError(
            f"the documents have {total} characters; CHATBOT_DOCS_MAX_CHARS allows {max_chars}. "
            "They all go into the prompt prefix, which must leave room for the conversation."
        )
    return documents


def _document(name: str, text: str) -> Document:
    first, _, rest = text.strip().partition("\n")
    if first.startswith("#"):
        return Document(name=name, title=first.lstrip("#").strip(), text=rest.strip())
    return Document(name=name, title=Path(name).stem, text=text.strip())
