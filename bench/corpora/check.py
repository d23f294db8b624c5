#!/usr/bin/env python
"""Check lmadapt.corpus against the real PTB and WikiText-2 files.

Usage: python bench/corpora/check.py [DATA_ROOT] [--spm]

DATA_ROOT holds ptb/ and wikitext-2/ (default: ../shared/data from the repository
root). For each corpus this loads it from the files, prints the train/valid/test
token counts, vocabulary size and load time and compares them with the published
numbers; then it rebuilds the same splits as Hugging Face hub rows look (wikitext:
one row per line with its trailing newline, "" for a blank line; ptb_text_only:
the stripped line), loads those through the `datasets` parquet loader via the
module's hub code path and checks that the token ids are identical. It also times
the hub availability check (it must fail fast when offline). With --spm it also
times training an 8000-piece sentencepiece model on WikiText-2 train.
Exit status 1 if any check fails.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmadapt import corpus as C

ROOT = Path(__file__).resolve().parents[2]  # the repository root

EXPECTED = {
    "ptb": ((929_589, 73_760, 82_430), 10_000),
    "wikitext-2": ((2_088_628, 217_646, 245_569), 33_278),
}
HUB_STYLE = {
    # how each hub dataset stores a line of the original file
    "wikitext-2": lambda line: line + "\n" if line.strip() else "",
    "ptb": lambda line: line.strip(),
}


def hub_style_check(name: str, files: dict[str, Path], reference: C.Corpus, tmp: Path) -> bool:
    import datasets

    datasets.disable_progress_bars()
    to_row = HUB_STYLE[name]
    hub_files = {}
    for ours, theirs in (("train", "train"), ("valid", "validation"), ("test", "test")):
        rows = [to_row(line) for line in C.read_lines(files[ours])]
        hub_files[theirs] = str(tmp / f"{name}-{theirs}.parquet")
        datasets.Dataset.from_dict({"col": rows}).to_parquet(hub_files[theirs])
    saved_sources, saved_check = dict(C._HUB_SOURCES), C.hub_unavailable_reason
    C._HUB_SOURCES[name] = C.HubSource(
        label="hub-style parquet",
        attempts=({"path": "parquet", "data_files": hub_files, "cache_dir": str(tmp / "cache")},),
        column="col",
        splits={"train": "train", "valid": "validation", "test": "test"},
    )
    C.hub_unavailable_reason = lambda timeout=None: None
    try:
        t = time.perf_counter()
        via_hub = C.load_corpus(name)  # no data_dir, no LMADAPT_DATA: goes to the (stubbed) hub
        dt = time.perf_counter() - t
    finally:
        C._HUB_SOURCES.clear()
        C._HUB_SOURCES.update(saved_sources)
        C.hub_unavailable_reason = saved_check
    same = via_hub.vocab == reference.vocab and all(
        torch.equal(via_hub.split(s), reference.split(s)) for s in C.SPLITS
    )
    print(f"  hub-style rows through datasets: {'identical ids' if same else 'MISMATCH'} ({dt:.2f}s)")
    return same


def main(argv: list[str]) -> int:
    args = [a for a in argv[1:] if not a.startswith("--")]
    root = Path(args[0]) if args else ROOT.parent / "shared" / "data"
    ok = True
    os.environ.pop("LMADAPT_DATA", None)
    with tempfile.TemporaryDirectory() as tmpdir:
        for name, (sizes, vocab_size) in EXPECTED.items():
            t = time.perf_counter()
            c = C.load_corpus(name, data_dir=str(root))
            dt = time.perf_counter() - t
            got = (c.train.numel(), c.valid.numel(), c.test.numel())
            good = got == sizes and len(c.vocab) == vocab_size
            ok &= good
            print(
                f"{name}: train/valid/test = {got[0]:,} / {got[1]:,} / {got[2]:,} tokens, "
                f"vocab {len(c.vocab):,}, unk id {c.vocab.unk}, eos id {c.vocab.eos}, "
                f"loaded in {dt:.2f}s -> {'OK' if good else f'FAIL (expected {sizes}, vocab {vocab_size})'}"
            )
            files, _ = C._find_in_dir(root, name)
            ok &= hub_style_check(name, files, c, Path(tmpdir))

    t = time.perf_counter()
    reason = C.hub_unavailable_reason()
    print(f"hub check: {reason or 'reachable'} ({time.perf_counter() - t:.2f}s)")
    with tempfile.TemporaryDirectory() as empty:
        t = time.perf_counter()
        try:
            C.load_corpus("ptb", data_dir=empty)
        except C.LmadaptError as e:
            print(f"not-found error after {time.perf_counter() - t:.2f}s: {e}")

    if "--spm" in argv:
        t = time.perf_counter()
        c = C.load_corpus("wikitext-2", data_dir=str(root), tokenizer="sentencepiece", spm_vocab_size=8000)
        print(
            f"wikitext-2 sentencepiece: vocab {len(c.vocab):,}, train/valid/test = {c.train.numel():,} / "
            f"{c.valid.numel():,} / {c.test.numel():,} pieces, model {len(c.spm_model):,} bytes, "
            f"{time.perf_counter() - t:.1f}s"
        )
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
