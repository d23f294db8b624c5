"""Classifier building blocks: the MLP, the four predictors, EWC.

A classifier is an embedding network f (identity on pixels, or a trained trunk) and an
output network g (a linear layer or a small MLP); the episodic memory holds (f(x), y).
The predictors (paper section 4.2 and eqs. 5, 9):

* ``parametric``:    g(f(x))
* ``nonparametric``: kernel-weighted vote of the K nearest memories (eq. 9)
* ``mixture``:       lam * parametric + (1 - lam) * nonparametric (eq. 5)
* ``mbpa``:          T local steps on g over the K nearest memories, predict, discard
                     (plain steps: the exact span path ``lmadapt.adapt.mlp_mbpa``;
                     RMSprop/Adam: ``lmadapt.adapt.functional_mbpa``)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from lmadapt.adapt import functional_mbpa, kernel_weights, mlp_base_pass, mlp_mbpa
from lmadapt.memory import EpisodicMemory

PREDICTORS = ("parametric", "nonparametric", "mixture", "mbpa")


@dataclass
class MLPConfig:
    in_dim: int = 784
    hidden: tuple[int, ...] = (100, 100)
    classes: int = 10


def build_mlp(cfg: MLPConfig) -> nn.Sequential:
    dims = [cfg.in_dim, *cfg.hidden]
    mods: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        mods += [nn.Linear(a, b), nn.ReLU()]
    mods.append(nn.Linear(dims[-1], cfg.classes))
    return nn.Sequential(*mods)


@dataclass
class MbPAConfig:
    """Test-time MbPA and memory read-out settings shared by the classifier experiments."""

    k: int = 32  # neighbours
    alpha: float = 0.1  # local learning rate alpha_M
    steps: int = 5  # T
    beta: float = 0.0  # prior weight: beta ||theta_x - theta||^2
    eps: float = 1e-3  # kernel 1 / (eps + d^2)
    optimizer: str = "sgd"  # "sgd" (exact span path), "rmsprop" or "adam" (torch.func)
    normalise: bool = True  # kernel weights sum to 1 over the K neighbours
    mixture_lambda: float = 0.5  # weight of the parametric model in the mixture (eq. 5)
    extra: dict = field(default_factory=dict)


def _memory_probs(sq: Tensor, idx: Tensor, valid: Tensor, memory: EpisodicMemory, classes: int, eps: float) -> Tensor:
    """Eq. 9: p_mem(j | q) = sum_i w_i [v_i = j] / sum_i w_i over the K neighbours."""
    w = kernel_weights(sq, valid, eps, normalise=True)
    vals = memory.values[idx]
    return torch.zeros(w.shape[0], classes, dtype=w.dtype, device=w.device).scatter_add_(1, vals, w)


def predict(
    methods: tuple[str, ...] | list[str],
    embed: nn.Module,
    head: nn.Module,
    memory: EpisodicMemory | None,
    x: Tensor,
    cfg: MbPAConfig,
    *,
    batch: int = 1000,
) -> dict[str, Tensor]:
    """Predicted class of every row of ``x`` under each predictor in ``methods``, one setting."""
    out = predict_many(embed, head, memory, x, {m: [cfg] for m in methods}, batch=batch)
    return {m: v[0] for m, v in out.items()}


@torch.no_grad()
def predict_many(
    embed: nn.Module,
    head: nn.Module,
    memory: EpisodicMemory | None,
    x: Tensor,
    settings: dict[str, list[MbPAConfig]],
    *,
    batch: int = 1000,
) -> dict[str, list[Tensor]]:
    """Predictions of every (predictor, setting) pair; the neighbour search runs once per batch.

    ``settings`` maps a predictor name to the settings to score (a grid when tuning); the
    returned dict holds one tensor of predicted classes per setting, in the same order.
    The K nearest neighbours for the largest K are searched once and each setting uses
    their first K (they come sorted by distance).
    """
    embed.eval()
    head.eval()
    bad = [m for m in settings if m not in PREDICTORS]
    if bad:
        raise ValueError(f"unknown predictor(s) {bad}; choose from {PREDICTORS}")
    classes = _out_features(head)
    with_memory = [c for m, cs in settings.items() if m != "parametric" for c in cs]
    if with_memory and (memory is None or len(memory) == 0):
        raise ValueError("the memory-based predictors need a non-empty memory")
    k_max = max((c.k for c in with_memory), default=0)
    base = None
    if any(c.optimizer == "sgd" and c.steps > 0 for c in settings.get("mbpa", [])):
        # Step 1 of MbPA is taken at the trained weights: each memory entry's per-layer inputs
        # and NLL gradients are the same for every query that retrieves it, so compute them
        # once per call here and let mlp_mbpa gather them.
        base = mlp_base_pass(head, memory.keys, memory.values)
    out: dict[str, list[list[Tensor]]] = {m: [[] for _ in cs] for m, cs in settings.items()}
    for s in range(0, x.shape[0], batch):
        q = embed(x[s : s + batch])
        logits = head(q)
        for i, _ in enumerate(settings.get("parametric", [])):
            out["parametric"][i].append(logits.argmax(1))
        if not with_memory:
            continue
        sq_all, idx_all, valid_all = memory.knn(q, k_max)
        for name in ("nonparametric", "mixture", "mbpa"):
            for i, c in enumerate(settings.get(name, [])):
                sq, idx, valid = sq_all[:, : c.k], idx_all[:, : c.k], valid_all[:, : c.k]
                if name == "nonparametric":
                    pred = _memory_probs(sq, idx, valid, memory, classes, c.eps).argmax(1)
                elif name == "mixture":
                    p_mem = _memory_probs(sq, idx, valid, memory, classes, c.eps)
                    pred = (c.mixture_lambda * logits.softmax(1) + (1 - c.mixture_lambda) * p_mem).argmax(1)
                else:
                    pred = _mbpa_log_probs(head, q, memory, sq, idx, valid, c, base).argmax(1)
                out[name][i].append(pred)
    return {m: [torch.cat(v) for v in per] for m, per in out.items()}


def _mbpa_log_probs(head, q, memory, sq, idx, valid, c: MbPAConfig, base) -> Tensor:
    w = kernel_weights(sq, valid, c.eps, c.normalise)
    nb_x, nb_y = memory.keys[idx], memory.values[idx]
    if c.optimizer == "sgd":
        nb_base = None if base is None else ([t[idx] for t in base[0]], [t[idx] for t in base[1]])
        return mlp_mbpa(head, q, nb_x, nb_y, w, steps=c.steps, lr=c.alpha, beta=c.beta, nb_base=nb_base)
    return functional_mbpa(head, q, nb_x, nb_y, w, steps=c.steps, lr=c.alpha, beta=c.beta, optimizer=c.optimizer)


def jsonable(obj):
    """Tuples (in dataclass configs) as lists, recursively, for JSON results."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def _out_features(head: nn.Module) -> int:
    last = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    return last.out_features


