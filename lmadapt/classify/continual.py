"""Permuted-MNIST continual learning (MbPA paper section 4.1, Fig. 3).

Tasks are fixed random pixel permutations of MNIST, trained in sequence (no revisiting),
``examples_per_task`` training images each, a two-layer MLP with Adam.  After each task
every method is scored on the test sets of all tasks seen so far: after the last task on
all ``test_per_task`` (default 10,000) test images of every task, after the earlier tasks
(the points of the curve) on the first ``curve_test_per_task`` (default 1,000) of them.
The second is a stated cost cut: MbPA adapts the network per query, and the full curve
would be 2.1 million adaptations per configuration; the final point is never subsampled.

Methods:
* ``mlp``      -- plain sequential training.
* ``ewc``      -- the same with the EWC penalty of every finished task (lambda by grid).
* ``mbpa``     -- the ``mlp`` network plus an episodic memory of about ``M`` random training
                  images per task (keys = pixels, f = identity) and test-time MbPA on the
                  whole MLP.  No task identity is used at test time.
* ``mbpa+ewc`` -- the same on the EWC network.
The MbPA methods run for every memory size in ``memory_per_task``.

Tuning (``tune=True``): EWC's lambda and MbPA's (alpha, T) are chosen by grid search on
validation images (the last 10,000 MNIST training images, never trained on, under each
task's permutation), by the average accuracy over all tasks after the last task.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field, replace
from typing import ClassVar

import torch
from tqdm import tqdm

from lmadapt.classify.loop import Plugin, Task, minibatches, train
from lmadapt.classify.mnist import MNIST, train_pool_size
from lmadapt.classify.models import MLPConfig, build
from lmadapt.classify.plugins import EWC, MbPA
from lmadapt.classify.predict import ClassifierMbPA, predict, predict_many
from lmadapt.errors import LmadaptError
from lmadapt.memory import EpisodicMemory
from lmadapt.params import NON_NEGATIVE, POSITIVE, at_least, check_choices, check_fields

METHODS = ("mlp", "ewc", "mbpa", "mbpa+ewc")
MBPA_FLAGS = tuple(f for f in ClassifierMbPA.FIELDS if f != "mixture_lambda")  # no mixture here


@dataclass
class ContinualConfig:
    methods: tuple[str, ...] = METHODS
    tasks: int = 20
    examples_per_task: int = 10000
    epochs_per_task: int = 2
    batch_size: int = 64
    lr: float = 1e-3
    hidden: tuple[int, ...] = (100, 100)
    memory_per_task: tuple[int, ...] = (100, 250, 500, 1000)
    ewc_lambda: float = 100.0
    ewc_fisher_samples: int = 1000
    test_per_task: int = 10000  # after the last task: the whole MNIST test set under each permutation
    curve_test_per_task: int = 1000  # after the earlier tasks (the curve): the first N test images
    valid_per_task: int = 250
    seed: int = 0
    tune: bool = True
    ewc_grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)  # measured optimum 1 (README)
    alpha_grid: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0)
    steps_grid: tuple[int, ...] = (1, 5, 10)
    mbpa: ClassifierMbPA = field(default_factory=lambda: ClassifierMbPA(k=32, alpha=0.1, steps=5))

    RANGES: ClassVar[dict] = {
        "tasks": at_least(1), "examples_per_task": at_least(1), "epochs_per_task": at_least(1),
        "batch_size": at_least(1), "lr": POSITIVE, "hidden": at_least(1), "memory_per_task": at_least(1),
        "ewc_lambda": NON_NEGATIVE, "ewc_fisher_samples": at_least(1), "test_per_task": at_least(1),
        "curve_test_per_task": at_least(1), "valid_per_task": at_least(1), "seed": NON_NEGATIVE,
        "ewc_grid": NON_NEGATIVE, "alpha_grid": ClassifierMbPA.RANGES["alpha"],
        "steps_grid": ClassifierMbPA.RANGES["steps"]}
    CHOICES: ClassVar[dict] = {"methods": METHODS}
    HELP: ClassVar[dict] = {
        "methods": "what to run", "memory_per_task": "MbPA memory sizes (examples per task)",
        "hidden": "hidden layer sizes of the MLP", "test_per_task": "test images per task after the last task",
        "curve_test_per_task": "test images per task for the curve points before the last task",
        "ewc_lambda": "EWC penalty weight (with --no-tune)", "ewc_grid": "EWC penalty weights to try",
        "tune": "grid searches on validation images; --no-tune uses the flags' values",
        "alpha_grid": "MbPA local learning rates to try", "steps_grid": "MbPA step counts T to try"}

    def __post_init__(self):
        check_fields(self, "--")
        check_choices(self, "--")
        check_fields(self.mbpa, "--mbpa-")
        check_choices(self.mbpa, "--mbpa-")
        if not self.methods:
            raise LmadaptError("--methods is empty")


class Tasks:
    """The permutations and each task's train / validation / test images."""

    def __init__(self, data: MNIST, cfg: ContinualConfig):
        g = torch.Generator().manual_seed(cfg.seed)
        n_pool = train_pool_size(data.train_x.shape[0])
        if cfg.examples_per_task > n_pool:
            raise LmadaptError(f"--examples-per-task {cfg.examples_per_task} exceeds the {n_pool} training images available per task")
        self.data, self.cfg = data, cfg
        self.perms = [torch.randperm(784, generator=g) for _ in range(cfg.tasks)]
        self.train_idx = [torch.randperm(n_pool, generator=g)[: cfg.examples_per_task] for _ in range(cfg.tasks)]
        valid_pool = torch.arange(n_pool, data.train_x.shape[0])
        self.valid_idx = valid_pool[: cfg.valid_per_task]
        self.test_n = min(cfg.test_per_task, data.test_x.shape[0])
        self.curve_n = min(cfg.curve_test_per_task, self.test_n)

    def train(self, t):
        i = self.train_idx[t]
        return self.data.train_x[i][:, self.perms[t]], self.data.train_y[i]

    def valid(self, t):
        i = self.valid_idx
        return self.data.train_x[i][:, self.perms[t]], self.data.train_y[i]

    def test(self, t, final: bool = True):
        n = self.test_n if final else self.curve_n
        return self.data.test_x[:n][:, self.perms[t]], self.data.test_y[:n]


