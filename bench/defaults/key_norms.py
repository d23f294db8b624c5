"""The scale the cache's θ divides by: mean squared norm of each model's output-layer inputs.

    python bench/defaults/key_norms.py RUN [RUN ...] --tokens 3000 --out bench/defaults/results/key-norms.json

For each run, the hidden states of the first --tokens valid positions (one stream, state
carried, eval mode): mean and median ‖h‖², as cited for the scaled θ in docs/results.md §9.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--tokens", type=int, default=3000)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from lmadapt.evaluate import load_for_eval

    report = {"tokens": args.tokens, "command": " ".join(sys.argv), "runs": {}}
    for run in args.runs:
        model, corpus, _ = load_for_eval(run)
        x = corpus.split("valid")[: args.tokens + 1]
        parts, state = [], model.init_state(1)
        with torch.no_grad():
            for i in range(0, args.tokens, 128):
                hidden, _, state = model.forward(x[i:min(i + 128, args.tokens)].view(1, -1), state,
                                                 compute_logits=False)
                parts.append(hidden[0].float())
        sq = torch.cat(parts).pow(2).sum(1)
        report["runs"][str(Path(run).resolve())] = {"mean_sq_norm": sq.mean().item(), "median_sq_norm": sq.median().item()}
        print(f"{run}: mean ‖h‖² {sq.mean().item():.2f}, median {sq.median().item():.2f}", flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
