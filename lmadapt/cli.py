"""The `lmadapt` command.

Every user-facing failure is an LmadaptError: printed as one line, exit code 2,
no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from lmadapt import runs
from lmadapt.errors import LmadaptError

RUN_FILES = (runs.CONFIG, runs.VOCAB, runs.SPM, runs.BEST, runs.LAST, runs.METRICS, runs.RESULTS)


class _Parser(argparse.ArgumentParser):
    """argparse exits with code 2 on bad arguments already; keep its message to one line."""

    def error(self, message):
        self.exit(2, f"lmadapt: error: {message}\n")


def _device(name: str):
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LmadaptError("--device cuda requested but no CUDA device is available")
    if name.startswith("cuda") and "LOCAL_RANK" in os.environ and ":" not in name:
        return f"cuda:{os.environ['LOCAL_RANK']}"  # one GPU per torchrun process
    return name


def _check_run_dir_free(out: Path, force: bool) -> None:
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if not existing:
        return
    if not force:
        what = "a finished run" if runs.RESULTS in existing else "an unfinished run"
        raise LmadaptError(f"{out} already holds {what}; use --resume to continue it or --force to start over")
    for name in existing:
        (out / name).unlink()


def cmd_train(args) -> int:
    import torch

    from lmadapt.config import RunConfig, apply_overrides, load_recipe
    from lmadapt.corpus import Vocab, load_corpus
    from lmadapt.train import fit

    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    main_rank = os.environ.get("RANK", "0") == "0"

    if args.resume:
        if args.out is None:
            raise LmadaptError("--resume needs --out RUN_DIR")
        if args.recipe or args.data:
            raise LmadaptError("--resume continues with the run's own config.json; drop --recipe/--data")
        out = Path(args.out)
        if (out / runs.RESULTS).is_file():
            print(f"{out} is already finished:", json.dumps(runs.read_json(out / runs.RESULTS), indent=2))
            return 0
        if not (out / runs.LAST).is_file():
            raise LmadaptError(f"nothing to resume: {out / runs.LAST} not found")
        meta = runs.read_json(out / runs.CONFIG)
        cfg = RunConfig.from_dict(meta)
        apply_overrides(cfg, args.set)
        vocab = Vocab.from_dict(runs.read_json(out / runs.VOCAB))
        spm = (out / runs.SPM).read_bytes() if (out / runs.SPM).is_file() else None
        corpus = load_corpus(cfg.data.name, cfg.data.data_dir, tokenizer=cfg.data.tokenizer,
                             spm_vocab_size=cfg.data.spm_vocab_size, vocab=vocab, spm_model=spm)
    else:
        cfg = load_recipe(args.recipe) if args.recipe else RunConfig()
        if args.data:
            cfg.data.name = args.data
        if args.data_dir:
            cfg.data.data_dir = args.data_dir
        apply_overrides(cfg, args.set)
        cfg.model.validate()
        label = Path(cfg.data.name).name or "run"
        out = Path(args.out) if args.out else Path("runs") / f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
        if main_rank:
            _check_run_dir_free(out, args.force)
        corpus = load_corpus(cfg.data.name, cfg.data.data_dir, tokenizer=cfg.data.tokenizer,
                             spm_vocab_size=cfg.data.spm_vocab_size)

    if main_rank:
        sizes = ", ".join(f"{s} {corpus.split(s).numel():,}" for s in ("train", "valid", "test"))
        print(f"corpus {corpus.name}: vocab {len(corpus.vocab):,}; tokens {sizes}", file=sys.stderr)
        print(f"run directory: {out}", file=sys.stderr)
    results = fit(out, cfg, corpus, device=device, resume=args.resume)
    if results is not None:
        print(f"valid ppl {results['valid_ppl']:.2f}  test ppl {results['test_ppl']:.2f}  "
              f"train {results['train_seconds'] / 60:.1f} min at {results['tokens_per_second']:.0f} tokens/s  "
              f"({results['stopped_because']})")
        print(f"wrote {out / runs.RESULTS}")
    return 0


def _method_flags(parser) -> None:
    """--NAME-FIELD for every registered method's hyper-parameters, --lambda-NAME for mixtures."""
    import dataclasses

    from lmadapt.methods import REGISTRY

    for name, cls in REGISTRY.items():
        group = parser.add_argument_group(f"{name} settings")
        for f in dataclasses.fields(cls.Params):
            default = f.default
            group.add_argument(f"--{name}-{f.name.replace('_', '-')}", dest=f"m__{name}__{f.name}", default=None,
                               metavar=type(default).__name__.upper(), help=f"default {default}")
        if not cls.adapts_model:
            group.add_argument(f"--lambda-{name}", dest=f"lambda__{name}", type=float, default=None,
                               help="mixture weight")


