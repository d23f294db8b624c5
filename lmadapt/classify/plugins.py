"""Plugins of the classifier training loop (lmadapt.classify.loop): EWC, MbPA, Hebbian softmax."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from lmadapt.classify.loop import Plugin, Task
from lmadapt.classify.models import Classifier
from lmadapt.classify.predict import ClassifierMbPA, predict_many
from lmadapt.hebbian import HebbianSoftmax
from lmadapt.memory import EpisodicMemory


class EWC(Plugin):
    """Elastic weight consolidation (Kirkpatrick et al. 2017), one penalty per finished task.

    Fisher: the diagonal of the *true* Fisher of the model's predictive distribution,
    F_i = E_x sum_y p(y|x) (d log p(y|x) / d theta_i)^2, with the expectation over y computed
    exactly (all classes, weighted by p, no label sampling) and over x averaged on the first
    ``samples`` training examples of the finished task.  Penalty added to the (mean) training
    loss:

        (lam / 2) * sum_tasks sum_i F_task,i (theta_i - theta*_task,i)^2

    i.e. with the 1/2, as in the paper's eq. 3.
    """

    def __init__(self, lam: float, samples: int = 1000):
        self.lam, self.samples = float(lam), int(samples)
        self.anchors: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = []  # (theta*, F)
        self._sums = None

    def after_task(self, model: nn.Module, task: Task) -> None:
        self.consolidate(model, task.x[: self.samples])

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


class MbPA(Plugin):
    """An episodic memory written during training, read by the predictors at test time.

    After every step each example of the batch is written as (f(x), y), f the trunk after
    the step, with probability ``rate`` (1: all, as MbPA-Train; keys are not refreshed as f
    changes).  The draws come from a generator seeded with ``seed``: plugins given the same
    seed see the same draws, so memories of several rates fill as nested subsets.
    """

    def __init__(self, memory: EpisodicMemory, settings: ClassifierMbPA, *, rate: float = 1.0, seed: int = 0):
        self.memory, self.settings, self.rate = memory, settings, float(rate)
        self.gen = torch.Generator().manual_seed(seed)

    def after_step(self, model: Classifier, x: Tensor, y: Tensor, hidden: Tensor) -> None:
        if self.rate < 1.0:
            keep = torch.rand(x.shape[0], generator=self.gen) < self.rate
            if not keep.any():
                return
            x, y = x[keep], y[keep]
        with torch.no_grad():
            self.memory.add(model.trunk(x), y)

    def predict(self, model: Classifier, x: Tensor, predictor: str = "mbpa") -> Tensor:
        return predict_many(model, self.memory, x, {predictor: [self.settings]})[predictor][0]


class Hebbian(Plugin):
    """Hebbian softmax (lmadapt.hebbian) on the head, a single linear layer: after every step,
    each present class's row mixes toward the mean of the hidden activations the loss used."""

    def __init__(self, classes: int, gamma: float, T: int):
        self.rule = HebbianSoftmax(classes, gamma=gamma, T=T)

    def before_task(self, model: Classifier, task: Task) -> None:
        if len(model.head) != 1 or not isinstance(model.head[0], nn.Linear):
            raise ValueError("the Hebbian softmax needs a head that is one linear layer")

    def after_step(self, model: Classifier, x: Tensor, y: Tensor, hidden: Tensor) -> None:
        self.rule.update(model.head[0].weight, hidden, y)
