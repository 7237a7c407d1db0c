"""The embedded engine: llama.cpp in-process through llama-cpp-python, on the CPU.

One llama.cpp context serves every request, one at a time, on one worker thread; requests
wait in a bounded FIFO queue. Before each request the context keeps the longest common
prefix of what it holds and the new prompt and evaluates only the rest; the size of that
prefix is the request's ``cached_tokens``.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp

from chatbot.engines import chat_format
from chatbot.engines.base import Engine as EngineBase
from chatbot.engines.base import (
    EngineEvent,
    Finished,
    FinishReason,
    Generation,
    GenerationRequest,
    SamplingParams,
    TokenDelta,
)
from chatbot.engines.stops import StopScanner
from chatbot.models.domain import Timing, Usage
from chatbot.models.errors import (
    ContextLengthExceeded,
    EngineFailure,
    EngineOverloaded,
    ServiceUnavailable,
)

logger = logging.getLogger(__name__)

_END = object()  # marks the end of a job's event stream

# Small models loop without a mild penalty; llama.cpp's own server defaults to the same.
REPEAT_PENALTY = 1.1


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class LlamaRunner:
    """Owns one llama.cpp context. Generation is not thread-safe: the engine runs it on one
    thread. ``tokenize`` only reads the vocabulary and may run beside it."""

    def __init__(
        self,
        model_path: Path,
        *,
        context_tokens: int,
        batch_tokens: int,
        threads: int,
        prefix_cache: bool = True,
    ) -> None:
        self._llm: Any = llama_cpp.Llama(
            model_path=str(model_path),
            n_ctx=context_tokens,
            n_batch=batch_tokens,
            n_threads=threads,
            n_threads_batch=threads,
            # Gemma 3's sliding-window layers keep only the last window by default, and
            # then a context cannot be truncated back to a shared prefix: keep it whole.
            swa_full=True,
            verbose=False,
        )
        self.context_tokens: int = self._llm.n_ctx()
        self._batch_tokens = batch_tokens
        self._prefix_cache = prefix_cache

    def close(self) -> None:
        self._llm.close()

    def evaluated_tokens(self) -> tuple[int, int]:
        """llama.cpp's own count of tokens evaluated since load: (in batches of two or more
        tokens, one at a time). An independent check of what reuse saved."""
        ctx = self._llm._ctx.ctx
        llama_cpp.llama_synchronize(ctx)
        perf = llama_cpp.llama_perf_context(ctx)
        return int(perf.n_p_eval), int(perf.n_eval)

    def tokenize(self, segments: Sequence[str]) -> list[int]:
        tokens = [self._llm.token_bos()]
        for segment in segments:
            tokens += self._llm.tokenize(segment.encode(), add_bos=False, special=False)
        return tokens

    def reuse_prefix(self, tokens: Sequence[int]) -> int:
        """Truncate the context to its longest common prefix with ``tokens``; return its size.

        At least one prompt token is always evaluated, to produce fresh logits.
        """
        if not self._prefix_cache:
            self._llm.reset()
            return 0
        held = self._llm.input_ids[: self._llm.n_tokens].tolist()
        keep = min(common_prefix_length(held, tokens), len(tokens) - 1)
        if keep > 0 and self._llm._ctx.kv_cache_seq_rm(-1, keep, -1):
            self._llm.n_tokens = keep
            return keep
        self._llm.reset()
        return 0

    def generate(
        self,
        tokens: list[int],
        sampling: SamplingParams,
        *,
        emit: Callable[[str], None],
        cancelled: Callable[[], bool],
        stops: tuple[str, ...],
    ) -> tuple[Usage, FinishReason | None, float, float | None]:
        """Prefill and decode; returns usage, finish reason (None: cancelled), prefill ms
        and the time of the first emitted text."""
        started = time.perf_counter()
        cached = self.reuse_prefix(tokens)
        # The last prompt token goes through generate() so that it produces the logits
        # for the first sample; everything before it is evaluated here, a batch at a time,
        # so a cancelled request stops within one batch.
        rest = tokens[cached:-1]
        for i in range(0, len(rest), self._batch_tokens):
            if cancelled():
                return (
                    Usage(prompt_tokens=len(tokens), cached_tokens=cached, completion_tokens=0),
                    None,
                    0.0,
                    None,
                )
            self._llm.eval(rest[i : i + self._batch_tokens])

        if sampling.seed is not None:
            self._llm.set_seed(sampling.seed)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        scanner = StopScanner(stops)
        vocab = self._llm._model.vocab
        max_new = min(sampling.max_tokens, self.context_tokens - len(tokens))
        completion: list[int] = []
        prefill_ms = 0.0
        first_text_at: float | None = None
        # Whitespace is held until something follows it, so an answer is streamed without
        # the blank line the model writes before the next "User:".
        held_space = ""
        reason: FinishReason | None = "length"
        for token in self._llm.generate(
            tokens[-1:],
            temp=sampling.temperature,
            top_p=sampling.top_p,
            repeat_penalty=REPEAT_PENALTY,
            reset=False,
        ):
            if not completion:
                prefill_ms = (time.perf_counter() - started) * 1000
            if cancelled():
                reason = None
                break
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                reason = "stop"
                break
            completion.append(token)
            piece = decoder.decode(self._llm.detokenize([token]))
            text = held_space + scanner.feed(piece)
            if first_text_at is None:
                text = text.lstrip()
            body = text.rstrip()
            held_space = text[len(body) :]
            if body:
                first_text_at = first_text_at or time.perf_counter()
                emit(body)
            if scanner.stopped:
                reason = "stop"
                break
            if len(completion) >= max_new:
                break
        if reason is not None:
            tail = (scanner.flush() + decoder.decode(b"", final=True)).rstrip()
            if first_text_at is None:
                tail = tail.lstrip()
            if tail:
                first_text_at = first_text_at or time.perf_counter()
                emit(held_space + tail)
        usage = Usage(
            prompt_tokens=len(tokens), cached_tokens=cached, completion_tokens=len(completion)
        )
        return usage, reason, prefill_ms, first_text_at


@dataclass(eq=False)
class _Job:
    tokens: list[int]
    sampling: SamplingParams
    loop: asyncio.AbstractEventLoop
    submitted_at: float = field(default_factory=time.perf_counter)
    events: asyncio.Queue[object] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def put(self, item: object) -> None:
        """Thread-safe: hand an event to the consumer on the event loop."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class _EmbeddedGeneration(Generation):
    def __init__(self, engine: EmbeddedEngine, job: _Job) -> None:
        self._engine = engine
        self._job = job

    async def __aiter__(self) -> AsyncIterator[EngineEvent]:
        while True:
            item = await self._job.events.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, TokenDelta | Finished)
            yield item

    async def aclose(self) -> None:
        self._job.cancelled.set()
        self._engine._withdraw(self._job)
        # Shielded: whoever closes us may itself be cancelled, and the engine must not be
        # reported free before the worker thread has really let go of the context.
        await asyncio.shield(self._job.done.wait())


