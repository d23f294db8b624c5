"""Time low-rank MbPA (adapted_log_probs_lowrank) against the naive per-query reference.

    python bench/mbpa_lowrank/run.py                 # the configurations below
    python bench/mbpa_lowrank/run.py --quick         # small smoke run

Setting: an LM-style softmax layer (V, d), an episodic memory of N random keys with random
labels, K neighbours per query from EpisodicMemory.knn, normalised kernel weights.  The
kNN search is timed separately (both paths need it).  Naive = naive_mbpa on an nn.Linear:
deep copy + torch.optim.SGD + autograd, one query at a time.  Low-rank is run in the pool
layout (nb_index = the knn slots), with neighbour logits recomputed from W ("recompute")
or taken from the memory ("stored", as an LM evaluator that keeps each position's base
logits would).  When the naive path runs on a subset of the queries (--naive-max) its time
is scaled to all queries, and the printout says so.  Each low-rank variant runs three
times (alternating) and the median is used: the machine is shared, timings are noisy.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lmadapt.adapt import adapted_log_probs_lowrank, kernel_weights, naive_mbpa
from lmadapt.memory import EpisodicMemory


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def run(V, d, K, N, m, steps, naive_max, repeats=3, alpha=0.15, beta=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(d, V)
    with torch.no_grad():  # logits of a plausible scale (std ~ 1)
        lin.weight.copy_(torch.randn(V, d, generator=g) / d**0.5)
        lin.bias.copy_(torch.randn(V, generator=g) * 0.1)
    W, b = lin.weight.detach(), lin.bias.detach()
    mem = EpisodicMemory(N, d, extras={"logits": ((V,), torch.float32)})
    keys = torch.randn(N, d, generator=g)
    with torch.no_grad():
        mem.add(keys, torch.randint(0, V, (N,), generator=g), logits=F.linear(keys, W, b))
    q = torch.randn(m, d, generator=g)

    (sq, idx, valid), t_knn = _timed(lambda: mem.knn(q, K))
    w = kernel_weights(sq, valid, eps=1e-3, normalise=True)
    kw = dict(alpha=alpha, steps=steps, beta=beta, nb_index=idx)
    rec, sto = [], []
    for _ in range(repeats):  # alternate the two variants; report the median of each
        low, t = _timed(lambda: adapted_log_probs_lowrank(q, mem.keys, mem.values, w, W, b, **kw))
        rec.append(t)
        low2, t = _timed(
            lambda: adapted_log_probs_lowrank(q, mem.keys, mem.values, w, W, b, nb_logits=mem.extra("logits"), **kw)
        )
        sto.append(t)
    t_rec, t_sto = statistics.median(rec), statistics.median(sto)
    n = min(m, naive_max)
    with torch.no_grad():
        ref, t_naive = _timed(
            lambda: naive_mbpa(lin, q[:n], mem.gather_keys(idx[:n]), mem.gather_values(idx[:n]), w[:n],
                               steps=steps, lr=alpha, beta=beta)
        )
    t_naive_all = t_naive * m / n
    err = max((low[:n].exp() - ref.exp()).abs().max().item(), (low2[:n].exp() - ref.exp()).abs().max().item())
    scaled = "" if n == m else f" (measured on {n} queries, scaled x{m / n:g})"
    print(f"V={V} d={d} K={K} N={N} queries={m} T={steps} beta={beta}")
    print(f"  knn (exact, torch)            {t_knn:8.2f} s   (not in the comparison)")
    print(f"  naive reference               {t_naive_all:8.2f} s   {1e3 * t_naive / n:7.1f} ms/query{scaled}")
    for name, t, ts in (("recomputed", t_rec, rec), ("stored    ", t_sto, sto)):
        print(f"  low-rank, logits {name}   {t:8.2f} s   {1e3 * t / m:7.1f} ms/query   "
              f"speed-up x{t_naive_all / t:.1f}   (runs: {', '.join(f'{x:.2f}' for x in ts)} s)")
    print(f"  max |p_lowrank - p_naive|     {err:.2e}  (float32)", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--naive-max", type=int, default=None, help="cap on queries timed with the naive path")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.quick:
        run(V=2000, d=64, K=32, N=500, m=100, steps=1, naive_max=args.naive_max or 100)
        run(V=2000, d=64, K=32, N=500, m=100, steps=5, naive_max=args.naive_max or 20, beta=0.01)
        return
    cap = args.naive_max
    run(V=10_000, d=256, K=256, N=5000, m=1000, steps=1, naive_max=cap or 1000)
    run(V=33_278, d=400, K=256, N=5000, m=200, steps=1, naive_max=cap or 200)
    run(V=10_000, d=256, K=256, N=5000, m=100, steps=5, naive_max=cap or 40, beta=0.01)


if __name__ == "__main__":
    main()
