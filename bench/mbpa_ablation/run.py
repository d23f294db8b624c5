"""One-factor-at-a-time ablation of MbPA on a language model (what closes the gap?).

    python bench/mbpa_ablation/run.py RUN_DIR --out bench/out/ablation-ptb.json [--tokens 20000]

Around a base point (the calibration note's setting: plain steps, T=1,
normalised weights, K=256, N=5000) it varies one factor at a time: α,
normalisation, K, N, T, β, ε, what the step moves (weight, bias or both) and the
local optimiser, then some factors together (COMBINED), and the cache for
reference. Each point is one streaming pass over the first --tokens
validation tokens; its figure is the best perplexity over the λ grid (λ tuned
per point, as the paper tunes λ_mbpa). The RMSprop/Adam points need a V×d
copy per query and are run on --tokens-slow tokens only, beside an sgd point
on the same tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lmadapt import runs
from lmadapt.evaluate import build_methods, load_for_eval
from lmadapt.mix import mix_log_probs, perplexity
from lmadapt.stream import stream_eval

LAMBDAS = [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5]
# One memory of N (select off): the factors vary the paper's single-memory MbPA.
BASE = {"memory": 5000, "k": 256, "steps": 1, "alpha": 1.0, "beta": 0.0, "eps": 1e-3, "normalise": True,
        "optimizer": "sgd", "select": False}
FACTORS = {
    "alpha": [0.15, 0.5, 2.0, 5.0, 10.0],
    "normalise": [False],
    "k": [32, 64, 512, 1024],
    "memory": [500, 1000, 2000],
    "steps": [2, 5],
    "beta": [0.01, 0.1],
    "eps": [1e-1],
    "adapt": ["weight", "bias"],
}
# Several factors at once: the changes that helped one at a time (larger steps, unnormalised
# weights, fewer neighbours, a shorter memory) together, and what the step moves.
COMBINED = [
    {"normalise": False, "alpha": 0.3}, {"normalise": False, "alpha": 1.0}, {"normalise": False, "alpha": 3.0},
    {"alpha": 5.0, "adapt": "weight"}, {"alpha": 5.0, "adapt": "bias"}, {"alpha": 20.0, "adapt": "bias"},
    {"alpha": 50.0, "adapt": "bias"}, {"alpha": 5.0, "k": 32, "memory": 1000},
    {"alpha": 10.0, "k": 32, "memory": 1000}, {"normalise": False, "alpha": 1.0, "k": 32, "memory": 1000},
]
# Round 2, after COMBINED showed that more local steps (K = 32, N = 1000, large alpha) help most.
LOCAL = [
    {"alpha": a, "k": k, "memory": n} for n in (500, 1000, 2000) for k in (8, 16, 32, 64) for a in (3.0, 10.0)
] + [{"alpha": 5.0, "k": 16, "memory": 1000, "steps": 2}, {"alpha": 5.0, "k": 16, "memory": 1000, "adapt": "weight"}]



def best_over_lambda(base, comp) -> tuple[float, float]:
    return min((perplexity(mix_log_probs(base, {"m": comp}, {"m": lam})), lam) for lam in LAMBDAS)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--out", required=True)
    ap.add_argument("--data-dir")
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--tokens-slow", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--factors", default=",".join(list(FACTORS) + ["combined", "local", "optimizer"]),
                    help="which factors to vary (T > 1 is slow: (K x K) @ (K x V) per query and step)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, corpus, _ = load_for_eval(args.run_dir, data_dir=args.data_dir)
    stream = corpus.valid[: args.tokens + 1]
    t0 = time.time()
    lstm = stream_eval(model, stream, [], {})
    rows = [{"point": "lstm", "ppl": perplexity(lstm.base), "lambda": 0.0}]
    print(f"lstm: {rows[0]['ppl']:.2f}", flush=True)

    def point(label, mbpa=None, cache=None, tokens=None):
        s = stream if tokens is None else corpus.valid[: tokens + 1]
        base = lstm.base if tokens is None else stream_eval(model, s, [], {}).base
        name, params = ("mbpa", mbpa) if mbpa is not None else ("cache", cache)
        methods = build_methods([name], {name: params})
        r = stream_eval(model, s, methods, {name: 0.0})
        ppl, lam = best_over_lambda(base, r.components[name])
        row = {"point": label, "method": name, "params": params, "ppl": ppl, "lambda": lam,
               "lstm_ppl": perplexity(base), "delta_percent": 100 * (ppl / perplexity(base) - 1),
               "tokens": r.tokens, "tokens_per_second": r.tokens / r.seconds}
        rows.append(row)
        print(f"[{time.time() - t0:.0f}s] {label}: {ppl:.2f} ({row['delta_percent']:+.1f}%, λ={lam})", flush=True)
        runs.write_json(Path(args.out), {"run_dir": args.run_dir, "tokens": args.tokens, "rows": rows})

    point("cache N=500 θ=0.3", cache={"window": 500, "theta": 0.3})
    point("mbpa base", mbpa=dict(BASE))
    factors = args.factors.split(",")
    for factor, values in FACTORS.items():
        if factor not in factors:
            continue
        for v in values:
            point(f"mbpa {factor}={v}", mbpa={**BASE, factor: v})
    for combo in (COMBINED if "combined" in factors else []) + (LOCAL if "local" in factors else []):
        point("mbpa " + " ".join(f"{k}={v}" for k, v in combo.items()), mbpa={**BASE, **combo})
    for opt, lr in [] if "optimizer" not in factors else (("sgd", 1.0), ("rmsprop", 0.001), ("rmsprop", 0.01), ("adam", 0.001), ("adam", 0.01)):
        point(f"mbpa optimizer={opt} α={lr} ({args.tokens_slow} tokens)",
              mbpa={**BASE, "optimizer": opt, "alpha": lr, "k": 64}, tokens=args.tokens_slow)
    print(json.dumps(rows[-1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
