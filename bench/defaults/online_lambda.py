"""What choosing a mixture's λs online would gain: a Bayesian average over a λ grid, on a sweep's stored columns.

    python bench/defaults/online_lambda.py COLUMNS.pt --mbpa alpha=0.0,k=32,memory=2000,steps=1 \
        --cache select=True,theta=0.0,window=5000 --out bench/defaults/results/online-lambda-NAME.json

For mbpa+cache at the given settings (keys of the sweep's columns file, bench/defaults/sweep.py
--columns): valid perplexity with the methods' own λs (mbpa 0.1, cache 0.2; `shipped` in the
file, the mixture's default when this was run), with the best λ pair
in hindsight on the same tokens, and with the λ pair chosen online per token: every pair of
the grid weighted by how well it scored the tokens before (each token is scored before its
own target enters the weights, as the cache's online selection does). An off-line study of
a possible default, run on stored columns only; nothing in lmadapt uses it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

GRID = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("columns")
    ap.add_argument("--mbpa", required=True)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    from lmadapt.mix import mix_log_probs, perplexity

    cols = torch.load(args.columns, weights_only=True)
    base = cols["base"]
    comps = {"mbpa": tuple(cols[f"mbpa:{args.mbpa}"]), "cache": tuple(cols[f"cache:{args.cache}"])}
    pairs = [(a, b) for a in GRID for b in GRID if a + b <= 0.5 + 1e-9]
    mixed = torch.stack([mix_log_probs(base, comps, {"mbpa": a, "cache": b}) for a, b in pairs], 1).double()
    totals = mixed.sum(0)
    best = int(totals.argmax())
    before = mixed.cumsum(0) - mixed          # each token's weights see the tokens before it only
    online = torch.logsumexp(torch.log_softmax(before, 1) + mixed, 1)
    base_ppl = perplexity(base)
    shipped = perplexity(mix_log_probs(base, comps, {"mbpa": 0.1, "cache": 0.2}))
    report = {"command": " ".join(sys.argv), "tokens": int(base.numel()), "base_ppl": base_ppl,
              "settings": {"mbpa": args.mbpa, "cache": args.cache}, "grid": GRID, "pairs": len(pairs),
              "shipped": {"lambdas": {"mbpa": 0.1, "cache": 0.2}, "ppl": shipped,
                          "delta_percent": 100 * (shipped / base_ppl - 1)},
              "best_in_hindsight": {"lambdas": {"mbpa": pairs[best][0], "cache": pairs[best][1]},
                                    "ppl": perplexity(mixed[:, best]),
                                    "delta_percent": 100 * (perplexity(mixed[:, best]) / base_ppl - 1)},
              "online": {"ppl": perplexity(online), "delta_percent": 100 * (perplexity(online) / base_ppl - 1)}}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    for k in ("shipped", "best_in_hindsight", "online"):
        print(f"{k}: {report[k]['ppl']:.2f} ({report[k]['delta_percent']:+.2f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
