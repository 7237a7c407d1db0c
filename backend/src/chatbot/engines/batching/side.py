"""A long prompt read beside the answers: a second llama.cpp context on a core of its own.

In the shared context a long prompt is read in small chunks between the answers' steps, and
small chunks deep in a context are dear on a CPU (a 16-token chunk at position 6,144 costs
5.1 ms a token, a 512-token one 2.6). Measured on 2 cores (2026-12-05, Gemma 3 270M): a
6,656-token prompt read in 512-token chunks by a second context on one thread took 24.6 s
while the first context, on the other thread, answered four users at 64 ms a step (p95 68,
largest 73); in the shared context with 150 ms steps the same prompt took 38-45 s and the
answers' gaps reached 290 ms.

So a prompt long enough (the scheduler's ``SIDE_READ_TOKENS``) that arrives while others
are answered is read here, whole but its last token, and its state handed back to its
sequence in the shared context (the same copy a saved state takes), where the last token is
evaluated and the answer sampled. The side context keeps what it read last: the next long
prompt starts from the prefix they share (the public preamble, or all of it for the same
owner).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from chatbot.engines.llama_context import BatchItem, LlamaContext, LlamaError
from chatbot.kvcache import PromptKey
from chatbot.kvcache.keys import shareable_prefix

logger = logging.getLogger(__name__)

_CHUNK = 512
_SEQ = 0


class SideReader:
    """One prompt at a time; ``read`` may be called from any thread, the reading happens on
    the reader's own thread."""

    def __init__(self, shared: LlamaContext, model_path: Path, *, context_tokens: int) -> None:
        """Reads with ``shared``'s model, which must outlive the reader."""
        self._context = LlamaContext(
            model_path,
            sequences=1,
            pool_tokens=context_tokens,
            batch_tokens=_CHUNK,
            threads=1,
            model_of=shared,
        )
        self.context_tokens = self._context.pool_tokens
        self._held = PromptKey([], 0, b"")
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-side")
        self._busy = threading.Event()
        self.tokens_read = 0

    @property
    def busy(self) -> bool:
        return self._busy.is_set()

    def read(
        self, key: PromptKey, upto: int, cancelled: threading.Event
    ) -> Future[bytearray | None]:
        """The state of a sequence holding ``key.tokens[:upto]``; None if ``cancelled`` was
        set meanwhile or llama.cpp failed (the prompt is then read in the shared context)."""
        self._busy.set()
        future = self._thread.submit(self._read, key, upto, cancelled)
        future.add_done_callback(lambda _: self._busy.clear())
        return future

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        self._context.close()

    def _read(self, key: PromptKey, upto: int, cancelled: threading.Event) -> bytearray | None:
        context = self._context
        start = min(shareable_prefix(self._held, key), upto - 1)
        if not context.keep_first(_SEQ, start):
            context.clear(_SEQ)
            start = 0
        self._held = PromptKey(key.tokens[:start], min(start, key.public_tokens), key.owner)
        try:
            while start < upto:
                if cancelled.is_set():
                    return None
                n = min(_CHUNK, upto - start)
                tokens = key.tokens[start : start + n]
                context.decode([BatchItem(t, start + i, _SEQ, False) for i, t in enumerate(tokens)])
                start += n
                self.tokens_read += n
                self._held = PromptKey(key.tokens[:start], min(start, key.public_tokens), key.owner)
            return context.export_state(_SEQ)
        except LlamaError as exc:
            logger.warning("reading a prompt beside the answers failed: %s", exc)
            context.clear(_SEQ)
            self._held = PromptKey([], 0, b"")
            return None
