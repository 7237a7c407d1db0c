"""Carries out the scheduler's plans on llama.cpp, on the engine's worker thread."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future

from chatbot.engines.batching.cores import CoreShare
from chatbot.engines.batching.plan import Admission, Save, StepOutput, StepPlan
from chatbot.engines.batching.requests import Progress
from chatbot.engines.batching.scheduler import Scheduler
from chatbot.engines.llama_context import BatchItem, LlamaContext, LlamaError, PoolFull, Sampler
from chatbot.kvcache import KVCache, Reuse
from chatbot.models.cache import CacheTier

logger = logging.getLogger(__name__)


class ModelRunner:
    """Owns the context and the requests' sampler chains."""

    def __init__(
        self,
        context: LlamaContext,
        kv_cache: KVCache | None,
        cores: CoreShare | None,
        *,
        threads: int,
    ) -> None:
        """``cores``: adapts the thread count to the machine's load; None keeps ``threads``.
        While the side reader reads, on a thread of its own, steps compute on one thread
        fewer."""
        self._context = context
        self._kv_cache = kv_cache
        self._cores = cores
        self._max_threads = threads
        self._threads = threads
        self._samplers: dict[Progress, Sampler] = {}

    def execute(self, plan: StepPlan) -> StepOutput:
        output = StepOutput()
        for progress in plan.released:
            sampler = self._samplers.pop(progress, None)
            if sampler is not None:
                sampler.close()
        for save in plan.saves:
            output.saving[save.seq_id] = self._save(save)
        for seq_id in plan.evictions:
            self._context.clear(seq_id)
        for admission in plan.admissions:
            try:
                self._admit(admission, output)
            except Exception as exc:
                output.failed[admission.progress] = exc
        for load in plan.loads:
            assert self._kv_cache is not None
            sequence = _Sequence(self._context, load.progress.slot.seq_id)
            try:
                reuse = self._kv_cache.load(sequence, load.restore, load.payload)
            except Exception as exc:
                output.failed[load.progress] = exc
                continue
            if reuse.tokens != load.restore.tokens:
                output.diverged[load.progress] = reuse
        for handoff in plan.handoffs:
            if not self._context.import_state(handoff.progress.slot.seq_id, handoff.payload):
                logger.warning("llama.cpp refused the state of a prompt read beside the answers")
                output.diverged[handoff.progress] = Reuse(0, None)  # its sequence is empty
        items: list[BatchItem] = []
        wanted: list[tuple[Progress, int]] = []
        for chunk in plan.chunks:
            if chunk.progress in output.failed or chunk.progress in output.diverged:
                continue
            seq_id = chunk.progress.slot.seq_id
            for i, token in enumerate(chunk.tokens):
                last = i == len(chunk.tokens) - 1
                items.append(BatchItem(token, chunk.start + i, seq_id, chunk.wants_logits and last))
            if chunk.wants_logits:
                wanted.append((chunk.progress, len(items) - 1))
        self._follow_the_load(plan.beside_side_reader)
        if not items:
            return output
        started = time.perf_counter()
        try:
            self._context.decode(items)
        except PoolFull:
            output.pool_full = True
            return output
        except LlamaError as exc:
            output.decode_error = exc
            return output
        for progress, index in wanted:
            output.sampled[progress] = self._samplers[progress].sample(self._context, index)
        output.elapsed_s = time.perf_counter() - started
        return output

    def _follow_the_load(self, beside_side_reader: bool) -> None:
        if self._cores is not None and self._cores.update() is not None:
            logger.info(
                "other work keeps %.1f cores busy: computing on %d threads",
                self._cores.others,
                self._cores.threads,
            )
        threads = self._cores.threads if self._cores is not None else self._max_threads
        if beside_side_reader:
            threads = max(1, threads - 1)
        if threads != self._threads:
            self._threads = threads
            self._context.set_threads(threads)

    def close(self) -> None:
        for sampler in self._samplers.values():
            sampler.close()
        self._samplers.clear()

    def _admit(self, admission: Admission, output: StepOutput) -> None:
        progress = admission.progress
        seq_id = progress.slot.seq_id
        context = self._context
        held = admission.keep
        if admission.source is not None:
            context.share(admission.source, seq_id, held)
        elif held == 0:
            context.clear(seq_id)
        elif not context.keep_first(seq_id, held):
            context.clear(seq_id)
            held = 0
        if held != admission.keep:
            output.diverged[progress] = Reuse(held, CacheTier.LIVE if held else None)
        request = progress.request
        if request.pin:
            return
        sampler = context.sampler(request.sampling)
        sampler.accept(request.key.tokens)
        self._samplers[progress] = sampler

    def _save(self, save: Save) -> Future[None]:
        """The one copy out of llama.cpp happens here; the rest on the cache's I/O thread."""
        assert self._kv_cache is not None
        try:
            payload = self._context.export_state(save.seq_id)
        except LlamaError as exc:
            logger.warning("could not copy a KV state out of llama.cpp: %s", exc)
            failed: Future[None] = Future()
            failed.set_result(None)
            return failed
        return self._kv_cache.save(save.key, payload, drafted_from=save.drafted_from)


class _Sequence:
    """One sequence of the context, as a load drives it."""

    def __init__(self, context: LlamaContext, seq_id: int) -> None:
        self._context = context
        self._seq_id = seq_id

    def truncate(self, n_tokens: int) -> bool:
        return self._context.keep_first(self._seq_id, n_tokens)

    def import_state(self, payload: bytearray, tokens: Sequence[int]) -> bool:
        del tokens  # llama.cpp's state records its own positions
        return self._context.import_state(self._seq_id, payload)


def serve(scheduler: Scheduler, runner: ModelRunner) -> None:
    """The worker thread: plan, execute, apply, until the scheduler stops."""
    while (plan := scheduler.next_plan()) is not None:
        try:
            output = runner.execute(plan)
        except Exception as exc:
            logger.exception("the engine failed while carrying out a step")
            output = StepOutput(decode_error=exc)
        try:
            scheduler.update_from_output(plan, output)
        except Exception:
            # A bug here leaves the plan half applied: end every running request with an
            # error rather than leave its client waiting, and go on serving new ones.
            logger.exception("the engine failed while applying a step")
            scheduler.fail_running()
    runner.close()
