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

import torch
import torch.nn.functional as F

from lmadapt.classify.incremental import Net
from lmadapt.classify.mnist import MNIST, train_pool_size
from lmadapt.errors import LmadaptError
from lmadapt.hebbian import HebbianSoftmax



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

    def __post_init__(self):
        if not 1 <= self.classes_per_stage <= 10:
            raise LmadaptError("--classes-per-stage must be between 1 and 10")
        if self.steps_per_stage < 1 or self.seeds < 1:
            raise LmadaptError("--steps-per-stage and --seeds must be at least 1")


def run_arm(data: MNIST, cfg: CurriculumConfig, seed: int, hebbian: tuple[float, int] | None, evaluate_on: str) -> dict:
    """One training run through the curriculum; returns new-class accuracy at each exposure count."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(10, generator=g)
    n_pool = train_pool_size(data.train_x.shape[0])
    x_pool, y_pool = data.train_x[:n_pool], data.train_y[:n_pool]
    if evaluate_on == "valid":
        x_eval, y_eval = data.train_x[n_pool:], data.train_y[n_pool:]
    else:
        x_eval, y_eval = data.test_x, data.test_y
    torch.manual_seed(seed)
    net = Net(tuple(cfg.hidden))
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    heb = HebbianSoftmax(10, gamma=hebbian[0], T=hebbian[1]) if hebbian else None
    by_class = [(y_pool == c).nonzero().squeeze(1) for c in range(10)]
    seen = torch.zeros(10, dtype=torch.long)
    new_class_acc = {e: [] for e in cfg.exposures}  # per new class (stages after the first)
    all_acc = []

    def accuracy(classes) -> float:
        mask = torch.isin(y_eval, classes)
        with torch.no_grad():
            net.eval()
            pred = net(x_eval[mask]).argmax(1)
            net.train()
        return float((pred == y_eval[mask]).float().mean())

    stages = [order[i : i + cfg.classes_per_stage] for i in range(0, 10, cfg.classes_per_stage)]
    for stage, new in enumerate(stages):
        active = order[: sum(len(s) for s in stages[: stage + 1])]
        pool = torch.cat([by_class[int(c)] for c in active])
        pending = {int(c): list(cfg.exposures) for c in new} if stage > 0 else {}
        for _ in range(cfg.steps_per_stage):
            b = pool[torch.randint(pool.numel(), (cfg.batch_size,), generator=g)]
            xb, yb = x_pool[b], y_pool[b]
            net.train()
            h = net.trunk(xb)
            loss = F.cross_entropy(net.head(h), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if heb is not None:
                heb.update(net.head[0].weight, h.detach(), yb)
            seen += torch.bincount(yb, minlength=10)
            for c, thresholds in pending.items():
                while thresholds and seen[c] >= thresholds[0]:
                    new_class_acc[thresholds.pop(0)].append(accuracy(torch.tensor([c])))
        for c, thresholds in pending.items():  # exposures never reached within the stage
            for e in thresholds:
                new_class_acc[e].append(float("nan"))
        all_acc.append(accuracy(active))
    return {"order": order.tolist(), "new_class_accuracy": new_class_acc, "accuracy_after_stage": all_acc}


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
