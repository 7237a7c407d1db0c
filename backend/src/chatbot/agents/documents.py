"""The documents the knowledge agent answers from, loaded once at start-up.

They are placed in the prompt prefix that every conversation shares, whatever its agent, so
their KV cache is computed once per server and then served to every user and every turn.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
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
    root = resources.files("chatbot.agents") / "documents" if folder is None else folder
    files = sorted(
        (entry.name, entry.read_text("utf-8"))
        for entry in root.iterdir()
        if entry.is_file() and entry.name.endswith(SUFFIXES)
    )
    documents = tuple(_document(name, text) for name, text in files if text.strip())
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


_WORD = re.compile(r"[a-z][a-z0-9\-]{2,}")
_ABOUT_US = re.compile(r"\b(lmcache|chatbot|documentation|docs?|this (server|product|api))\b")
_STOPWORDS = frozenset(
    [
        "the",
        "and",
        "for",
        "are",
        "but",
        "not",
        "you",
        "your",
        "with",
        "this",
        "that",
        "have",
        "from",
        "they",
        "what",
        "when",
        "where",
        "which",
        "who",
        "how",
        "why",
        "can",
        "does",
        "did",
        "was",
        "were",
        "will",
        "would",
        "should",
        "could",
        "there",
        "their",
        "them",
        "then",
        "than",
        "into",
        "about",
        "also",
        "more",
        "some",
        "any",
        "all",
        "its",
        "it's",
        "our",
        "out",
        "one",
        "two",
        "use",
        "used",
        "using",
        "like",
        "just",
        "only",
        "each",
        "other",
        "over",
        "such",
        "very",
        "been",
        "being",
        "before",
        "after",
        "because",
        "while",
        "these",
        "those",
    ]
)


def content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS}


class DocumentIndex:
    """Finds the document a text is about, by the content words they share: enough for a
    handful of documents that all sit in the prompt anyway (no retrieval is needed to
    answer, only to route and to cite)."""

    def __init__(self, documents: Sequence[Document]) -> None:
        self._vocabulary = [(d, content_words(f"{d.title} {d.text}")) for d in documents]

    def about(self, text: str) -> Document | None:
        """The best match if it shares two content words, or one when the text names the
        product or its documentation."""
        words = content_words(text)
        if not words or not self._vocabulary:
            return None
        best, vocabulary = max(self._vocabulary, key=lambda item: len(words & item[1]))
        overlap = len(words & vocabulary)
        if overlap >= 2 or (overlap == 1 and _ABOUT_US.search(text.lower())):
            return best
        return None
