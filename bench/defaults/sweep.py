"""Evidence for the shipped defaults: every grid setting of each method on one model's valid prefix
(or, with --split test, on a test prefix, to check a choice already made on valid).

    python bench/defaults/sweep.py RUN_DIR --name ptb-lstm --tokens 20000 --threads 1 \
        --out bench/defaults/results/sweep-ptb-lstm.json [--methods cache,mbpa,dyneval]

For each method alone, one streaming pass per setting of the method's own tune grid
(`grid_for`, the one place a method's grid is declared; the paper's App. B MbPA grid is
the `paper` preset's, see lmadapt/methods/mbpa.py) plus the paper preset and the current
defaults; a mixture method's stored per-token column is then mixed with the base model at
every λ of LAMBDAS (no model pass). Written per setting: valid perplexity at each λ, the
base perplexity and the pass's tokens/s, so that bench/defaults/choose.py can pick the
setting and λ that do best on average over models. The JSON is rewritten after every
pass: an interrupted sweep keeps what it measured, and a rerun skips settings already
in the file.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

LAMBDAS = [0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4]


def settings_of(cls, extra: list[dict], override: dict) -> list[dict]:
    grid = {**cls.grid_for({}), **override}
    keys = list(grid)
    out = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    for setting in extra:
        if setting not in out:
            out.append(setting)
    return out


def _cpu(column):
    """A stored column (a tensor, or a method's tuple of them) on the CPU: a CUDA sweep's
    column file must load anywhere."""
    return tuple(_cpu(c) for c in column) if isinstance(column, tuple) else column.cpu()


def key_of(setting: dict) -> str:
    return ",".join(f"{k}={setting[k]}" for k in sorted(setting))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--name", required=True, help="the model's label in the tables (e.g. ptb-lstm)")
    ap.add_argument("--tokens", type=int, default=20000, help="scored tokens from the split's start")
    ap.add_argument("--split", default="valid", help="valid (choosing defaults) or test (checking a choice made on valid)")
    ap.add_argument("--methods", default="cache,mbpa,dyneval")
    ap.add_argument("--grid", action="append", default=[], metavar="METHOD.PARAM=v1,v2",
                    help="narrow one axis of a method's grid (the preset and defaults are still run)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="e.g. cuda (columns are stored on the CPU)")
    ap.add_argument("--columns", help="also save every pass's per-token log-probabilities here (.pt)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from lmadapt.evaluate import build_methods, load_for_eval
    from lmadapt.methods import REGISTRY
    from lmadapt.mix import mix_log_probs, perplexity
    from lmadapt.stream import stream_eval

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = json.loads(out.read_text()) if out.is_file() else {}
    report.update({"model": args.name, "run_dir": str(Path(args.run_dir).resolve()), "split": args.split,
                   "threads": args.threads, "lambdas": LAMBDAS})
    if args.device != "cpu":
        report["device"] = args.device
    # every invocation that wrote into this file, in order (a rerun adds settings or rows)
    report.setdefault("commands", [report.pop("command")] if "command" in report else []).append(" ".join(sys.argv))
    report.setdefault("methods", {})

    def save():
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(out)

    from lmadapt.tune import parse_grid

    overrides, _ = parse_grid(args.grid, args.methods.split(","))
    columns = torch.load(args.columns, weights_only=True) if args.columns and Path(args.columns).is_file() else {}
    model, corpus, _ = load_for_eval(args.run_dir, device=args.device)
    stream = corpus.split(args.split)[: args.tokens + 1]
    report["tokens"] = stream.numel() - 1
    t0 = time.perf_counter()
    base = stream_eval(model, stream, [], {}, corpus=corpus, device=args.device)
    report["base_ppl"] = perplexity(base.base)
    report["base_tokens_per_second"] = base.tokens / (time.perf_counter() - t0)
    print(f"{args.name}: base {args.split}[:{report['tokens']}] ppl {report['base_ppl']:.2f}", flush=True)
    save()
    columns["base"] = base.base.cpu()

    for name in args.methods.split(","):
        cls = REGISTRY[name]
        presets = [dict(p) for p in getattr(cls, "PRESETS", {}).values()]
        # The defaults and presets are run too, with any axis narrowed to one value held at it
        # (e.g. --grid dyneval.max_batches=200 applies to every dyneval pass).
        axes = {**cls.grid_for({}), **overrides.get(name, {})}
        fixed = {k: v[0] for k, v in overrides.get(name, {}).items() if len(v) == 1}
        defaults = {k: fixed.get(k, getattr(cls.Params(), k)) for k in axes}
        rows = report["methods"].setdefault(name, {})
        extra = [defaults, *[{k: fixed.get(k, p.get(k, defaults[k])) for k in defaults} for p in presets]]
        for setting in settings_of(cls, extra, overrides.get(name, {})):
            key = key_of(setting)
            if key in rows:
                continue
            methods = build_methods([name], {name: setting})
            t0 = time.perf_counter()
            lam0 = {m.name: 0.0 for m in methods if name != "dyneval"}
            r = stream_eval(model, stream, methods, lam0, corpus=corpus, cache_dir=args.run_dir, device=args.device)
            seconds = time.perf_counter() - t0
            row = {"params": setting, "seconds": seconds, "tokens_per_second": r.tokens / seconds}
            if name == "dyneval":
                row["ppl"] = perplexity(r.base)
            else:
                comp = {name: r.components[name]}
                row["ppl_by_lambda"] = {str(lam): perplexity(mix_log_probs(r.base, comp, {name: lam})) for lam in LAMBDAS}
                best = min(row["ppl_by_lambda"].items(), key=lambda kv: kv[1])
                row["ppl"], row["best_lambda"] = best[1], float(best[0])
            row["delta_percent"] = 100 * (row["ppl"] / report["base_ppl"] - 1)
            rows[key] = row
            if args.columns:
                columns[f"{name}:{key}"] = _cpu(r.base if name == "dyneval" else r.components[name])
                torch.save(columns, args.columns)
            print(f"{args.name} {name} {key}: {row['ppl']:.2f} ({row['delta_percent']:+.1f}%) "
                  f"{row['tokens_per_second']:.0f} tok/s", flush=True)
            save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
