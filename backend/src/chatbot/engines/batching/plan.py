"""A step as plain data: what the scheduler decides (``StepPlan``), what the model runner
reports back (``StepOutput``). Nothing here touches llama.cpp, so the scheduler's policy is
tested with hand-made outputs."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from chatbot.engines.batching.cost import StepShape
from chatbot.engines.batching.requests import Progress
from chatbot.kvcache import PromptKey, Restore, Reuse


@dataclass(frozen=True, slots=True)
class Save:
    """Copy the sequence's state out of llama.cpp and hand it to the cache's I/O thread:
    first thing in the step, before anything changes the sequence."""

    seq_id: int
    key: PromptKey
    drafted_from: int | None = None


@dataclass(frozen=True, slots=True)
class Admission:
    """Give ``progress`` its sequence: keep its first ``keep`` tokens in place, or, with a
    ``source``, make it share the source sequence's first ``keep`` tokens by reference."""

    progress: Progress
    keep: int
    source: int | None = None


@dataclass(frozen=True, slots=True)
class Load:
    """Load a saved state, fetched off the worker thread, into ``progress``'s sequence."""

    progress: Progress
    restore: Restore
    payload: bytearray


@dataclass(frozen=True, slots=True)
class Handoff:
    """Copy the state the side reader computed, ``tokens`` of ``progress``'s prompt, into
    its sequence."""

    progress: Progress
    tokens: int
    payload: bytearray


@dataclass(frozen=True, slots=True)
class Chunk:
    """Tokens of one sequence evaluated in this step: one answer token, or part of a prompt."""

    progress: Progress
    start: int
    tokens: Sequence[int]
    wants_logits: bool


@dataclass(slots=True)
class StepPlan:
    """In the order the runner carries it out."""

    released: list[Progress] = field(default_factory=list)
    saves: list[Save] = field(default_factory=list)
    evictions: list[int] = field(default_factory=list)
    admissions: list[Admission] = field(default_factory=list)
    loads: list[Load] = field(default_factory=list)
    handoffs: list[Handoff] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    decode_tokens: int = 0
    """Chunks that are one answer token each (they come first)."""
    shape: StepShape = field(default_factory=StepShape)
    predicted_s: float = 0.0
    beside_side_reader: bool = False
    """The side reader is reading: the step computes on one thread fewer."""

    def is_empty(self) -> bool:
        return not (
            self.released
            or self.saves
            or self.evictions
            or self.admissions
            or self.loads
            or self.handoffs
            or self.chunks
        )


@dataclass(slots=True)
class StepOutput:
    sampled: dict[Progress, int] = field(default_factory=dict)
    """The token each chunk that wanted logits sampled."""
    diverged: dict[Progress, Reuse] = field(default_factory=dict)
    """Requests whose sequence holds less than planned (llama.cpp refused to keep a prefix
    or to load a state): what it holds; their chunk was not evaluated."""
    saving: dict[int, Future[None]] = field(default_factory=dict)
    """Per sequence, the save handed to the cache's I/O thread."""
    failed: dict[Progress, BaseException] = field(default_factory=dict)
    """Requests whose admission or load failed: they alone fail."""
    pool_full: bool = False
    """The batch found no room in the KV pool and none of it was stored."""
    decode_error: BaseException | None = None
    """The batch failed otherwise: the sequences in it are in an unknown state."""
    elapsed_s: float = 0.0
