"""llama.cpp through its C API: one model, one context of many sequences, one batch a step.

llama-cpp-python's ``Llama`` class drives one sequence; serving users together needs the
layer below it: a context with ``n_seq_max`` sequences, a ``llama_batch`` that mixes the
next token of every answering sequence with prompt chunks of others, per-sequence memory
operations, per-sequence state I/O, and a sampler chain per request. This module is that
layer, typed, and nothing more: what goes into each step is the scheduler's business.

The KV cache is unified: every sequence draws its cells from one pool. That is what lets
``seq_cp`` share a prefix between sequences by reference, without copying (llama.cpp can
copy between the separate buffers of a split cache only whole), and what lets a step mix
one token of some sequences with hundreds of another in one micro-batch.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp

from chatbot.engines.base import SamplingParams

# Small models loop without a mild penalty; llama.cpp's own server defaults to the same.
REPEAT_PENALTY = 1.1
PENALTY_LAST_N = 64
# llama-cpp-python's defaults for sampled (temperature > 0) answers, kept as they were.
TOP_K = 40
MIN_P = 0.05


class LlamaError(RuntimeError):
    """llama.cpp refused an operation: the context's contents are no longer known."""


class PoolFull(LlamaError):
    """``llama_decode`` found no room in the KV pool for the batch, and stored none of it."""


@dataclass(frozen=True, slots=True)
class BatchItem:
    token: int
    position: int
    seq_id: int
    wants_logits: bool


