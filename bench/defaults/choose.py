"""Pick each method's default from the sweeps of several models: the setting (and λ) whose
largest shortfall from any model's own best setting (in points of relative gain on valid)
is smallest; ties go to the best mean gain.

    python bench/defaults/choose.py bench/defaults/results/sweep-*.json --out bench/defaults/results/choice.json

Also written per method: each model's own best setting (what the full grid finds), the
paper preset, the current defaults, and the chosen setting, each as Δ% on every model's
valid prefix.

With --columns (each sweep's saved per-token columns, in the sweeps' order) it also picks
the λ of each method inside a mixture (--mixtures, default mbpa+cache) jointly: each method
keeps its own chosen setting, and the λ tuple is the one whose largest shortfall from each
model's own best mixture (every setting and λ of the sweep, as the full grid would find)
is smallest. Alone, each method's λ is tuned for that method alone; mixed, the weights
share the probability mass taken from the base model, so their best values differ.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path


def candidates(sweep: dict, method: str) -> dict[tuple[str, float | None], float]:
    """(setting key, λ) -> Δ% on this model's valid prefix."""
    out = {}
    base = sweep["base_ppl"]
    for key, row in sweep["methods"].get(method, {}).items():
        if "ppl_by_lambda" in row:
            for lam, ppl in row["ppl_by_lambda"].items():
                out[(key, float(lam))] = 100 * (ppl / base - 1)
        else:
            out[(key, None)] = 100 * (row["ppl"] / base - 1)
    return out


def key_of(setting: dict) -> str:
    return ",".join(f"{k}={setting[k]}" for k in sorted(setting))


def mixture_candidates(sweep: dict, columns: dict, names: list[str]) -> dict[tuple, float]:
    """((setting key, ...), (λ, ...)) -> Δ% of the mixture on this model's valid prefix, for every
    stored setting of each method and every λ tuple of the sweep with Σλ ≤ 1, from the per-token
    columns (no model pass). Mixed in probability space in float64, all λ tuples of one
    setting tuple at once: p = p_base + Σ_i λ_i a_i (p_i − p_base), as lmadapt.mix does in log space."""
    import numpy as np

    base = columns["base"].double().numpy()
    p_base = np.exp(base)
    base_nll = -base.mean()
    lams = np.array([t for t in itertools.product(sweep["lambdas"], repeat=len(names)) if sum(t) <= 1 + 1e-9])
    pools = [[k.split(":", 1)[1] for k in columns if k.startswith(f"{n}:")] for n in names]
    diffs = {}
    for n, pool in zip(names, pools):
        for k in pool:
            log_p, avail = columns[f"{n}:{k}"]
            diffs[(n, k)] = avail.double().numpy() * (np.exp(log_p.double().numpy()) - p_base)
    out = {}
    for keys in itertools.product(*pools):
        d = np.stack([diffs[(n, k)] for n, k in zip(names, keys)])  # (methods, tokens)
        nll = -np.log(p_base[None, :] + lams @ d).mean(axis=1)       # (λ tuples,)
        for t, v in zip(lams, nll):
            out[(keys, tuple(float(x) for x in t))] = 100 * (np.exp(v - base_nll) - 1)
    return out


