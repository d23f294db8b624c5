"""Incremental learning of new classes (MbPA paper section 4.2, Table 1, Figs. 4-5), on MNIST.

A network (MLP trunk = embedding f, last linear layer = output network g) is pre-trained on
a random half of the classes, then trained on all classes.  At fractions of an epoch of
that second phase four predictors are scored on the test set, separately on the novel and
the pre-trained classes:

* parametric (g(f(x))), nonparametric (kernel vote of the K nearest memories, eq. 9),
  mixture (eq. 5), and MbPA (T local RMSprop/SGD steps on g over the K nearest memories).

The memory stores (f(x), y) for every training example as it is seen (both phases; keys
are not refreshed as f changes, as in the paper's MbPA-Train), in a ring buffer of
``memory_size`` entries.

Splits: ``splits`` random class splits; hyper-parameters are tuned on the first split
against validation images (MNIST train[50000:]), and the remaining splits are reported on
the test set (as the paper does).  ``unbalanced``: half of the novel classes keep only a
tenth of their training images in the second phase (section 4.2.1).

Area under the curve at epoch e: the trapezoid area under accuracy vs epochs over [0, e]
divided by e (the mean accuracy over that stretch of training).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field, replace
from typing import ClassVar

import torch

from lmadapt.classify.loop import Plugin, Task, minibatches, train
from lmadapt.classify.mnist import MNIST, train_pool_size
from lmadapt.classify.models import MLPConfig, build
from lmadapt.classify.plugins import MbPA
from lmadapt.classify.predict import PREDICTORS, ClassifierMbPA, describe, predict_many
from lmadapt.memory import EpisodicMemory
from lmadapt.params import NON_NEGATIVE, POSITIVE, PROBABILITY, at_least, check_choices, check_fields

REPORT_EPOCHS = (0.1, 1.0, 3.0)
MBPA_FLAGS = ClassifierMbPA.FIELDS


@dataclass
class IncrementalConfig:
    splits: int = 5
    unbalanced: bool = False
    pretrain_epochs: int = 2
    epochs: float = 3.0
    eval_epochs: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0)
    hidden: tuple[int, ...] = (256, 256)
    optimizer: str = "sgd"  # the parametric learner: "sgd" (momentum 0.9) or "adam"
    lr: float = 0.01
    batch_size: int = 64
    memory_size: int = 50000
    test_examples: int = 10000
    valid_examples: int = 5000
    seed: int = 0
    tune: bool = True
    alpha_grid: tuple[float, ...] = (0.01, 0.1, 0.5, 1.0)
    steps_grid: tuple[int, ...] = (1, 5, 10)
    lambda_grid: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    mbpa: ClassifierMbPA = field(default_factory=lambda: ClassifierMbPA(k=50, alpha=0.1, steps=5, optimizer="rmsprop"))

    RANGES: ClassVar[dict] = {
        "splits": at_least(1), "pretrain_epochs": NON_NEGATIVE, "epochs": POSITIVE, "eval_epochs": POSITIVE,
        "hidden": at_least(1), "lr": POSITIVE, "batch_size": at_least(1), "memory_size": at_least(1),
        "test_examples": at_least(1), "valid_examples": at_least(1), "seed": NON_NEGATIVE,
        "alpha_grid": ClassifierMbPA.RANGES["alpha"], "steps_grid": ClassifierMbPA.RANGES["steps"],
        "lambda_grid": PROBABILITY}
    CHOICES: ClassVar[dict] = {"optimizer": ("sgd", "adam")}
    HELP: ClassVar[dict] = {
        "unbalanced": "half the novel classes keep a tenth of their images",
        "eval_epochs": "checkpoints, in epochs of the all-classes phase", "hidden": "hidden layer sizes of the trunk",
        "optimizer": "the parametric learner's optimiser", "memory_size": "episodic memory entries",
        "tune": "grid searches on split 0's validation images; --no-tune uses the flags' values",
        "alpha_grid": "MbPA local learning rates to try", "steps_grid": "MbPA step counts T to try",
        "lambda_grid": "mixture weights to try"}

    def __post_init__(self):
        check_fields(self, "--")
        check_choices(self, "--")
        check_fields(self.mbpa, "--mbpa-")
        check_choices(self.mbpa, "--mbpa-")


def _optimizer(cfg: IncrementalConfig, params):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9)
    return torch.optim.Adam(params, lr=cfg.lr)


def _auc(epochs: list[float], accs: list[float], upto: float) -> float:
    """Mean accuracy over [0, upto] by the trapezoid rule on the measured points."""
    xs, ys = [], []
    for e, a in zip(epochs, accs):
        if e <= upto + 1e-9:
            xs.append(e)
            ys.append(a)
    if len(xs) < 2 or xs[-1] <= 0:
        return ys[-1] if ys else float("nan")
    area = sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1))
    return area / (xs[-1] - xs[0])


class Checkpoints(Plugin):
    """Scores every (predictor, setting) on the evaluation images, separately on the novel and
    the pre-trained classes, when the all-classes phase (task 1) reaches each checkpoint step."""

    def __init__(self, at_step: dict[int, float], memory: EpisodicMemory, configs, x_eval, y_eval, is_novel,
                 split: int, log):
        self.at_step, self.memory, self.configs = at_step, memory, configs
        self.x, self.y, self.is_novel, self.split, self.log = x_eval, y_eval, is_novel, split, log
        self.results = {name: [[] for _ in settings] for name, settings in configs.items()}
        self.seconds = 0.0
        self.steps = None  # counted in the all-classes phase only

    def before_task(self, model, task):
        if task.index == 1:
            self.steps = 0
            if 0 in self.at_step:
                self.score(model, 0.0)

    def after_step(self, model, x, y, hidden):
        if self.steps is not None:
            self.steps += 1
            if self.steps in self.at_step:
                self.score(model, self.at_step[self.steps])

    def score(self, model, epoch):
        t0 = time.time()
        preds = predict_many(model, self.memory, self.x, self.configs)
        self.seconds += time.time() - t0
        for name, per_setting in preds.items():
            for i, pred in enumerate(per_setting):
                ok = (pred == self.y).float()
                self.results[name][i].append([float(ok[self.is_novel].mean()), float(ok[~self.is_novel].mean())])
        if "mbpa" in self.configs and len(self.configs["mbpa"]) == 1:
            r = {n: self.results[n][0][-1] for n in self.configs}
            self.log(f"split {self.split} epoch {epoch:g}: " +
                     ", ".join(f"{n} novel {a[0]:.3f} pre {a[1]:.3f}" for n, a in r.items()))


def run_split(data: MNIST, cfg: IncrementalConfig, split: int, configs: dict[str, list[ClassifierMbPA]],
              evaluate_on: str, log=print) -> dict:
    """Pre-train, then train on all classes; score every (predictor, setting) at each checkpoint.

    ``configs`` maps each predictor to the settings to score (several when tuning).
    Returns {"novel": [...], "epochs": [...], "acc": {predictor: [[novel, pretrained] per
    checkpoint] per setting}}.
    """
    g = torch.Generator().manual_seed(cfg.seed * 1000 + split)
    classes = torch.randperm(10, generator=g)
    pre_classes, novel = classes[:5].sort().values, classes[5:].sort().values
    n_pool = train_pool_size(data.train_x.shape[0])
    x_pool, y_pool = data.train_x[:n_pool], data.train_y[:n_pool]
    keep = torch.ones(n_pool, dtype=torch.bool)
    # unbalanced: half of the novel classes (2 of 5, rounded down) keep a tenth of their images
    scarce = novel[torch.randperm(novel.numel(), generator=g)[: novel.numel() // 2]] if cfg.unbalanced else novel[:0]
    if cfg.unbalanced:
        for c in scarce:  # a tenth of each scarce class's images stay
            idx = (y_pool == c).nonzero().squeeze(1)
            drop = idx[torch.randperm(idx.numel(), generator=g)[idx.numel() // 10:]]
            keep[drop] = False
    if evaluate_on == "valid":
        x_eval, y_eval = data.train_x[n_pool : n_pool + cfg.valid_examples], data.train_y[n_pool : n_pool + cfg.valid_examples]
    else:
        x_eval, y_eval = data.test_x[: cfg.test_examples], data.test_y[: cfg.test_examples]

    torch.manual_seed(cfg.seed * 1000 + split)
    model = build(MLPConfig(784, tuple(cfg.hidden), 10, embed=True))
    opt = _optimizer(cfg, model.parameters())
    memory = EpisodicMemory(cfg.memory_size, cfg.hidden[-1], index="exact")

    pre_idx = torch.isin(y_pool, pre_classes).nonzero().squeeze(1)
    all_idx = keep.nonzero().squeeze(1)
    per_epoch = -(-all_idx.numel() // cfg.batch_size)
    checkpoints = sorted({0.0, *[e for e in cfg.eval_epochs if e <= cfg.epochs], cfg.epochs})
    scoring = Checkpoints({round(e * per_epoch): e for e in checkpoints}, memory, configs, x_eval, y_eval,
                          torch.isin(y_eval, novel), split, log)
    phases = [
        Task(minibatches(x_pool, y_pool, batch=cfg.batch_size, gen=g, index=pre_idx, epochs=cfg.pretrain_epochs),
             index=0, classes=tuple(pre_classes.tolist())),
        Task(minibatches(x_pool, y_pool, batch=cfg.batch_size, gen=g, index=all_idx, epochs=None,
                         max_steps=round(cfg.epochs * per_epoch)), index=1, classes=tuple(novel.tolist())),
    ]
    # MbPA-Train: (f(x), y) of every example written as it is seen, in both phases
    train(model, opt, phases, [MbPA(memory, cfg.mbpa), scoring])
    return {"novel_classes": novel.tolist(), "scarce_classes": [int(c) for c in scarce], "epochs": checkpoints,
            "acc": scoring.results, "eval_seconds": {"all": scoring.seconds}}


def _settings_grid(cfg: IncrementalConfig) -> dict[str, list[ClassifierMbPA]]:
    base = cfg.mbpa
    return {
        "parametric": [base],
        "nonparametric": [base],
        "mixture": [replace(base, mixture_lambda=lam) for lam in cfg.lambda_grid],
        "mbpa": [replace(base, alpha=a, steps=t) for a, t in itertools.product(cfg.alpha_grid, cfg.steps_grid)],
    }


def run_incremental(data: MNIST, cfg: IncrementalConfig, log=print) -> dict:
    chosen = {name: cfg.mbpa for name in PREDICTORS}
    tuning = {}
    t0 = time.time()
    if cfg.tune:
        grid = _settings_grid(cfg)
        r = run_split(data, cfg, 0, grid, "valid", log=log)
        for name, settings in grid.items():
            # mean validation accuracy (all classes) over the checkpoints up to 3 epochs
            def mean_acc(curve):
                return sum((a[0] + a[1]) / 2 for a in curve) / len(curve)

            scores = [mean_acc(curve) for curve in r["acc"][name]]
            best = max(range(len(settings)), key=scores.__getitem__)
            chosen[name] = settings[best]
            tuning[name] = {"best": settings[best].used(), "valid_mean_accuracy": scores[best],
                            "grid_size": len(settings)}
            log(f"tune {name}: valid mean accuracy {scores[best]:.4f} with "
                f"{describe(name, settings[best])}")
    tune_seconds = time.time() - t0
    report_splits = list(range(1, cfg.splits)) if cfg.tune and cfg.splits > 1 else list(range(cfg.splits))
    per_split = []
    for split in report_splits:
        r = run_split(data, cfg, split, {n: [c] for n, c in chosen.items()}, "test", log=log)
        per_split.append(r)
    epochs = per_split[0]["epochs"]
    methods = {}
    for name in PREDICTORS:
        curves = [[acc for acc in r["acc"][name][0]] for r in per_split]  # split -> checkpoint -> [novel, pre]
        mean = [[sum(c[i][j] for c in curves) / len(curves) for j in range(2)] for i in range(len(epochs))]
        entry = {"novel_accuracy": [m[0] for m in mean], "pretrained_accuracy": [m[1] for m in mean],
                 "settings": describe(name, chosen[name])}
        for subset, key in (("novel", 0), ("pretrained", 1)):
            ys = [m[key] for m in mean]
            entry[f"{subset}_top1_at"] = {str(e): _at(epochs, ys, e) for e in REPORT_EPOCHS if e <= epochs[-1] + 1e-9}
            entry[f"{subset}_auc_at"] = {str(e): _auc(epochs, ys, e) for e in REPORT_EPOCHS if e <= epochs[-1] + 1e-9}
        methods[name] = entry
    config = asdict(cfg)
    config["mbpa"] = cfg.mbpa.used()
    return {"config": config, "epochs": epochs, "reported_splits": report_splits,
            "splits": [{k: r[k] for k in ("novel_classes", "scarce_classes")} for r in per_split],
            "methods": methods, "tuning": tuning, "tune_seconds": round(tune_seconds, 1),
            "eval_seconds_all_predictors": round(sum(r["eval_seconds"]["all"] for r in per_split), 1),
            "seconds": round(time.time() - t0, 1)}


def _at(epochs, ys, e):
    best = min(range(len(epochs)), key=lambda i: abs(epochs[i] - e))
    return ys[best]


def to_markdown(results: dict) -> str:
    """Table 1's shape: top-1 and AUC at 0.1 / 1 / 3 epochs, novel and pre-trained classes."""
    cols = [str(e) for e in REPORT_EPOCHS if str(e) in results["methods"]["mbpa"]["novel_top1_at"]]
    names = {"mbpa": "MbPA", "nonparametric": "Non-parametric", "mixture": "Mixture", "parametric": "Parametric"}
    head = "| Subset | Model | " + " | ".join(f"Top-1 @{c}" for c in cols) + " | " + " | ".join(f"AUC @{c}" for c in cols) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(cols))]
    for subset, label in (("novel", "Novel"), ("pretrained", "Pre-trained")):
        for key in ("mbpa", "nonparametric", "mixture", "parametric"):
            m = results["methods"][key]
            top = " | ".join(f"{100 * m[f'{subset}_top1_at'][c]:.1f} %" for c in cols)
            auc = " | ".join(f"{100 * m[f'{subset}_auc_at'][c]:.1f} %" for c in cols)
            lines.append(f"| {label} | {names[key]} | {top} | {auc} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path) -> None:
    """Accuracy vs epochs: novel classes dashed, pre-trained solid (Fig. 4 right / Fig. 5 left)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmadapt import runs

    colours = {"mbpa": "tab:blue", "parametric": "tab:green", "mixture": "tab:red", "nonparametric": "tab:gray"}
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ep = results["epochs"]
    for name, m in results["methods"].items():
        ax.plot(ep, m["pretrained_accuracy"], color=colours[name], label=f"{name} (pre-trained)")
        ax.plot(ep, m["novel_accuracy"], color=colours[name], linestyle="--", label=f"{name} (novel)")
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel("epochs of training on all classes")
    ax.set_ylabel("test accuracy")
    ax.set_title("incremental MNIST" + (" (unbalanced)" if results["config"]["unbalanced"] else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    runs.write_bytes(path, buf.getvalue())