class Sampler:
    """A llama.cpp sampler chain for one request: the top-k candidates, the penalties over
    the last tokens (a mild repeat penalty, and the request's frequency and presence
    penalties, OpenAI's parameters: minus ``frequency`` times a token's count, minus
    ``presence`` once for any token seen), then greedy at temperature 0, else top-p, min-p,
    temperature and a seeded draw.

    Top-k comes first because the penalty looks every candidate up in its token counts:
    over Gemma's 262k-token vocabulary that costs milliseconds per token and sequence. A
    penalty only lowers logits, so the greedy choice among the top 40 is the greedy choice
    over all unless all 40 were penalised below the 41st."""

    def __init__(self, vocab_size: int, sampling: SamplingParams) -> None:
        params = llama_cpp.llama_sampler_chain_default_params()
        self._chain: Any = llama_cpp.llama_sampler_chain_init(params)
        add = llama_cpp.llama_sampler_chain_add
        add(self._chain, llama_cpp.llama_sampler_init_top_k(TOP_K))
        add(
            self._chain,
            llama_cpp.llama_sampler_init_penalties(
                vocab_size,
                PENALTY_LAST_N,
                REPEAT_PENALTY,
                sampling.frequency_penalty,
                sampling.presence_penalty,
            ),
        )
        if sampling.temperature <= 0:
            add(self._chain, llama_cpp.llama_sampler_init_greedy())
        else:
            add(self._chain, llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
            add(self._chain, llama_cpp.llama_sampler_init_min_p(MIN_P, 1))
            add(self._chain, llama_cpp.llama_sampler_init_temp(sampling.temperature))
            seed = sampling.seed
            draw_seed = llama_cpp.LLAMA_DEFAULT_SEED if seed is None else seed & 0xFFFFFFFF
            add(self._chain, llama_cpp.llama_sampler_init_dist(draw_seed))

    def accept(self, tokens: Sequence[int]) -> None:
        """Let the penalties see what the model has read (the prompt's last tokens)."""
        for token in tokens[-PENALTY_LAST_N:]:
            llama_cpp.llama_sampler_accept(self._chain, token)

    def sample(self, context: LlamaContext, output: int) -> int:
        """Sample from the batch's ``output``-th token's logits, and accept the result."""
        return int(llama_cpp.llama_sampler_sample(self._chain, context.ctx, output))

    def close(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None


class LlamaContext:
    """Owns the model and one multi-sequence context. Not thread-safe: one thread drives
    it; ``tokenize`` and ``piece`` only read the vocabulary and may run beside it."""

    def __init__(
        self,
        model_path: Path,
        *,
        sequences: int,
        pool_tokens: int,
        batch_tokens: int,
        threads: int,
        poll: int = 0,
        model_of: LlamaContext | None = None,
    ) -> None:
        """``threads`` compute each step; ``poll`` is how long they busy-wait for work
        between operations, 0 to 100 (``ggml_threadpool_params.poll``): 0 sleeps at once,
        which keeps a step from stalling when another process takes one of the cores.
        ``model_of``: use that context's model (loaded once), which must outlive this one."""
        # llama-cpp-python routes llama.cpp's log through this logger; its load-time
        # chatter is of no use to an operator.
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        llama_cpp.llama_backend_init()
        self._owns_model = model_of is None
        if model_of is not None:
            self._model: Any = model_of._model
        else:
            model_params = llama_cpp.llama_model_default_params()
            self._model = llama_cpp.llama_model_load_from_file(
                str(model_path).encode(), model_params
            )
        if not self._model:
            raise LlamaError(f"llama.cpp could not load {model_path}")
        self._vocab: Any = llama_cpp.llama_model_get_vocab(self._model)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = pool_tokens
        params.n_batch = batch_tokens
        params.n_ubatch = batch_tokens
        params.n_seq_max = sequences
        params.n_threads = threads
        params.n_threads_batch = threads
        params.kv_unified = True
        # Gemma 3's sliding-window layers keep only the last window by default, and then a
        # sequence cannot be truncated back to a shared prefix: keep them whole.
        params.swa_full = True
        params.no_perf = False
        self.ctx: Any = llama_cpp.llama_init_from_model(self._model, params)
        if not self.ctx:
            if self._owns_model:
                llama_cpp.llama_model_free(self._model)
            raise LlamaError("llama.cpp could not create a context")
        self._threadpool = _Threadpool(threads, poll)
        _llama_attach_threadpool(self.ctx, self._threadpool.handle, self._threadpool.handle)
        self._memory: Any = llama_cpp.llama_get_memory(self.ctx)
        self.pool_tokens = int(llama_cpp.llama_n_ctx(self.ctx))
        self.batch_tokens = batch_tokens
        self.vocab_size = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self._batch: Any = llama_cpp.llama_batch_init(batch_tokens, 0, 1)
        self._piece = ctypes.create_string_buffer(256)

    def close(self) -> None:
        if self.ctx is not None:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self.ctx)
            if self._owns_model:
                llama_cpp.llama_model_free(self._model)
            self._threadpool.close()
            self.ctx = None

    # -- the vocabulary ---------------------------------------------------------------------

    def bos(self) -> int:
        return int(llama_cpp.llama_vocab_bos(self._vocab))

    def eos(self) -> int:
        return int(llama_cpp.llama_vocab_eos(self._vocab))

    def adds_bos(self) -> bool:
        """Whether the model's prompts start with its BOS token (the GGUF says)."""
        return bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))

    def token_text(self, token: int) -> str:
        """A token's text as the vocabulary has it (``<|im_end|>`` for a control token)."""
        return bytes(llama_cpp.llama_vocab_get_text(self._vocab, token)).decode(errors="replace")

    def chat_template(self) -> str | None:
        """The GGUF's own chat template (``tokenizer.chat_template``), if it has one."""
        template = llama_cpp.llama_model_chat_template(self._model, None)
        return bytes(template).decode() if template else None

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        data = text.encode()
        capacity = len(data) + 8
        while True:
            buffer = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(
                self._vocab, data, len(data), buffer, capacity, False, special
            )
            if n >= 0:
                return list(buffer[:n])
            capacity = -n

    def piece(self, token: int) -> bytes:
        n = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece, 256, 0, False)
        if n < 0:
            raise LlamaError(f"token {token} has a piece longer than 256 bytes")
        return self._piece.raw[:n]

    def is_end_of_generation(self, token: int) -> bool:
        """End-of-generation tokens (``<|im_end|>``, ``<end_of_turn>``...), and any other
        control token: a template's marker (``<|im_start|>``) would begin a turn the model
        invents, and streams as no text."""
        return bool(
            llama_cpp.llama_vocab_is_eog(self._vocab, token)
            or llama_cpp.llama_vocab_is_control(self._vocab, token)
        )

    # -- one step ---------------------------------------------------------------------------

    def decode(self, items: Sequence[BatchItem]) -> None:
        """Evaluate one batch; the items that want logits can be sampled from afterwards, by
        their index in ``items``."""
        if not 0 < len(items) <= self.batch_tokens:
            raise ValueError(f"a batch holds 1 to {self.batch_tokens} tokens, not {len(items)}")
        batch = self._batch
        for i, item in enumerate(items):
            batch.token[i] = item.token
            batch.pos[i] = item.position
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = item.seq_id
            batch.logits[i] = item.wants_logits
        batch.n_tokens = len(items)
        status = llama_cpp.llama_decode(self.ctx, batch)
        if status == 1:
            raise PoolFull("no room in the KV pool for the batch")
        if status != 0:
            # 2: aborted; <0: an error. Sequences whose tokens were partly stored are in an
            # unknown state.
            raise LlamaError(f"llama_decode returned {status}")

    # -- sequences ---------------------------------------------------------------------------

    def keep_first(self, seq_id: int, n_tokens: int) -> bool:
        """Drop everything of ``seq_id`` from position ``n_tokens`` on."""
        return bool(llama_cpp.llama_memory_seq_rm(self._memory, seq_id, n_tokens, -1))

    def clear(self, seq_id: int) -> None:
        llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)

    def share(self, source: int, target: int, n_tokens: int) -> None:
        """Make ``target`` hold ``source``'s first ``n_tokens``, by reference (the cells are
        shared, nothing is copied or recomputed)."""
        self.clear(target)
        llama_cpp.llama_memory_seq_cp(self._memory, source, target, 0, n_tokens)

    def export_state(self, seq_id: int) -> bytearray:
        size = llama_cpp.llama_state_seq_get_size(self.ctx, seq_id)
        payload = bytearray(size)
        written = llama_cpp.llama_state_seq_get_data(self.ctx, _c_bytes(payload), size, seq_id)
        if written != size:
            raise LlamaError(f"llama.cpp wrote {written} of {size} state bytes")
        return payload

    def import_state(self, seq_id: int, payload: bytearray) -> bool:
        """Replace ``seq_id``'s contents with a saved state; False if llama.cpp refused it
        (the sequence is then empty)."""
        read = llama_cpp.llama_state_seq_set_data(self.ctx, _c_bytes(payload), len(payload), seq_id)
        if not read:
            self.clear(seq_id)
        return bool(read)

    def evaluated_tokens(self) -> tuple[int, int]:
        """llama.cpp's own count of tokens evaluated since load: (in batches of two or more
        tokens, one at a time). An independent check of what reuse saved."""
        llama_cpp.llama_synchronize(self.ctx)
        perf = llama_cpp.llama_perf_context(self.ctx)
        return int(perf.n_p_eval), int(perf.n_eval)

    def set_threads(self, threads: int) -> None:
        """Compute the next steps on ``threads`` of the pool's threads (at most its size)."""
        llama_cpp.llama_set_n_threads(self.ctx, threads, threads)

    def sampler(self, sampling: SamplingParams) -> Sampler:
        return Sampler(self.vocab_size, sampling)


