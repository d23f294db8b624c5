"""Successive-halving schedules for dyneval's grid, replayed exactly from per-token columns.

    python bench/tune_speed/halving_sim.py RUN_DIR --tokens 5000 --test-tokens 20000 --threads 1 \
        --out bench/tune_speed/results/halving-sim-RUN.json

Dynamic evaluation is causal, so a rung that runs a setting on valid[:n] scores exactly the
first n tokens of the same setting's pass over valid[:N]. One pass per setting of the grid
on valid[:tokens] (the per-token log-probabilities kept) therefore replays any halving
schedule without the model: which setting each schedule keeps at every rung, which it
chooses, what that costs in tokens, and where the full grid's choice ranked on each
prefix. `tune(search="halving")` runs once too, to check the replay chooses as it does.
Then each distinct choice (and the defaults) is scored on test[:test-tokens]. A setting counts as
diverged on a prefix as `lmadapt tune` counts it: not finite, or twice the plain model's
perplexity at the prefix's end (tune checks that after every segment past a quarter of
the prefix, so it can stop a setting this replay still counts).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from lmadapt.evaluate import build_methods, load_for_eval
from lmadapt.mix import perplexity
from lmadapt.runs import write_json
from lmadapt.stream import stream_eval
from lmadapt.tune import DIVERGED, MIN_RUNG_TOKENS, _settings, tune


def rungs_for(n_settings: int, tokens: int, eta: int, min_tokens: int = MIN_RUNG_TOKENS) -> list[tuple[int, int]]:
    """lmadapt.tune.halving_rungs with `eta` as a parameter (eta 3 is what tune runs)."""
    sizes = [n_settings]
    while sizes[-1] > eta:
        sizes.append(math.ceil(sizes[-1] / eta))
    last = len(sizes) - 1
    return [(n, max(min(tokens, min_tokens), tokens // eta ** (last - i))) for i, n in enumerate(sizes)]


def prefix_ppl(column: torch.Tensor, plain: torch.Tensor, n: int) -> float | None:
    """The setting's perplexity on the first n tokens, None where tune would call it diverged."""
    ppl = perplexity(column[:n])
    base = perplexity(plain[:n])
    if not math.isfinite(ppl) or ppl > DIVERGED * base:
        return None
    return ppl


