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
from dataclasses import asdict, dataclass, replace

import torch
from tqdm import tqdm

from lmadapt.classify.core import EWC, MbPAConfig, MLPConfig, build_mlp, jsonable, predict, predict_many, train_epochs
from lmadapt.classify.mnist import MNIST, train_pool_size
from lmadapt.errors import LmadaptError
from lmadapt.memory import EpisodicMemory

METHODS = ("mlp", "ewc", "mbpa", "mbpa+ewc")


@dataclass
class ContinualConfig:
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
    mbpa: MbPAConfig = None  # type: ignore[assignment]

    def __post_init__(self):
        if self.mbpa is None:
            self.mbpa = MbPAConfig(k=32, alpha=0.1, steps=5)
        if self.tasks < 1:
            raise LmadaptError("--tasks must be at least 1")
        if any(m < 1 for m in self.memory_per_task):
            raise LmadaptError(f"--memory-per-task sizes must be >= 1, got {list(self.memory_per_task)}")
        if self.examples_per_task < 1:
            raise LmadaptError("--examples-per-task must be at least 1")


def check_methods(methods) -> tuple[str, ...]:
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise LmadaptError(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
    if not methods:
        raise LmadaptError("--methods is empty")
    return tuple(methods)


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


def _train_sequence(tasks: Tasks, cfg: ContinualConfig, ewc_lambda: float | None, after_task=None, memories=None,
                    desc: str = "train"):
    """Train one MLP on the tasks in order; ``after_task(t, model)`` runs after each task."""
    torch.manual_seed(cfg.seed)
    model = build_mlp(MLPConfig(784, tuple(cfg.hidden), 10))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    mem_gen = torch.Generator().manual_seed(cfg.seed + 2)
    ewc = EWC(ewc_lambda) if ewc_lambda else None
    # Memory writes need no task boundaries: every training example seen is written with
    # probability M / (examples_per_task * epochs_per_task), so each task leaves about M
    # entries per memory (one uniform draw per example serves all memory sizes: nested).
    seen_per_task = cfg.examples_per_task * cfg.epochs_per_task

    def write(xb, yb):
        u = torch.rand(xb.shape[0], generator=mem_gen)
        for m_size, mem in memories.items():
            keep = u < m_size / seen_per_task
            if keep.any():
                mem.add(xb[keep], yb[keep])

    for t in tqdm(range(cfg.tasks), desc=desc, leave=False, disable=not _progress()):
        x, y = tasks.train(t)
        train_epochs(model, x, y, epochs=cfg.epochs_per_task, batch=cfg.batch_size, opt=opt, gen=gen, ewc=ewc,
                     on_batch=write if memories else None)
        if ewc is not None:
            ewc.consolidate(model, x[: cfg.ewc_fisher_samples])
        if after_task is not None:
            after_task(t, model)
    return model


def _progress() -> bool:
    from lmadapt.train import progress_enabled

    return progress_enabled()


def _accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred == y).float().mean())


def _new_memories(cfg: ContinualConfig) -> dict[int, EpisodicMemory]:
    # room for the random write count to exceed its mean M per task; oldest entries go first
    return {m: EpisodicMemory(int(m * cfg.tasks * 1.25) + 16, 784, index="exact") for m in sorted(set(cfg.memory_per_task))}


def _valid_accuracy(tasks: Tasks, model, memory, mbpa: MbPAConfig, predictor: str) -> float:
    accs = []
    for t in range(tasks.cfg.tasks):
        x, y = tasks.valid(t)
        pred = predict((predictor,), torch.nn.Identity(), model, memory, x, mbpa)[predictor]
        accs.append(_accuracy(pred, y))
    return sum(accs) / len(accs)