class _ThreadpoolParams(ctypes.Structure):
    """ggml's ``struct ggml_threadpool_params`` (ggml-cpu.h)."""

    _fields_ = [
        ("cpumask", ctypes.c_bool * 512),  # GGML_MAX_N_THREADS
        ("n_threads", ctypes.c_int),
        ("prio", ctypes.c_int),
        ("poll", ctypes.c_uint32),
        ("strict_cpu", ctypes.c_bool),
        ("paused", ctypes.c_bool),
    ]


def _ggml_cpu() -> ctypes.CDLL:
    """ggml's CPU backend, as llama-cpp-python ships it beside libllama (its Python module
    binds no threadpool function)."""
    lib = ctypes.CDLL(str(Path(llama_cpp.llama_cpp._lib._name).with_name("libggml-cpu.so")))
    lib.ggml_threadpool_params_init.argtypes = [ctypes.POINTER(_ThreadpoolParams), ctypes.c_int]
    lib.ggml_threadpool_params_init.restype = None
    lib.ggml_threadpool_new.argtypes = [ctypes.POINTER(_ThreadpoolParams)]
    lib.ggml_threadpool_new.restype = ctypes.c_void_p
    lib.ggml_threadpool_free.argtypes = [ctypes.c_void_p]
    lib.ggml_threadpool_free.restype = None
    return lib


def _llama_attach_threadpool(ctx: Any, threadpool: int, batch_threadpool: int) -> None:
    attach = llama_cpp.llama_cpp._lib.llama_attach_threadpool
    attach.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    attach.restype = None
    attach(ctx, threadpool, batch_threadpool)


class _Threadpool:
    """The threads that compute every step, made once. Without one, llama.cpp starts a
    pool per ``llama_decode`` whose threads busy-wait at each operation's barrier: when the
    OS takes a core away (a neighbour, the API's own thread), every step waits on the
    thread that lost it while the other spins."""

    def __init__(self, threads: int, poll: int) -> None:
        self._lib = _ggml_cpu()
        params = _ThreadpoolParams()
        self._lib.ggml_threadpool_params_init(ctypes.byref(params), threads)
        params.poll = poll
        self.handle: int = self._lib.ggml_threadpool_new(ctypes.byref(params))
        if not self.handle:
            raise LlamaError("llama.cpp could not start its threads")

    def close(self) -> None:
        if self.handle:
            self._lib.ggml_threadpool_free(self.handle)
            self.handle = 0


def _c_bytes(payload: bytearray) -> Any:
    """A ctypes view of ``payload``, without a copy."""
    return (ctypes.c_uint8 * len(payload)).from_buffer(payload)