# --------------------------------------------------------------------------- EWC
class EWC:
    """Elastic weight consolidation (Kirkpatrick et al. 2017), one penalty per finished task.

    Fisher: the diagonal of the *true* Fisher of the model's predictive distribution,
    F_i = E_x sum_y p(y|x) (d log p(y|x) / d theta_i)^2, with the expectation over y computed
    exactly (all classes, weighted by p, no label sampling) and over x averaged on
    ``n_samples`` examples of the finished task.  Penalty added to the (mean) training loss:

        (lam / 2) * sum_tasks sum_i F_task,i (theta_i - theta*_task,i)^2

    i.e. with the 1/2, as in the paper's eq. 3.
    """

    def __init__(self, lam: float):
        self.lam = float(lam)
        self.anchors: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = []  # (theta*, F)
        self._sums = None

    def consolidate(self, model: nn.Module, x: Tensor, chunk: int = 500) -> None:
        params = {n: p.detach() for n, p in model.named_parameters()}

        def log_probs(p, xi):
            return F.log_softmax(functional_call(model, p, (xi[None],))[0], -1)

        def fisher_one(p, xi):
            lp = log_probs(p, xi)
            prob = lp.exp().detach()
            jac = torch.func.jacrev(log_probs)(p, xi)  # each (C, *shape)
            return {n: torch.einsum("c,c...->...", prob, j * j) for n, j in jac.items()}

        batched = vmap(fisher_one, in_dims=(None, 0))
        total = {n: torch.zeros_like(p) for n, p in params.items()}
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for s in range(0, x.shape[0], chunk):
                f = batched(params, x[s : s + chunk])
                for n in total:
                    total[n] += f[n].sum(0)
        model.train(was_training)
        fisher = {n: t / max(1, x.shape[0]) for n, t in total.items()}
        self.anchors.append(({n: p.clone() for n, p in params.items()}, fisher))

    def penalty(self, model: nn.Module) -> Tensor:
        if not self.anchors or self.lam == 0:
            return torch.zeros(())
        # sum_t F_t (p - a_t)^2 = p^2 sum_t F_t - 2 p sum_t F_t a_t + sum_t F_t a_t^2: three
        # running sums instead of a loop over every finished task at every step.
        if self._sums is None or self._sums[0] != len(self.anchors):
            f_sum = {n: sum(f[n] for _, f in self.anchors) for n in self.anchors[0][1]}
            fa_sum = {n: sum(f[n] * a[n] for a, f in self.anchors) for n in f_sum}
            const = sum(float((f[n] * a[n] ** 2).sum()) for a, f in self.anchors for n in f)
            self._sums = (len(self.anchors), f_sum, fa_sum, const)
        _, f_sum, fa_sum, const = self._sums
        total = const
        for n, p in model.named_parameters():
            total = total + (f_sum[n] * p * p - 2.0 * fa_sum[n] * p).sum()
        return 0.5 * self.lam * total


def train_epochs(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, batch: int, opt: torch.optim.Optimizer,
                 gen: torch.Generator, ewc: EWC | None = None, on_batch=None) -> None:
    """Plain minibatch training; ``on_batch(xb, yb)`` sees every batch (memory writes)."""
    model.train()
    n = x.shape[0]
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for s in range(0, n, batch):
            idx = order[s : s + batch]
            xb, yb = x[idx], y[idx]
            loss = F.cross_entropy(model(xb), yb)
            if ewc is not None:
                loss = loss + ewc.penalty(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if on_batch is not None:
                on_batch(xb, yb)
    model.eval()


__all__ = ["PREDICTORS", "MLPConfig", "build_mlp", "MbPAConfig", "predict", "predict_many", "EWC", "train_epochs"]