def train_sequence(tasks: Tasks, cfg: ContinualConfig, ewc_lambda: float | None, plugins=(), desc: str = "train"):
    """One MLP (keys = pixels, MbPA on the whole network) trained on the tasks in order."""
    torch.manual_seed(cfg.seed)
    model = build(MLPConfig(784, tuple(cfg.hidden), 10))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)

    def stream():
        for t in range(cfg.tasks):
            x, y = tasks.train(t)
            yield Task(minibatches(x, y, batch=cfg.batch_size, gen=gen, epochs=cfg.epochs_per_task), index=t, x=x)

    ewc = [EWC(ewc_lambda, cfg.ewc_fisher_samples)] if ewc_lambda else []
    progress = tqdm(stream(), total=cfg.tasks, desc=desc, leave=False, disable=not _progress())
    return train(model, opt, progress, [*ewc, *plugins])


def memory_writers(cfg: ContinualConfig, settings: dict[int, ClassifierMbPA] | None = None) -> dict[int, MbPA]:
    """One MbPA plugin per memory size M.  Writes need no task boundaries: every training
    example seen is written with probability M / (examples_per_task * epochs_per_task), so
    each task leaves about M entries; all sizes share one draw per example (same seed), so
    the smaller memories are subsets of the larger.  Room is left for the random count to
    exceed its mean; the oldest entries go first."""
    seen_per_task = cfg.examples_per_task * cfg.epochs_per_task
    return {m: MbPA(EpisodicMemory(int(m * cfg.tasks * 1.25) + 16, 784, index="exact"),
                    (settings or {}).get(m, cfg.mbpa), rate=m / seen_per_task, seed=cfg.seed + 2)
            for m in sorted(set(cfg.memory_per_task))}


def _progress() -> bool:
    from lmadapt.train import progress_enabled

    return progress_enabled()


def _accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred == y).float().mean())


class Curves(Plugin):
    """After each task: accuracy of the base network and of each memory's MbPA on the test
    images of every task seen so far (all of them after the last task)."""

    def __init__(self, tasks: Tasks, base: str, writers: dict[int, MbPA], mbpa_name: str, log):
        self.tasks, self.base, self.log = tasks, base, log
        self.names = {base: None, **{f"{mbpa_name}@{m}": w for m, w in writers.items()}}
        self.curves = {k: [] for k in self.names}
        self.seconds = {k: 0.0 for k in self.names}

    def after_task(self, model, task):
        last = task.index == self.tasks.cfg.tasks - 1
        per = {k: [] for k in self.names}
        for s in range(task.index + 1):
            x, y = self.tasks.test(s, final=last)
            for name, writer in self.names.items():
                t0 = time.time()
                pred = predict(model, None, x, "parametric") if writer is None else writer.predict(model, x)
                self.seconds[name] += time.time() - t0
                per[name].append(_accuracy(pred, y))
        for k, accs in per.items():
            self.curves[k].append(accs)
        self.log(f"{self.base}: after task {task.index + 1}: " +
                 ", ".join(f"{k} {sum(a) / len(a):.4f}" for k, a in per.items()))


def _valid_accuracy(tasks: Tasks, model) -> float:
    accs = [_accuracy(predict(model, None, x, "parametric"), y) for x, y in map(tasks.valid, range(tasks.cfg.tasks))]
    return sum(accs) / len(accs)


