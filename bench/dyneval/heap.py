"""Dynamic evaluation's statistics pass with and without lmadapt.heap.reuse_freed_memory(),
alternating, each pass in a fresh process (restoring malloc's settings freezes glibc's
self-adjusting mmap threshold, so a later pass in the same process would not see glibc's
pristine behaviour), one thread: wall, user and system CPU, minor page faults.

    python bench/dyneval/heap.py RUN --batches 100 --repeats 2 --json bench/dyneval/results/heap-wt2-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from lmadapt import runs
from lmadapt.checkpoint import load_model
from lmadapt.corpus import Vocab, load_corpus
from lmadapt.methods import dyneval


def timed(model, params, train, batches: int) -> dict:
    r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    rms = dyneval.gradient_rms(model, params, train, 5, 100, batches)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"reuse_freed_memory": os.environ.get("LMADAPT_MALLOC_DEFAULTS") != "1", "wall_s": time.perf_counter() - t, "user_s": r1.ru_utime - r0.ru_utime,
            "sys_s": r1.ru_stime - r0.ru_stime, "minor_faults": r1.ru_minflt - r0.ru_minflt,
            "rms_checksum": float(sum(r.double().sum() for r in rms))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", required=True)
    ap.add_argument("--one", choices=["default", "reuse"], help=argparse.SUPPRESS)  # a child's single pass
    a = ap.parse_args()
    if a.one:
        torch.set_num_threads(1)
        model, cfg, _ = load_model(a.run)
        vocab = Vocab.from_dict(runs.read_json(runs.require_run_dir(a.run) / runs.VOCAB))
        train = load_corpus(cfg.data.name, cfg.data.data_dir, tokenizer=cfg.data.tokenizer, vocab=vocab).train
        params = dyneval.select_parameters(model, "all")
        for q in params:
            q.requires_grad_(True)
        print(json.dumps(timed(model, params, train, a.batches)))
        return
    rows = []
    for _ in range(a.repeats):
        for mode in ("default", "reuse"):
            cmd = [sys.executable, __file__, a.run, "--batches", str(a.batches), "--json", a.json, "--one", mode]
            env = dict(os.environ, LMADAPT_MALLOC_DEFAULTS="0" if mode == "reuse" else "1")  # as `lmadapt` reads it
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    mean = {r: sum(x["wall_s"] for x in rows if x["reuse_freed_memory"] == r) / a.repeats for r in (False, True)}
    out = {"run": a.run, "batches": a.batches, "stat_batch": 100, "segment": 5, "threads": 1,
           "tokens_per_batch": 500, "rows": rows, "mean_wall_s": {"default": mean[False], "reuse": mean[True]},
           "speedup": mean[False] / mean[True]}
    runs.write_json(a.json, out)
    print(f"default {mean[False]:.1f} s, reuse {mean[True]:.1f} s: {out['speedup']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
