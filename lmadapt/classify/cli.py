"""`lmadapt classify permuted-mnist|incremental|curriculum`: the MbPA paper's image experiments on MNIST.

Every experiment flag is generated from a field of the experiment's config dataclass, and
the --mbpa-* flags from the language-model side's MbPAParams (the same names and value
checks as `lmadapt eval --mbpa-*`), through lmadapt.params (add_flags / read_flags).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from lmadapt import runs
from lmadapt.errors import LmadaptError
from lmadapt.params import NON_NEGATIVE, add_flags, arg, read_flags


def _out_dir(path: str, force: bool, files: tuple[str, ...]) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise LmadaptError(f"--out {out} exists and is not a directory")
    runs.check_writable_dir(out, "--out")
    clash = [f for f in files if (out / f).exists()]
    if clash and not force:
        raise LmadaptError(f"{out} already holds {', '.join(clash)}; choose another --out or pass --force")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _config(args):
    """The experiment's config from its flags (checked before any file is touched)."""
    from lmadapt.classify.predict import ClassifierMbPA

    cfg = read_flags(args, args.config_class, "cfg", args.config_class())
    if hasattr(cfg, "mbpa"):
        cfg = dataclasses.replace(cfg, mbpa=read_flags(args, ClassifierMbPA, "mbpa", cfg.mbpa, prefix="--mbpa-"))
    return cfg


def _setup(args):
    import torch

    from lmadapt.classify.mnist import load_mnist

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.data_dir:
        raise LmadaptError("--data-dir is required (a folder with the four MNIST IDX files)")
    return load_mnist(args.data_dir)


def cmd_permuted(args) -> int:
    from lmadapt.classify.continual import plot, run_permuted_mnist

    cfg = _config(args)
    out = _out_dir(args.out, args.force, ("results.json", "permuted-mnist.png"))
    data = _setup(args)
    t0 = time.time()

    def partial(res):  # a long run leaves its finished methods behind even if stopped later
        runs.write_json(out / "results.json", {**res, "complete": False})

    results = run_permuted_mnist(data, cfg, on_partial=partial)
    results["seconds"] = round(time.time() - t0, 1)
    results["complete"] = True
    runs.write_json(out / "results.json", results)
    plot(results, out / "permuted-mnist.png")
    print(f"{'method':<16} {'avg acc after 1 task':>21} {'after all':>10}  {'train s':>8} {'eval s':>8}")
    for name, m in results["methods"].items():
        curve = m["average_accuracy"]
        print(f"{name:<16} {curve[0]:>21.4f} {curve[-1]:>10.4f}  {m['train_seconds']:>8.1f} {m['eval_seconds']:>8.1f}")
    print(f"wrote {out / 'results.json'} and {out / 'permuted-mnist.png'} ({results['seconds']:.0f} s)")
    return 0


def cmd_incremental(args) -> int:
    from lmadapt.classify.incremental import plot, run_incremental, to_markdown

    cfg = _config(args)
    out = _out_dir(args.out, args.force, ("results.json", "table.md", "incremental.png"))
    data = _setup(args)
    results = run_incremental(data, cfg)
    table = to_markdown(results)
    runs.write_json(out / "results.json", results)
    runs.write_bytes(out / "table.md", table.encode())
    plot(results, out / "incremental.png")
    print(table, end="")
    print(f"wrote {out}/results.json, table.md, incremental.png ({results['seconds']:.0f} s)")
    return 0


def cmd_curriculum(args) -> int:
    from lmadapt.classify.curriculum import run_curriculum, to_markdown

    cfg = _config(args)
    out = _out_dir(args.out, args.force, ("results.json", "table.md"))
    data = _setup(args)
    t0 = time.time()
    results = run_curriculum(data, cfg)
    results["seconds"] = round(time.time() - t0, 1)
    table = to_markdown(results)
    runs.write_json(out / "results.json", results)
    runs.write_bytes(out / "table.md", table.encode())
    print(table, end="")
    print(f"wrote {out}/results.json, table.md ({results['seconds']:.0f} s)")
    return 0


def add_parser(sub) -> None:
    from lmadapt.classify import continual, curriculum, incremental
    from lmadapt.classify.predict import ClassifierMbPA

    p = sub.add_parser("classify", help="the MbPA paper's MNIST experiments (continual and incremental learning)")
    exp = p.add_subparsers(dest="experiment", required=True, parser_class=type(p))
    experiments = [
        ("permuted-mnist", "permuted-MNIST tasks in sequence: mlp, ewc, mbpa, mbpa+ewc", continual.ContinualConfig,
         continual.MBPA_FLAGS, cmd_permuted),
        ("incremental", "pre-train on half the classes, then learn all: Table 1 on MNIST",
         incremental.IncrementalConfig, incremental.MBPA_FLAGS, cmd_incremental),
        ("curriculum", "classes introduced one at a time: Hebbian vs plain softmax", curriculum.CurriculumConfig,
         (), cmd_curriculum),
    ]
    for name, help_, config, mbpa_flags, cmd in experiments:
        q = exp.add_parser(name, help=help_)
        q.add_argument("--data-dir", help="folder with the MNIST IDX files (e.g. ../shared/data/mnist)")
        q.add_argument("--out", required=True, help="output folder (results.json, plot, table)")
        q.add_argument("--force", action="store_true", help="overwrite results already in --out")
        q.add_argument("--threads", type=arg(int, NON_NEGATIVE), default=0)
        defaults = config()
        add_flags(q.add_argument_group("experiment settings"), config, "cfg", defaults=defaults)
        if mbpa_flags:
            add_flags(q.add_argument_group("memory read-out settings (lmadapt eval's --mbpa-* where shared)"),
                      ClassifierMbPA, "mbpa", prefix="--mbpa-", only=mbpa_flags, defaults=defaults.mbpa)
        q.set_defaults(func=cmd, config_class=config)
