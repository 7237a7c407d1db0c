"""The embedded engine: llama.cpp in-process through llama-cpp-python, on the CPU.

One llama.cpp context with ``parallel`` sequences serves every user at once: a worker
thread runs continuous batching over them (``chatbot.engines.batching``), and this module
is its asynchronous face: it renders and tokenizes prompts, admits requests into a bounded
FIFO queue or refuses them at once, and hands each request's events to its consumer on the
event loop. The KV cache (``chatbot.kvcache``) keeps each conversation's state, resident in
the context or saved in RAM and on disk; a request's ``cached_tokens`` are the prompt tokens
it did not have to compute.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import llama_cpp

from chatbot.engines import chat_format, chat_template, model_files
from chatbot.engines.base import (
    DraftStatus,
    EngineEvent,
    Finished,
    Generation,
    GenerationRequest,
    SamplingParams,
)
from chatbot.engines.base import Engine as EngineBase
from chatbot.engines.batching.cores import CoreShare
from chatbot.engines.batching.cost import CPU_PRIOR, StepCostModel
from chatbot.engines.batching.requests import Request
from chatbot.engines.batching.runner import ModelRunner, serve
from chatbot.engines.batching.scheduler import PINNED_SEQUENCES, Scheduler
from chatbot.engines.batching.side import SideReader
from chatbot.engines.llama_context import LlamaContext
from chatbot.engines.stops import Stops, request_stops
from chatbot.kvcache import KVCache, PromptKey, owner_digest
from chatbot.models.cache import CacheStats, LookupStats
from chatbot.models.domain import BatchStats, ChatMessage, DraftStats, PromptFormatInfo
from chatbot.models.errors import ContextLengthExceeded, EngineOverloaded, ServiceUnavailable

logger = logging.getLogger(__name__)

PUBLIC_OWNER = owner_digest("")
"""The owner of a pinned public prefix: it holds no user's content."""


def state_namespace(model_path: Path) -> bytes:
    """What saved sequence states are valid for: these weights, this llama.cpp build, and
    the KV layout the context asks for (f16, full-size sliding-window cache)."""
    h = hashlib.blake2b(model_files.fingerprint(model_path), digest_size=16)
    h.update(f"llama-cpp-python {llama_cpp.__version__}; kv f16; swa_full".encode())
    return h.digest()


