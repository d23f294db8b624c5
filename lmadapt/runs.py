"""Run directories: atomic writes, JSON metadata, weights-only checkpoints.

A run directory holds
  config.json     model + training config + corpus description
  vocab.json      the vocabulary (itos list)
  spm.model       the sentencepiece model, for subword corpora
  model.pt        best weights (a plain state dict)
  last.pt         training state for --resume (tensors and plain Python values only)
  metrics.jsonl   one line per validation
  results.json    written last: its presence marks a finished run
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from lmadapt.errors import LmadaptError

CONFIG = "config.json"
VOCAB = "vocab.json"
SPM = "spm.model"
BEST = "model.pt"
LAST = "last.pt"
METRICS = "metrics.jsonl"
RESULTS = "results.json"


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same directory, then rename over the target.

    A crash mid-write leaves the previous file intact instead of a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    # mkstemp creates 0600 files; give the result the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    data = (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()
    _atomic_write(path, lambda f: f.write(data))


def write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def save_tensors(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f))


def load_tensors(path: Path, map_location="cpu") -> Any:
    path = Path(path)
    if not path.is_file():
        raise LmadaptError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LmadaptError(f"cannot read checkpoint {path}: {first_line[:200]}") from None


def read_json(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise LmadaptError(f"file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LmadaptError(f"cannot parse {path}: {exc}") from None


def append_jsonl(path: Path, obj: Any) -> None:
    # Appends are small; metrics.jsonl is rewritten atomically on resume (see train.py).
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line after a crash: ignore it
    return rows


def require_run_dir(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LmadaptError(f"run directory not found: {run_dir}")
    for name in (CONFIG, VOCAB, BEST):
        if not (run_dir / name).is_file():
            raise LmadaptError(f"{run_dir} is not a trained run directory (missing {name})")
    return run_dir
