"""WikiText-2 test through lm-evaluation-harness: `--model lmadapt` for methods x scopes
(and lm-eval's own `--model hf` on the run's hf/ export for GPT-2 runs), one
`lmadapt harness` process per row, wall time measured around it.

    python bench/harness/run.py RUN --text /work/shared/data/wikitext-2/wiki.test.tokens \
        --out bench/harness/results/wt2-gpt2 --methods none,cache --scopes document,stream

Writes OUT/ROW/results_*.json (lm-eval's output) and OUT/summary.md; prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def run_row(out: Path, model: str, model_args: str, text: str, task: str, threads: int,
            device: str = "cpu") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "lmadapt", "harness", "--task-file", text, "--model", model,
           "--model_args", model_args, "--tasks", task, "--device", device, "--output_path", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    start = time.perf_counter()
    with open(out / "log.txt", "w") as log:  # written as it runs: an interrupted row keeps its progress
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {out / 'log.txt'}")
    (result,) = out.rglob("results_*.json")
    res = json.loads(result.read_text())["results"][task]
    return {"model": model, "model_args": model_args, "task": task, "wall_s": round(seconds, 1),
            "word_perplexity": res["word_perplexity,none"], "bits_per_byte": res["bits_per_byte,none"],
            "command": " ".join(cmd)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--text", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--task", default="lmadapt_wikitext_local_tokenized")
    ap.add_argument("--methods", default="none,cache,mbpa+cache,dyneval")
    ap.add_argument("--scopes", default="document,stream")
    ap.add_argument("--extra", default="", help="more model_args for every lmadapt row, e.g. threads=1")
    ap.add_argument("--stock", action="store_true", help="also lm-eval's --model hf on RUN/hf")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="lm-eval's --device, which both models use (e.g. cuda)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows OUT/rows.json already holds and run only the missing ones")
    a = ap.parse_args()
    out = Path(a.out)
    done = {}
    if a.resume and (out / "rows.json").exists():
        done = {(r["model"], r["model_args"]): r for r in json.loads((out / "rows.json").read_text())}
    elif out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not empty (--resume continues it)")
    plan = [("hf", f"pretrained={Path(a.run) / 'hf'}", out / "hf")] if a.stock else []
    for method in a.methods.split(","):
        for scope in a.scopes.split(","):
            args = f"run={a.run},method={method},scope={scope}" + (f",{a.extra}" if a.extra else "")
            plan.append(("lmadapt", args, out / f"{method}-{scope}"))
    rows = []
    for model, args, row_dir in plan:
        if (model, args) in done:
            rows.append(done[(model, args)])
            continue
        if row_dir.exists():  # an interrupted row: its partial output is not a result
            shutil.rmtree(row_dir)
        rows.append(run_row(row_dir, model, args, a.text, a.task, a.threads, a.device))
        print(rows[-1], flush=True)
        write_summary(out, rows)  # after every row: an interrupted benchmark keeps what it measured
    print((out / "summary.md").read_text())


def write_summary(out: Path, rows: list[dict]) -> None:
    lines = ["| model | model_args | word_perplexity | bits_per_byte | wall s |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | `{r['model_args']}` | {r['word_perplexity']:.4f} | {r['bits_per_byte']:.4f} | "
              f"{r['wall_s']} |" for r in rows]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "rows.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
