"""What a step costs: a model of ``llama_decode``'s time, fitted from the steps it times.

A step evaluates some tokens, each at a position of its sequence, and computes the logits of
some of them (every answer token; a prompt's last). Its time is

    seconds = per_step + per_token * tokens + per_output * outputs + per_cell * cells

``per_step`` is what every step pays whatever it holds (reading the weights once, launching
the graph); ``per_token`` the matrix products, linear in tokens; ``per_output`` a row of the
output layer, which for a small model with a large vocabulary (Gemma 3: 262,144 tokens) costs
several tokens' worth; and ``per_cell`` attention, which grows with where the tokens sit.

``cells`` is the attention work of the step's chunks: a chunk of ``n`` tokens from position
``start`` reads about ``start + n / 2`` cells per query row, and llama.cpp's CPU attention
does so for a few rows at once: a chunk of a few tokens costs almost as much per step as one
of 32. Measured on the 2-core CPU (2026-12-05, Gemma 3 270M, a grid of chunks of 1 to 512
tokens at positions 0 to 6,144), a chunk weighs as ``min(3 n, n + 64)`` rows, which predicts
that grid within 8 % rms where plain ``n`` rows is off by 14 % (and by a third on small deep
chunks: 16 tokens at 6,144 took 82 ms, 5.1 ms a token, against 2.6 for 512 tokens there).

The four coefficients start from a prior (that same CPU) and are refitted by least squares
over the most recent steps, pulled towards the prior where the recent steps say little (a
run of decode-only steps tells nothing of ``per_cell`` at large positions). A busy machine
makes every step slower; the fit follows, and chunks shrink with it.
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
# The query rows a chunk's attention costs, ``min(_FEW_ROWS_FACTOR * n, n + _ROWS_AT_ONCE)``.
_FEW_ROWS_FACTOR = 3
_ROWS_AT_ONCE = 64


@dataclass(slots=True)
class StepShape:
    """What one step evaluates, as far as its cost is concerned."""

    tokens: int = 0
    outputs: int = 0
    cells: int = 0

    def add(self, start: int, n: int, *, outputs: int = 0) -> None:
        """``n`` tokens of one sequence at positions ``start`` … ``start + n - 1``, of which
        ``outputs`` have their logits computed."""
        self.tokens += n
        self.outputs += outputs
        self.cells += attention_cells(start, n)


def attention_cells(start: int, n: int) -> int:
    rows = min(_FEW_ROWS_FACTOR * n, n + _ROWS_AT_ONCE)
    return (2 * start + n + 1) * rows // 2


@dataclass(frozen=True, slots=True)
class Coefficients:
    per_step_s: float
    per_token_s: float
    per_output_s: float
    per_cell_s: float

    def times(self, factor: float) -> Coefficients:
        return Coefficients(
            self.per_step_s * factor,
            self.per_token_s * factor,
            self.per_output_s * factor,
            self.per_cell_s * factor,
        )


# Measured on the 2-core CPU (Gemma 3 270M Q4_K_M, 2 threads, 2026-12-05): one answer token
# 13 ms, four 29 ms (9 ms without their logits); 512 prompt tokens 0.88 s at position 0 and
# 1.34 s at position 6,144, 64 tokens 0.11 and 0.25 s.
CPU_PRIOR = Coefficients(
    per_step_s=0.006, per_token_s=0.0016, per_output_s=0.005, per_cell_s=1.7e-7
)


class StepCostModel:
    def __init__(self, prior: Coefficients = CPU_PRIOR) -> None:
        self.prior = prior
        self._prior = prior
        self.coefficients = prior
        self._steps: deque[tuple[int, int, int, float]] = deque(maxlen=_WINDOW)
        self._since_fit = 0

    def predict(self, shape: StepShape) -> float:
        c = self.coefficients
        if shape.tokens == 0:
            return 0.0
        return (
            c.per_step_s
            + c.per_token_s * shape.tokens
            + c.per_output_s * shape.outputs
            + c.per_cell_s * shape.cells
        )

    def max_chunk(self, shape: StepShape, start: int, budget_s: float, most: int) -> int:
        """The most tokens of one sequence, up to ``most``, from position ``start``, that fit
        in a step already holding ``shape`` without its predicted time passing ``budget_s``."""
        low, high = 0, most  # a step's cost grows with every token it takes: bisect
        while low < high:
            n = (low + high + 1) // 2
            with_n = StepShape(shape.tokens, shape.outputs, shape.cells)
            with_n.add(start, n)
            if self.predict(with_n) <= budget_s:
                low = n
            else:
                high = n - 1
        return low

    def observe(self, shape: StepShape, seconds: float) -> None:
        """One timed step; refits now and then."""
        if shape.tokens == 0:
            return
        self._steps.append((shape.tokens, shape.outputs, shape.cells, seconds))
        self._since_fit += 1
        if self._since_fit >= _REFIT_EVERY:
            self.refit()

    def refit(self) -> None:
        """Least squares on the recent steps, in units of the prior (so that the four
        coefficients, orders of magnitude apart, weigh alike), with one pseudo-step
        per coefficient pulling it towards the prior."""
        self._since_fit = 0
        if not self._steps:
            return
        p = self._prior
        steps = np.array(self._steps, dtype=np.float64)
        ones = np.ones(len(steps))
        x = np.column_stack(
            (
                ones * p.per_step_s,
                steps[:, 0] * p.per_token_s,
                steps[:, 1] * p.per_output_s,
                steps[:, 2] * p.per_cell_s,
            )
        )
        # Each step weighs by 1/seconds: a relative error counts alike for a 20 ms step and
        # a 1 s one, so that the short steps, the ones streaming users wait on, fit too.
        weight = 1 / np.maximum(steps[:, 3], 1e-4)
        x = x * weight[:, None]
        y = steps[:, 3] * weight
        anchor = math.sqrt(_PRIOR_WEIGHT)
        x = np.vstack((x, np.eye(4) * anchor))
        y = np.concatenate((y, np.full(4, anchor)))
        scale, *_ = np.linalg.lstsq(x, y, rcond=None)
        scale = np.maximum(scale, _FLOOR)
        self.coefficients = Coefficients(
            per_step_s=p.per_step_s * float(scale[0]),
            per_token_s=p.per_token_s * float(scale[1]),
            per_output_s=p.per_output_s * float(scale[2]),
            per_cell_s=p.per_cell_s * float(scale[3]),
        )
