"""The embedded engine: llama.cpp in-process through llama-cpp-python, on the CPU.

One llama.cpp context serves every request, one at a time, on one worker thread; requests
wait in a bounded FIFO queue. Before each request the KV cache (``chatbot.kvcache``) leaves
in the context the longest prefix of the prompt that it holds, live or saved, and only the
rest is evaluated; that prefix is the request's ``cached_tokens``. After each request the
context's sequence state is saved, so that a conversation that loses the context to
another one gets it back without recomputing.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import hashlib
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

from chatbot.engines import chat_format, model_files
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
from chatbot.kvcache import KVCache, PromptKey, Reuse, owner_digest
from chatbot.models.cache import CacheStats, LookupStats
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


def state_namespace(model_path: Path) -> bytes:
    """What saved sequence states are valid for: these weights, this llama.cpp build, and
    the KV layout the runner asks for (f16, full-size sliding-window cache)."""
    h = hashlib.blake2b(model_files.fingerprint(model_path), digest_size=16)
    h.update(f"llama-cpp-python {llama_cpp.__version__}; kv f16; swa_full".encode())
    return h.digest()


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
        kv_cache: KVCache | None = None,
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
        self._kv_cache = kv_cache

    def close(self) -> None:
        self._llm.close()

    def evaluated_tokens(self) -> tuple[int, int]:
        """llama.cpp's own count of tokens evaluated since load: (in batches of two or more
        tokens, one at a time). An independent check of what reuse saved."""
        ctx = self._llm._ctx.ctx
        llama_cpp.llama_synchronize(ctx)
        perf = llama_cpp.llama_perf_context(ctx)
        return int(perf.n_p_eval), int(perf.n_eval)

    def tokenize(self, prompt: chat_format.RenderedPrompt) -> tuple[list[int], int]:
        """The prompt's tokens, and how many of them are public material."""
        tokens = [self._llm.token_bos()]
        public_tokens = 1
        for i, segment in enumerate(prompt.segments):
            tokens += self._llm.tokenize(segment.encode(), add_bos=False, special=False)
            if i < prompt.public_segments:
                public_tokens = len(tokens)
        return tokens, public_tokens

    # -- the context as the KV cache drives it (chatbot.kvcache.SequenceState) -------------

    def held_tokens(self) -> list[int]:
        held: list[int] = self._llm.input_ids[: self._llm.n_tokens].tolist()
        return held

    def truncate(self, n_tokens: int) -> bool:
        if n_tokens == 0:
            self.clear()
            return True
        if n_tokens > self._llm.n_tokens or not self._llm._ctx.kv_cache_seq_rm(-1, n_tokens, -1):
            return False
        self._llm.n_tokens = n_tokens
        return True

    def export_state(self) -> bytearray:
        ctx = self._llm._ctx.ctx
        size = llama_cpp.llama_state_seq_get_size(ctx, 0)
        payload = bytearray(size)
        written = llama_cpp.llama_state_seq_get_data(ctx, _c_bytes(payload), size, 0)
        if written != size:
            raise RuntimeError(f"llama.cpp wrote {written} of {size} state bytes")
        return payload

    def import_state(self, payload: bytearray, tokens: Sequence[int]) -> bool:
        self.clear()
        ctx = self._llm._ctx.ctx
        if not llama_cpp.llama_state_seq_set_data(ctx, _c_bytes(payload), len(payload), 0):
            self.clear()
            return False
        self._llm.input_ids[: len(tokens)] = tokens
        self._llm.n_tokens = len(tokens)
        return True

    def clear(self) -> None:
        self._llm.reset()
        self._llm._ctx.kv_cache_clear()

    def forget(self) -> None:
        """After a failure the context's contents are unknown: start from nothing."""
        self.clear()
        if self._kv_cache is not None:
            self._kv_cache.forget_live()

    def _reuse(self, key: PromptKey) -> Reuse:
        if self._kv_cache is None:
            self.clear()
            return Reuse(0, None)
        return self._kv_cache.prepare(self, key)

    def generate(
        self,
        key: PromptKey,
        sampling: SamplingParams,
        *,
        emit: Callable[[str], None],
        cancelled: Callable[[], bool],
        stops: tuple[str, ...],
    ) -> tuple[Usage, FinishReason | None, float, float | None]:
        """Prefill and decode; returns usage, finish reason (None: cancelled), prefill ms
        and the time of the first emitted text."""
        started = time.perf_counter()
        tokens = list(key.tokens)
        reuse = self._reuse(key)
        cached = reuse.tokens
        # The last prompt token goes through generate() so that it produces the logits
        # for the first sample; everything before it is evaluated here, a batch at a time,
        # so a cancelled request stops within one batch.
        rest = tokens[cached:-1]
        for i in range(0, len(rest), self._batch_tokens):
            if cancelled():
                return _usage(key, reuse, 0), None, 0.0, None
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
        return _usage(key, reuse, len(completion)), reason, prefill_ms, first_text_at

    def save(self, key: PromptKey) -> None:
        """After a generation for ``key``, finished or not: let the KV cache keep what the
        context now holds (the prompt as far as it got, and the answer)."""
        if self._kv_cache is not None:
            self._kv_cache.commit(self, key)