def _tune_mbpa(tasks: Tasks, cfg: ContinualConfig, writers: dict[int, MbPA], model, mbpa_name: str, tuning, log):
    """(alpha, T) per memory size by the average validation accuracy over all tasks."""
    chosen = {}
    for m_size, writer in writers.items():
        grid = list(itertools.product(cfg.alpha_grid, cfg.steps_grid))
        settings = [replace(cfg.mbpa, alpha=a, steps=t) for a, t in grid]
        accs = [0.0] * len(grid)
        for t in range(cfg.tasks):  # one neighbour search per task serves the whole grid
            x, y = tasks.valid(t)
            preds = predict_many(model, writer.memory, x, {"mbpa": settings})["mbpa"]
            for i, pred in enumerate(preds):
                accs[i] += _accuracy(pred, y) / cfg.tasks
        scores = dict(zip(grid, accs))
        best = max(scores, key=scores.get)
        chosen[m_size] = replace(cfg.mbpa, alpha=best[0], steps=best[1])
        log(f"tune {mbpa_name} memory {m_size}/task: alpha={best[0]} T={best[1]} valid accuracy {scores[best]:.4f}")
        tuning[f"{mbpa_name}@{m_size}"] = {
            "grid": [{"alpha": a, "steps": s, "valid_accuracy": v} for (a, s), v in scores.items()],
            "best": {"alpha": best[0], "steps": best[1]}}
    return chosen


def run_permuted_mnist(data: MNIST, cfg: ContinualConfig, log=print, on_partial=None) -> dict:
    """Run the experiment; ``on_partial(results)`` gets the results so far after each base network."""
    methods = cfg.methods
    tasks = Tasks(data, cfg)
    want_base = {"mlp": "mlp" in methods or "mbpa" in methods, "ewc": "ewc" in methods or "mbpa+ewc" in methods}
    tuning: dict = {}
    ewc_lambda = cfg.ewc_lambda
    if want_base["ewc"] and cfg.tune:
        scores = {}
        for lam in cfg.ewc_grid:
            model = train_sequence(tasks, cfg, lam, desc=f"tune ewc lambda={lam:g}")
            scores[lam] = _valid_accuracy(tasks, model)
            log(f"tune ewc: lambda={lam:g} valid accuracy {scores[lam]:.4f}")
        ewc_lambda = max(scores, key=scores.get)
        tuning["ewc_lambda"] = {"grid": {str(k): v for k, v in scores.items()}, "best": ewc_lambda}

    config = asdict(cfg)
    config["mbpa"] = cfg.mbpa.used()
    results: dict = {"config": config, "methods": {}, "tuning": tuning}
    for base in ("mlp", "ewc"):
        if not want_base[base]:
            continue
        lam = ewc_lambda if base == "ewc" else None
        mbpa_name = "mbpa" if base == "mlp" else "mbpa+ewc"
        use_mbpa = mbpa_name in methods
        settings = None
        if use_mbpa and cfg.tune:
            # MbPA's (alpha, T) are tuned per memory size on the final network, then the whole
            # curve is re-run with them (training is deterministic, so the network is the same).
            t0 = time.time()
            writers = memory_writers(cfg)
            model = train_sequence(tasks, cfg, lam, writers.values(), desc=f"tune {mbpa_name}")
            settings = _tune_mbpa(tasks, cfg, writers, model, mbpa_name, tuning, log)
            tuning[f"{mbpa_name}_seconds"] = round(time.time() - t0, 1)
        writers = memory_writers(cfg, settings) if use_mbpa else {}
        curves = Curves(tasks, base, writers, mbpa_name, log)
        t0 = time.time()
        train_sequence(tasks, cfg, lam, [*writers.values(), curves], desc=base)
        train_seconds = time.time() - t0 - sum(curves.seconds.values())
        for name, per_task in curves.curves.items():
            if name == base and base not in methods:
                continue
            entry = {
                "average_accuracy": [sum(a) / len(a) for a in per_task],  # after 1, 2, ... tasks
                "final_per_task_accuracy": per_task[-1],
                "test_images_per_task": {"curve": tasks.curve_n, "final": tasks.test_n},
                "train_seconds": round(train_seconds, 1),
                "eval_seconds": round(curves.seconds[name], 1),
            }
            if lam:
                entry["ewc_lambda"] = lam
            if name != base:
                writer = curves.names[name]
                entry["memory_per_task"] = int(name.split("@")[1])
                entry["mbpa"] = writer.settings.used()
            results["methods"][name] = entry
        if on_partial is not None:
            on_partial(results)
    return results


def plot(results: dict, path) -> None:
    """Fig. 3-like PNG: average accuracy over the tasks seen so far vs number of tasks."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmadapt import runs

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, group in zip(axes, (("mlp", "ewc", "mbpa@"), ("mbpa@", "mbpa+ewc@", "ewc"))):
        for name, entry in results["methods"].items():
            if not any(name == g or (g.endswith("@") and name.startswith(g)) for g in group):
                continue
            curve = entry["average_accuracy"]
            ax.plot(range(1, len(curve) + 1), curve, marker=".", label=name,
                    linestyle="--" if "ewc" in name and "mbpa" in name else "-")
        ax.set_xlabel("number of tasks")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("average accuracy on tasks seen")
    axes[0].set_title("baselines vs MbPA")
    axes[1].set_title("MbPA with EWC")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    runs.write_bytes(path, buf.getvalue())
