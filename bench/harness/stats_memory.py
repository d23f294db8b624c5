"""Peak resident memory of dynamic evaluation's statistics pass through the harness's wrappers.

    python bench/harness/stats_memory.py RUN MODE STEPS [--old-recorder]

MODE: plain (the backbone, as `lmadapt eval` runs the pass), windows (lm-eval's rolling
windows, lmadapt.harness.WindowedContext) or recorder (windows inside the greedy-choice
recorder, as the harness runs it). Runs STEPS batches of the pass (batch 100, L 5) over the
run's training split at one thread and prints the RSS before and after and the peak (ru_maxrss).
--old-recorder restores the recorder that recorded at every batch size. Run each case in a
fresh process: the peak is per process. LMADAPT_MALLOC_DEFAULTS=1 leaves malloc alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from lmadapt import harness
from lmadapt.evaluate import load_for_eval
from lmadapt.methods.dyneval import gradient_rms, select_parameters


def _old_forward(self, tokens, state=None, compute_logits=True):
    hidden, logits, state = self.inner(tokens, state, compute_logits)
    if logits is not None:
        self.sink.append(logits.detach()[0].argmax(-1))
    return hidden, logits, state


def rss_mb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 // 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("mode", choices=["plain", "windows", "recorder"])
    ap.add_argument("steps", type=int)
    ap.add_argument("--old-recorder", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.old_recorder:
        harness._GreedyRecorder.forward = _old_forward
    model, corpus, _ = load_for_eval(a.run, device="cpu")
    m = model
    if a.mode != "plain":
        m = harness.WindowedContext(model, 2048, [(0, 1000)])
    if a.mode == "recorder":
        m = harness._GreedyRecorder(m, harness._Sink())
    every = select_parameters(m, "all")
    for q in every:
        q.requires_grad_(True)
    before, t = rss_mb(), time.perf_counter()
    gradient_rms(m, every, corpus.train, 5, 100, max_batches=a.steps)
    print(json.dumps({"mode": a.mode, "steps": a.steps, "old_recorder": a.old_recorder, "rss_before_mb": before,
                      "rss_after_mb": rss_mb(), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                      "seconds": round(time.perf_counter() - t, 1)}))


if __name__ == "__main__":
    main()