def _method_settings(args, config: dict) -> tuple[str, dict, dict]:
    """Method, per-method params and lambdas: --config file first, explicit flags over it."""
    method = args.method or config.get("method") or "lstm"
    params = {k: dict(v) for k, v in config.get("params", {}).items()}
    lambdas = dict(config.get("lambdas", {}))
    for key, value in vars(args).items():
        if value is None:
            continue
        if key.startswith("m__"):
            _, name, field = key.split("__")
            params.setdefault(name, {})[field] = value
        elif key.startswith("lambda__"):
            lambdas[key.split("__")[1]] = value
    return method, params, lambdas


def cmd_eval(args) -> int:
    import torch

    from lmadapt.evaluate import evaluate_run, format_table, load_for_eval, save_tokens
    from lmadapt.methods import parse_combination

    if args.threads:
        torch.set_num_threads(args.threads)
    config = runs.read_json(Path(args.config)) if args.config else {}
    method, params, lambdas = _method_settings(args, config)
    parse_combination(method)  # fail on a bad name before loading anything
    if args.segment is not None and args.segment < 1:
        raise LmadaptError(f"--segment must be >= 1, got {args.segment}")
    device = _device(args.device)
    model, corpus, _ = load_for_eval(args.run_dir, args.data, args.data_dir, device)
    # Build and validate the methods (λ, K vs N, ...) before the long pass.
    from lmadapt.evaluate import build_methods, mixture_lambdas

    build_methods(parse_combination(method), params)
    mixture_lambdas(parse_combination(method), lambdas)
    report, tokens = evaluate_run(model, corpus, args.split, method, params, lambdas, device=device,
                                  segment_len=args.segment, cache_dir=args.run_dir)
    report["run_dir"] = str(args.run_dir)
    print(format_table(report))
    if args.json:
        runs.write_json(Path(args.json), report)
    if args.save_tokens:
        save_tokens(Path(args.save_tokens), tokens)
    return 0


def cmd_tune(args) -> int:
    import torch

    from lmadapt.evaluate import load_for_eval
    from lmadapt.methods import parse_combination
    from lmadapt.tune import parse_grid, tune

    if args.threads:
        torch.set_num_threads(args.threads)
    names = parse_combination(args.method)
    method, params, _ = _method_settings(args, {})
    grids, lambda_grid = parse_grid(args.grid, names)
    if lambda_grid is not None and any(not 0 <= v <= 1 for v in lambda_grid):
        raise LmadaptError("--grid lambda values must be in [0, 1]")
    device = _device(args.device)
    model, corpus, _ = load_for_eval(args.run_dir, args.data, args.data_dir, device)
    best = tune(model, corpus, method, split=args.split, params=params, grid_overrides=grids,
                lambda_grid=lambda_grid, device=device, segment_len=args.segment, max_passes=args.max_passes,
                cache_dir=args.run_dir)
    best["run_dir"] = str(args.run_dir)
    runs.write_json(Path(args.out), best)
    print(f"{best['method']} on {best['split']}: ppl {best['ppl']:.2f} (lstm {best['lstm_ppl']:.2f}, "
          f"{best['delta_vs_lstm_percent']:+.1f}%) after {best['passes']} passes")
    print(f"params {json.dumps(best['params'])}  lambdas {json.dumps(best['lambdas'])}")
    print(f"wrote {args.out}")
    return 0


