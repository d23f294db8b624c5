"""MNIST class curriculum: how fast a new class binds, Hebbian softmax vs plain softmax.

After the Omniglot curriculum of Rae et al. (2018): classes are introduced one at a time
(``classes_per_stage``) in a random order.  Each stage trains ``steps_per_stage`` minibatches
drawn uniformly from the training images of all classes introduced so far, so a new class
appears in about 1/(number of classes so far) of the examples.  Every time a new class's
number of exposures (training images of it seen so far) crosses one of ``exposures``, the
network is scored on that class's test images (and on all classes introduced so far).

The two arms differ only in the output layer: ``plain`` learns by gradient alone;
``hebbian`` additionally mixes each present class's weight row toward the mean of its
penultimate-layer activations after every step (lmadapt.hebbian.HebbianSoftmax).  Both arms
see the same images in the same order (same seeds).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from lmadapt.classify.loop import Plugin, Task, train
from lmadapt.classify.mnist import MNIST, train_pool_size
from lmadapt.classify.models import MLPConfig, build
from lmadapt.classify.plugins import Hebbian
from lmadapt.params import NON_NEGATIVE, POSITIVE, PROBABILITY, at_least, between, check_fields


@dataclass
class CurriculumConfig:
    classes_per_stage: int = 1
    steps_per_stage: int = 300
    batch_size: int = 32
    hidden: tuple[int, ...] = (256, 256)
    lr: float = 1e-3  # Adam
    exposures: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100)
    hebbian_gamma: float = 0.01
    hebbian_T: int = 500
    seeds: int = 3
    tune: bool = True
    gamma_grid: tuple[float, ...] = (0.0, 0.01, 0.1)
    T_grid: tuple[int, ...] = (10, 100, 500)
    seed: int = 0

    RANGES: ClassVar[dict] = {
        "classes_per_stage": between(1, 10), "steps_per_stage": at_least(1), "batch_size": at_least(1),
        "hidden": at_least(1), "lr": POSITIVE, "exposures": at_least(1), "hebbian_gamma": PROBABILITY,
        "hebbian_T": at_least(1), "seeds": at_least(1), "gamma_grid": PROBABILITY, "T_grid": at_least(1),
        "seed": NON_NEGATIVE}
    HELP: ClassVar[dict] = {
        "seeds": "runs averaged per arm", "exposures": "exposure counts at which a new class is scored",
        "hebbian_gamma": "(with --no-tune)", "hebbian_T": "(with --no-tune)",
        "tune": "grid search of (gamma, T) on validation images; --no-tune uses the flags' values"}

    def __post_init__(self):
        check_fields(self, "--")


def stages(x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, cfg: CurriculumConfig, g: torch.Generator):
    """The curriculum: stage i introduces the next ``classes_per_stage`` classes of ``order``
    and trains ``steps_per_stage`` minibatches drawn uniformly (with replacement) from the
    images of every class introduced so far."""
    by_class = [(y == c).nonzero().squeeze(1) for c in range(10)]

    def batches(pool):
        for _ in range(cfg.steps_per_stage):
            b = pool[torch.randint(pool.numel(), (cfg.batch_size,), generator=g)]
            yield x[b], y[b]

    for i, start in enumerate(range(0, 10, cfg.classes_per_stage)):
        active = order[: start + cfg.classes_per_stage]
        pool = torch.cat([by_class[int(c)] for c in active])
        yield Task(batches(pool), index=i, classes=tuple(order[start : start + cfg.classes_per_stage].tolist()))


class Exposures(Plugin):
    """Each new class (stages after the first) is scored on its evaluation images when its
    count of training images seen crosses each of ``exposures``; all classes introduced so
    far are scored at the end of every stage."""

    def __init__(self, exposures, x_eval, y_eval):
        self.exposures, self.x, self.y = tuple(exposures), x_eval, y_eval
        self.seen = torch.zeros(10, dtype=torch.long)
        self.active: list[int] = []
        self.pending: dict[int, list[int]] = {}
        self.new_class_acc = {e: [] for e in self.exposures}  # per new class
        self.all_acc: list[float] = []

    def accuracy(self, model, classes) -> float:
        mask = torch.isin(self.y, torch.tensor(classes))
        with torch.no_grad():
            model.eval()
            pred = model(self.x[mask]).argmax(1)
        return float((pred == self.y[mask]).float().mean())

    def before_task(self, model, task):
        self.pending = {c: list(self.exposures) for c in task.classes} if task.index > 0 else {}
        self.active += list(task.classes)

    def after_step(self, model, x, y, hidden):
        self.seen += torch.bincount(y, minlength=10)
        for c, thresholds in self.pending.items():
            while thresholds and self.seen[c] >= thresholds[0]:
                self.new_class_acc[thresholds.pop(0)].append(self.accuracy(model, [c]))

    def after_task(self, model, task):
        for thresholds in self.pending.values():  # exposures never reached within the stage
            for e in thresholds:
                self.new_class_acc[e].append(float("nan"))
        self.all_acc.append(self.accuracy(model, self.active))


def run_arm(data: MNIST, cfg: CurriculumConfig, seed: int, hebbian: tuple[float, int] | None, evaluate_on: str) -> dict:
    """One training run through the curriculum; returns new-class accuracy at each exposure count."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(10, generator=g)
    n_pool = train_pool_size(data.train_x.shape[0])
    if evaluate_on == "valid":
        x_eval, y_eval = data.train_x[n_pool:], data.train_y[n_pool:]
    else:
        x_eval, y_eval = data.test_x, data.test_y
    torch.manual_seed(seed)
    model = build(MLPConfig(784, tuple(cfg.hidden), 10, embed=True))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    probe = Exposures(cfg.exposures, x_eval, y_eval)
    plugins = [Hebbian(10, *hebbian), probe] if hebbian else [probe]
    train(model, opt, stages(data.train_x[:n_pool], data.train_y[:n_pool], order, cfg, g), plugins)
    return {"order": order.tolist(), "new_class_accuracy": probe.new_class_acc, "accuracy_after_stage": probe.all_acc}


