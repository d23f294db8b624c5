"""MNIST in the original IDX format (optionally gzipped), read with numpy.

IDX: a big-endian header ``0x00 0x00 <dtype code> <ndim>``, ``ndim`` big-endian uint32
sizes, then the data.  MNIST images are ``0x0803`` (uint8, 3 dims), labels ``0x0801``.
Every malformed file is an LmadaptError naming the file and the problem.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmadapt.errors import LmadaptError

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_UINT8 = 0x08
# The experiments learn from MNIST train[:50000] and tune on train[50000:] (never trained on).
VALID_START = 50000


def train_pool_size(n_train: int) -> int:
    """How many of the first training images are for training; the rest are validation.

    50,000 of MNIST's 60,000; on a smaller (test fixture) set, the first five sixths.
    """
    return min(VALID_START, n_train * 5 // 6)


def read_idx(path: str | Path) -> np.ndarray:
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:  # zlib.error: a damaged gzip stream
        raise LmadaptError(f"{path}: cannot read ({exc.__class__.__name__}: {exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise LmadaptError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    if raw[2] != _UINT8:
        raise LmadaptError(f"{path}: IDX data type 0x{raw[2]:02x} is not uint8 (0x08)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise LmadaptError(f"{path}: truncated IDX header")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    n = int(np.prod(shape))
    if len(raw) - header != n:
        raise LmadaptError(f"{path}: truncated or oversized IDX data: header says {shape} = {n:,} bytes, "
                           f"file holds {len(raw) - header:,}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find(data_dir: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        for folder in (data_dir, data_dir / "mnist"):
            if (folder / name).is_file():
                return folder / name
    raise LmadaptError(f"MNIST file {stem}[.gz] not found in {data_dir} or {data_dir / 'mnist'}")


@dataclass
class MNIST:
    train_x: torch.Tensor  # (60000, 784) float32 in [0, 1]
    train_y: torch.Tensor  # (60000,) long
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_mnist(data_dir: str | Path) -> MNIST:
    """Load the four MNIST IDX files from ``data_dir`` (or ``data_dir/mnist``)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise LmadaptError(f"--data-dir {data_dir} is not a directory")
    arrays = {key: read_idx(_find(data_dir, stem)) for key, stem in FILES.items()}
    for split in ("train", "test"):
        imgs, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if imgs.ndim != 3 or labels.ndim != 1:
            raise LmadaptError(f"MNIST {split}: images must be 3-D and labels 1-D, got {imgs.shape} and {labels.shape}")
        if imgs.shape[0] != labels.shape[0]:
            raise LmadaptError(f"MNIST {split}: {imgs.shape[0]} images but {labels.shape[0]} labels")
        if labels.size and labels.max() > 9:
            raise LmadaptError(f"MNIST {split}: label {int(labels.max())} out of range 0-9")

    def images(a):
        return torch.from_numpy(a.reshape(a.shape[0], -1).astype(np.float32) / 255.0)

    def labels(a):
        return torch.from_numpy(a.astype(np.int64))

    return MNIST(images(arrays["train_images"]), labels(arrays["train_labels"]),
                 images(arrays["test_images"]), labels(arrays["test_labels"]))


def write_idx(path: str | Path, array: np.ndarray, *, gz: bool = True) -> None:
    """Write a uint8 array as IDX (for test fixtures and tiny generated datasets)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, _UINT8, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + array.tobytes()
    Path(path).write_bytes(gzip.compress(data) if gz else data)


def make_fake_mnist(folder: str | Path, n_train: int = 600, n_test: int = 200, seed: int = 0) -> Path:
    """A tiny learnable MNIST look-alike: each class is a noisy copy of its own random prototype."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    protos = rng.random((10, 28, 28)) < 0.3

    def split(n):
        y = np.arange(n) % 10
        rng.shuffle(y)
        flip = rng.random((n, 28, 28)) < 0.08
        x = (protos[y] ^ flip).astype(np.uint8) * 255
        return x, y.astype(np.uint8)

    for split_name, n in (("train", n_train), ("t10k", n_test)):
        x, y = split(n)
        write_idx(folder / f"{split_name}-images-idx3-ubyte.gz", x)
        write_idx(folder / f"{split_name}-labels-idx1-ubyte.gz", y)
    return folder
