"""λ mixtures: p = (1 − Σ λ_i a_i) p_base + Σ λ_i a_i p_i, in log space.

a_i is 1 where method i is available for the token (0 e.g. for a cache with
an empty memory: its λ mass goes back to the base model). Everything works
on per-token target log-probabilities, so tuning λ never needs the model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmadapt.errors import LmadaptError


def check_lambdas(lambdas: dict[str, float]) -> None:
    for name, lam in lambdas.items():
        if not 0.0 <= lam <= 1.0:
            raise LmadaptError(f"lambda for {name} must be in [0, 1], got {lam}")
    total = sum(lambdas.values())
    if total > 1.0 + 1e-9:
        raise LmadaptError(f"mixture weights sum to {total:g} > 1 ({', '.join(f'{k}={v:g}' for k, v in lambdas.items())})")


def mix_log_probs(base: Tensor, components: dict[str, tuple[Tensor, Tensor]], lambdas: dict[str, float]) -> Tensor:
    """Per-token log p of the mixture. base: (n,) log p_base(target) (the adapted model's under
    dyneval); components: name -> ((n,) log p_i(target), (n,) bool available)."""
    if not components:
        return base
    terms, used = [], torch.zeros_like(base)
    for name, (log_p, available) in components.items():
        lam = lambdas.get(name, 0.0) * available.to(base.dtype)
        terms.append(torch.log(lam) + log_p)
        used = used + lam
    terms.append(torch.log1p(-used.clamp(max=1.0)) + base)
    return torch.logsumexp(torch.stack(terms), 0)


def perplexity(log_probs: Tensor) -> float:
    return float(torch.exp(-log_probs.double().mean()))
