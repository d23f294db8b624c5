"""Dynamic-evaluation settings on the first N tokens of a split of a trained run.

    python bench/dyneval/ablation.py RUN_DIR --split valid --tokens 20000 --threads 1 \
        --setting "" --setting "adapt=lstm" --setting "segment=20,lr=2e-4,decay=0.008" \
        --json bench/dyneval/results/ablation.json

Each --setting is a comma-separated list of dyneval parameters over the defaults ("" is
the default rule); the plain model is scored once on the same tokens.  Optional
--mix "cache:window=500,theta=0.1:0.1" adds mixture methods (name:params:lambda) to every
setting.  The gradient statistics are cached in RUN_DIR, so settings sharing L (and the
batch settings) pay for the statistics pass once.  Results are appended as they come, so an
interrupted run keeps its finished rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from dyneval_common import add_stream_arguments, load_stream
from lmadapt.evaluate import build_methods
from lmadapt.methods import combination_name, parse_combination
from lmadapt.mix import perplexity
from lmadapt.stream import stream_eval


def parse_setting(text: str) -> dict:
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--setting items are KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_stream_arguments(ap, split="valid", tokens=20000)
    ap.add_argument("--setting", action="append", default=None, help="dyneval params, e.g. lr=1e-4,decay=0.004")
    ap.add_argument("--mix", action="append", default=[], help="NAME:k=v,k=v:LAMBDA mixture added to each setting")
    ap.add_argument("--no-cache", action="store_true", help="do not read or write cached statistics")
    args = ap.parse_args(argv)
    model, corpus, stream, out_path, head = load_stream(args)
    report = {**head, "rows": []}
    plain = stream_eval(model, stream, [], {}, corpus=corpus)
    report["lstm_ppl"] = perplexity(plain.base)
    print(f"lstm: {report['lstm_ppl']:.2f}", flush=True)
    mixes = []
    for spec in args.mix:
        name, params, lam = spec.split(":")
        mixes.append((name, parse_setting(params), float(lam)))
    for text in args.setting or [""]:
        setting = parse_setting(text)
        names = parse_combination("+".join(["dyneval"] + [m[0] for m in mixes]))
        params = {"dyneval": setting, **{m[0]: m[1] for m in mixes}}
        methods = build_methods(names, params)
        lambdas = {m[0]: m[2] for m in mixes}
        t0 = time.perf_counter()
        r = stream_eval(model, stream, methods, lambdas, corpus=corpus,
                        cache_dir=None if args.no_cache else args.run_dir)
        total = time.perf_counter() - t0
        dyn = methods[0]
        row = {"method": combination_name(names), "setting": text,
               "params": {m.name: dataclasses.asdict(m.params) for m in methods}, "lambdas": lambdas,
               "ppl": perplexity(r.mixed), "dyneval_only_ppl": perplexity(r.base),
               "delta_vs_lstm_percent": 100 * (perplexity(r.mixed) / report["lstm_ppl"] - 1),
               "stream_seconds": r.seconds, "total_seconds": total, "stats_source": dyn.stats_source,
               "tokens_per_second": r.tokens / r.seconds}
        report["rows"].append(row)
        print(f"{row['method']} [{text or 'defaults'}]: {row['ppl']:.2f} ({row['delta_vs_lstm_percent']:+.1f}%), "
              f"stream {r.seconds:.0f}s, total {total:.0f}s, statistics {dyn.stats_source}", flush=True)
        out_path.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
