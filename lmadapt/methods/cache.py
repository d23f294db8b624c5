"""Neural cache (Grave et al. 2016).

p_cache(w | t) ∝ Σ_{t-N <= i < t, y_i = w} exp(θ h_t·h_i). Only the target's
probability is needed for scoring, so this is an (L x memory) attention, never
a V-sized vector. Unlike awd-lstm-lm's pointer.py it works from the first
token: with an empty window the cache is unavailable and its λ goes back to
the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmadapt.errors import LmadaptError
from lmadapt.methods.base import Method, Segment


@dataclass
class CacheParams:
    window: int = 500       # N: how many past positions the cache attends over
    theta: float = 0.3      # inverse temperature of the dot-product attention


class NeuralCache(Method):
    name = "cache"
    Params = CacheParams
    grid = {"window": [500, 1000, 5000], "theta": [0.1, 0.3, 0.5, 1.0]}

    def __init__(self, params=None):
        super().__init__(params)
        if self.params.window < 1:
            raise LmadaptError(f"cache window must be >= 1, got {self.params.window}")

    def memory_window(self) -> int:
        return self.params.window

    def start(self, ctx) -> None:
        self.memory = ctx.memory

    def target_log_probs(self, seg: Segment):
        mem = self.memory
        keys, values, positions = mem.keys, mem.values, mem.positions
        t = seg.positions.unsqueeze(1)
        # Strictly earlier, and within the last N positions.
        visible = (positions.unsqueeze(0) < t) & (positions.unsqueeze(0) >= t - self.params.window)
        scores = self.params.theta * (seg.hidden @ keys.T)
        scores = scores.masked_fill(~visible, float("-inf"))
        available = visible.any(1)
        # Rows with nothing visible get a harmless 0 instead of NaN from an all -inf softmax.
        log_attn = torch.log_softmax(torch.where(available.unsqueeze(1), scores, torch.zeros_like(scores)), 1)
        hits = values.unsqueeze(0) == seg.targets.unsqueeze(1)
        log_p = torch.logsumexp(log_attn.masked_fill(~(hits & visible), float("-inf")), 1)
        return log_p, available
