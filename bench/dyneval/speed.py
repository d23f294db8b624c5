"""Dynamic evaluation's speed against its floor (and, optionally, the reference code), in one run.

    python bench/dyneval/speed.py RUN_DIR --split test --tokens 4000 --segments 5,20 --threads 1 \
        [--reference /path/outside/the/repo/port.py] --json bench/dyneval/results/speed.json

The floor at segment length L is what any dynamic evaluation must do per token: the
forward and backward of one L-token segment at batch size 1 and one fused pass over the
adapted weights (w -= c * g, one foreach op), timed on the same tokens.  Against it:

* dyneval's stream loop alone (the statistics already known),
* the gradient-statistics pass (cold, over the training split at the method's batch size,
  or its first --max-batches batches), and loading it from the run directory's cache,
* throughput including the statistics: tokens / (statistics + stream), cold and cached,
* dyneval+cache and dyneval+mbpa+cache at L = the first of --segments (tokens/s, wall),
* the reference code, when --reference names a port of benkrause/dynamic-evaluation's
  dynamiceval.py that loads an lmadapt run (it is never part of this repository): run as a
  subprocess at the same settings, its statistics and evaluation times read from its
  --json output (keys stat_seconds, eval_seconds).

Floor and method are timed alternately in one process so that load from other processes
hits both alike.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dyneval_common import add_stream_arguments, load_stream
from lmadapt.evaluate import build_methods
from lmadapt.methods import dyneval as dyn
from lmadapt.mix import perplexity
from lmadapt.model import detach_state
from lmadapt.stream import stream_eval


def floor_seconds(model, stream, L: int) -> float:
    """Forward + backward of each L-token segment at batch 1 and one fused weight pass."""
    model = copy.deepcopy(model).eval()
    model.sparse_embedding_grad = True  # the cheapest forward+backward the model offers
    params = dyn.select_parameters(model, "all")
    for p in params:
        p.requires_grad_(True)
    n = stream.numel() - 1
    state = model.init_state(1)
    start = time.perf_counter()
    for s in range(0, n, L):
        e = min(s + L, n)
        x, y = stream[s:e], stream[s + 1:e + 1]
        _, logits, new_state = model(x.unsqueeze(0), state)
        loss = -F.log_softmax(logits[0].float(), -1).gather(1, y.unsqueeze(1)).mean()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            torch._foreach_add_(params, list(grads), alpha=-1e-12)
        state = detach_state(new_state)
    return time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_stream_arguments(ap, split="test", tokens=4000)
    ap.add_argument("--segments", default="5,20")
    ap.add_argument("--max-batches", type=int, default=0, help="statistics batches (0: the whole training split)")
    ap.add_argument("--reference", help="a port of the reference dynamiceval.py (outside this repository)")
    ap.add_argument("--repeats", type=int, default=2, help="floor/method timings, alternated (the fastest counts)")
    ap.add_argument("--no-mixtures", action="store_true")
    args = ap.parse_args(argv)
    model, corpus, stream, out_path, head = load_stream(args)
    n = stream.numel() - 1
    report = {**head, "max_batches": args.max_batches, "segments": {}}

    def save():
        out_path.write_text(json.dumps(report, indent=1) + "\n")

    segments = [int(v) for v in args.segments.split(",")]
    for L in segments:
        settings = {"segment": L, "max_batches": args.max_batches,
                    "lr": dyn.DynEvalParams().lr * L / 5, "decay": dyn.DynEvalParams().decay * L / 5}
        row = {"settings": settings}
        # the statistics, cold (no cache read, nothing stored)
        method = build_methods(["dyneval"], {"dyneval": settings})[0]
        stat_model = copy.deepcopy(model)  # as the method's own copy: sparse embedding gradients
        stat_model.sparse_embedding_grad = True
        params = dyn.select_parameters(stat_model, "all")
        for p in params:
            p.requires_grad_(True)
        t0 = time.perf_counter()
        rms = dyn.gradient_rms(stat_model, params, corpus.train, L, method.params.stat_batch, args.max_batches)
        row["statistics_seconds"] = time.perf_counter() - t0
        # cached: write them where the method looks, then time a start that reads them
        with tempfile.TemporaryDirectory() as cache:
            method.model, method.adapted = stat_model, params
            key = method._cache_key(corpus.train, params)
            dyn._store(Path(cache) / f"dyneval-stats-{key}.pt", rms)
            del rms
            floors, streams, ppl = [], [], None
            for _ in range(args.repeats):  # alternate floor and method; keep the faster of each
                floors.append(floor_seconds(model, stream, L))
                dyn._RECENT.clear()
                m = build_methods(["dyneval"], {"dyneval": settings})[0]
                t0 = time.perf_counter()
                r = stream_eval(model, stream, [m], {}, corpus=corpus, cache_dir=cache)
                wall = time.perf_counter() - t0
                assert m.stats_source == "cache"
                streams.append((r.seconds, wall - r.seconds))
                ppl = perplexity(r.base)
        floor = min(floors)
        stream_s, start_s = min(streams)
        row.update({
            "floor_seconds": floor, "floor_tokens_per_second": n / floor,
            "dyneval_ppl": ppl, "stream_seconds": stream_s, "start_seconds_cached": start_s,
            "stream_tokens_per_second": n / stream_s,
            "ratio_stream_to_floor": floor / stream_s,
            "ratio_to_floor_cached": floor / (stream_s + start_s),
            "ratio_to_floor_cold": floor / (stream_s + row["statistics_seconds"]),
        })
        if args.reference:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "ref.json"
                cmd = [sys.executable, args.reference, "--run", args.run_dir, "--tokens", str(args.tokens),
                       "--bptt", str(L), "--lr", str(settings["lr"]), "--lamb", str(settings["decay"]),
                       "--threads", str(args.threads), "--json", str(out)]
                if args.split == "valid":
                    cmd.append("--val")
                if args.max_batches:
                    cmd += ["--max_batches", str(args.max_batches)]
                # the port imports lmadapt as this process does (installed, or an inherited PYTHONPATH)
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                ref = json.loads(out.read_text())
            row["reference"] = {"ppl": ref["ppl"], "stat_seconds": ref["stat_seconds"],
                                "eval_seconds": ref["eval_seconds"]}
            row["speedup_vs_reference_stream"] = ref["eval_seconds"] / stream_s
            row["speedup_vs_reference_cold"] = (ref["eval_seconds"] + ref["stat_seconds"]) / (
                stream_s + row["statistics_seconds"])
        report["segments"][str(L)] = row
        print(json.dumps({L: row}, indent=1), flush=True)
        save()

    if not args.no_mixtures:
        L = segments[0]
        settings = report["segments"][str(L)]["settings"]
        # one cache window and one MbPA memory, as when these rows were recorded (the defaults
        # now choose among several online)
        single = {"cache": {"window": 500, "theta": 0.1, "select": False}, "mbpa": {"select": False}}
        mixtures = {"dyneval": ({}, {}), "dyneval+cache": ({"cache": single["cache"]}, {"cache": 0.15}),
                    "dyneval+mbpa+cache": (single, {"cache": 0.15, "mbpa": 0.1})}
        report["mixtures"] = {}
        for combo, (extra, lambdas) in mixtures.items():
            names = combo.split("+")
            methods = build_methods(names, {"dyneval": settings, **extra})
            t0 = time.perf_counter()
            r = stream_eval(model, stream, methods, lambdas, corpus=corpus, cache_dir=args.run_dir)
            wall = time.perf_counter() - t0
            report["mixtures"][combo] = {"ppl": perplexity(r.mixed), "stream_seconds": r.seconds,
                                         "wall_seconds": wall, "tokens_per_second": n / r.seconds,
                                         "statistics": methods[0].stats_source, "lambdas": lambdas}
            print(combo, report["mixtures"][combo], flush=True)
            save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
