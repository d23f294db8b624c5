"""Probability mass a trained LM gives each frequency bucket, against that bucket's share of the targets.

    python bench/hebbian/bucket_mass.py RUN_DIR [RUN_DIR ...] --data-dir ../shared/data [--split valid] \
        [--json OUT.json]

A diagnostic for output-layer methods that move rare-word rows (the Hebbian softmax):
if the rows of rare words are pulled toward the mean activation, their logits rise in
every context and the model moves probability mass from frequent to rare words. The
buckets are the ones `lmadapt report` uses (5 equal-token buckets of the split's targets
ordered by train frequency; bucket 1 = most frequent), so the figures line up with its
per-bucket perplexities. Each run is read with its own vocabulary; runs of one recipe
share it, so their buckets are the same.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from lmadapt import runs
from lmadapt.errors import LmadaptError
from lmadapt.evaluate import load_for_eval
from lmadapt.report import frequency_buckets
from lmadapt.train import batchify


def type_buckets(targets: torch.Tensor, train_counts: torch.Tensor, buckets: int) -> torch.Tensor:
    """Bucket of every vocabulary type: types absent from the targets go by train count."""
    token_bucket = frequency_buckets(targets, train_counts, buckets)
    # lowest train count seen in each bucket; a type joins the first bucket whose floor it reaches
    floors = torch.stack([train_counts[targets[token_bucket == b]].min() for b in range(buckets)])
    kinds = torch.searchsorted(-floors, -train_counts).clamp(max=buckets - 1)
    # types that tie on train count across a bucket edge are the only ones that can disagree
    agree = (kinds[targets] == token_bucket).float().mean().item()
    if agree < 0.99:
        raise LmadaptError(f"type buckets agree with the report's token buckets on only {agree:.1%} of targets")
    return kinds


@torch.no_grad()
def bucket_mass(model, stream: torch.Tensor, type_bucket: torch.Tensor, buckets: int, rows: int = 16,
                bptt: int = 70) -> torch.Tensor:
    """Mean over positions of Σ_{w in bucket b} p(w | context), shape (buckets,).

    The stream is cut into `rows` parallel rows (as the trainer's validation does), so the
    state of a row starts empty once; the mass figures are about the output layer, not
    about long-range context."""
    model.eval()
    inputs = batchify(stream[:-1], rows)  # the inputs of every position that has a target
    onehot = torch.nn.functional.one_hot(type_bucket, buckets).float()  # (V, B)
    total, count, state = torch.zeros(buckets), 0, None
    for start in range(0, inputs.size(1), bptt):
        _, logits, state = model(inputs[:, start:start + bptt], state)
        total += (logits.softmax(-1) @ onehot).sum((0, 1))
        count += logits.shape[0] * logits.shape[1]
    return total / count


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", default="valid")
    p.add_argument("--buckets", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the figures here (the shape mass_from_log.py gives a recorded printout)")
    a = p.parse_args(argv)
    if a.json and Path(a.json).exists():
        print(f"bucket_mass: error: {a.json} exists (not overwritten)", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    out = {}
    try:
        for run in a.runs:
            model, corpus, _ = load_for_eval(run, data_dir=a.data_dir)
            stream = corpus.split(a.split)
            counts = corpus.train_counts()
            kinds = type_buckets(stream[1:], counts, a.buckets)
            share = torch.bincount(kinds[stream[1:]], minlength=a.buckets).float() / (stream.numel() - 1)
            mass = bucket_mass(model, stream, kinds, a.buckets)
            out[run] = {"mass": mass.tolist(), "target_share": share.tolist()}
    except LmadaptError as e:
        print(f"bucket_mass: error: {e}", file=sys.stderr)
        return 2
    print(f"mean probability mass per frequency bucket on {a.split} (bucket 1 = most frequent); "
          f"'targets' = the bucket's share of the split's target tokens")
    print("| run | " + " | ".join(f"bucket {b + 1}" for b in range(a.buckets)) + " |")
    print("|---|" + "---|" * a.buckets)
    first = next(iter(out.values()))
    print("| targets | " + " | ".join(f"{s:.4f}" for s in first["target_share"]) + " |")
    for run, r in out.items():
        print(f"| {run} | " + " | ".join(f"{m:.4f}" for m in r["mass"]) + " |")
    print(json.dumps(out))
    if a.json:
        runs.write_json(Path(a.json), {"split": a.split, "buckets": a.buckets, "runs": out,
                                       "command": " ".join(sys.argv)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
