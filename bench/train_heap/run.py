"""`lmadapt train` with and without lmadapt.heap.reuse_freed_memory() (LMADAPT_MALLOC_DEFAULTS=1
switches it off), alternating, each a fresh process: training tokens/s from results.json,
and the whole command's wall, user and system CPU and minor page faults (its final valid
and test evaluation included).

    python bench/train_heap/run.py --recipe wt2-cpu --data-dir ../shared/data --steps 40 --repeats 2 \\
        --work /tmp/train_heap --json bench/train_heap/results/wt2-cpu.json
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

from lmadapt import runs


def one(a, reuse: bool, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, LMADAPT_MALLOC_DEFAULTS="0" if reuse else "1")
    cmd = [sys.executable, "-m", "lmadapt", "train", "--recipe", a.recipe, "--data-dir", a.data_dir, "--threads", "1",
           "--set", f"train.max_steps={a.steps}", "--set", "train.eval_interval=0", "--out", str(out)]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(cmd)} failed")
    res = json.loads((out / "results.json").read_text())
    return {"reuse_freed_memory": reuse, "wall_s": time.perf_counter() - t, "user_s": usage.ru_utime,
            "sys_s": usage.ru_stime, "minor_faults": usage.ru_minflt, "peak_rss_mb": usage.ru_maxrss / 1024,
            "train_tokens_per_second": res.get("tokens_per_second"), "valid_ppl": res.get("valid_ppl"),
            "test_ppl": res.get("test_ppl")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="wt2-cpu")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", required=True)
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    rows = []
    for _ in range(a.repeats):
        for reuse in (False, True):
            rows.append(one(a, reuse, Path(a.work) / ("reuse" if reuse else "default")))
            print(json.dumps(rows[-1]), flush=True)
    runs.write_json(Path(a.json), {"recipe": a.recipe, "steps": a.steps, "threads": 1, "rows": rows})


if __name__ == "__main__":
    main()
