"""Tokens/s of the streaming evaluator per method, as ratios to plain LSTM evaluation.

    python bench/eval_speed/run.py /tmp/r/a                 # a trained run, its test split
    python bench/eval_speed/run.py                          # random ptb-cpu-sized LSTMLM (V=10000, 300/300, 2 layers)
    python bench/eval_speed/run.py --vocab 33278 --tokens 3000   # wt2-cpu-sized vocabulary
    python bench/eval_speed/run.py RUN --only lstm,mbpa --no-naive

One model and one token stream for every method: a run's split (via
lmadapt.evaluate.load_for_eval) or random tokens with repeats (Zipf draws, and copies of
earlier spans so the cache and MbPA have something to find).  Each method first runs on a
short warm-up prefix, then ``stream_eval`` is timed on ``--tokens`` tokens (its own
timer: the loop only, not dyneval's gradient statistics on training data).  Methods run
one after the other in this process, each in a forked child by default so the peak RSS
printed is that method's (resource.getrusage of the child; it includes the parent's
pages: model, corpus).  Then MbPA's low-rank path against adapt.naive_mbpa on the same
queries: the stream's memory is filled with N real (hidden, next word) entries and the
mbpa method object scores the next ``--naive-queries`` positions segment by segment,
exactly as in stream_eval, while naive_mbpa adapts a deep copy of the output layer with
torch.optim.SGD for each of those queries from the same neighbours.  kNN is timed
separately (both paths need the same search).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import sys
import time

import torch

from lmadapt.adapt import kernel_weights, naive_mbpa
from lmadapt.evaluate import build_methods, mixture_lambdas
from lmadapt.methods import EvalContext, Segment, parse_combination
from lmadapt.model import LMConfig, LSTMLM
from lmadapt.stream import stream_eval

DEFAULT_METHODS = ["lstm", "cache", "mbpa", "mbpa+cache", "dyneval", "dyneval+cache"]
# The paper's single MbPA memory and Grave et al.'s single cache: the settings this bench's
# speed figures were recorded at (the toolkit's defaults choose among several online).
MBPA = {"memory": 5000, "k": 256, "steps": 1, "select": False}
CACHE = {"window": 500, "select": False}


class _Corpus:
    """What dynamic evaluation reads from a corpus: the training split."""

    def __init__(self, train):
        self.train = train


def random_stream(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Zipf-distributed tokens; ~30% of positions continue a copy of an earlier span."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    zipf = torch.multinomial(1.0 / ranks**1.1, n, replacement=True, generator=g)
    out = zipf.clone()
    t = 50
    while t < n:
        if torch.rand((), generator=g) < 0.3:
            length = int(torch.randint(5, 40, (), generator=g))
            src = int(torch.randint(0, t - 20, (), generator=g))
            e = min(n, t + length)
            out[t:e] = out[src:src + e - t].clone()
            t = e
        else:
            t += int(torch.randint(5, 60, (), generator=g))
    return out


def load(args):
    if args.run:
        from lmadapt.evaluate import load_for_eval

        model, corpus, cfg = load_for_eval(args.run)
        stream = corpus.split(args.split)
        desc = (f"run {args.run}: V={model.vocab_size:,} d={model.feature_size} "
                f"layers={cfg.model.num_layers} hidden={cfg.model.hidden_size}; {args.split} split "
                f"({stream.numel():,} tokens)")
        return model, corpus, stream, desc
    torch.manual_seed(args.seed)
    cfg = LMConfig(vocab_size=args.vocab, emb_size=args.size, hidden_size=args.size, num_layers=2)
    model = LSTMLM(cfg).eval()
    with torch.no_grad():  # logits of a trained model's scale, not the near-uniform init
        model.decoder.weight.mul_(30)
    need = max(args.warmup, args.skip + args.tokens, MBPA["memory"] + args.naive_queries) + 2
    stream = random_stream(need, args.vocab, args.seed + 1)
    corpus = _Corpus(random_stream(30000, args.vocab, args.seed + 2))
    desc = (f"random LSTMLM: V={args.vocab:,} emb=hidden={args.size}, 2 layers; random stream with repeats "
            f"({stream.numel():,} tokens)")
    return model, corpus, stream, desc


def method_params(args) -> dict:
    from lmadapt.methods import REGISTRY

    # (a setting an older lmadapt lacks, e.g. `select` in a before/after comparison, is left out)
    params = {name: {k: v for k, v in d.items() if k in REGISTRY[name].param_names()}
              for name, d in (("mbpa", MBPA), ("cache", CACHE))}
    if args.dyneval_max_batches is not None:
        params["dyneval"] = {"max_batches": args.dyneval_max_batches}
    for spec in args.param:
        key, value = spec.split("=", 1)
        method, name = key.split(".", 1)
        params.setdefault(method, {})[name] = value
    return params


class _SegmentClock:
    """Stands in for the loop's progress bar (lmadapt.stream.tqdm), which it updates once per
    segment: records when each segment ended, so one run gives the time of its later part."""

    marks: list = []

    def __init__(self, *a, **kw):
        _SegmentClock.marks = [(time.perf_counter(), 0)]

    def update(self, n):
        t, done = _SegmentClock.marks[-1]
        _SegmentClock.marks.append((time.perf_counter(), done + n))

    def close(self):
        pass

    @classmethod
    def install(cls):
        import lmadapt.stream

        lmadapt.stream.tqdm = cls
        return cls

    @classmethod
    def since(cls, skip: int) -> tuple[float, int]:
        """(seconds, tokens) from the end of the first segment that reaches `skip` tokens."""
        start = next(m for m in cls.marks if m[1] >= skip)
        end = cls.marks[-1]
        return end[0] - start[0], end[1] - start[1]


def time_method(model, corpus, stream, combo, params, args) -> dict:
    names = parse_combination(combo) if combo != "lstm" else []
    lam = mixture_lambdas(names, {}) if names else {}

    def run(tokens):
        methods = build_methods(names, params)
        seg = {"segment_len": args.segment} if args.segment else {}
        return stream_eval(model, stream[: tokens + 1], methods, lam, corpus=corpus, **seg)

    run(args.warmup)
    if args.skip:  # steady state: the time of tokens [skip, skip + tokens) given a full history
        clock = _SegmentClock.install()
        r = run(args.skip + args.tokens)
        seconds, tokens = clock.since(args.skip)
    else:
        r = run(args.tokens)
        seconds, tokens = r.seconds, r.tokens
    nll = -float(r.mixed.mean()) if names else -float(r.base.mean())
    return {"method": combo, "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds,
            "ppl": math.exp(nll), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _child(conn, fn, *a):
    try:
        conn.send(fn(*a))
    except BaseException as exc:  # report, don't hang the parent
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    conn.close()


def isolated(fn, *a, fork: bool = True):
    if not fork:
        return fn(*a)
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child, fn, *a))
    p.start()
    child.close()
    out = parent.recv()
    p.join()
    if "error" in out:
        raise RuntimeError(out["error"])
    return out


def lowrank_vs_naive(model, stream, args) -> dict:
    """The mbpa method object (as stream_eval drives it) vs naive_mbpa on the same queries."""
    try:
        from lmadapt.stream import make_memory, memory_extras_of
    except ImportError:  # an older lmadapt (before/after comparisons): its memory kept the logits
        from lmadapt.memory import EpisodicMemory

        def make_memory(model, methods, L, device, index):
            V = model.vocab_size
            return EpisodicMemory(methods[0].memory_window() + L, model.feature_size,
                                  extras={"logits": ((V,), torch.float32)}, index=index)

        def memory_extras_of(methods):
            return lambda seg: {"logits": seg.logits}

    probe = build_methods(["mbpa"], {"mbpa": dict(MBPA)})[0]
    params = probe.params
    preferred = getattr(probe, "preferred_segment_len", lambda: None)()  # as stream_eval picks it
    n_mem, n_q, L = params.memory, args.naive_queries, args.segment or preferred or 128
    need = n_mem + n_q
    if stream.numel() < need + 1:
        raise SystemExit(f"the stream has {stream.numel()} tokens; the naive comparison needs {need + 1}")
    x, y = stream[:need], stream[1:need + 1]
    with torch.no_grad():
        hidden, logits, _ = model(x.unsqueeze(0))
    hidden, logits = hidden[0], logits[0].float()
    log_probs = torch.log_softmax(logits, -1)
    method = build_methods(["mbpa"], {"mbpa": dict(MBPA)})[0]
    memory = make_memory(model, [method], L, "cpu", "auto")
    method.start(EvalContext(model=model, corpus=None, memory=memory, device=torch.device("cpu"), segment_len=L))
    wanted = memory_extras_of([method])
    t_low = t_knn = t_naive = 0.0
    low_parts, naive_parts = [], []
    decoder = model.output_layer()
    for s in range(0, need, L):
        e = min(need, s + L)
        seg = Segment(positions=torch.arange(s, e), hidden=hidden[s:e], logits=logits[s:e],
                      log_probs=log_probs[s:e], targets=y[s:e])
        memory.add(seg.hidden, seg.targets, seg.positions, **wanted(seg))
        if e <= n_mem:
            continue
        rows = slice(max(s, n_mem) - s, e - s)
        seg = Segment(positions=seg.positions[rows], hidden=seg.hidden[rows], logits=seg.logits[rows],
                      log_probs=seg.log_probs[rows], targets=seg.targets[rows])
        with torch.no_grad():
            t = time.perf_counter()
            lp, _ = method.target_log_probs(seg)
            t_low += time.perf_counter() - t
            low_parts.append(lp)
            t = time.perf_counter()
            sq, idx, valid = memory.knn(seg.hidden, params.k, window=(seg.positions - params.memory, seg.positions))
            w = kernel_weights(sq, valid, params.eps, params.normalise)
            t_knn += time.perf_counter() - t
        t = time.perf_counter()
        for i in range(seg.hidden.shape[0]):
            ref = naive_mbpa(decoder, seg.hidden[i:i + 1], memory.gather_keys(idx[i:i + 1]),
                             memory.gather_values(idx[i:i + 1]), w[i:i + 1], steps=params.steps, lr=params.alpha,
                             beta=params.beta)
            naive_parts.append(ref[0, seg.targets[i]].detach())
        t_naive += time.perf_counter() - t
    low, naive = torch.cat(low_parts), torch.stack(naive_parts)
    return {"queries": low.numel(), "lowrank_s": t_low, "knn_s": t_knn, "naive_s": t_naive,
            "naive_plus_knn_s": t_naive + t_knn,
            "max_abs_p_diff": float((low.exp() - naive.exp()).abs().max()),
            "max_abs_logp_diff": float((low - naive).abs().max())}


def store_error(model, corpus, stream, args) -> list[dict]:
    """mbpa with a float16 / bfloat16 probability store against float32, on the same stream."""
    lam = mixture_lambdas(["mbpa"], {})
    n = args.skip + args.tokens
    out, ref = [], None
    for store in ("float32", "float16", "bfloat16"):
        methods = build_methods(["mbpa"], {"mbpa": {**MBPA, "store": store}})
        seg = {"segment_len": args.segment} if args.segment else {}
        r = stream_eval(model, stream[: n + 1], methods, lam, corpus=corpus, **seg)
        log_p = r.components["mbpa"][0]
        ref = log_p if ref is None else ref
        diff = (log_p - ref).abs()
        out.append({"store": store, "tok_s": r.tokens / r.seconds, "ppl": math.exp(-float(r.mixed.mean())),
                    "max_abs_logp_diff": float(diff.max()), "mean_abs_logp_diff": float(diff.mean()),
                    "max_abs_p_diff": float((log_p.exp() - ref.exp()).abs().max())})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", nargs="?", help="run directory (default: a random ptb-cpu-sized model)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--tokens", type=int, default=5000, help="timed tokens per method (default 5000)")
    ap.add_argument("--warmup", type=int, default=300, help="warm-up tokens per method before timing")
    ap.add_argument("--skip", type=int, default=0,
                    help="time tokens [SKIP, SKIP+TOKENS) instead of [0, TOKENS) (from the first segment end "
                         "at or after SKIP, in one stream_eval run): the steady state once SKIP >= the memory size")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=10000, help="random model: vocabulary (33278 mimics wt2-cpu)")
    ap.add_argument("--size", type=int, default=300, help="random model: embedding = hidden size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--segment", type=int, default=None, help="stream segment length (default: stream_eval's)")
    ap.add_argument("--only", default=",".join(DEFAULT_METHODS), help="comma-separated combinations to time")
    ap.add_argument("--param", action="append", default=[], metavar="METHOD.NAME=VALUE",
                    help="override a method setting, e.g. mbpa.store=bfloat16 (repeatable)")
    ap.add_argument("--dyneval-max-batches", type=int, default=None,
                    help="training batches for dyneval's gradient statistics (default: the method's, all)")
    ap.add_argument("--naive-queries", type=int, default=1000)
    ap.add_argument("--no-naive", action="store_true", help="skip the low-rank vs naive comparison")
    ap.add_argument("--no-fork", action="store_true", help="run every method in this process (RSS is cumulative)")
    ap.add_argument("--extrapolate", type=int, default=None, metavar="TOKENS",
                    help="also print the projected time of each method for a stream of this many tokens")
    ap.add_argument("--store-error", action="store_true",
                    help="also run mbpa with float16 / bfloat16 probability stores and report their error")
    ap.add_argument("--json", default=None, help="write the figures to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, corpus, stream, desc = load(args)
    if stream.numel() < args.skip + args.tokens + 1:
        raise SystemExit(f"the stream has only {stream.numel()} tokens")
    params = method_params(args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print(desc)
    window = f"tokens [{args.skip:,}, {args.skip + args.tokens:,})" if args.skip else f"the first {args.tokens:,} tokens"
    print(f"settings: {json.dumps(params)}; timed: {window} of the stream, per method, after {args.warmup} warm-up")
    rows = []
    print(f"{'method':<16}{'tokens/s':>10}{'x lstm':>8}{'seconds':>9}{'ppl':>10}{'peak RSS MB':>13}", flush=True)
    for combo in args.only.split(","):
        r = isolated(time_method, model, corpus, stream, combo, params, args, fork=not args.no_fork)
        rows.append(r)
        base = next((x["tok_s"] for x in rows if x["method"] == "lstm"), None)
        ratio = f"{r['tok_s'] / base:8.3f}" if base else f"{'-':>8}"
        print(f"{combo:<16}{r['tok_s']:10.0f}{ratio}{r['seconds']:9.2f}{r['ppl']:10.2f}{r['peak_rss_mb']:13.0f}",
              flush=True)
    out = {"description": desc, "threads": args.threads, "methods": rows}
    if args.extrapolate:
        print(f"projected time for {args.extrapolate:,} tokens (linear in tokens):")
        for r in rows:
            print(f"  {r['method']:<16}{args.extrapolate / r['tok_s'] / 60:8.1f} min")
    if not args.no_naive:
        c = lowrank_vs_naive(model, stream, args)
        out["naive"] = c
        print(f"MbPA (K={MBPA['k']}, N={MBPA['memory']}, T={MBPA['steps']}) on {c['queries']} stream queries "
              f"after a full memory:")
        print(f"  low-rank (mbpa method, incl. its kNN)  {c['lowrank_s']:8.2f} s")
        print(f"  naive_mbpa + the same kNN             {c['naive_plus_knn_s']:8.2f} s   "
              f"(kNN alone {c['knn_s']:.2f} s)")
        print(f"  speed-up x{c['naive_plus_knn_s'] / c['lowrank_s']:.1f}   "
              f"(adaptation only, naive / (low-rank - kNN): x{c['naive_s'] / max(c['lowrank_s'] - c['knn_s'], 1e-9):.1f})")
        print(f"  max |p - p_naive| {c['max_abs_p_diff']:.2e}, max |log p - log p_naive| "
              f"{c['max_abs_logp_diff']:.2e} (float32)")
    if args.store_error:
        rows = store_error(model, corpus, stream, args)
        out["store_error"] = rows
        print(f"mbpa probability store on the first {args.skip + args.tokens:,} tokens, vs float32 "
              f"(p and log p of the mbpa component at each target):")
        for r in rows:
            print(f"  {r['store']:<9} {r['tok_s']:7.0f} tok/s  ppl(lstm+mbpa) {r['ppl']:.4f}  max |dlog p| "
                  f"{r['max_abs_logp_diff']:.1e}  mean |dlog p| {r['mean_abs_logp_diff']:.1e}  max |dp| "
                  f"{r['max_abs_p_diff']:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
