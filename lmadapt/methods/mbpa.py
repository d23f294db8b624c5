"""Memory-based parameter adaptation of the softmax layer (Sprechmann et al. 2018).

For each query: the K nearest of the last N (hidden, next word) pairs, kernel
weights 1/(ε + ‖h_k − q‖²), T steps of size α on the output layer's weight and
bias against the weighted neighbour NLL plus β‖θ_x − θ‖², predict, discard.
With plain gradient steps the adapted logits come from the exact rank-K form
(lmadapt.adapt.adapted_log_probs_lowrank), reusing each neighbour's base
logits stored in the memory when it was scored. RMSprop/Adam steps break the
low-rank structure and go through the batched torch.func path instead.

With dynamic evaluation the stored base logits lag the current weights (they
are the logits the model had when that position was scored); we keep them
as they are: MbPA then adapts from the current weights using slightly stale
neighbour predictions, which costs nothing and changes little for small
dynamic-evaluation learning rates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmadapt.adapt import LinearMbPA, functional_mbpa, kernel_weights
from lmadapt.errors import LmadaptError
from lmadapt.methods.base import Method, Segment


@dataclass
class MbPAParams:
    memory: int = 5000      # N: past positions searched
    k: int = 256            # neighbours per query
    alpha: float = 0.15     # local learning rate
    steps: int = 1          # T local steps
    beta: float = 0.0       # prior weight on ||theta_x - theta||^2
    eps: float = 1e-3       # kernel epsilon
    normalise: bool = True  # kernel weights sum to 1
    optimizer: str = "sgd"  # sgd (exact rank-K path) | rmsprop | adam (torch.func path)


class MbPA(Method):
    name = "mbpa"
    Params = MbPAParams
    # The paper's App. B grid.
    grid = {"memory": [500, 1000, 5000], "k": [256, 512], "steps": [1, 5, 10],
            "alpha": [0.01, 0.1, 0.15, 0.2, 0.5, 1.0]}

    def __init__(self, params=None):
        super().__init__(params)
        p = self.params
        if p.k < 1 or p.memory < 1:
            raise LmadaptError(f"mbpa needs k >= 1 and memory >= 1, got k={p.k}, memory={p.memory}")
        if p.k > p.memory:
            raise LmadaptError(f"mbpa k={p.k} is larger than its memory N={p.memory}")
        if p.optimizer not in ("sgd", "rmsprop", "adam"):
            raise LmadaptError(f"mbpa optimizer must be sgd, rmsprop or adam, got {p.optimizer!r}")

    needs_logits = True

    def memory_window(self) -> int:
        return self.params.memory

    def start(self, ctx) -> None:
        self.memory = ctx.memory
        self.decoder = ctx.model.decoder
        p = self.params
        self.local = LinearMbPA(self.decoder.weight.detach(), self.decoder.bias.detach(), k=p.k, alpha=p.alpha,
                                steps=p.steps, beta=p.beta, eps=p.eps, normalise=p.normalise,
                                logits_extra="logits")

    def target_log_probs(self, seg: Segment):
        t = seg.positions
        window = (t - self.params.memory, t)
        p = self.params
        if p.optimizer == "sgd":
            # Dynamic evaluation may have moved the weights: always adapt from the current ones.
            self.local.weight, self.local.bias = self.decoder.weight.detach(), self.decoder.bias.detach()
            log_probs = self.local.log_probs(seg.hidden, self.memory, window=window)
        else:
            sq, idx, valid = self.memory.knn(seg.hidden, p.k, window=window)
            w = kernel_weights(sq, valid, p.eps, p.normalise)
            log_probs = functional_mbpa(
                self.decoder, seg.hidden, self.memory.keys[idx], self.memory.values[idx], w,
                steps=p.steps, lr=p.alpha, beta=p.beta, optimizer=p.optimizer)
        log_p = log_probs.gather(1, seg.targets.unsqueeze(1)).squeeze(1)
        # Rows with no neighbour yet come back unadapted (= the base model): no need to
        # mark them unavailable, mixing them in changes nothing.
        return log_p, torch.ones_like(log_p, dtype=torch.bool)
