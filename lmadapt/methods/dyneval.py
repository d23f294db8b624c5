"""Dynamic evaluation (Krause et al. 2017).

After each scored segment of L tokens, one gradient step on that segment's
NLL. Two update rules:

* sgd:  θ ← θ − η ∇ + λ (θ₀ − θ)
* rms:  θ ← θ − η ∇ / (√MS + ε) + λ · r ⊙ (θ₀ − θ),  r = √MS / mean(√MS) clipped at 1/λ

where MS is the mean squared gradient collected on training data (segments of
the same length, batch size 1, as at evaluation) and θ₀ the trained weights;
this is the "RMS norm with decay to the global prior" of the paper and its
reference code. The stream loop runs its forward pass with the graph kept and
uses L as its segment length when this method is active.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from lmadapt.errors import LmadaptError
from lmadapt.methods.base import Method, Segment
from lmadapt.params import NON_NEGATIVE, POSITIVE, at_least, between


@dataclass
class DynEvalParams:
    lr: float = 0.002        # η
    decay: float = 0.02      # λ, pull toward the trained weights
    eps: float = 0.001       # ε of the RMS rule
    segment: int = 5         # L, tokens per update
    variant: str = "rms"     # rms | sgd
    adapt: str = "all"       # all | output | lstm: which parameters move
    stat_tokens: int = 20000  # training tokens for the gradient statistics (rms)

    RANGES: ClassVar[dict] = {"lr": NON_NEGATIVE, "decay": between(0, 1), "eps": POSITIVE, "segment": at_least(1),
                              "stat_tokens": at_least(1)}


class DynamicEvaluation(Method):
    name = "dyneval"
    Params = DynEvalParams
    grid = {"lr": [1e-4, 3e-4, 1e-3, 2e-3, 5e-3], "decay": [0.0, 0.01, 0.02, 0.05]}
    needs_grad = True
    adapts_model = True

    def __init__(self, params=None):
        super().__init__(params)
        p = self.params
        if p.variant not in ("rms", "sgd"):
            raise LmadaptError(f"dyneval variant must be rms or sgd, got {p.variant!r}")
        if p.adapt not in ("all", "output", "lstm"):
            raise LmadaptError(f"dyneval adapt must be all, output or lstm, got {p.adapt!r}")
        if p.segment < 1:
            raise LmadaptError(f"dyneval segment must be >= 1, got {p.segment}")

    def _select(self, model) -> list[torch.nn.Parameter]:
        return model.adaptable_parameters(self.params.adapt)  # tied weights appear once

    def start(self, ctx) -> None:
        model = ctx.model
        self.model = model
        self.device = ctx.device
        self.adapted = self._select(model)
        chosen = {id(p) for p in self.adapted}
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
        self.theta0 = [p.detach().clone() for p in self.adapted]
        p = self.params
        if p.variant == "rms":
            rms = self._gradient_rms(ctx.corpus.train)
            mean = torch.cat([r.flatten() for r in rms]).mean()
            self.rms = rms
            cap = 1.0 / p.decay if p.decay > 0 else float("inf")
            self.decay_rate = [(r / mean).clamp(max=cap) for r in rms]
        # The update rule rewritten so that one step is two passes over the weights:
        #   w <- w + decay * r (w0 - w) - lr * g * inv  =  keep * w + anchor - lr * g * inv
        # with keep = 1 - decay * r, anchor = decay * r * w0 and inv = 1 / (sqrt(MS) + eps)
        # precomputed here (r = 1 and inv = 1 for sgd).  The textbook form made ~8 passes and
        # temporaries per weight per segment, and the update dominates at L = 5.
        rate = self.decay_rate if p.variant == "rms" else [torch.ones_like(w) for w in self.theta0]
        self.keep = [1.0 - p.decay * r for r in rate] if p.decay else None
        self.anchor = [p.decay * r * w0 for r, w0 in zip(rate, self.theta0)] if p.decay else None
        self.inv = [1.0 / (r + p.eps) for r in self.rms] if p.variant == "rms" else None

    def _gradient_rms(self, train: torch.Tensor) -> list[torch.Tensor]:
        """√(mean squared gradient) per weight, over consecutive training segments."""
        p = self.params
        stream = train[: p.stat_tokens + 1].to(self.device)
        sums = [torch.zeros_like(q) for q in self.adapted]
        state, count = self.model.init_state(1, self.device), 0
        for s in range(0, stream.numel() - 1, p.segment):
            x = stream[s:s + p.segment].unsqueeze(0)
            y = stream[s + 1:s + 1 + p.segment].unsqueeze(0)
            x = x[:, :y.size(1)]
            _, logits, state = self.model(x, state)
            state = self.model.detach_state(state)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
            grads = torch.autograd.grad(loss, self.adapted)
            for acc, g in zip(sums, grads):
                acc.add_(g.square())
            count += 1
        if count == 0:
            raise LmadaptError("dyneval needs training data for its gradient statistics")
        return [(acc / count).sqrt() for acc in sums]

    def target_log_probs(self, seg: Segment):
        raise NotImplementedError("dynamic evaluation adapts the base model; it is not mixed in")

    def observe(self, seg: Segment, loss) -> None:
        grads = torch.autograd.grad(loss, self.adapted)
        with torch.no_grad():
            apply_update(self.adapted, grads, lr=self.params.lr, keep=self.keep, anchor=self.anchor, inv=self.inv)


def apply_update(weights, grads, *, lr: float, keep=None, anchor=None, inv=None) -> None:
    """w <- keep * w + anchor - lr * g * inv, in place, in two passes over each weight."""
    if keep is not None:
        for w, k, a in zip(weights, keep, anchor):  # one pass: w <- anchor + w * keep
            torch.addcmul(a, w, k, out=w)
    if inv is not None:
        torch._foreach_addcmul_(weights, list(grads), inv, value=-lr)
    else:
        torch._foreach_add_(weights, list(grads), alpha=-lr)
