"""THE classifier training loop, and the hooks its plugins implement.

A run is a sequence of tasks (permuted-MNIST tasks, the two phases of incremental
learning, curriculum stages), each a stream of (x, y) minibatches.  Every step is the
same: cross-entropy of head(trunk(x)) plus each plugin's penalty, one optimiser step.
What differs between the experiments lives in plugins (EWC, MbPA's memory writes,
Hebbian softmax, the experiments' own scoring), called in list order at fixed points:

    before_task(model, task)                 before the task's first batch
    penalty(model) -> Tensor | None          added to the loss of every step
    after_step(model, x, y, hidden)          after every optimiser step; ``hidden`` are the
                                             trunk outputs the loss used (pre-step, detached)
    after_task(model, task)                  after the task's last batch
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lmadapt.classify.models import Classifier


@dataclass
class Task:
    batches: Iterable[tuple[Tensor, Tensor]]  # consumed once
    index: int = 0
    x: Tensor | None = None  # the task's training inputs (EWC's Fisher is estimated on them)
    classes: tuple[int, ...] = ()  # the classes the task introduces (curriculum stages)


class Plugin:
    def before_task(self, model: Classifier, task: Task) -> None:
        pass

    def penalty(self, model: Classifier) -> Tensor | None:
        return None

    def after_step(self, model: Classifier, x: Tensor, y: Tensor, hidden: Tensor) -> None:
        pass

    def after_task(self, model: Classifier, task: Task) -> None:
        pass


def train(model: Classifier, opt: torch.optim.Optimizer, tasks: Iterable[Task], plugins=()) -> Classifier:
    for task in tasks:
        for p in plugins:
            p.before_task(model, task)
        for x, y in task.batches:
            model.train()
            hidden = model.trunk(x)
            loss = F.cross_entropy(model.head(hidden), y)
            for p in plugins:
                extra = p.penalty(model)
                if extra is not None:
                    loss = loss + extra
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            model.eval()
            hidden = hidden.detach()
            for p in plugins:
                p.after_step(model, x, y, hidden)
        model.eval()
        for p in plugins:
            p.after_task(model, task)
    return model


def minibatches(x: Tensor, y: Tensor, *, batch: int, gen: torch.Generator, index: Tensor | None = None,
                epochs: int | None = 1, max_steps: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Shuffled minibatches of the rows ``index`` (default: all) of (x, y), a fresh order each
    epoch, for ``epochs`` epochs (None: no limit) or ``max_steps`` minibatches, whichever
    ends first.  An order is drawn from ``gen`` only when an epoch starts."""
    rows = torch.arange(x.shape[0]) if index is None else index
    steps = 0
    for _ in itertools.count() if epochs is None else range(epochs):
        if max_steps is not None and steps >= max_steps:
            return
        order = rows[torch.randperm(rows.numel(), generator=gen)]
        for s in range(0, order.numel(), batch):
            if max_steps is not None and steps >= max_steps:
                return
            b = order[s : s + batch]
            yield x[b], y[b]
            steps += 1
