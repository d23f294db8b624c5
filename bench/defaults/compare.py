"""The paper preset, the shipped defaults, `eval --tune` and the full grid, side by side on test.

    python bench/defaults/compare.py RUN_DIR --name ptb-lstm --sweep bench/defaults/results/sweep-ptb-lstm.json \
        --columns COLUMNS.pt --tokens 20000 --threads 1 --out bench/defaults/results/compare-ptb-lstm.json

For each of cache, mbpa, dyneval and mbpa+cache, `lmadapt eval --split test --tokens N` with
(a) `--preset paper`, (b) the defaults, (c) `--tune` at its default budget, (d) `--config` of
the best single setting of the full grid on valid (bench/defaults/sweep.py's file for this model;
for mbpa+cache the joint best over the sweep's stored per-token columns and λ pairs, as
`lmadapt tune` chooses). Each row: test perplexity, Δ% vs the base model, wall seconds; and
the plain evaluation's wall time, for the `--tune` cost bound.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

COMBOS = ["cache", "mbpa", "dyneval", "mbpa+cache"]


def single(params: dict) -> bool:
    """A setting of one fixed configuration: not the cache's online selection (its default,
    which selects among the grid's own kind of settings), so that the grid row is the best
    fixed setting the defaults are held against."""
    return not params.get("select", False)


def joint_best(sweep: dict, columns: dict, names: list[str]) -> tuple[dict, dict, float]:
    """The best (settings, λ) of a mixture from per-token columns: tune's sweep, off-line."""
    from lmadapt.mix import mix_log_probs, perplexity

    base = columns["base"]
    pools = [[(k.split(":", 1)[1], v) for k, v in columns.items() if k.startswith(f"{n}:")
              and single(sweep["methods"][n][k.split(":", 1)[1]]["params"])] for n in names]
    lambdas = sweep["lambdas"]
    best = (float("inf"), None, None)
    for picks in itertools.product(*pools):
        comps = {n: tuple(p[1]) for n, p in zip(names, picks)}
        for lams in itertools.product(lambdas, repeat=len(names)):
            if sum(lams) > 1:
                continue
            ppl = perplexity(mix_log_probs(base, comps, dict(zip(names, lams))))
            if ppl < best[0]:
                best = (ppl, {n: p[0] for n, p in zip(names, picks)}, dict(zip(names, lams)))
    return ({n: sweep["methods"][n][k]["params"] for n, k in best[1].items()}, best[2], best[0])


def own_best(sweep: dict, name: str) -> tuple[dict, dict]:
    rows = sweep["methods"][name]
    row = min((r for r in rows.values() if single(r["params"])), key=lambda r: r["ppl"])
    return {name: row["params"]}, ({name: row["best_lambda"]} if "best_lambda" in row else {})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--name", required=True)
    ap.add_argument("--sweep", required=True)
    ap.add_argument("--columns", help="the sweep's --columns file (for the mbpa+cache full-grid row)")
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--combos", default=",".join(COMBOS))
    ap.add_argument("--variants", default="defaults,paper,tune,grid", help="which of the four rows to run")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    import torch

    from lmadapt.cli import main as lmadapt
    from lmadapt.methods import REGISTRY

    sweep = json.loads(Path(args.sweep).read_text())
    columns = torch.load(args.columns, weights_only=True) if args.columns else None
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.is_file() else {}
    report.update({"model": args.name, "run_dir": str(Path(args.run_dir).resolve()), "split": "test",
                   "tokens": args.tokens, "threads": args.threads})
    # every invocation that wrote into this file, in order (a rerun adds settings or rows)
    report.setdefault("commands", [report.pop("command")] if "command" in report else []).append(" ".join(sys.argv))
    rows = report.setdefault("rows", {})

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")

    tmp = Path(tempfile.mkdtemp())

    def run(label: str, extra: list[str]) -> dict:
        js = tmp / f"{label.replace('+', '_').replace(' ', '_')}.json"
        t0 = time.perf_counter()
        code = lmadapt(["eval", args.run_dir, "--split", "test", "--tokens", str(args.tokens), "--threads",
                        str(args.threads), "--json", str(js), "--overwrite", *extra])
        wall = time.perf_counter() - t0
        if code != 0:
            raise SystemExit(f"{label}: lmadapt eval exited {code}")
        return {"report": json.loads(js.read_text()), "wall_seconds": wall}

    if "plain" not in report:
        r = run("plain", [])
        report["plain"] = {"ppl": r["report"]["methods"]["base"]["ppl"], "wall_seconds": r["wall_seconds"]}
        save()
    for combo in args.combos.split(","):
        names = combo.split("+")
        variants = {"defaults": [], "paper": ["--preset", "paper"], "tune": ["--tune"]}
        if len(names) == 1:
            params, lambdas = own_best(sweep, combo)
            key = ",".join(f"{k}={params[combo][k]}" for k in sorted(params[combo]))
            report.setdefault("grid_valid", {})[combo] = {
                "key": key, "lambdas": lambdas, "ppl": sweep["methods"][combo][key]["ppl"],
                "delta_percent": sweep["methods"][combo][key]["delta_percent"]}
        elif columns is not None:
            params, lambdas, valid_ppl = joint_best(sweep, columns, names)
            report.setdefault("joint_valid_ppl", {})[combo] = valid_ppl
        else:
            params = None
        if params is not None:
            cfg = tmp / f"{combo}-grid.json"
            cfg.write_text(json.dumps({"method": combo, "params": params, "lambdas": lambdas}))
            variants["grid"] = ["--config", str(cfg)]
        for variant, extra in variants.items():
            label = f"{combo} {variant}"
            if label in rows or variant not in args.variants.split(","):
                continue
            if variant == "paper" and not any("paper" in getattr(REGISTRY[n], "PRESETS", {}) for n in names):
                # No paper preset for these methods: `--preset paper` runs the defaults again.
                rows[label] = {**rows[f"{combo} defaults"], "variant": variant, "same_as": "defaults"}
                save()
                continue
            r = run(label, ["--method", combo, *extra] if variant != "grid" else extra)
            e = r["report"]["methods"][combo]
            rows[label] = {"combo": combo, "variant": variant, "ppl": e["ppl"],
                           "delta_percent": e["delta_vs_base_percent"], "wall_seconds": r["wall_seconds"],
                           "params": r["report"].get("params"), "lambdas": r["report"].get("lambdas"),
                           "settings": r["report"].get("settings"),
                           **({"summary": e["summary"]} if "summary" in e else {})}
            print(f"{args.name} {label}: {e['ppl']:.2f} ({e['delta_vs_base_percent']:+.2f}%) "
                  f"{r['wall_seconds']:.0f} s", flush=True)
            save()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