class _Stream:
    """A request's events, handed from the worker thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.events: asyncio.Queue[EngineEvent | BaseException | None] = asyncio.Queue()
        self.ended = asyncio.Event()

    def emit(self, item: EngineEvent | BaseException | None) -> None:
        """Thread-safe; None ends the stream."""
        # A closed loop means nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._put, item)

    def _put(self, item: EngineEvent | BaseException | None) -> None:
        self.events.put_nowait(item)
        if item is None:
            self.ended.set()


class _EmbeddedGeneration(Generation):
    def __init__(self, scheduler: Scheduler, job: Request, stream: _Stream) -> None:
        self._scheduler = scheduler
        self._job = job
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[EngineEvent]:
        while True:
            item = await self._stream.events.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def aclose(self) -> None:
        self._job.cancelled.set()
        if self._scheduler.withdraw(self._job):
            self._stream.emit(None)
        else:
            self._scheduler.wake()
        # Shielded: whoever closes us may itself be cancelled, and the engine must not be
        # reported free before the worker thread has let go of the sequence.
        await asyncio.shield(self._stream.ended.wait())


class EmbeddedEngine(EngineBase):
    def __init__(
        self,
        model_path: Path,
        *,
        model_id: str,
        context_tokens: int,
        batch_tokens: int,
        threads: int | None,
        parallel: int,
        pool_tokens: int,
        queue_size: int,
        few_shot: bool,
        kv_cache: KVCache | None = None,
        step_bound_s: float = 0.15,
        template: str = chat_template.AUTO,
        side_read: bool = True,
    ) -> None:
        """``context_tokens``: the most one sequence holds, prompt and answer. ``parallel``:
        sequences answering at once. ``pool_tokens``: KV cells shared by all sequences.
        ``kv_cache``: None recomputes every prompt in full (the benchmarks' baseline).
        ``threads``: None follows the machine's load, up to one thread per core.
        ``template``: ``auto``, ``transcript``, ``model`` or a ``.jinja`` file
        (``chatbot.engines.chat_template.choose``). ``side_read``: on a machine of two cores
        or more, a long prompt arriving while others are answered is read by a second
        context on a core of its own (``batching/side.py``)."""
        self.model_id = model_id
        self._kv_cache = kv_cache
        self._model_path = model_path
        self._context_tokens = context_tokens
        self._batch_tokens = batch_tokens
        self._threads = threads
        self._parallel = parallel
        self._pool_tokens = pool_tokens
        self._queue_size = queue_size
        self._few_shot = few_shot
        self._step_bound_s = step_bound_s
        self._template = template
        self._side_read = side_read
        self._side: SideReader | None = None
        self._format: chat_template.PromptFormat | None = None
        self._template_check: chat_template.TemplateCheck | None = None
        self._segment_tokens: chat_format.SegmentTokens | None = None
        self._context: LlamaContext | None = None
        self._scheduler: Scheduler | None = None
        self._drafts: dict[str, Request] = {}  # the conversation's draft being read
        self._worker: threading.Thread | None = None

    async def start(self) -> None:
        threads = self._threads or os.cpu_count() or 1
        self._context = await asyncio.to_thread(
            LlamaContext,
            self._model_path,
            sequences=self._parallel + PINNED_SEQUENCES,
            pool_tokens=self._pool_tokens,
            batch_tokens=self._batch_tokens,
            threads=threads,
        )
        self._format, self._template_check = self._prompt_format(self._context)
        self._segment_tokens = chat_format.SegmentTokens(self._context.tokenize)
        if self._side_read and threads >= 2:
            self._side = await asyncio.to_thread(
                SideReader, self._context, self._model_path, context_tokens=self._context_tokens
            )
        self._scheduler = Scheduler(
            self._context,
            sequences=self._parallel,
            sequence_tokens=self._context_tokens,
            pool_tokens=self._context.pool_tokens,
            batch_tokens=self._batch_tokens,
            kv_cache=self._kv_cache,
            cost=StepCostModel(),
            step_bound_s=self._step_bound_s,
            side=self._side,
            # One thread fewer: compute spread over the rest, at least one.
            cost_beside=StepCostModel(CPU_PRIOR.times(threads / max(1, threads - 1))),
        )
        cores = CoreShare(threads) if self._threads is None else None  # else fixed
        runner = ModelRunner(self._context, self._kv_cache, cores, threads=threads)
        self._worker = threading.Thread(
            target=serve, args=(self._scheduler, runner), name="llama", daemon=True
        )
        self._worker.start()
        logger.info(
            "embedded engine ready: %s, %d sequences of %d tokens, prompts as %s",
            self._model_path.name,
            self._parallel,
            self._context_tokens,
            self._format.name,
        )

    def _prompt_format(
        self, context: LlamaContext
    ) -> tuple[chat_template.PromptFormat, chat_template.TemplateCheck | None]:
        prompt_format = chat_template.from_context(self._template, context, few_shot=self._few_shot)
        check = prompt_format.check(context.tokenize, context.bos())
        if check is not None and not check.prefix_stable:
            # Not an error: the cache still reuses what the prompts share, measured here.
            logger.warning(
                "the chat template %r is not prefix-stable: a turn's prompt reuses as little "
                "as %.0f %% of the previous turn's KV cache",
                prompt_format.name,
                100 * check.reuse,
            )
        if check is not None and not check.verbatim:
            logger.warning(
                "the chat template %r transforms message content; prompts show it as given",
                prompt_format.name,
            )
        return prompt_format, check

    async def warm(self, public: Sequence[ChatMessage]) -> None:
        """Compute the public prefix that ``public`` (the server's own leading messages)
        renders to into a pinned sequence, so that no user pays for it and every sequence
        shares it by reference."""
        if self._kv_cache is None or not public:
            return
        rendered = self.formatter.render(public, public_messages=len(public))
        tokens, public_tokens = self.tokenize(rendered)
        if public_tokens + self._context_tokens > self._pool_tokens:
            # Pinned, it would leave no room for one full-length sequence beside it.
            logger.warning(
                "the public prefix (%d tokens) is not pinned: the KV pool is too small",
                public_tokens,
            )
            return
        stream = _Stream(asyncio.get_running_loop())
        job = Request(
            key=PromptKey(tokens[:public_tokens], public_tokens, PUBLIC_OWNER),
            sampling=SamplingParams(max_tokens=0, temperature=0.0, top_p=1.0),
            stops=Stops(),
            emit=stream.emit,
            pin=True,
        )
        self.scheduler.submit(job)
        async for event in _EmbeddedGeneration(self.scheduler, job, stream):
            if isinstance(event, Finished) and event.usage is not None:
                logger.info("public prefix computed: %d tokens", event.usage.prompt_tokens)

    async def aclose(self) -> None:
        if self._scheduler is None or self._worker is None:
            return
        for job in self._scheduler.stop():
            job.emit(ServiceUnavailable("the server is shutting down"))
            job.emit(None)
        # Waits for the thread to leave the context before the model is freed.
        await asyncio.to_thread(self._worker.join)
        if self._side is not None:
            await asyncio.to_thread(self._side.close)
            self._side = None
        if self._kv_cache is not None:
            await asyncio.to_thread(self._kv_cache.flush)
            await asyncio.to_thread(self._kv_cache.close)
        if self._context is not None:
            self._context.close()
        self._context = self._scheduler = self._worker = None

    @property
    def ready(self) -> bool:
        return self._scheduler is not None

    @property
    def context_tokens(self) -> int:
        return self._context_tokens

    @property
    def queue_depth(self) -> int:
        return self._scheduler.counts()[1] if self._scheduler is not None else 0

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            raise ServiceUnavailable("the model is not loaded")
        return self._scheduler

    @property
    def context(self) -> LlamaContext:
        if self._context is None:
            raise ServiceUnavailable("the model is not loaded")
        return self._context

    @property
    def formatter(self) -> chat_template.PromptFormat:
        """How this engine lays out prompts (known once the model is loaded)."""
        if self._format is None:
            raise ServiceUnavailable("the model is not loaded")
        return self._format

    def prompt_format(self) -> PromptFormatInfo | None:
        if self._format is None:
            return None
        check = self._template_check
        return PromptFormatInfo(
            name=self._format.name,
            prefix_stable=check is None or check.prefix_stable,
            reuse=1.0 if check is None else check.reuse,
        )

    def batch_stats(self) -> BatchStats | None:
        return self._scheduler.stats() if self._scheduler is not None else None

    def cache_stats(self) -> CacheStats | None:
        if self._kv_cache is None:
            return None
        resident = self._scheduler.resident_sequences() if self._scheduler is not None else 0
        return self._kv_cache.stats(resident)

    def user_cache_stats(self, cache_salt: str) -> LookupStats | None:
        if self._kv_cache is None:
            return None
        return self._kv_cache.owner_stats(owner_digest(cache_salt))

    def tokenize(self, prompt: chat_format.RenderedPrompt) -> tuple[list[int], int]:
        """The prompt's tokens, and how many of them are public material."""
        context, tokenize = self.context, self._segment_tokens
        assert tokenize is not None  # made with the context
        return chat_format.prompt_tokens(prompt, bos=context.bos(), tokenize=tokenize)

    def prompt_key(self, request: GenerationRequest) -> PromptKey:
        prompt = self.formatter.render(request.messages, public_messages=request.public_messages)
        tokens, public_tokens = self.tokenize(prompt)
        return PromptKey(tokens, public_tokens, owner_digest(request.cache_salt))

    async def prefill_draft(self, request: GenerationRequest) -> DraftStatus:
        if self._kv_cache is None or not request.session:
            return DraftStatus.UNSUPPORTED  # nothing would be kept for the message to find
        self._cancel_draft(request.session)
        prompt = chat_format.up_to_the_answer(
            self.formatter.render(request.messages, public_messages=request.public_messages)
        )
        tokens, public_tokens = self.tokenize(prompt)
        scheduler = self.scheduler
        running, waiting = scheduler.counts()
        if waiting or running >= self._parallel or len(tokens) >= self._context_tokens:
            return DraftStatus.SKIPPED
        loop = asyncio.get_running_loop()
        session = request.session

        def ended(item: EngineEvent | BaseException | None) -> None:
            if item is None:  # on the worker thread
                with contextlib.suppress(RuntimeError):  # a closed loop: nobody to tell
                    loop.call_soon_threadsafe(self._forget_draft, session, draft)

        draft = Request(
            key=PromptKey(tokens, public_tokens, owner_digest(request.cache_salt)),
            sampling=request.sampling,
            stops=Stops(),
            emit=ended,
            draft=True,
        )
        self._drafts[session] = draft
        scheduler.submit_draft(draft)
        return DraftStatus.PREFILLING

    async def drop_draft(self, session: str) -> None:
        self._cancel_draft(session)

    def draft_stats(self) -> DraftStats | None:
        return self._scheduler.draft_stats() if self._scheduler is not None else None

    def _cancel_draft(self, session: str) -> None:
        draft = self._drafts.pop(session, None)
        if draft is not None:
            draft.cancelled.set()
            self.scheduler.wake()

    def _forget_draft(self, session: str, draft: Request) -> None:
        if self._drafts.get(session) is draft:
            del self._drafts[session]

    async def submit(self, request: GenerationRequest) -> Generation:
        if request.session:
            # The message its draft read ahead of: the draft stops where it got, and the
            # message continues from there in the same sequence.
            self._cancel_draft(request.session)
        key = self.prompt_key(request)
        if len(key.tokens) >= self._context_tokens:
            raise ContextLengthExceeded(
                f"the prompt is {len(key.tokens)} tokens; the context holds {self._context_tokens}"
            )
        scheduler = self.scheduler
        running, waiting = scheduler.counts()
        if running + waiting >= self._parallel + self._queue_size:
            raise EngineOverloaded(
                f"the engine queue is full ({self._queue_size} waiting)", retry_after=1
            )
        stream = _Stream(asyncio.get_running_loop())
        job = Request(
            key=key,
            sampling=request.sampling,
            stops=request_stops(self.formatter.stops, request.sampling.stop),
            emit=stream.emit,
        )
        scheduler.submit(job)
        return _EmbeddedGeneration(scheduler, job, stream)
