"""`lmadapt classify permuted-mnist|incremental`: the MbPA paper's image experiments on MNIST."""

from __future__ import annotations

import time
from pathlib import Path

from lmadapt import runs
from lmadapt.errors import LmadaptError
from lmadapt.params import NON_NEGATIVE, POSITIVE, PROBABILITY, arg, at_least, numbers


def _ints(text: str, flag: str, rng=None) -> tuple[int, ...]:
    return numbers(text, flag, int, rng or at_least(1))


def _floats(text: str, flag: str, rng=None) -> tuple[float, ...]:
    return numbers(text, flag, float, rng or NON_NEGATIVE)


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


def _mbpa_cfg(args, default_k, default_optimizer):
    from lmadapt.classify.core import MbPAConfig

    if args.mbpa_optimizer not in (None, "sgd", "rmsprop", "adam"):
        raise LmadaptError(f"--mbpa-optimizer must be sgd, rmsprop or adam, not {args.mbpa_optimizer!r}")
    return MbPAConfig(k=args.mbpa_k or default_k, alpha=args.mbpa_alpha if args.mbpa_alpha is not None else 0.1,
                      steps=args.mbpa_steps if args.mbpa_steps is not None else 5, beta=args.mbpa_beta,
                      optimizer=args.mbpa_optimizer or default_optimizer)


def _setup(args):
    import torch

    from lmadapt.classify.mnist import load_mnist

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.data_dir:
        raise LmadaptError("--data-dir is required (a folder with the four MNIST IDX files)")
    return load_mnist(args.data_dir)


