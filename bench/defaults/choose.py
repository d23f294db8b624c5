"""Pick each method's default from the sweeps of several models: the setting (and λ) whose
largest shortfall from any model's own best setting (in points of relative gain on valid)
is smallest; ties go to the best mean gain.

    python bench/defaults/choose.py bench/defaults/results/sweep-*.json --out bench/defaults/results/choice.json

Also written per method: each model's own best setting (what the full grid finds), the
paper preset, the current defaults, and the chosen setting, each as Δ% on every model's
valid prefix, plus the columns-based best of mbpa+cache when the sweeps saved columns.
"""

from __future__ import annotations

import argparse
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweeps", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
