"""Training throughput of recipes' models: tokens/s of full training steps on real batches.

    python bench/train_speed/run.py ptb-cpu ptb-gpt2-cpu --steps 12 --threads 1 --out bench/train_speed/results/recipes.json

Each recipe's model (through lmadapt.backbones), optimizer, batch size, bptt and amp
setting, on its corpus's first training batches, as lmadapt.train.fit steps them
(forward, loss, backward, clip, step; the LSTM carries its state). The first two
steps are warm-up and not timed. Only the step time: not validation, not checkpoints.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lmadapt import backbones, runs
from lmadapt.config import load_recipe
from lmadapt.corpus import load_corpus
from lmadapt.model import count_parameters
from lmadapt.train import _make_optimizer, autocast, batchify


def measure(recipe: str, data_dir: str, steps: int) -> dict:
    cfg = load_recipe(recipe)
    corpus = load_corpus(cfg.data.name, data_dir, tokenizer=cfg.data.tokenizer, spm_vocab_size=cfg.data.spm_vocab_size)
    cfg.model.vocab_size = len(corpus.vocab)
    torch.manual_seed(0)
    model = backbones.build(cfg.model).train()
    t = cfg.train
    optimizer = _make_optimizer(cfg, model.parameters(), asgd=False)
    columns = batchify(corpus.train, t.batch_size)
    state = model.init_state(t.batch_size) if model.train_carries_state else None
    device = torch.device("cpu")
    timed, tokens = 0.0, 0
    for step in range(steps + 2):
        i = step * t.bptt
        x, y = columns[:, i:i + t.bptt], columns[:, i + 1:i + 1 + t.bptt]
        start = time.perf_counter()
        state = model.detach_state(state) if model.train_carries_state else None
        with autocast(device, t.amp):
            _, logits, state = model(x, state)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if t.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip)
        optimizer.step()
        if step >= 2:
            timed += time.perf_counter() - start
            tokens += y.numel()
    return {"recipe": recipe, "arch": cfg.model.arch, "parameters": count_parameters(model),
            "batch": f"{t.batch_size}x{t.bptt}", "amp": t.amp, "steps_timed": steps,
            "tokens_per_second": tokens / timed, "max_minutes": t.max_minutes,
            "tokens_in_budget": tokens / timed * 60 * t.max_minutes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="+")
    ap.add_argument("--data-dir", default="/work/shared/data")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for recipe in args.recipes:
        row = measure(recipe, args.data_dir, args.steps)
        rows.append(row)
        print(f"{recipe:14s} {row['arch']:5s} {row['parameters']:>10,} params  {row['batch']:7s} amp {row['amp']:4s} "
              f"{row['tokens_per_second']:7.0f} tokens/s  -> {row['tokens_in_budget'] / 1e6:.1f}M tokens "
              f"in {row['max_minutes']:g} min")
    if args.out:
        runs.write_json(Path(args.out), {"threads": args.threads, "rows": rows, "command": " ".join(sys.argv)})


if __name__ == "__main__":
    main()
