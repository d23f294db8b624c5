"""The four predictors of a classifier with an episodic memory (MbPA paper section 4.2, eqs. 5, 9).

With f the model's trunk and g its head, and the memory holding (f(x), y):

* ``parametric``:    g(f(x))
* ``nonparametric``: kernel-weighted vote of the K nearest memories (eq. 9)
* ``mixture``:       lam * parametric + (1 - lam) * nonparametric (eq. 5)
* ``mbpa``:          T local steps on g over the K nearest memories, predict, discard
                     (plain steps: the exact span path ``lmadapt.adapt.mlp_mbpa``;
                     RMSprop/Adam: ``lmadapt.adapt.functional_mbpa``)

The settings are the language-model side's ``MbPAParams`` (K, alpha, T, beta, eps,
normalise, optimizer mean the same here) plus the mixture's weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmadapt.adapt import functional_mbpa, kernel_weights, mlp_base_pass, mlp_mbpa
from lmadapt.classify.models import Classifier
from lmadapt.memory import EpisodicMemory
from lmadapt.methods.mbpa import MbPAParams
from lmadapt.params import PROBABILITY

PREDICTORS = ("parametric", "nonparametric", "mixture", "mbpa")


@dataclass
class ClassifierMbPA(MbPAParams):
    """MbPAParams as the classifiers read them: the fields in FIELDS (the others describe the
    language model's stream memory and are unused here), and the mixture's weight."""

    mixture_lambda: float = 0.5  # weight of the parametric model in the mixture (eq. 5)

    FIELDS: ClassVar[tuple[str, ...]] = ("k", "alpha", "steps", "beta", "eps", "normalise", "optimizer",
                                         "mixture_lambda")
    RANGES: ClassVar[dict] = {**MbPAParams.RANGES, "mixture_lambda": PROBABILITY}
    CHOICES: ClassVar[dict] = {"optimizer": ("sgd", "rmsprop", "adam")}
    HELP: ClassVar[dict] = {"k": "neighbours K", "alpha": "local learning rate (with --no-tune)",
                            "steps": "local steps T (with --no-tune)", "beta": "prior weight beta",
                            "eps": "kernel 1 / (eps + d^2)", "normalise": "kernel weights sum to 1",
                            "optimizer": "local steps (sgd: the exact span path)",
                            "mixture_lambda": "weight of the parametric model in the mixture (with --no-tune)"}

    def used(self) -> dict:
        return {name: getattr(self, name) for name in self.FIELDS}


def memory_probs(sq: Tensor, idx: Tensor, valid: Tensor, memory: EpisodicMemory, classes: int, eps: float) -> Tensor:
    """Eq. 9: p_mem(j | q) = sum_i w_i [v_i = j] / sum_i w_i over the K neighbours."""
    w = kernel_weights(sq, valid, eps, normalise=True)
    vals = memory.values[idx]
    return torch.zeros(w.shape[0], classes, dtype=w.dtype, device=w.device).scatter_add_(1, vals, w)


def mbpa_log_probs(head, q: Tensor, memory: EpisodicMemory, sq: Tensor, idx: Tensor, valid: Tensor,
                   c: ClassifierMbPA, base=None) -> Tensor:
    """Log-probabilities of g after c.steps local steps on the neighbours ``idx`` of each query
    ``q`` (keys f(x)); ``base``: :func:`mlp_base_pass` of the whole memory (plain steps)."""
    w = kernel_weights(sq, valid, c.eps, c.normalise)
    nb_x, nb_y = memory.keys[idx], memory.values[idx]
    if c.optimizer == "sgd":
        nb_base = None if base is None else ([t[idx] for t in base[0]], [t[idx] for t in base[1]])
        return mlp_mbpa(head, q, nb_x, nb_y, w, steps=c.steps, lr=c.alpha, beta=c.beta, nb_base=nb_base)
    return functional_mbpa(head, q, nb_x, nb_y, w, steps=c.steps, lr=c.alpha, beta=c.beta, optimizer=c.optimizer)


@torch.no_grad()
def predict_many(model: Classifier, memory: EpisodicMemory | None, x: Tensor,
                 settings: dict[str, list[ClassifierMbPA]], *, batch: int = 1000) -> dict[str, list[Tensor]]:
    """Predicted classes of every (predictor, setting) pair; the neighbour search runs once per batch.

    ``settings`` maps a predictor name to the settings to score (a grid when tuning); the
    returned dict holds one tensor of predicted classes per setting, in the same order.
    The K nearest neighbours for the largest K are searched once and each setting uses
    their first K (they come sorted by distance).
    """
    model.eval()
    bad = [m for m in settings if m not in PREDICTORS]
    if bad:
        raise ValueError(f"unknown predictor(s) {bad}; choose from {PREDICTORS}")
    classes = model.classes()
    with_memory = [c for m, cs in settings.items() if m != "parametric" for c in cs]
    if with_memory and (memory is None or len(memory) == 0):
        raise ValueError("the memory-based predictors need a non-empty memory")
    k_max = max((c.k for c in with_memory), default=0)
    base = None
    if any(c.optimizer == "sgd" and c.steps > 0 for c in settings.get("mbpa", [])):
        # Step 1 of MbPA is taken at the trained weights: each memory entry's per-layer inputs
        # and NLL gradients are the same for every query that retrieves it, so compute them
        # once per call here and let mlp_mbpa gather them.
        base = mlp_base_pass(model.head, memory.keys, memory.values)
    out: dict[str, list[list[Tensor]]] = {m: [[] for _ in cs] for m, cs in settings.items()}
    for s in range(0, x.shape[0], batch):
        q = model.trunk(x[s : s + batch])
        logits = model.head(q)
        for i, _ in enumerate(settings.get("parametric", [])):
            out["parametric"][i].append(logits.argmax(1))
        if not with_memory:
            continue
        sq_all, idx_all, valid_all = memory.knn(q, k_max)
        for name in ("nonparametric", "mixture", "mbpa"):
            for i, c in enumerate(settings.get(name, [])):
                sq, idx, valid = sq_all[:, : c.k], idx_all[:, : c.k], valid_all[:, : c.k]
                if name == "nonparametric":
                    pred = memory_probs(sq, idx, valid, memory, classes, c.eps).argmax(1)
                elif name == "mixture":
                    p_mem = memory_probs(sq, idx, valid, memory, classes, c.eps)
                    pred = (c.mixture_lambda * logits.softmax(1) + (1 - c.mixture_lambda) * p_mem).argmax(1)
                else:
                    pred = mbpa_log_probs(model.head, q, memory, sq, idx, valid, c, base).argmax(1)
                out[name][i].append(pred)
    return {m: [torch.cat(v) for v in per] for m, per in out.items()}


def predict(model: Classifier, memory: EpisodicMemory | None, x: Tensor, predictor: str,
            settings: ClassifierMbPA | None = None) -> Tensor:
    """Predicted class of every row of ``x`` under one predictor and setting."""
    return predict_many(model, memory, x, {predictor: [settings or ClassifierMbPA()]})[predictor][0]


def describe(name: str, c: ClassifierMbPA) -> dict:
    """The settings a predictor reads."""
    if name == "parametric":
        return {}
    if name == "nonparametric":
        return {"k": c.k, "eps": c.eps}
    if name == "mixture":
        return {"k": c.k, "eps": c.eps, "lambda": c.mixture_lambda}
    return {"k": c.k, "eps": c.eps, "alpha": c.alpha, "steps": c.steps, "optimizer": c.optimizer, "beta": c.beta,
            "normalise": c.normalise}