def choose_mixture(mixture: str, sweeps: list[dict], column_files: list[str], methods: dict) -> dict:
    """Joint λ for `mixture` at each method's chosen setting, by the largest shortfall from every
    model's own best mixture; also the row each method's λ-alone default gives, for comparison."""
    import torch

    names = mixture.split("+")
    chosen = {n: methods[n]["chosen"]["setting"] for n in names}
    alone = tuple(methods[n]["chosen"]["lambda"] for n in names)
    keys = tuple(chosen[n] for n in names)
    fulls, own = [], []
    for sweep, path in zip(sweeps, column_files):
        full = mixture_candidates(sweep, torch.load(path, weights_only=True), names)
        fulls.append(full)
        b = min(full, key=full.get)
        own.append({"settings": dict(zip(names, b[0])), "lambdas": dict(zip(names, b[1])), "delta_percent": full[b]})
        print(f"{mixture} {sweep['model']}: own best {full[b]:+.2f}% {b}", flush=True)
    models = [s["model"] for s in sweeps]
    common = set.intersection(*(set(f) for f in fulls))
    regret = {c: max(f[c] - o["delta_percent"] for f, o in zip(fulls, own)) for c in common}
    mean = {c: sum(f[c] for f in fulls) / len(fulls) for c in common}
    order = lambda c: (round(regret[c], 6), mean[c])  # noqa: E731  (as for single methods)
    pick = min((c for c in common if c[0] == keys), key=order)
    # The same choice with each method's setting free too (a mixture-specific setting): what
    # the per-method settings cost the mixture.
    free = min(common, key=order)

    def row(c):
        return {"settings": dict(zip(names, c[0])), "lambdas": dict(zip(names, c[1])),
                "mean_delta_percent": mean.get(c), "max_shortfall_points": regret.get(c),
                "delta_percent": {m: f.get(c) for m, f in zip(models, fulls)}}

    print(f"{mixture}: chosen λ {dict(zip(names, pick[1]))} shortfall {regret[pick]:.2f} (each method's own λ "
          f"{dict(zip(names, alone))}: shortfall {regret.get((keys, alone), float('nan')):.2f})", flush=True)
    print(f"{mixture}: with free settings {row(free)['settings']} λ {row(free)['lambdas']} shortfall "
          f"{regret[free]:.2f}", flush=True)
    return {"settings": chosen, "chosen": row(pick), "lambdas_alone": row((keys, alone)), "free_settings": row(free),
            "own_best": dict(zip(models, own))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweeps", nargs="+")
    ap.add_argument("--columns", nargs="*", default=[], help="each sweep's --columns file, in the same order")
    ap.add_argument("--mixtures", default="mbpa+cache", help="comma-separated mixtures to choose joint λ for")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.columns and len(args.columns) != len(args.sweeps):
        ap.error("--columns needs one file per sweep")
    from lmadapt.methods import REGISTRY

    sweeps = [json.loads(Path(p).read_text()) for p in args.sweeps]
    models = [s["model"] for s in sweeps]
    report = {"models": models, "sources": args.sweeps, "methods": {}}
    methods = sorted({m for s in sweeps for m in s["methods"]})
    for method in methods:
        per_model = [candidates(s, method) for s in sweeps]
        common = set.intersection(*(set(c) for c in per_model))
        if not common:
            continue
        mean = {c: sum(pm[c] for pm in per_model) / len(per_model) for c in common}
        # The default should lose little against what tuning would find on *every* model:
        # choose by the largest shortfall from each model's own best (then by the mean gain).
        best = [min(pm.values()) for pm in per_model]
        regret = {c: max(pm[c] - b for pm, b in zip(per_model, best)) for c in common}
        chosen = min(common, key=lambda c: (round(regret[c], 6), mean[c]))
        cls = REGISTRY[method]
        grid_keys = list(cls.grid_for({}))
        defaults = key_of({k: getattr(cls.Params(), k) for k in grid_keys})
        paper = dict(cls.PRESETS.get("paper", {}))
        paper_lam = paper.pop("lambda", None)
        paper_key = key_of({k: paper.get(k, getattr(cls.Params(), k)) for k in grid_keys}) if paper else None

        def row(c):
            return {"setting": c[0], "lambda": c[1], "mean_delta_percent": mean.get(c),
                    "max_shortfall_points": regret.get(c),
                    "delta_percent": {m: pm.get(c) for m, pm in zip(models, per_model)}}

        entry = {"chosen": row(chosen),
                 "own_best": {m: {"setting": (b := min(pm, key=pm.get))[0], "lambda": b[1], "delta_percent": pm[b]}
                              for m, pm in zip(models, per_model)},
                 "settings_tried": len({c[0] for c in common})}
        if paper_key is not None:
            entry["paper"] = row((paper_key, paper_lam))
        entry["top"] = [row(c) for c in sorted(common, key=lambda c: (round(regret[c], 6), mean[c]))[:10]]
        report["methods"][method] = entry
        print(f"{method}: chosen {chosen[0]} λ={chosen[1]} mean {mean[chosen]:+.2f}% shortfall {regret[chosen]:.2f} "
              + " ".join(f"{m} {pm[chosen]:+.2f}% (own best {min(pm.values()):+.2f}%)" for m, pm in zip(models, per_model)))
    if args.columns:
        report["column_sources"] = args.columns
        report["mixtures"] = {}
        for mixture in args.mixtures.split(","):
            report["mixtures"][mixture] = choose_mixture(mixture, sweeps, args.columns, report["methods"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
