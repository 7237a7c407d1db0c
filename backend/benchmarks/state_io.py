"""``python -m benchmarks state-io``: moving KV state in and out of a llama.cpp context, our
sequence-state path against what llama-cpp-python's own caches store
(``Llama.save_state``/``load_state``, kept whole by ``LlamaRAMCache`` and pickled by
``LlamaDiskCache``)."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import llama_cpp
import typer
from llama_cpp.llama_cache import LlamaDiskCache, LlamaRAMCache

from benchmarks import report
from benchmarks.runner import MIB, header, model_path, write
from chatbot.engines.llama_context import BatchItem, LlamaContext
from chatbot.kvcache.tiers import DiskTier, EntryMeta


def _timed(action: Callable[[], object], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 1)


def _prefill(context: LlamaContext, tokens: list[int]) -> None:
    context.clear(0)
    for start in range(0, len(tokens), context.batch_tokens):
        chunk = tokens[start : start + context.batch_tokens]
        context.decode([BatchItem(t, start + i, 0, False) for i, t in enumerate(chunk)])


def measure(model_path: Path, lengths: list[int]) -> list[dict[str, Any]]:
    ours = LlamaContext(model_path, sequences=1, pool_tokens=4096, batch_tokens=512, threads=2)
    # The Llama object's own API, which llama-cpp-python's caches use.
    llm: Any = llama_cpp.Llama(
        model_path=str(model_path), n_ctx=4096, n_threads=2, swa_full=True, verbose=False
    )
    text = " ".join(f"Sentence number {i} talks about hiking gear." for i in range(600))
    all_tokens = [ours.bos(), *ours.tokenize(text)]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for n in lengths:
            tokens = all_tokens[:n]
            _prefill(ours, tokens)
            payload = ours.export_state(0)
            ours_save = _timed(partial(ours.export_state, 0))
            ours_load = _timed(partial(ours.import_state, 0, payload))
            llm.reset()
            llm.eval(tokens)
            disk = DiskTier(Path(folder) / f"ours-{n}", budget_bytes=2**34)
            meta = EntryMeta(f"e{n}", tokens, 0, b"")
            ours_disk_put = _timed(partial(disk.put, meta, payload), repeat=1)
            ours_disk_get = _timed(partial(disk.get, meta.id))

            state = llm.save_state()
            theirs_bytes = state.llama_state_size + state.scores.nbytes + state.input_ids.nbytes
            theirs_save = _timed(llm.save_state)
            theirs_load = _timed(partial(llm.load_state, state))
            ram = LlamaRAMCache(capacity_bytes=2**34)
            ram_put = _timed(partial(ram.__setitem__, tokens, state), repeat=1)
            disk_cache = LlamaDiskCache(cache_dir=str(Path(folder) / f"theirs-{n}"))
            disk_put = _timed(partial(disk_cache.__setitem__, tokens, state), repeat=1)
            # A read pops the entry from LlamaDiskCache, so it can be timed once.
            disk_get = _timed(partial(disk_cache.__getitem__, tokens), repeat=1)
            rows.append(
                {
                    "tokens": n,
                    "ours_bytes": len(payload),
                    "ours_save_ms": ours_save,
                    "ours_load_ms": ours_load,
                    "ours_disk_put_ms": ours_disk_put,
                    "ours_disk_get_ms": ours_disk_get,
                    "llama_state_bytes": theirs_bytes,
                    "llama_state_counted_bytes": state.llama_state_size,
                    "save_state_ms": theirs_save,
                    "load_state_ms": theirs_load,
                    "ram_cache_put_ms": ram_put,
                    "disk_cache_put_ms": disk_put,
                    "disk_cache_get_ms": disk_get,
                }
            )
            del ram, disk_cache
    ours.close()
    llm.close()
    return rows


def command(
    lengths: Annotated[str, typer.Option(help="Comma-separated token counts.")] = "200,1000,2000",
) -> dict[str, Any]:
    """Saving and loading KV state: our sequence-state path vs llama-cpp-python's caches."""
    settings = {"lengths": lengths}
    result, lines = header(
        "KV state in and out of the context",
        settings,
        "Median of 3 (a LlamaDiskCache read pops its entry, so its read and every write "
        "are timed once).",
    )
    rows = measure(model_path(), [int(n) for n in lengths.split(",")])
    result["rows"] = rows
    lines += report.table(
        [
            "tokens",
            "ours: bytes",
            "ours: save / load (ms)",
            "ours: disk write / read (ms)",
            "save_state: bytes (counted by LlamaRAMCache)",
            "save_state / load_state (ms)",
            "LlamaDiskCache write / read (ms)",
        ],
        [
            [
                r["tokens"],
                f"{r['ours_bytes'] / MIB:.1f} MiB",
                f"{r['ours_save_ms']} / {r['ours_load_ms']}",
                f"{r['ours_disk_put_ms']} / {r['ours_disk_get_ms']}",
                f"{r['llama_state_bytes'] / MIB:.1f} MiB "
                f"({r['llama_state_counted_bytes'] / MIB:.1f})",
                f"{r['save_state_ms']} / {r['load_state_ms']}",
                f"{r['disk_cache_put_ms']} / {r['disk_cache_get_ms']}",
            ]
            for r in rows
        ],
    )
    lines += [
        "",
        "`save_state` copies the whole context state plus the logits buffer (Gemma's 262k "
        "vocabulary); `LlamaRAMCache` counts only the state against its budget. Ours is the "
        "one sequence's KV state (`llama_state_seq_get_data`), nothing else.",
    ]
    write("state_io", result, lines)
    return result
