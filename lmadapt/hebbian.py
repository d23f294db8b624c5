"""Hebbian softmax (Rae et al. 2018, "Fast Parametric Learning with Activation Memorization").

After each optimiser step, the softmax weight row of every class present in the batch is
mixed toward the mean of that class's final-layer activations in the batch:

    w_i <- (1 - lam_i) w_i + lam_i * h_i,    lam_i = max(1 / c_i, gamma) if c_i < T else 0

where w_i on the right is the row after the gradient step, h_i the batch mean of the
activations whose target is i, and c_i the number of occurrences of class i seen so far in
training, starting at 1 (so a class's first batch writes its mean activation outright).
c_i is updated after the mix.  Rare classes thus "bind" to their activations at once,
frequent ones fall back to plain gradient learning after T occurrences.

The rows are written with ``index_copy_`` on the parameter itself: the one public
implementation we found assigned to a boolean-mask copy, so its weights never changed
(tests/test_hebbian.py checks that exactly the present rows move, by the exact amount).
"""

from __future__ import annotations

import torch
from torch import Tensor


class HebbianSoftmax:
    def __init__(self, num_classes: int, gamma: float = 0.01, T: int = 500, device=None):
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"hebbian gamma must be in [0, 1], got {gamma}")
        if T < 1:
            raise ValueError(f"hebbian T must be >= 1, got {T}")
        self.gamma, self.T = float(gamma), int(T)
        self.counts = torch.ones(num_classes, dtype=torch.long, device=device)  # c_i, starting at 1

    def mixing_rates(self, counts: Tensor) -> Tensor:
        c = counts.to(torch.float32)
        lam = torch.clamp(1.0 / c, min=self.gamma)
        return torch.where(counts < self.T, lam, torch.zeros_like(lam))

    @torch.no_grad()
    def update(self, weight: Tensor, hidden: Tensor, targets: Tensor, all_reduce=None) -> Tensor:
        """Mix the rows of ``weight`` (V, d) for the classes in ``targets``; returns those classes.

        ``hidden`` (..., d) are the softmax inputs the loss used, ``targets`` (...) their
        classes.  ``all_reduce`` (DDP): a function summing a tensor over processes in place,
        so that every process applies the same update from the global batch.
        """
        V, d = weight.shape
        h = hidden.detach().reshape(-1, d).float()
        y = targets.reshape(-1).to(weight.device)
        if all_reduce is None:
            classes, inverse = torch.unique(y, return_inverse=True)
            n = torch.bincount(inverse, minlength=classes.numel())
            sums = torch.zeros(classes.numel(), d, device=h.device).index_add_(0, inverse, h)
        else:  # processes see different classes: reduce over the whole vocabulary
            n = torch.bincount(y, minlength=V)
            sums = torch.zeros(V, d, device=h.device).index_add_(0, y, h)
            all_reduce(n)
            all_reduce(sums)
            classes = (n > 0).nonzero().squeeze(1)
            n, sums = n[classes], sums[classes]
        lam = self.mixing_rates(self.counts[classes])[:, None]
        mixed = (1.0 - lam) * weight.index_select(0, classes).float() + lam * (sums / n[:, None])
        weight.index_copy_(0, classes, mixed.to(weight.dtype))
        self.counts.index_add_(0, classes, n.to(self.counts.dtype))
        return classes

    def state_dict(self) -> dict:
        return {"counts": self.counts.clone(), "gamma": self.gamma, "T": self.T}

    def load_state_dict(self, sd: dict) -> None:
        if sd["counts"].shape != self.counts.shape:
            raise ValueError(f"hebbian counts for {sd['counts'].shape[0]} classes, model has {self.counts.shape[0]}")
        self.counts.copy_(sd["counts"])
