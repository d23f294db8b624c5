"""Dynamic evaluation's grid: every setting on the whole prefix against successive halving,
and what `eval --tune` picks within its budget, then each choice on test.

    python bench/tune_speed/halving.py RUN_DIR --tokens 5000 --test-tokens 20000 --minutes 3 \
        --threads 1 --out bench/tune_speed/results/halving-RUN.json

In one process, on valid[:tokens]: `tune(search="grid")` (36 passes of the reference's grid
and the low rates, plus the plain model), `tune(search="halving")` (the same settings, the
best third kept at each rung), and `tune_in_budget(minutes)` (what `lmadapt eval --tune`
runs: the longest valid prefix the budget holds, searched by halving). Then test[:test-tokens]
with each chosen setting and with the defaults. The statistics pass runs first (cached in
the run directory) and is not part of any search's time. Figures: wall seconds, chosen lr
and decay, valid perplexity on the same prefix, test perplexity and Δ against the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from lmadapt.evaluate import build_methods, load_for_eval
from lmadapt.mix import perplexity
from lmadapt.runs import write_json
from lmadapt.stream import stream_eval
from lmadapt.tune import tune, tune_in_budget


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--tokens", type=int, default=5000, help="valid prefix of the grid and halving searches")
    ap.add_argument("--test-tokens", type=int, default=20000)
    ap.add_argument("--minutes", type=float, default=3.0, help="eval --tune's budget (its default)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, corpus, _ = load_for_eval(args.run_dir)
    common = {"cache_dir": args.run_dir}
    report = {"run_dir": str(Path(args.run_dir).resolve()), "tokens": args.tokens, "test_tokens": args.test_tokens,
              "threads": args.threads, "minutes": args.minutes, "command": " ".join(sys.argv), "searches": {}}

    t0 = time.perf_counter()   # the statistics pass (or its cache), paid once for everything below
    stream_eval(model, corpus.split("valid")[:3], build_methods(["dyneval"], {}), {}, corpus=corpus, **common)
    report["statistics_seconds"] = time.perf_counter() - t0

    chosen = {"defaults": dataclasses.asdict(build_methods(["dyneval"], {})[0].params)}
    for label, run in (("grid", lambda: tune(model, corpus, "dyneval", tokens=args.tokens, search="grid", **common)),
                       ("halving", lambda: tune(model, corpus, "dyneval", tokens=args.tokens, search="halving",
                                            **common)),
                       ("eval --tune", lambda: tune_in_budget(model, corpus, "dyneval", minutes=args.minutes,
                                                              **common))):
        t0 = time.perf_counter()
        res = run()
        seconds = time.perf_counter() - t0
        if "fallback" in res:
            report["searches"][label] = {"seconds": seconds, "fallback": res["fallback"]}
            continue
        chosen[label] = res["params"]["dyneval"]
        report["searches"][label] = {"seconds": seconds, "valid_tokens": res["tokens"], "passes": res["passes"],
                                     "valid_ppl": res["ppl"], "valid_base_ppl": res["base_ppl"],
                                     "lr": chosen[label]["lr"], "decay": chosen[label]["decay"],
                                     "rungs": res.get("rungs"), "tuned_on": res.get("tuned_on")}
        print(label, json.dumps(report["searches"][label]), flush=True)

    test = corpus.split("test")[:args.test_tokens + 1]
    plain = stream_eval(model, test, [], {}, corpus=corpus, **common)
    report["test_base_ppl"] = base = perplexity(plain.base)
    report["test"] = {}
    for label, setting in chosen.items():
        r = stream_eval(model, test, build_methods(["dyneval"], {"dyneval": setting}), {}, corpus=corpus, **common)
        ppl = perplexity(r.base)
        report["test"][label] = {"lr": setting["lr"], "decay": setting["decay"], "ppl": ppl,
                                 "delta_percent": 100 * (ppl / base - 1), "tokens_per_second": r.tokens / r.seconds}
        print("test", label, json.dumps(report["test"][label]), flush=True)
    write_json(Path(args.out), report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
