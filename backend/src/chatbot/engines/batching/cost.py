"""What a step costs: a model of ``llama_decode``'s time, fitted from the steps it times.

A step evaluates some tokens, each at a position of its sequence. Its time is

    seconds = per_step + per_token * tokens + per_cell * cells

where ``cells`` counts, over the step's tokens, the KV cells each one attends to (its
position plus one). ``per_step`` is what every step pays whatever it holds (reading the
weights once, launching the graph), ``per_token`` the matrix products, linear in tokens, and
``per_cell`` attention, which grows with where the tokens sit: a 512-token chunk at position
6,000 reads 6,000 cells per token and costs many times the same chunk at position 0.

The three coefficients start from a prior (the 2-core CPU this was built on) and are refitted
by least squares over the most recent steps, pulled towards the prior where the recent steps
say little (a run of decode-only steps tells nothing of ``per_cell`` at large positions). A
busy machine makes every step slower; the fit follows, and chunks shrink with it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

# Steps kept for the fit, and how often it is redone: a few seconds of work.
_WINDOW = 256
_REFIT_EVERY = 16
# How strongly the prior holds, in steps' worth of evidence per coefficient.
_PRIOR_WEIGHT = 0.25
# No coefficient is fitted below this share of its prior: a fit on a narrow range of shapes
# could otherwise call a cost free.
_FLOOR = 0.1


@dataclass(slots=True)
class StepShape:
    """What one step evaluates, as far as its cost is concerned."""

    tokens: int = 0
    cells: int = 0

    def add(self, start: int, n: int) -> None:
        """``n`` tokens of one sequence at positions ``start`` … ``start + n - 1``."""
        self.tokens += n
        self.cells += n * start + n * (n + 1) // 2


@dataclass(frozen=True, slots=True)
class Coefficients:
    per_step_s: float
    per_token_s: float
    per_cell_s: float


# Measured on the 2-core CPU (Gemma 3 270M Q4_K_M, 2 threads, 2026-12-05): a lone decode step
# 13 ms, a 512-token chunk 0.72 s at position 0 and 1.29 s at position 6,144.
CPU_PRIOR = Coefficients(per_step_s=0.013, per_token_s=0.00133, per_cell_s=1.8e-7)


class StepCostModel:
    def __init__(self, prior: Coefficients = CPU_PRIOR) -> None:
        self._prior = prior
        self.coefficients = prior
        self._steps: deque[tuple[int, int, float]] = deque(maxlen=_WINDOW)
        self._since_fit = 0

    def predict(self, shape: StepShape) -> float:
        c = self.coefficients
        if shape.tokens == 0:
            return 0.0
        return c.per_step_s + c.per_token_s * shape.tokens + c.per_cell_s * shape.cells

    def max_chunk(self, shape: StepShape, start: int, budget_s: float) -> int:
        """The most tokens of one sequence, from position ``start``, that fit in a step already
        holding ``shape`` without its predicted time passing ``budget_s``."""
        c = self.coefficients
        left = budget_s - (self.predict(shape) if shape.tokens else c.per_step_s)
        if left <= 0:
            return 0
        # per_token * n + per_cell * (n * start + n (n + 1) / 2) <= left, solved for n.
        a = c.per_cell_s / 2
        b = c.per_token_s + c.per_cell_s * (start + 0.5)
        if a == 0:
            return int(left / b) if b > 0 else 1 << 30
        return int((-b + math.sqrt(b * b + 4 * a * left)) / (2 * a))

    def observe(self, shape: StepShape, seconds: float) -> None:
        """One timed step; refits now and then."""
        if shape.tokens == 0:
            return
        self._steps.append((shape.tokens, shape.cells, seconds))
        self._since_fit += 1
        if self._since_fit >= _REFIT_EVERY:
            self.refit()

    def refit(self) -> None:
        """Least squares on the recent steps, in units of the prior (so that the three
        coefficients, eight orders of magnitude apart, weigh alike), with one pseudo-step
        per coefficient pulling it towards the prior."""
        self._since_fit = 0
        if not self._steps:
            return
        p = self._prior
        steps = np.array(self._steps, dtype=np.float64)
        ones = np.ones(len(steps))
        x = np.column_stack(
            (ones * p.per_step_s, steps[:, 0] * p.per_token_s, steps[:, 1] * p.per_cell_s)
        )
        # Each step weighs by 1/seconds: a relative error counts alike for a 20 ms step and
        # a 1 s one, so that the short steps, the ones streaming users wait on, fit too.
        weight = 1 / np.maximum(steps[:, 2], 1e-4)
        x = x * weight[:, None]
        y = steps[:, 2] * weight
        anchor = math.sqrt(_PRIOR_WEIGHT)
        x = np.vstack((x, np.eye(3) * anchor))
        y = np.concatenate((y, np.full(3, anchor)))
        scale, *_ = np.linalg.lstsq(x, y, rcond=None)
        scale = np.maximum(scale, _FLOOR)
        self.coefficients = Coefficients(
            per_step_s=p.per_step_s * float(scale[0]),
            per_token_s=p.per_token_s * float(scale[1]),
            per_cell_s=p.per_cell_s * float(scale[2]),
        )
