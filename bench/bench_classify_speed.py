"""Queries/s of the classifier MbPA path (exact span form, plain steps) on MNIST-sized shapes.

    python bench/bench_classify_speed.py [--threads 2]

A 784-100-100-10 MLP, K = 32, random memories of 2,000 and 20,000 entries (100 and 1,000
per task after 20 permuted-MNIST tasks), 2,000 queries, T = 0 (search only), 1, 5, 10.
"""

import argparse
import time

import torch

from lmadapt.classify.models import MLPConfig, build
from lmadapt.classify.predict import ClassifierMbPA, predict
from lmadapt.memory import EpisodicMemory
from lmadapt.params import arg, at_least

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=arg(int, at_least(1)), default=2)
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)
net = build(MLPConfig(784, (100, 100), 10)).eval()
for n_mem in (2000, 20000):
    mem = EpisodicMemory(n_mem, 784)
    mem.add(torch.rand(n_mem, 784), torch.randint(0, 10, (n_mem,)))
    q = torch.rand(2000, 784)
    for steps in (0, 1, 5, 10):
        cfg = ClassifierMbPA(k=32, alpha=0.1, steps=steps)
        t = time.time()
        predict(net, mem, q, "mbpa", cfg)
        print(f"memory {n_mem} T={steps}: {2000 / (time.time() - t):.0f} queries/s", flush=True)
