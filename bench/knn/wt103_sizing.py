"""What a WikiText-103 datastore (103M keys) needs with this code, scaled from a measured build.

Reads bench/knn/results/build-TAG.json (written by bench/knn/run.py --stages build) and
writes bench/knn/results/wt103-sizing-TAG.json. Sizes follow exactly from the storage
format (float16 keys, int32 values, M-byte PQ codes + 8-byte ids); times are the measured
per-key rates scaled:

  embed   measured seconds per position (same model size), x 103M, / processes
  train   coarse k-means dominates: cost ∝ training points x NLIST (64 points per list)
  add     between "per-key cost independent of NLIST" (low) and "∝ NLIST" (high: coarse
          assignment dominating)

  python bench/knn/wt103_sizing.py --tag ptb [--keys 103227021]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmadapt import datastore, runs

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tag", default="ptb")
    ap.add_argument("--keys", type=int, default=103_227_021, help="WikiText-103 training tokens")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 8, 64])
    args = ap.parse_args()
    res = Path(args.results)
    build = json.loads((res / f"build-{args.tag}.json").read_text())["builds"]
    pq, flat = build["ivfpq"], build["flat"]
    n0, d = pq["keys"], pq["dim"]
    spec0 = datastore.IndexSpec("ivfpq", pq["index"]["nlist"], pq["index"]["m"])
    n = args.keys
    spec = datastore.choose_index(n, d)
    size = datastore.sizes(n, d, 0, spec)
    embed_per_key = min(pq["stage_seconds"]["embed"], flat["stage_seconds"]["embed"]) / n0
    train_scale = (spec.train_points(n) * spec.nlist) / (spec0.train_points(n0) * spec0.nlist)
    add_per_key = pq["stage_seconds"]["add"] / n0
    out = {
        "source": f"bench/knn/results/build-{args.tag}.json (one process, 1 thread, 2 shared cores)",
        "keys": n, "dim": d, "index": spec.describe(),
        "disk_bytes": size["disk"], "peak_disk_bytes": size["peak_disk"],
        "ram_build_bytes": size["build_ram"], "ram_eval_bytes": size["eval_ram"],
        "ram_eval_recompute_page_cache_bytes": size["keys"],
        "flat_eval_ram_bytes": 4 * n * d,
        "embed_seconds": {str(p): embed_per_key * n / p for p in args.processes},
        "train_seconds": pq["stage_seconds"]["train"] * train_scale,
        "add_seconds_low": add_per_key * n,
        "add_seconds_high": add_per_key * n * spec.nlist / spec0.nlist,
        "measured": {"keys": n0, "index": spec0.describe(), "embed_seconds_per_key": embed_per_key,
                     "train_seconds": pq["stage_seconds"]["train"], "add_seconds_per_key": add_per_key},
    }
    runs.write_json(res / f"wt103-sizing-{args.tag}.json", out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