def replay(columns: list[torch.Tensor], plain: torch.Tensor, rungs: list[tuple[int, int]],
           forced: int | None = None) -> dict:
    """Run a halving schedule over stored columns; `forced`: a setting index kept into the
    last rung whatever it scores (the defaults)."""
    survivors = list(range(len(columns)))
    history = []
    for i, (_, n) in enumerate(rungs):
        scored = [(p, j) for j in survivors if (p := prefix_ppl(columns[j], plain, n)) is not None]
        scored.sort()
        keep = rungs[i + 1][0] if i + 1 < len(rungs) else 1
        survivors = [j for _, j in scored[:keep]]
        if forced is not None and i + 2 == len(rungs) and forced not in survivors:
            survivors.append(forced)
        history.append({"tokens": n, "ran": len(scored), "kept": survivors[:]})
    return {"choice": survivors[0], "rungs": history, "cost_tokens": sum(h["ran"] * h["tokens"] for h in history)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--tokens", type=int, default=5000)
    ap.add_argument("--test-tokens", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, corpus, _ = load_for_eval(args.run_dir)
    common = {"corpus": corpus, "cache_dir": args.run_dir}
    settings = _settings("dyneval", {}, {})
    defaults = build_methods(["dyneval"], {})[0].params
    default_index = next((i for i, s in enumerate(settings)
                          if s["lr"] == defaults.lr and s["decay"] == defaults.decay), None)
    valid = corpus.split("valid")[:args.tokens + 1]
    stream_eval(model, valid[:3], build_methods(["dyneval"], {}), {}, **common)  # statistics, cached
    plain = stream_eval(model, valid, [], {}, **common).base
    t0 = time.perf_counter()
    columns = []
    for k, s in enumerate(settings):
        columns.append(stream_eval(model, valid, build_methods(["dyneval"], {"dyneval": s}), {}, **common).base)
        print(f"{k + 1}/{len(settings)} {s} {perplexity(columns[-1]):.2f}", flush=True)
    grid_seconds = time.perf_counter() - t0

    n = len(settings)
    full = [(p, j) for j in range(n) if (p := prefix_ppl(columns[j], plain, args.tokens)) is not None]
    grid_choice = min(full)[1]
    schedules = {"grid": None,
                 "halving eta 3 (tune's)": rungs_for(n, args.tokens, 3),
                 "halving eta 3, defaults kept to the last rung": rungs_for(n, args.tokens, 3),
                 "halving eta 2": rungs_for(n, args.tokens, 2)}
    report = {"run_dir": str(Path(args.run_dir).resolve()), "command": " ".join(sys.argv), "tokens": args.tokens,
              "test_tokens": args.test_tokens, "threads": args.threads, "grid_seconds": grid_seconds,
              "settings": settings, "defaults_index": default_index, "valid_base_ppl": perplexity(plain),
              "valid_ppl": [prefix_ppl(c, plain, args.tokens) for c in columns], "schedules": {}}
    # Where the full grid's choice ranks on each prefix the schedules use (1 = best).
    ranks = {}
    for length in sorted({t for r in schedules.values() if r for _, t in r}):
        order = sorted((p, j) for j in range(n) if (p := prefix_ppl(columns[j], plain, length)) is not None)
        ranks[length] = next(i + 1 for i, (_, j) in enumerate(order) if j == grid_choice)
    report["grid_choice_rank_by_prefix"] = ranks

    for label, rungs in schedules.items():
        if rungs is None:
            entry = {"choice": grid_choice, "cost_tokens": n * args.tokens, "rungs": None}
        else:
            forced = default_index if "defaults kept" in label else None
            entry = replay(columns, plain, rungs, forced)
        entry["setting"] = settings[entry["choice"]]
        entry["valid_ppl"] = prefix_ppl(columns[entry["choice"]], plain, args.tokens)
        entry["cost_passes"] = entry["cost_tokens"] / args.tokens
        report["schedules"][label] = entry
        print(label, json.dumps({k: v for k, v in entry.items() if k != "rungs"}), flush=True)

    # The replay's claim checked once against the real thing: tune's own halving search.
    real = tune(model, corpus, "dyneval", tokens=args.tokens, search="halving", cache_dir=args.run_dir)
    replayed = report["schedules"]["halving eta 3 (tune's)"]["setting"]
    diffs = []   # each rung's perplexity as tune measured it against the same prefix of the stored column
    for trial in real["top"]:   # tune reports its 20 best trials
        if "tokens" in trial and trial["ppl"] is not None:
            j = settings.index({k: trial["params"]["dyneval"][k] for k in settings[0]})
            diffs.append(abs(perplexity(columns[j][:trial["tokens"]]) / trial["ppl"] - 1))
    report["tune_halving_check"] = {"tune_chose": real["params"]["dyneval"], "tune_valid_ppl": real["ppl"],
                                    "replay_agrees": all(real["params"]["dyneval"][k] == v for k, v in replayed.items()),
                                    "rung_trials_compared": len(diffs), "max_relative_difference": max(diffs)}
    print("check", json.dumps(report["tune_halving_check"]), flush=True)

    test = corpus.split("test")[:args.test_tokens + 1]
    test_plain = stream_eval(model, test, [], {}, **common)
    report["test_base_ppl"] = base = perplexity(test_plain.base)
    report["test"] = {}
    for j in sorted({e["choice"] for e in report["schedules"].values()} | ({default_index} - {None})):
        r = stream_eval(model, test, build_methods(["dyneval"], {"dyneval": settings[j]}), {}, **common)
        ppl = perplexity(r.base)
        report["test"][str(j)] = {**settings[j], "ppl": ppl, "delta_percent": 100 * (ppl / base - 1)}
        print("test", json.dumps(report["test"][str(j)]), flush=True)
    write_json(Path(args.out), report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
