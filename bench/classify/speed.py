"""Queries/s of the classifier MbPA path (exact span form, plain steps) on MNIST-sized shapes.

    python bench/classify/speed.py [--threads 2] [--json bench/classify/results/speed.json]

A 784-100-100-10 MLP, K = 32, random memories of 2,000 and 20,000 entries (100 and 1,000
per task after 20 permuted-MNIST tasks), 2,000 queries, T = 0 (search only), 1, 5, 10.
"""

import argparse
import json
import os
import sys
import time

import torch

from lmadapt.classify.models import MLPConfig, build
from lmadapt.classify.predict import ClassifierMbPA, predict
from lmadapt.memory import EpisodicMemory


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    if args.json and os.path.exists(args.json):
        raise SystemExit(f"{args.json} exists (not overwritten)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = build(MLPConfig(784, (100, 100), 10)).eval()
    rows = []
    for n_mem in (2000, 20000):
        mem = EpisodicMemory(n_mem, 784)
        mem.add(torch.rand(n_mem, 784), torch.randint(0, 10, (n_mem,)))
        q = torch.rand(2000, 784)
        for steps in (0, 1, 5, 10):
            cfg = ClassifierMbPA(k=32, alpha=0.1, steps=steps)
            t = time.time()
            predict(net, mem, q, "mbpa", cfg)
            rows.append({"memory": n_mem, "steps": steps, "queries_per_second": 2000 / (time.time() - t)})
            print(f"memory {n_mem} T={steps}: {rows[-1]['queries_per_second']:.0f} queries/s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "command": " ".join(sys.argv), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
