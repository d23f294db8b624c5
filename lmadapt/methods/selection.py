"""Online selection among a method's experts: a Bayesian average weighted by the stream scored so far.

A method that cannot fix one setting for every model (the cache's window and θ, MbPA's
memory) runs several settings side by side, its experts, and returns their average:
expert k's weight at position t is proportional to Π_{s<t} ((1−λ) p_model(y_s) + λ p_k(y_s)),
how well it would have scored the tokens already scored, mixed with the model at the
method's default λ. Only past targets enter the weights, so the method stays causal. The
bound is for that mixture: the model mixed at the default λ with the average has a total
log-loss within log(number of experts) nats of the model mixed at that λ with the best
expert in hindsight, on the same stream; at another λ (a tuned one, or inside a mixture
with its own λs) the average is a good expert, not a bounded one.
"""

from __future__ import annotations

import math

import torch


def wide(device: torch.device) -> torch.dtype:
    """The weights' working precision: float64, since they sum over the whole stream (MPS has
    none: float32 there)."""
    return torch.float32 if device.type == "mps" else torch.float64


class OnlineSelection:
    def __init__(self, experts: list, lam: float, device):
        self.experts = list(experts)
        self.lam = lam
        # Each expert's log-likelihood of the scored stream at λ, less `shift`: its log posterior
        # weight (up to the uniform prior). Kept with its maximum at 0 (the total is evidence +
        # shift), so that float32 (on MPS) keeps its resolution over a long stream.
        self.evidence = torch.zeros(len(self.experts), dtype=wide(torch.device(device)), device=device)
        self.shift = 0.0

    def weights(self) -> dict:
        """The experts' posterior weights after the tokens scored so far."""
        return dict(zip(self.experts, torch.softmax(self.evidence, 0).tolist()))

    def top(self, n: int = 3) -> list:
        """The n heaviest experts, as (expert, weight), heaviest first."""
        return sorted(self.weights().items(), key=lambda kv: -kv[1])[:n]

    def average(self, log_p, base, available):
        """log of the weighted average of the experts' target probabilities for a block of rows in
        stream order, then the rows' scores added to the evidence.

        log_p: (rows, experts) each expert's log p(target); base: (rows,) the model's log
        p(target); available: (rows,) bool, False on rows no expert can score yet (they are
        mixed back to the model and add nothing to the evidence). Returns float32 (rows,)."""
        dt = self.evidence.dtype
        ok = available.unsqueeze(1)
        log_p = torch.where(ok, log_p.to(dt), torch.zeros((), dtype=dt, device=log_p.device))
        scored = torch.logaddexp(math.log1p(-self.lam) + base.to(dt).unsqueeze(1), math.log(self.lam) + log_p)
        # (a floor: a token both the model and an expert give probability 0 must not turn the
        # running sums into NaN)
        scored = torch.where(ok, scored.clamp(min=-1e4), torch.zeros_like(scored))
        # Row r's weights count the rows before it only: it is scored before anything learns from it.
        before = self.evidence + scored.cumsum(0) - scored
        evidence = self.evidence + scored.sum(0)
        top = evidence.max()
        self.evidence, self.shift = evidence - top, self.shift + float(top)
        return torch.logsumexp(torch.log_softmax(before, 1) + log_p, 1).float()
