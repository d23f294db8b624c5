#!/usr/bin/env python
"""Regenerate the bundled sample corpus ``lmadapt/sample/`` from WikiText-2.

The sample is, for each split, the leading run of whole WikiText-2 (v1, tokenized)
articles from ``wiki.<split>.tokens`` whose token count (words + one ``<eos>`` per
line) is closest to a target: 130k train, 15k valid, 15k test (130k rather than
150k keeps the three files, ~0.85 MB, under 1 MB). Lines are copied byte for byte,
so the sample keeps the ``<unk>`` convention of the original. ATTRIBUTION.md is
written alongside, naming the line ranges.

Usage: python bench/corpora/make_sample.py [WIKITEXT2_DIR] [OUT_DIR]
(defaults: ../shared/data/wikitext-2 relative to the repository root, lmadapt/sample)
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository root
TARGETS = {"train": 130_000, "valid": 15_000, "test": 15_000}
# An article starts with a blank line followed by a top-level heading " = Title = ".
HEADING = re.compile(r" = [^=].* = ")


def article_starts(lines: list[str]) -> list[int]:
    """Indices of the blank line that opens each article, plus len(lines) as the final end."""
    starts = [
        i for i in range(len(lines) - 2)
        if lines[i].strip() == "" and HEADING.fullmatch(lines[i + 1]) and lines[i + 2].strip() == ""
    ]
    return starts + [len(lines)]


def cut(lines: list[str], target: int) -> int:
    """Number of leading lines (an article boundary) whose token count is closest to target."""
    counts = [0]
    for line in lines:
        counts.append(counts[-1] + len(line.split()) + 1)
    ends = [i for i in article_starts(lines) if i > 0]
    return min(ends, key=lambda i: abs(counts[i] - target))


def main(argv: list[str]) -> int:
    src = Path(argv[1]) if len(argv) > 1 else ROOT.parent / "shared" / "data" / "wikitext-2"
    out = Path(argv[2]) if len(argv) > 2 else ROOT / "lmadapt" / "sample"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, target in TARGETS.items():
        raw = (src / f"wiki.{split}.tokens").read_bytes()
        source_digest = hashlib.sha256(raw).hexdigest()
        lines = raw.decode("utf-8").split("\n")
        assert lines[-1] == "", "expected a trailing newline"
        lines = lines[:-1]
        n = cut(lines, target)
        text = "".join(line + "\n" for line in lines[:n])
        (out / f"{split}.txt").write_bytes(text.encode("utf-8"))
        ntok = sum(len(line.split()) + 1 for line in lines[:n])
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
        rows.append((split, n, len(lines), ntok, len(text.encode("utf-8")), source_digest))
        print(f"{split}: wiki.{split}.tokens lines 1-{n} -> {split}.txt, {ntok} tokens, "
              f"{len(text.encode('utf-8'))} bytes, sha256 {digest}...")
    (out / "ATTRIBUTION.md").write_text(attribution(rows), encoding="utf-8")
    return 0


def attribution(rows) -> str:
    table = "\n".join(
        f"| `{split}.txt` | `wiki.{split}.tokens` | 1-{n} of {total} | {ntok:,} | {size:,} | `{sha[:16]}...` |"
        for split, n, total, ntok, size, sha in rows
    )
    return f"""# Sample corpus: attribution

The files in this folder are a slice of **WikiText-2** (v1, tokenized):

> Stephen Merity, Caiming Xiong, James Bradbury, Richard Socher. 2016.
> *Pointer Sentinel Mixture Models.* arXiv:1609.07843.

WikiText-2 is derived from verified Good and Featured articles of English
Wikipedia and is licensed under the **Creative Commons Attribution-ShareAlike 3.0
Unported** licence (CC BY-SA 3.0, https://creativecommons.org/licenses/by-sa/3.0/).
The text is by the Wikipedia contributors; this slice is distributed under the
same licence.

Each file holds the leading whole articles of the corresponding WikiText-2 file,
copied line for line and unchanged (rare words were already replaced by `<unk>` in
WikiText-2 itself):

| file | source file | source lines | tokens (words + one `<eos>` per line) | bytes | source sha256 |
|---|---|---|---|---|---|
{table}

Regenerate with `python bench/corpora/make_sample.py` from the repository root (it reads
`../shared/data/wikitext-2/`, or a folder given as its first argument).
"""


if __name__ == "__main__":
    sys.exit(main(sys.argv))