def cmd_report(args) -> int:
    from lmadapt.evaluate import load_tokens
    from lmadapt.report import bucket_report, plot_png, to_markdown

    tokens = load_tokens(Path(args.tokens_file))
    other, label = None, None
    if args.method_tokens:
        other = load_tokens(Path(args.method_tokens))
        label = f"{args.method} [{Path(args.method_tokens).name}]"
    rep = bucket_report(tokens, args.baseline, args.method, args.buckets, method_tokens=other, method_label=label)
    markdown = to_markdown(rep)
    print(markdown, end="")
    if args.out:
        out = Path(args.out)
        runs.write_bytes(out, markdown.encode())
        runs.write_json(out.with_suffix(".json"), rep)
        plot_png(rep, out.with_suffix(".png"))
        print(f"wrote {out}, {out.with_suffix('.json')}, {out.with_suffix('.png')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lmadapt", description="Dynamic test-time adaptation of LSTM language models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train an LSTM language model into a run directory")
    p.add_argument("--recipe", help="recipe name (see recipes/) or a .toml file")
    p.add_argument("--data", help="corpus name (ptb, wikitext-2, sample) or a directory with train/valid/test.txt")
    p.add_argument("--data-dir", help="directory holding named corpora (default: $LMADAPT_DATA, then the hub)")
    p.add_argument("--out", help="run directory (default: runs/NAME-TIMESTAMP)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set train.lr=0.001 --set model.hidden_size=650")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--force", action="store_true", help="start over in --out, deleting the run there")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run with test-time adaptation methods (streaming, batch size 1)")
    p.add_argument("run_dir")
    p.add_argument("--data", help="corpus (default: the one the run was trained on)")
    p.add_argument("--data-dir", help="directory holding named corpora")
    p.add_argument("--split", default="valid", choices=["valid", "test", "train"])
    p.add_argument("--method", help="lstm, cache, mbpa, dyneval or a '+' combination such as mbpa+cache")
    p.add_argument("--config", help="JSON with method, params and lambdas (e.g. from `lmadapt tune`)")
    p.add_argument("--segment", type=int, default=None,
                   help="positions per segment (speed only; default: the methods' preference, else 128)")
    p.add_argument("--json", help="write the report as JSON here")
    p.add_argument("--save-tokens", help="write per-token log-probabilities of every method here (.pt)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    _method_flags(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("tune", help="grid-search a method's settings and mixture weights on a split")
    p.add_argument("run_dir")
    p.add_argument("--method", required=True)
    p.add_argument("--split", default="valid", choices=["valid", "test", "train"])
    p.add_argument("--out", required=True, help="best settings as JSON (use with `lmadapt eval --config`)")
    p.add_argument("--grid", action="append", default=[], metavar="METHOD.PARAM=v1,v2",
                   help="replace one grid axis (default: the paper's App. B grid); lambda=v1,v2 for the weights")
    p.add_argument("--max-passes", type=int, default=200, help="refuse grids needing more streaming passes")
    p.add_argument("--data")
    p.add_argument("--data-dir")
    p.add_argument("--segment", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    _method_flags(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("report", help="per-frequency-bucket perplexity from an eval --save-tokens file")
    p.add_argument("tokens_file")
    p.add_argument("--baseline", default="lstm+cache")
    p.add_argument("--method", default="mbpa+cache")
    p.add_argument("--buckets", type=int, default=5)
    p.add_argument("--method-tokens", help="take --method from this second tokens file (another run, same split)")
    p.add_argument("--out", help="Markdown file; .json and .png are written beside it")
    p.set_defaults(func=cmd_report)

    from lmadapt.classify.cli import add_parser as add_classify

    add_classify(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LmadaptError as exc:
        print(f"lmadapt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmadapt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