def _usage(key: PromptKey, reuse: Reuse, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=len(key.tokens),
        cached_tokens=reuse.tokens,
        completion_tokens=completion_tokens,
        cache_tier=reuse.tier,
    )


def _c_bytes(payload: bytearray) -> Any:
    """A ctypes view of ``payload``, without a copy."""
    return (ctypes.c_uint8 * len(payload)).from_buffer(payload)


@dataclass(eq=False)
class _Job:
    key: PromptKey
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
        kv_cache: KVCache | None = None,
    ) -> None:
        """``kv_cache``: None recomputes every prompt in full (the benchmarks' baseline)."""
        self.model_id = model_id
        self._kv_cache = kv_cache
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
                kv_cache=self._kv_cache,
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
        if self._kv_cache is not None:
            await asyncio.to_thread(self._kv_cache.flush)
        if self._runner is not None:
            self._runner.close()
            self._runner = None

    @property
    def ready(self) -> bool:
        return self._runner is not None

    @property
    def context_tokens(self) -> int:
        return self._context_tokens

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

    def cache_stats(self) -> CacheStats | None:
        return self._kv_cache.stats() if self._kv_cache is not None else None

    def user_cache_stats(self, cache_salt: str) -> LookupStats | None:
        if self._kv_cache is None:
            return None
        return self._kv_cache.owner_stats(owner_digest(cache_salt))

    def prompt_key(self, request: GenerationRequest) -> PromptKey:
        prompt = chat_format.render(
            request.messages, few_shot=self._few_shot, public_messages=request.public_messages
        )
        tokens, public_tokens = self.runner.tokenize(prompt)
        return PromptKey(tokens, public_tokens, owner_digest(request.cache_salt))

    async def submit(self, request: GenerationRequest) -> Generation:
        key = self.prompt_key(request)
        if len(key.tokens) >= self._context_tokens:
            raise ContextLengthExceeded(
                f"the prompt is {len(key.tokens)} tokens; the context holds {self._context_tokens}"
            )
        if len(self._pending) >= self._queue_size and (self._running or self._pending):
            raise EngineOverloaded(
                f"the engine queue is full ({self._queue_size} waiting)", retry_after=1
            )
        job = _Job(key=key, sampling=request.sampling, loop=asyncio.get_running_loop())
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
        runner = self._runner
        assert runner is not None
        started = time.perf_counter()
        try:
            self._generate(runner, job, started)
        except Exception:
            logger.exception("generation failed")
            runner.forget()
            job.put(EngineFailure("the model failed while generating"))
            return
        finally:
            job.put(_END)
        # Saved once the answer is out, so that the copy delays neither this stream nor
        # its end; the next request waits for it, as it would for the worker anyway.
        try:
            runner.save(job.key)
        except Exception:
            logger.exception("saving the KV state failed")
            runner.forget()

    def _generate(self, runner: LlamaRunner, job: _Job, started: float) -> None:
        usage, reason, prefill_ms, first_at = runner.generate(
            job.key,
            job.sampling,
            emit=lambda text: job.put(TokenDelta(text)),
            cancelled=job.cancelled.is_set,
            stops=chat_format.STOPS + job.sampling.stop,
        )
        if reason is None:  # cancelled: the consumer has gone
            return
        ended = time.perf_counter()
        timing = Timing(
            queue_ms=_ms(started - job.submitted_at),
            prefill_ms=round(prefill_ms, 3),
            ttft_ms=_ms((first_at or ended) - job.submitted_at),
            total_ms=_ms(ended - job.submitted_at),
        )
        job.put(Finished(usage=usage, timing=timing, finish_reason=reason))


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)