def cmd_permuted(args) -> int:
    from lmadapt.classify.continual import ContinualConfig, check_methods, plot, run_permuted_mnist

    methods = check_methods(tuple(m.strip() for m in args.methods.split(",") if m.strip()))
    mems = _ints(args.memory_per_task, "--memory-per-task")
    cfg = ContinualConfig(
        tasks=args.tasks, examples_per_task=args.examples_per_task, epochs_per_task=args.epochs_per_task,
        hidden=_ints(args.hidden, "--hidden"), memory_per_task=mems, seed=args.seed, tune=not args.no_tune,
        test_per_task=args.test_per_task, curve_test_per_task=args.curve_test_per_task,
        ewc_lambda=args.ewc_lambda, mbpa=_mbpa_cfg(args, 32, "sgd"),
        **({"ewc_grid": _floats(args.ewc_grid, "--ewc-grid")} if args.ewc_grid else {}),
        **({"alpha_grid": _floats(args.alpha_grid, "--alpha-grid")} if args.alpha_grid else {}),
        **({"steps_grid": _ints(args.steps_grid, "--steps-grid", NON_NEGATIVE)} if args.steps_grid else {}),
    )
    out = _out_dir(args.out, args.force, ("results.json", "permuted-mnist.png"))
    data = _setup(args)
    t0 = time.time()

    def partial(res):  # a long run leaves its finished methods behind even if stopped later
        runs.write_json(out / "results.json", {**res, "complete": False})

    results = run_permuted_mnist(data, cfg, methods, on_partial=partial)
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
    from lmadapt.classify.incremental import IncrementalConfig, plot, run_incremental, to_markdown

    cfg = IncrementalConfig(
        splits=args.splits, unbalanced=args.unbalanced, epochs=args.epochs, memory_size=args.memory_size,
        seed=args.seed, tune=not args.no_tune, hidden=_ints(args.hidden, "--hidden"),
        pretrain_epochs=args.pretrain_epochs, lr=args.lr, optimizer=args.optimizer,
        test_examples=args.test_examples, mbpa=_mbpa_cfg(args, 50, "rmsprop"),
        **({"eval_epochs": _floats(args.eval_epochs, "--eval-epochs", POSITIVE)} if args.eval_epochs else {}),
        **({"alpha_grid": _floats(args.alpha_grid, "--alpha-grid")} if args.alpha_grid else {}),
        **({"steps_grid": _ints(args.steps_grid, "--steps-grid", NON_NEGATIVE)} if args.steps_grid else {}),
    )
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
    from lmadapt.classify.curriculum import CurriculumConfig, run_curriculum, to_markdown

    cfg = CurriculumConfig(
        classes_per_stage=args.classes_per_stage, steps_per_stage=args.steps_per_stage, seeds=args.seeds,
        hidden=_ints(args.hidden, "--hidden"), seed=args.seed, tune=not args.no_tune,
        hebbian_gamma=args.hebbian_gamma, hebbian_T=args.hebbian_T,
        **({"exposures": _ints(args.exposures, "--exposures")} if args.exposures else {}),
    )
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
    p = sub.add_parser("classify", help="the MbPA paper's MNIST experiments (continual and incremental learning)")
    exp = p.add_subparsers(dest="experiment", required=True, parser_class=type(p))

    def common(q):
        q.add_argument("--data-dir", help="folder with the MNIST IDX files (e.g. ../shared/data/mnist)")
        q.add_argument("--out", required=True, help="output folder (results.json, plot, table)")
        q.add_argument("--force", action="store_true", help="overwrite results already in --out")
        q.add_argument("--seed", type=arg(int, NON_NEGATIVE), default=0)
        q.add_argument("--threads", type=arg(int, NON_NEGATIVE), default=0)
        q.add_argument("--no-tune", action="store_true", help="skip the grid searches; use the flags' values")
        q.add_argument("--alpha-grid", help="MbPA local learning rates to try, e.g. 0.05,0.1,0.5")
        q.add_argument("--steps-grid", help="MbPA step counts T to try, e.g. 1,5,10")
        q.add_argument("--mbpa-k", type=arg(int, at_least(1)), help="neighbours K")
        q.add_argument("--mbpa-alpha", type=arg(float, NON_NEGATIVE), help="local learning rate (with --no-tune)")
        q.add_argument("--mbpa-steps", type=arg(int, NON_NEGATIVE), help="local steps T (with --no-tune)")
        q.add_argument("--mbpa-beta", type=arg(float, NON_NEGATIVE), default=0.0, help="prior weight beta")
        q.add_argument("--mbpa-optimizer", help="sgd (exact span path), rmsprop or adam")

    q = exp.add_parser("permuted-mnist", help="20 permuted-MNIST tasks in sequence: mlp, ewc, mbpa, mbpa+ewc")
    common(q)
    q.add_argument("--tasks", type=arg(int, at_least(1)), default=20)
    q.add_argument("--examples-per-task", type=arg(int, at_least(1)), default=10000)
    q.add_argument("--epochs-per-task", type=arg(int, at_least(1)), default=2)
    q.add_argument("--methods", default="mlp,ewc,mbpa,mbpa+ewc")
    q.add_argument("--memory-per-task", default="100,250,500,1000")
    q.add_argument("--hidden", default="100,100", help="hidden layer sizes of the MLP")
    q.add_argument("--test-per-task", type=arg(int, at_least(1)), default=10000,
                   help="test images per task after the last task (default: all 10,000)")
    q.add_argument("--curve-test-per-task", type=arg(int, at_least(1)), default=1000,
                   help="test images per task for the curve points before the last task (default 1,000)")
    q.add_argument("--ewc-lambda", type=arg(float, NON_NEGATIVE), default=100.0, help="EWC penalty weight (with --no-tune)")
    q.add_argument("--ewc-grid", help="EWC penalty weights to try")
    q.set_defaults(func=cmd_permuted)

    q = exp.add_parser("incremental", help="pre-train on half the classes, then learn all: Table 1 on MNIST")
    common(q)
    q.add_argument("--splits", type=arg(int, at_least(1)), default=5)
    q.add_argument("--unbalanced", action="store_true", help="half the novel classes get a tenth of their data")
    q.add_argument("--epochs", type=arg(float, POSITIVE), default=3.0)
    q.add_argument("--eval-epochs", help="checkpoints (fractions of an epoch), e.g. 0.1,0.5,1,2,3")
    q.add_argument("--pretrain-epochs", type=arg(int, NON_NEGATIVE), default=2)
    q.add_argument("--memory-size", type=arg(int, at_least(1)), default=50000)
    q.add_argument("--hidden", default="256,256")
    q.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    q.add_argument("--lr", type=arg(float, POSITIVE), default=0.01)
    q.add_argument("--test-examples", type=arg(int, at_least(1)), default=10000)
    q.set_defaults(func=cmd_incremental)

    q = exp.add_parser("curriculum", help="classes introduced one at a time: Hebbian vs plain softmax")
    common(q)
    q.add_argument("--classes-per-stage", type=arg(int, at_least(1)), default=1)
    q.add_argument("--steps-per-stage", type=arg(int, at_least(1)), default=300)
    q.add_argument("--seeds", type=arg(int, at_least(1)), default=3, help="runs averaged per arm")
    q.add_argument("--hidden", default="256,256")
    q.add_argument("--exposures", help="exposure counts at which a new class is scored, e.g. 1,2,5,10")
    q.add_argument("--hebbian-gamma", type=arg(float, PROBABILITY), default=0.01, help="(with --no-tune)")
    q.add_argument("--hebbian-T", type=arg(int, at_least(1)), default=500, help="(with --no-tune)")
    q.set_defaults(func=cmd_curriculum)

