"""Turn a recorded printout of bucket_mass.py into the JSON that its --json writes.

    python bench/hebbian/mass_from_log.py bench/hebbian/results/bucket-mass-ptb-valid.txt

The printout's first line names the split ("... on valid (bucket 1 ..."), its table shows
the figures rounded, and its last line is the full-precision JSON of every run; the JSON
goes next to the printout with the suffix .json (refused if that file exists).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def convert(text: str, source: str) -> dict:
    lines = text.strip().splitlines()
    split = re.search(r"per frequency bucket on (\w+) ", lines[0])
    if not split:
        raise ValueError(f"{source}: the first line does not name the split")
    runs = json.loads(lines[-1])
    buckets = {len(r["mass"]) for r in runs.values()}
    if len(buckets) != 1:
        raise ValueError(f"{source}: runs with different bucket counts")
    return {"split": split.group(1), "buckets": buckets.pop(), "runs": runs,
            "command": f"python bench/hebbian/mass_from_log.py {source}"}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    src = Path(argv[1])
    out = src.with_suffix(".json")
    if out.exists():
        print(f"mass_from_log: error: {out} exists (not overwritten)", file=sys.stderr)
        return 2
    out.write_text(json.dumps(convert(src.read_text(), argv[1]), indent=2) + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