def _mean(values):
    vals = [v for v in values if v == v]
    return sum(vals) / len(vals) if vals else float("nan")


def _summary(runs_: list[dict], exposures) -> dict:
    return {
        "new_class_accuracy": {str(e): _mean([v for r in runs_ for v in r["new_class_accuracy"][e]]) for e in exposures},
        "accuracy_after_stage": [_mean([r["accuracy_after_stage"][i] for r in runs_])
                                 for i in range(len(runs_[0]["accuracy_after_stage"]))],
    }


def run_curriculum(data: MNIST, cfg: CurriculumConfig, log=print) -> dict:
    tuning = {}
    gamma, T = cfg.hebbian_gamma, cfg.hebbian_T
    if cfg.tune:
        # choose (gamma, T) on validation images by the mean new-class accuracy over the
        # exposure counts, one seed (the first); report on the test set with the other seeds
        scores = {}
        for gm, tt in itertools.product(cfg.gamma_grid, cfg.T_grid):
            r = run_arm(data, cfg, cfg.seed, (gm, tt), "valid")
            scores[(gm, tt)] = _mean([_mean(v) for v in r["new_class_accuracy"].values()])
            log(f"tune hebbian gamma={gm} T={tt}: valid new-class accuracy {scores[(gm, tt)]:.4f}")
        gamma, T = max(scores, key=scores.get)
        tuning = {"grid": [{"gamma": a, "T": b, "valid_new_class_accuracy": v} for (a, b), v in scores.items()],
                  "best": {"gamma": gamma, "T": T}}
    seeds = [cfg.seed + 1 + i for i in range(cfg.seeds)] if cfg.tune else [cfg.seed + i for i in range(cfg.seeds)]
    arms = {}
    for name, heb in (("plain", None), ("hebbian", (gamma, T))):
        arms[name] = _summary([run_arm(data, cfg, s, heb, "test") for s in seeds], cfg.exposures)
        log(f"{name}: new-class test accuracy by exposures " +
            ", ".join(f"{e}: {a:.3f}" for e, a in arms[name]["new_class_accuracy"].items()))
    return {"config": asdict(cfg), "hebbian": {"gamma": gamma, "T": T}, "seeds": seeds, "arms": arms, "tuning": tuning}


def to_markdown(results: dict) -> str:
    ex = list(results["arms"]["plain"]["new_class_accuracy"])
    lines = ["| softmax | " + " | ".join(f"after {e}" for e in ex) + " | all classes, end |",
             "|---|" + "---|" * (len(ex) + 1)]
    for name, arm in results["arms"].items():
        accs = " | ".join(f"{100 * arm['new_class_accuracy'][e]:.1f} %" for e in ex)
        lines.append(f"| {name} | {accs} | {100 * arm['accuracy_after_stage'][-1]:.1f} % |")
    return "\n".join(lines) + "\n"
