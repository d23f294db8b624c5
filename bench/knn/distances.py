"""How far a model's kNN neighbours are: the scale a kNN temperature must match.

    python bench/knn/distances.py RUN DATASTORE [--tokens 2048] --out bench/knn/results/distances-NAME.json

Embeds the first --tokens positions of the valid split (the datastore's key kind), searches
each for its k = 1024 nearest keys (faiss distances, nprobe 32, as `knn` does by default)
and reports the queries' mean squared norm and the mean over queries of the 1st, 16th and
1024th neighbour's squared distance and of the mean over all k (what the scaled temperature
multiplies by its c).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from lmadapt.datastore import open_datastore
from lmadapt.evaluate import load_for_eval


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("datastore")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, corpus, _ = load_for_eval(args.run_dir)
    store = open_datastore(args.datastore, threads=1)
    stream = corpus.split("valid")[:args.tokens + 1]
    if store.key_kind != "output":
        model.record_keys(store.key_kind)
    state, queries = model.init_state(1), []
    with torch.no_grad():
        for s in range(0, args.tokens, 128):
            hidden, _, state = model(stream[s:min(s + 128, args.tokens)].unsqueeze(0), state)
            queries.append((model.recorded_keys[0] if store.key_kind != "output" else hidden[0]).float())
    q = torch.cat(queries)
    d, _ = store.search(q, args.k, nprobe=args.nprobe, recompute=False)
    d = d.float()
    report = {"run_dir": str(Path(args.run_dir).resolve()), "datastore": str(Path(args.datastore).resolve()),
              "key": store.key_kind, "tokens": int(q.shape[0]), "k": args.k, "nprobe": args.nprobe,
              "query_mean_squared_norm": float((q ** 2).sum(1).mean()),
              "distance_1st": float(d[:, 0].mean()), "distance_16th": float(d[:, 15].mean()),
              "distance_kth": float(d[:, -1].mean()), "distance_mean_over_k": float(d.mean(1).mean()),
              "command": " ".join(sys.argv)}
    print(json.dumps(report, indent=1))
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
