"""What ablation.py and speed.py share: which run, which split prefix, where the JSON goes.

Imported as a sibling module (Python puts a script's own folder first on sys.path)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lmadapt.evaluate import load_for_eval


def add_stream_arguments(ap: argparse.ArgumentParser, split: str, tokens: int) -> None:
    """RUN_DIR, --split, --tokens, --threads and --json, with this script's defaults."""
    ap.add_argument("run_dir")
    ap.add_argument("--split", default=split, choices=["valid", "test"])
    ap.add_argument("--tokens", type=int, default=tokens, help="scored tokens from the split's start (0: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", required=True, help="the report, rewritten after every finished row")


def load_stream(args: argparse.Namespace):
    """(model, corpus, stream, json path, report head) for the parsed arguments.

    The stream is the split's first --tokens targets plus the token before them; the
    JSON's folder is created now so that a long run cannot fail at its first save."""
    torch.set_num_threads(args.threads)
    model, corpus, _ = load_for_eval(args.run_dir)
    stream = corpus.split(args.split)
    if args.tokens:
        stream = stream[: args.tokens + 1]
    out_path = Path(args.json)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    head = {"run_dir": args.run_dir, "split": args.split, "tokens": stream.numel() - 1,
            "threads": args.threads, "command": " ".join(sys.argv)}
    return model, corpus, stream, out_path, head