def run_permuted_mnist(data: MNIST, cfg: ContinualConfig, methods=METHODS, log=print, on_partial=None) -> dict:
    """Run the experiment; ``on_partial(results)`` gets the results so far after each base network."""
    methods = check_methods(methods)
    tasks = Tasks(data, cfg)
    want_base = {"mlp": "mlp" in methods or "mbpa" in methods, "ewc": "ewc" in methods or "mbpa+ewc" in methods}
    tuning: dict = {}
    ewc_lambda = cfg.ewc_lambda
    if want_base["ewc"] and cfg.tune:
        scores = {}
        for lam in cfg.ewc_grid:
            model = _train_sequence(tasks, cfg, lam, desc=f"tune ewc lambda={lam:g}")
            scores[lam] = _valid_accuracy(tasks, model, None, cfg.mbpa, "parametric")
            log(f"tune ewc: lambda={lam:g} valid accuracy {scores[lam]:.4f}")
        ewc_lambda = max(scores, key=scores.get)
        tuning["ewc_lambda"] = {"grid": {str(k): v for k, v in scores.items()}, "best": ewc_lambda}

    results: dict = {"config": jsonable(asdict(cfg)), "methods": {}, "tuning": tuning}
    for base in ("mlp", "ewc"):
        if not want_base[base]:
            continue
        lam = ewc_lambda if base == "ewc" else None
        mbpa_name = "mbpa" if base == "mlp" else "mbpa+ewc"
        use_mbpa = mbpa_name in methods
        memories = _new_memories(cfg) if use_mbpa else {}
        # MbPA's (alpha, T) are tuned per memory size on the final network, then the whole
        # curve is re-run with them (training is deterministic, so the network is the same).
        mbpa_cfgs = {m: cfg.mbpa for m in memories}
        if use_mbpa and cfg.tune:
            t0 = time.time()
            model = _train_sequence(tasks, cfg, lam, memories=memories, desc=f"tune {mbpa_name}")
            for m_size, mem in memories.items():
                grid = list(itertools.product(cfg.alpha_grid, cfg.steps_grid))
                settings = [replace(cfg.mbpa, alpha=a, steps=t) for a, t in grid]
                accs = [0.0] * len(grid)
                for t in range(cfg.tasks):  # one neighbour search per task serves the whole grid
                    x, y = tasks.valid(t)
                    preds = predict_many(torch.nn.Identity(), model, mem, x, {"mbpa": settings})["mbpa"]
                    for i, pred in enumerate(preds):
                        accs[i] += _accuracy(pred, y) / cfg.tasks
                scores = dict(zip(grid, accs))
                best = max(scores, key=scores.get)
                mbpa_cfgs[m_size] = replace(cfg.mbpa, alpha=best[0], steps=best[1])
                log(f"tune {mbpa_name} memory {m_size}/task: alpha={best[0]} T={best[1]} valid accuracy {scores[best]:.4f}")
                tuning[f"{mbpa_name}@{m_size}"] = {
                    "grid": [{"alpha": a, "steps": s, "valid_accuracy": v} for (a, s), v in scores.items()],
                    "best": {"alpha": best[0], "steps": best[1]}}
            tuning[f"{mbpa_name}_seconds"] = round(time.time() - t0, 1)
            memories = _new_memories(cfg)

        curves = {base: []}
        curves.update({f"{mbpa_name}@{m}": [] for m in memories})
        seconds = {k: 0.0 for k in curves}

        def after_task(t, model):
            per = {k: [] for k in curves}
            for s in range(t + 1):
                x, y = tasks.test(s, final=t == cfg.tasks - 1)
                t0 = time.time()
                per[base].append(_accuracy(predict(("parametric",), torch.nn.Identity(), model, None, x, cfg.mbpa)["parametric"], y))
                seconds[base] += time.time() - t0
                for m_size, mem in memories.items():
                    t0 = time.time()
                    pred = predict(("mbpa",), torch.nn.Identity(), model, mem, x, mbpa_cfgs[m_size])["mbpa"]
                    seconds[f"{mbpa_name}@{m_size}"] += time.time() - t0
                    per[f"{mbpa_name}@{m_size}"].append(_accuracy(pred, y))
            for k, accs in per.items():
                curves[k].append(accs)
            log(f"{base}: after task {t + 1}: " + ", ".join(f"{k} {sum(a) / len(a):.4f}" for k, a in per.items()))

        t0 = time.time()
        _train_sequence(tasks, cfg, lam, after_task=after_task, memories=memories, desc=base)
        total = time.time() - t0
        train_seconds = total - sum(seconds.values())
        for name, per_task in curves.items():
            if name == base and base not in methods:
                continue
            entry = {
                "average_accuracy": [sum(a) / len(a) for a in per_task],  # after 1, 2, ... tasks
                "final_per_task_accuracy": per_task[-1],
                "test_images_per_task": {"curve": tasks.curve_n, "final": tasks.test_n},
                "train_seconds": round(train_seconds, 1),
                "eval_seconds": round(seconds[name], 1),
            }
            if lam:
                entry["ewc_lambda"] = lam
            if name != base:
                m_size = int(name.split("@")[1])
                entry["memory_per_task"] = m_size
                entry["mbpa"] = asdict(mbpa_cfgs[m_size])
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