class EmbeddedEngine(EngineBase):
    def __init__(
        self,
        model_path: Path,
        *,
        model_id: str,
        context_tokens: int,
        batch_tokens: int,
        threads: int,
        queue_size: int,
        few_shot: bool,
        prefix_cache: bool = True,
    ) -> None:
        self.model_id = model_id
        self._prefix_cache = prefix_cache
        self._model_path = model_path
        self._context_tokens = context_tokens
        self._batch_tokens = batch_tokens
        self._threads = threads
        self._queue_size = queue_size
        self._few_shot = few_shot
        self._runner: LlamaRunner | None = None
        self._pending: deque[_Job] = deque()
        self._wakeup = asyncio.Event()
        self._running: _Job | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")
        self._worker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._runner = await loop.run_in_executor(
            self._executor,
            lambda: LlamaRunner(
                self._model_path,
                context_tokens=self._context_tokens,
                batch_tokens=self._batch_tokens,
                threads=self._threads,
                prefix_cache=self._prefix_cache,
            ),
        )
        self._worker = asyncio.create_task(self._serve(), name="embedded-engine")
        logger.info(
            "embedded engine ready: %s, %d-token context",
            self._model_path.name,
            self._runner.context_tokens,
        )

    async def aclose(self) -> None:
        for job in [*self._pending, *([self._running] if self._running else [])]:
            job.cancelled.set()
        if self._worker is not None:
            self._worker.cancel()
        # Waits for the thread to leave the context before the model is freed.
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        for job in self._pending:
            job.put(ServiceUnavailable("the server is shutting down"))
            job.put(_END)
            job.done.set()
        self._pending.clear()
        if self._runner is not None:
            self._runner.close()
            self._runner = None

    @property
    def ready(self) -> bool:
        return self._runner is not None

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def busy(self) -> bool:
        return self._running is not None

    @property
    def runner(self) -> LlamaRunner:
        if self._runner is None:
            raise ServiceUnavailable("the model is not loaded")
        return self._runner

    def prompt_tokens(self, request: GenerationRequest) -> list[int]:
        segments = chat_format.render(request.messages, few_shot=self._few_shot)
        return self.runner.tokenize(segments)

    async def submit(self, request: GenerationRequest) -> Generation:
        tokens = self.prompt_tokens(request)
        if len(tokens) >= self._context_tokens:
            raise ContextLengthExceeded(
                f"the prompt is {len(tokens)} tokens; the context holds {self._context_tokens}"
            )
        if len(self._pending) >= self._queue_size and (self._running or self._pending):
            raise EngineOverloaded(
                f"the engine queue is full ({self._queue_size} waiting)", retry_after=1
            )
        job = _Job(tokens=tokens, sampling=request.sampling, loop=asyncio.get_running_loop())
        self._pending.append(job)
        self._wakeup.set()
        return _EmbeddedGeneration(self, job)

    def _withdraw(self, job: _Job) -> None:
        """Drop a job that is still waiting; a running one stops at its next check."""
        if job in self._pending:
            self._pending.remove(job)
            job.put(_END)
            job.done.set()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            job = self._pending.popleft()
            self._running = job
            try:
                await loop.run_in_executor(self._executor, self._run, job)
            finally:
                self._running = None
                job.done.set()

    def _run(self, job: _Job) -> None:
        """Runs on the worker thread."""
        assert self._runner is not None
        started = time.perf_counter()
        try:
            usage, reason, prefill_ms, first_at = self._runner.generate(
                job.tokens,
                job.sampling,
                emit=lambda text: job.put(TokenDelta(text)),
                cancelled=job.cancelled.is_set,
                stops=chat_format.STOPS + job.sampling.stop,
            )
            if reason is not None:
                ended = time.perf_counter()
                timing = Timing(
                    queue_ms=_ms(started - job.submitted_at),
                    prefill_ms=round(prefill_ms, 3),
                    ttft_ms=_ms((first_at or ended) - job.submitted_at),
                    total_ms=_ms(ended - job.submitted_at),
                )
                job.put(Finished(usage=usage, timing=timing, finish_reason=reason))
        except Exception:
            logger.exception("generation failed")
            job.put(EngineFailure("the model failed while generating"))
        finally:
            job.put(_END)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)
