"""The mixture half of a tune grid: one pass per setting against all settings in one pass.

    python bench/tune_speed/run.py RUN_DIR --method dyneval+mbpa+cache --split valid --tokens 200 \
        --threads 1 --out bench/tune_speed/results/RUN.json

`lmadapt tune` (and `eval --tune`) search a model adapter's grid one pass per setting,
then score every setting of every mixture method.  This times the two ways of doing that
second part on the same tokens in one process: a pass per mixture setting (each paying the
base model's forward and, with dyneval, its backward and update again), and one pass with
all settings side by side as labelled columns (lmadapt.tune.mixer_pass, what tune runs).
Dynamic evaluation, when in the combination, runs at its defaults in both.  It checks that
both give the same columns (largest difference in nats) and reports seconds and the ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lmadapt.evaluate import build_methods, load_for_eval
from lmadapt.methods import adapter_names, mixture_names, parse_combination
from lmadapt.stream import stream_eval
from lmadapt.tune import _settings, grid_with_defaults, mixer_pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--method", default="dyneval+mbpa+cache")
    ap.add_argument("--split", default="valid")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, corpus, _ = load_for_eval(args.run_dir)
    stream = corpus.split(args.split)[:args.tokens + 1]
    names = parse_combination(args.method)
    adapters, mixers = adapter_names(names), mixture_names(names)
    grids = grid_with_defaults(names, {})
    plan = {n: _settings(n, {}, grids.get(n, {})) for n in mixers}

    def timed(methods):
        t0 = time.perf_counter()
        r = stream_eval(model, stream, methods, {}, corpus=corpus, cache_dir=args.run_dir)
        return r, time.perf_counter() - t0

    timed(build_methods(adapters, {}))  # warm-up: loads dyneval's cached statistics, faiss, caches
    labelled = mixer_pass(mixers, plan)
    together, one_pass = timed(build_methods(adapters, {}) + [m for _, _, m in labelled])
    separate, worst = 0.0, 0.0
    for name, setting, m in labelled:
        r, seconds = timed(build_methods(adapters, {}) + build_methods([name], {name: setting}))
        separate += seconds
        a, b = together.components[m.column][0], r.components[name][0]
        ok = torch.isfinite(a) & torch.isfinite(b)
        worst = max(worst, float((a[ok] - b[ok]).abs().max()) if ok.any() else 0.0)
        assert torch.equal(torch.isfinite(a), torch.isfinite(b))
    report = {"run_dir": str(Path(args.run_dir).resolve()), "method": args.method, "split": args.split,
              "tokens": args.tokens, "threads": args.threads, "settings": {n: len(plan[n]) for n in mixers},
              "seconds_one_pass_per_setting": separate, "seconds_one_pass_for_all": one_pass,
              "speedup": separate / one_pass, "max_abs_difference_nats": worst,
              "command": " ".join(sys.argv)}
    print(json.dumps(report, indent=1))
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
