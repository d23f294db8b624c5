"""Run directories: atomic writes, JSON metadata, weights-only checkpoints.

A run directory holds
  config.json     model + training config + corpus description
  vocab.json      the vocabulary (itos list)
  spm.model       the sentencepiece model, for subword corpora
  model.pt        best weights (a plain state dict)
  last.pt         training state for --resume (tensors and plain Python values only)
  metrics.jsonl   one line per validation
  results.json    written last: its presence marks a finished run
  .lmadapt.lock   held by the one process writing the run (see `locked`)

Outputs a user names (--json, --save-tokens, tune/report --out) go through
`check_output` before any computation (so a bad path fails in a second, not
after a long evaluation) and `save_output` after it (which keeps the results
somewhere and says where if the named place fails after all, e.g. a full disk).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from lmadapt.errors import LmadaptError

CONFIG = "config.json"
VOCAB = "vocab.json"
SPM = "spm.model"
BEST = "model.pt"
LAST = "last.pt"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
RUN_FILES = (CONFIG, VOCAB, SPM, BEST, LAST, METRICS, RESULTS, "hf")  # hf/: the gpt2 export (a folder)
LOCK = ".lmadapt.lock"


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
        # torch's own message may suggest weights_only=False, which would run arbitrary code
        # from an untrusted file: never pass that on.
        raise LmadaptError(f"cannot read checkpoint {path}: not an intact weights-only PyTorch file "
                           f"({type(exc).__name__}); it may be damaged or of another kind") from None


def read_json(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise LmadaptError(f"file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LmadaptError(f"cannot parse {path}: {exc}") from None
    except OSError as exc:
        raise LmadaptError(f"cannot read {path}: {exc.strerror or exc}") from None


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


def is_run_dir(path: Path) -> bool:
    return (Path(path) / CONFIG).is_file() and (Path(path) / VOCAB).is_file()


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    return path


def check_writable_dir(folder: Path, what: str) -> None:
    """Raise unless `folder` (created later if missing) can receive files."""
    base = _nearest_existing(Path(folder))
    if not base.is_dir():
        raise LmadaptError(f"{what} {folder}: {base} is a file, not a directory")
    try:  # a real probe: permission bits do not tell for root, read-only mounts or /proc
        fd, probe = tempfile.mkstemp(prefix=".lmadapt-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise LmadaptError(f"{what} {folder} is not writable ({base}: {exc.strerror or exc})") from None


def check_output(path: str | Path | None, flag: str, *, overwrite: bool = False) -> Path | None:
    """Validate an output file path before any work: not a directory, not one of a run
    directory's own files, not an existing file unless `overwrite`, in a writable place."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise LmadaptError(f"{flag} {path} is a directory; give a file name")
    if path.name in RUN_FILES and is_run_dir(path.parent):
        raise LmadaptError(f"{flag} {path} would overwrite the run's own {path.name}; choose another name")
    if path.exists() and not overwrite:
        raise LmadaptError(f"{flag} {path} already exists; choose another name or pass --overwrite")
    check_writable_dir(path.parent, flag)
    return path


def save_output(path: Path, write: Callable[[Path], None], *, rescue_dir: Path | None = None) -> None:
    """write(path); if that fails (disk full, permissions changed during the run), write the
    results to a rescue file instead and raise an error that names both places, so a long
    computation is never lost to a failed write."""
    try:
        write(path)
        return
    except OSError as exc:
        reason = exc.strerror or str(exc)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    places = [p for p in (rescue_dir, Path.cwd(), Path(tempfile.gettempdir())) if p is not None]
    for folder in places:
        rescue = Path(folder) / f"lmadapt-rescued-{stamp}-{os.getpid()}-{path.name}"
        try:
            write(rescue)
        except OSError:
            continue
        raise LmadaptError(f"could not write {path} ({reason}); the results were saved to {rescue} instead")
    raise LmadaptError(f"could not write {path} ({reason}), nor a rescue copy in {', '.join(map(str, places))}")


@contextlib.contextmanager
def locked(folder: str | Path, what: str = "run directory"):
    """Hold an exclusive lock on `folder` (created if missing) for one writer.

    A second lmadapt process that wants to write there is refused at once with the holder's
    PID; the lock is an OS file lock (filelock), so it is released even if the holder is
    killed. Under torchrun only rank 0 writes, so only it locks.
    """
    from filelock import FileLock, Timeout

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK), timeout=0)
    pid_file = folder / (LOCK + ".pid")
    try:
        lock.acquire()
    except Timeout:  # (a subclass of OSError: catch it first)
        try:
            holder = pid_file.read_text().strip() or "unknown"
        except OSError:
            holder = "unknown"
        raise LmadaptError(f"{folder} is in use by another lmadapt process (PID {holder}); "
                           f"wait for it to finish or stop it") from None
    except OSError as exc:
        raise LmadaptError(f"cannot lock {folder}: {exc.strerror or exc}") from None
    try:
        pid_file.write_text(f"{os.getpid()}\n")
        yield folder
    finally:
        pid_file.unlink(missing_ok=True)
        lock.release()


def warn(message: str) -> None:
    print(f"lmadapt: warning: {message}", file=sys.stderr)


def progress_enabled() -> bool:
    """Progress bars on a terminal (or when LMADAPT_PROGRESS is set); never in logs and pipes."""
    return sys.stderr.isatty() or bool(os.environ.get("LMADAPT_PROGRESS"))
