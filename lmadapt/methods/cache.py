"""Neural cache (Grave et al. 2016).

p_cache(w | t) ∝ Σ_{t-N <= i < t, y_i = w} exp(θ h_t·h_i). Only the target's
probability is needed for scoring, so this is an (L x memory) attention, never
a V-sized vector. Unlike awd-lstm-lm's pointer.py it works from the first
token: with an empty window the cache is unavailable and its λ goes back to
the model.

θ by default scales with the model: θ_t = c / mean ‖h_i‖² over the keys in
t's window (c = `theta_scaled`), a causal running statistic of the stream's own
past. The best fixed θ differs threefold between the PTB and WikiText-2 recipe
models (0.3 vs 0.1) and their keys' mean squared norms differ in step (22 vs 50);
c = 6.7 matched each model's best fixed θ on valid (bench/defaults). `theta > 0`
fixes θ as in Grave et al. (the paper preset's 0.3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lmadapt.errors import LmadaptError
from lmadapt.methods.base import MixtureMethod, Segment
from lmadapt.params import NON_NEGATIVE, POSITIVE, at_least

_ROWS = 128  # segment rows per attention block


@dataclass
class CacheParams:
    window: int = 500          # N: how many past positions the cache attends over
    theta: float = 0.0         # a fixed inverse temperature (Grave et al.'s θ); 0: scaled, below
    theta_scaled: float = 6.7  # c of the scaled θ = c / mean ‖h_i‖² over the window (bench/defaults)

    RANGES: ClassVar[dict] = {"window": at_least(1), "theta": NON_NEGATIVE, "theta_scaled": POSITIVE}
    HELP: ClassVar[dict] = {"theta": "fixed inverse temperature θ; 0 scales it to the keys' norms",
                            "theta_scaled": "c of the scaled θ = c / mean squared key norm in the window"}


class NeuralCache(MixtureMethod):
    name = "cache"
    Params = CacheParams
    default_lambda = 0.2  # bench/defaults
    # theta 0 is the scaled θ (at the default c); the fixed values are Grave et al.'s.
    grid = {"window": [500, 1000, 5000], "theta": [0.0, 0.1, 0.3, 0.5, 1.0]}
    PRESETS = {"paper": {"window": 500, "theta": 0.3, "lambda": 0.15}}

    def __init__(self, params=None):
        super().__init__(params)
        if self.params.window < 1:
            raise LmadaptError(f"cache window must be >= 1, got {self.params.window}")

    def memory_window(self) -> int:
        return self.params.window

    def start(self, ctx) -> None:
        self.memory = ctx.memory

    def target_log_probs(self, seg: Segment):
        # Rows go in blocks: each block attends over its own window (N + block entries), so a
        # long stream segment (MbPA prefers 512) costs no more per row than a short one.
        parts = [self._rows(seg.hidden[s:s + _ROWS], seg.positions[s:s + _ROWS], seg.targets[s:s + _ROWS])
                 for s in range(0, seg.positions.numel(), _ROWS)]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _rows(self, hidden, rows, targets):
        mem = self.memory
        keys, values, positions = mem.keys, mem.values, mem.positions
        t = rows.unsqueeze(1)
        # The shared memory may be much longer than this window (MbPA's N): attend only over
        # the entries some row can see.
        near = (positions >= rows.min() - self.params.window) & (positions < rows.max())
        if not bool(near.all()):
            slots = near.nonzero().squeeze(1)
            keys, values, positions = keys[slots], values[slots], positions[slots]
        # Strictly earlier, and within the last N positions.
        visible = (positions.unsqueeze(0) < t) & (positions.unsqueeze(0) >= t - self.params.window)
        dots = hidden @ keys.T
        if self.params.theta > 0:
            theta = self.params.theta
        else:  # c / mean squared norm of each row's visible keys
            seen = visible.to(dots.dtype)
            mean_sq = (seen @ keys.to(dots.dtype).pow(2).sum(1)) / seen.sum(1).clamp(min=1)
            theta = (self.params.theta_scaled / mean_sq.clamp(min=1e-12)).unsqueeze(1)
        scores = theta * dots
        scores = scores.masked_fill(~visible, float("-inf"))
        available = visible.any(1)
        # Rows with nothing visible get a harmless 0 instead of NaN from an all -inf softmax.
        log_attn = torch.log_softmax(torch.where(available.unsqueeze(1), scores, torch.zeros_like(scores)), 1)
        hits = values.unsqueeze(0) == targets.unsqueeze(1)
        log_p = torch.logsumexp(log_attn.masked_fill(~(hits & visible), float("-inf")), 1)
        return log_p, available
