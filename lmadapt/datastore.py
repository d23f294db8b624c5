"""kNN-LM datastores: (hidden state, next word) for every position of a split, searched with faiss.

A datastore directory holds
  keys.npy        (N, d) float16, memory-mapped: the output layer's input at each position
  values.npy      (N,) int32: the next word
  index.faiss     the IVF-PQ index (absent for a flat index, which is rebuilt from keys.npy
                  when opened: writing it would double the disk for nothing)
  manifest.json   written last: its presence marks a complete datastore

While building, `build.json` records the settings and `parts/` holds one keys/values file
pair per part of the split.  Parts are the unit of work, of resumption and of sharding:

* The split is cut into rows of ROW positions; each row is embedded from a zero state
  after WARMUP positions of burn-in (the tokens just before it), so a row does not depend
  on any other row.  Rows are batched ROWS_PER_PART at a time into a part.  The first
  row of the split has no burn-in (it starts at the beginning, as evaluation does).
* A part is finished when its values file exists (written atomically after its keys).
  A rerun with the same settings reuses finished parts; with other settings it restarts.
* Under torchrun each rank embeds the parts i with i % world == rank; rank 0 then
  concatenates them, trains the index and adds every key.  Parts are batched the same
  way whatever the world size, so 1 and N processes compute the same keys.

The burn-in makes a key differ slightly from the state of one continuous pass over the
split (an LSTM's state forgets its zero start within a few hundred words); it is what
makes the pass shardable and resumable at part granularity.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lmadapt import runs
from lmadapt.errors import LmadaptError

FORMAT = "lmadapt-datastore"
VERSION = 1
MANIFEST = "manifest.json"
BUILD = "build.json"
KEYS = "keys.npy"
VALUES = "values.npy"
INDEX = "index.faiss"
PARTS = "parts"

ROW = 2048            # default positions per independently embedded row
WARMUP = 256          # default burn-in positions fed before each row (outputs discarded)
ROWS_PER_PART = 32    # default rows batched together: one part = 65,536 positions
STEP = 64             # time steps per forward call (bounds the (rows x STEP x V) logits)
ADD_BATCH = 65536     # keys per faiss add() call
FLAT_MAX_ELEMENTS = 1 << 25   # auto: a flat index up to N*d = 33.5M (e.g. 110k keys of d=300)
PQ_NBITS = 8
SEED = 0
CACHE_BYTES = 768 << 20   # search results kept per opened datastore (see Datastore.search)


# --------------------------------------------------------------------------- backbone access
# The only place that knows the model's interface; a backbone seam replaces these three.

def backbone_sizes(model) -> tuple[int, int]:
    """(feature size = key dimension, vocabulary size)."""
    return int(model.feature_size), int(model.vocab_size)


def backbone_init_state(model, batch: int, device):
    return model.init_state(batch, device)


def backbone_hidden(model, tokens: torch.Tensor, state, key: str = "output"):
    """tokens (B, T) -> keys (B, T, d): the output layer's inputs, or the vectors of the key
    kind the backbone records (`model.record_keys(key)` set by the caller); new state."""
    hidden, _, state = model(tokens, state, compute_logits=False)
    return (hidden if key == "output" else model.recorded_keys), state


# --------------------------------------------------------------------------- hashes

def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def tokens_sha256(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.cpu().numpy().astype("<i8").tobytes()).hexdigest()


# --------------------------------------------------------------------------- layout

@dataclass(frozen=True)
class Layout:
    """How the split is cut for embedding; part of a datastore's identity (the keys depend on it)."""
    row: int = ROW
    warmup: int = WARMUP
    rows_per_part: int = ROWS_PER_PART

    def validate(self) -> None:
        if self.row < 1 or self.rows_per_part < 1 or self.warmup < 0:
            raise LmadaptError(f"datastore layout needs row >= 1, rows per part >= 1, warmup >= 0; got {self}")

    def to_dict(self) -> dict:
        return {"row": self.row, "warmup": self.warmup, "rows_per_part": self.rows_per_part, "step": STEP}

    def rows(self, n_keys: int) -> list[tuple[int, int]]:
        return [(a, min(a + self.row, n_keys)) for a in range(0, n_keys, self.row)]

    def n_parts(self, n_keys: int) -> int:
        return math.ceil(len(self.rows(n_keys)) / self.rows_per_part)



# --------------------------------------------------------------------------- index settings

@dataclass(frozen=True)
class IndexSpec:
    kind: str            # "flat" | "ivfpq"
    nlist: int = 0
    m: int = 0

    def describe(self) -> str:
        return "flat" if self.kind == "flat" else f"ivfpq:{self.nlist},{self.m}"

    def to_dict(self) -> dict:
        d = {"type": self.kind}
        if self.kind == "ivfpq":
            d.update(nlist=self.nlist, m=self.m, nbits=PQ_NBITS)
        return d

    def train_points(self, n: int) -> int:
        """Keys sampled to train the index: 64 per coarse centroid (at least 64 per PQ centroid)."""
        return min(n, max(64 * self.nlist, 64 * (1 << PQ_NBITS))) if self.kind == "ivfpq" else 0

    def code_bytes(self) -> int:
        return self.m * PQ_NBITS // 8


def _pq_m(d: int) -> int:
    # Sub-vectors of at least 4 dimensions, at most 64 bytes per code (kNN-LM: 64 for d=1024).
    cap = max(1, min(64, d // 4))
    return max(m for m in range(1, cap + 1) if d % m == 0)


def choose_index(n: int, d: int, text: str = "auto") -> IndexSpec:
    """Flat when N*d is small enough to search exactly, else IVF-PQ with about 2*sqrt(N) lists."""
    if text == "flat":
        return IndexSpec("flat")
    if text == "auto":
        if n * d <= FLAT_MAX_ELEMENTS:
            return IndexSpec("flat")
        nlist = 1 << max(0, round(math.log2(2 * math.sqrt(n))))
        return IndexSpec("ivfpq", min(nlist, max(1, n // 39)), _pq_m(d))
    kind, _, rest = text.partition(":")
    if kind != "ivfpq" or not rest:
        raise LmadaptError(f"--index must be auto, flat or ivfpq:NLIST,M, got {text!r}")
    try:
        nlist, m = (int(v) for v in rest.split(","))
    except ValueError:
        raise LmadaptError(f"--index ivfpq:NLIST,M expects two integers, got {text!r}") from None
    if nlist < 1 or m < 1:
        raise LmadaptError(f"--index {text}: NLIST and M must be >= 1")
    if d % m:
        raise LmadaptError(f"--index {text}: M={m} must divide the key dimension {d}")
    if nlist > n:
        raise LmadaptError(f"--index {text}: NLIST={nlist} is more than the {n:,} keys")
    return IndexSpec("ivfpq", nlist, m)


# --------------------------------------------------------------------------- plan

def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _human(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if b < 1000 or unit == "TB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1000
    return f"{b:.1f} TB"


def sizes(n: int, d: int, vocab: int, spec: IndexSpec, layout: Layout = Layout()) -> dict:
    """Bytes on disk and in RAM for a datastore of n keys of dimension d (model excluded)."""
    keys, values = 2 * n * d, 4 * n
    if spec.kind == "ivfpq":
        # codes + 8-byte ids per key, coarse centroids, PQ centroids
        index = n * (spec.code_bytes() + 8) + 4 * spec.nlist * d + 4 * (1 << PQ_NBITS) * d
        train = 4 * spec.train_points(n) * d
        eval_ram = index + values
    else:
        index, train = 0, 0
        eval_ram = 4 * n * d + values    # the flat index holds float32 copies of the keys
    part_ram = 4 * layout.rows_per_part * (STEP * vocab * 2 + (layout.row + layout.warmup) * d)
    return {
        "keys": keys, "values": values, "index": index, "disk": keys + values + index,
        # parts and the assembled arrays coexist until the manifest is written
        "peak_disk": 2 * (keys + values) + index,
        "build_ram": max(part_ram, train + index + 4 * ADD_BATCH * d),
        "eval_ram": eval_ram,
    }


def _calibrate(model, device, d: int) -> tuple[float, float]:
    """(embedding positions/s, matmul flop/s) from a short timing: the time estimate's basis."""
    x = torch.zeros(ROWS_PER_PART, STEP, dtype=torch.long, device=device)
    with torch.no_grad():
        state = backbone_init_state(model, ROWS_PER_PART, device)
        backbone_hidden(model, x, state)  # warm-up
        t = time.perf_counter()
        backbone_hidden(model, x, state)
        rate = x.numel() / max(time.perf_counter() - t, 1e-6)
    a, b = np.random.rand(2048, d).astype(np.float32), np.random.rand(d, 1024).astype(np.float32)
    t = time.perf_counter()
    a @ b
    flops = 2 * 2048 * d * 1024 / max(time.perf_counter() - t, 1e-6)
    return rate, flops


def estimate_seconds(n: int, d: int, spec: IndexSpec, embed_rate: float, flops: float, world: int = 1,
                     layout: Layout = Layout()) -> dict:
    embed = n * (1 + layout.warmup / layout.row) / embed_rate / world
    if spec.kind == "flat":
        return {"embed": embed, "train": 0.0, "add": 0.0}
    t = spec.train_points(n)
    # coarse k-means (25 iterations) + PQ k-means (25 iterations of 256 centroids per sub-space)
    train = 25 * 2 * t * spec.nlist * d / flops + 25 * 2 * t * (1 << PQ_NBITS) * d / flops
    add = 2 * n * spec.nlist * d / flops + 2 * n * (1 << PQ_NBITS) * d / flops
    return {"embed": embed, "train": train, "add": add}


# --------------------------------------------------------------------------- embedding

@torch.no_grad()
def embed_part(model, stream: torch.Tensor, part: int, device, layout: Layout = Layout(),
               key: str = "output") -> tuple[np.ndarray, np.ndarray]:
    """Keys (float16) and values (int32) of one part, in position order."""
    n_keys = stream.numel() - 1
    rows = layout.rows(n_keys)[part * layout.rows_per_part:(part + 1) * layout.rows_per_part]
    # Rows of equal (burn-in, length) go through the model together: all but the split's
    # first and last row, typically.
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (a, b) in enumerate(rows):
        groups.setdefault((a - max(0, a - layout.warmup), b - a), []).append(i)
    d, _ = backbone_sizes(model)
    out = [None] * len(rows)
    for (warm, length), members in groups.items():
        x = torch.stack([stream[rows[i][0] - warm:rows[i][1]] for i in members]).to(device)
        state = backbone_init_state(model, len(members), device)
        chunks = []
        for s in range(0, x.size(1), STEP):
            hidden, state = backbone_hidden(model, x[:, s:s + STEP], state, key)
            chunks.append(hidden.float())
        hidden = torch.cat(chunks, 1)[:, warm:]
        for j, i in enumerate(members):
            out[i] = hidden[j].cpu().numpy().astype(np.float16)
    keys = np.concatenate(out) if out else np.zeros((0, d), np.float16)
    if keys.shape[1] != d:
        raise LmadaptError(f"the model's {key} vectors have {keys.shape[1]} dimensions, its hidden state {d}: "
                           f"datastores assume they are equal")
    a, b = rows[0][0], rows[-1][1]
    values = stream[a + 1:b + 1].cpu().numpy().astype(np.int32)
    return keys, values


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _part_paths(out: Path, i: int) -> tuple[Path, Path]:
    return out / PARTS / f"keys-{i:05d}.npy", out / PARTS / f"values-{i:05d}.npy"


def _atomic_path(path: Path, write) -> None:
    """write(tmp_path) then rename: for writers that need a file name (faiss, memmaps)."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.unlink(missing_ok=True)
    write(tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- build

def _settings(run_dir: Path, ckpt: str, corpus, split: str, stream, d: int, vocab: int, spec: IndexSpec,
              layout: Layout, key: str = "output") -> dict:
    return {
        "key": key,
        "format": FORMAT, "version": VERSION,
        "run_dir": str(Path(run_dir).resolve()), "checkpoint_sha256": ckpt,
        "corpus": corpus.name, "split": split, "split_sha256": tokens_sha256(stream),
        "keys": int(stream.numel() - 1), "dim": d, "vocab": vocab,
        "key_dtype": "float16", "value_dtype": "int32",
        "embedding": layout.to_dict(),
        "index": spec.to_dict(),
    }


def _check_free(out: Path, need: dict) -> None:
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    if free < need["peak_disk"]:
        raise LmadaptError(f"not enough disk for the datastore: needs {_human(need['peak_disk'])} during the build, "
                           f"{probe} has {_human(free)} free")
    avail = _mem_available()
    if avail is not None and avail < need["build_ram"]:
        raise LmadaptError(f"not enough RAM to build the datastore: needs about {_human(need['build_ram'])}, "
                           f"{_human(avail)} available")


def build(run_dir, out, *, model, corpus, split: str = "train", index: str = "auto", device="cpu",
          force: bool = False, layout: Layout = Layout(), log=print,
          interrupt_after_parts: int | None = None, key: str = "output") -> dict | None:
    """Build (or resume building) a datastore; returns the manifest (None on non-main ranks).
    `key`: the kind of vector stored as key ("output": the output layer's input; "ffn": the
    last feed-forward block's input, for Transformer backbones).

    `interrupt_after_parts` stops abruptly after embedding that many parts in this call:
    the test suite's stand-in for a killed process.
    """
    from lmadapt.train import Dist

    run_dir, out, device = Path(run_dir), Path(out), torch.device(device)
    dist = Dist(device)
    try:
        stream = corpus.split(split)
        if stream.numel() < 2:
            raise LmadaptError(f"split {split!r} has fewer than 2 tokens: nothing to store")
        d, vocab = backbone_sizes(model)
        n = int(stream.numel() - 1)
        spec = choose_index(n, d, index)
        layout.validate()
        from lmadapt.backbones.base import check_key_kind

        check_key_kind(model, key)
        model.record_keys(key)
        settings = _settings(run_dir, file_sha256(run_dir / runs.BEST), corpus, split, stream, d, vocab, spec,
                             layout, key)
        need = sizes(n, d, vocab, spec, layout)

        # Decide, on rank 0, whether this is done, a resume or a fresh start, before any work.
        manifest_path = out / MANIFEST
        if manifest_path.is_file():
            old = runs.read_json(manifest_path)
            old.setdefault("key", "output")  # manifests written before key kinds existed
            same = {k: old.get(k) for k in settings} == settings
            if same and not force:
                if dist.main:
                    log(f"{out} is already a complete datastore with these settings")
                return old if dist.main else None
            if not force:
                raise LmadaptError(f"{out} holds a datastore with other settings; use --force to rebuild it")
        model.eval()
        rate, flops = _calibrate(model, device, d)
        est = estimate_seconds(n, d, spec, rate, flops, dist.world, layout)
        # Decided and printed on rank 0 only; a refusal there must stop every rank, not
        # leave the others waiting at a barrier.
        refusal = None
        if dist.main:
            try:
                _plan(out, settings, spec, layout.n_parts(n), need, est, rate, corpus.name, split, index, dist,
                      force, log)
            except LmadaptError as exc:
                refusal = exc
        if not all(dist.gather(refusal is None)):
            raise refusal or LmadaptError("rank 0 refused the build")
        dist.barrier()

        t0 = time.perf_counter()
        total = layout.n_parts(n)
        mine = [i for i in range(total) if i % dist.world == dist.rank]
        todo = [i for i in mine if not _part_paths(out, i)[1].is_file()]
        if dist.main and len(todo) < len(mine):
            log(f"  reusing {len(mine) - len(todo)} finished parts")
        done_now = 0
        with tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"embed {split}", unit="part",
                  disable=not (dist.main and runs.progress_enabled())) as bar:
            for i in todo:
                keys, values = embed_part(model, stream, i, device, layout, key)
                kp, vp = _part_paths(out, i)
                runs.write_bytes(kp, _npy_bytes(keys))
                runs.write_bytes(vp, _npy_bytes(values))   # last: marks the part finished
                bar.update(1)
                done_now += 1
                if interrupt_after_parts is not None and done_now >= interrupt_after_parts:
                    return None
        embed_seconds = time.perf_counter() - t0
        dist.barrier()
        if not dist.main:
            dist.barrier()  # wait for rank 0 to finish the index before the process group goes
            return None
        manifest = _finish(out, settings, spec, n, d, total, log)
        manifest["seconds"]["embed"] = embed_seconds
        manifest["world_size"] = dist.world
        runs.write_json(out / MANIFEST, manifest)   # last: marks the datastore complete
        shutil.rmtree(out / PARTS, ignore_errors=True)
        (out / BUILD).unlink(missing_ok=True)
        dist.barrier()
        return manifest
    finally:
        dist.close()



def _plan(out, settings, spec, parts, need, est, rate, corpus_name, split, index, dist, force, log) -> None:
    """Print the plan, refuse when disk or RAM cannot hold it, and set up the build directory."""
    build_path = out / BUILD
    mode = "fresh"
    if build_path.is_file() and not force:
        mode = "resume" if runs.read_json(build_path) == settings else "restart (settings changed)"
    n, d = settings["keys"], settings["dim"]
    log(f"datastore plan: {n:,} keys x {d} dims from {corpus_name} {split}, {parts} parts"
        f"{f' over {dist.world} processes' if dist.enabled else ''}; {mode}")
    log(f"  disk: keys {_human(need['keys'])} (float16) + values {_human(need['values'])} + index "
        f"{_human(need['index'])} = {_human(need['disk'])}; {_human(need['peak_disk'])} at peak (parts)")
    log(f"  RAM: build ~{_human(need['build_ram'])}; eval ~{_human(need['eval_ram'])} "
        f"(+ keys page cache with --knn-recompute)")
    log(f"  index: {spec.describe()}{' (auto)' if index == 'auto' else ''}"
        + (f", trained on {spec.train_points(n):,} keys" if spec.kind == "ivfpq" else ""))
    log(f"  time estimate: embed {est['embed']:.0f} s ({rate:,.0f} positions/s per process), "
        f"train {est['train']:.0f} s, add {est['add']:.0f} s")
    _check_free(out, need)
    if mode != "resume":
        for name in (MANIFEST, KEYS, VALUES, INDEX, BUILD):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / PARTS, ignore_errors=True)
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    runs.write_json(build_path, settings)

def _finish(out: Path, settings: dict, spec: IndexSpec, n: int, d: int, total: int, log) -> dict:
    """Rank 0: concatenate the parts into keys.npy/values.npy, train and fill the index."""
    import faiss

    # faiss would otherwise use every core's OpenMP thread whatever --threads says; on shared
    # cores spinning threads slow it down rather than up.
    faiss.omp_set_num_threads(torch.get_num_threads())
    t0 = time.perf_counter()

    def write_keys(tmp):
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, d))
        pos = 0
        for i in range(total):
            part = np.load(_part_paths(out, i)[0])
            arr[pos:pos + len(part)] = part
            pos += len(part)
        if pos != n:
            raise LmadaptError(f"the parts in {out / PARTS} hold {pos:,} keys, expected {n:,}; rebuild with --force")
        arr.flush()
        del arr

    def write_values(tmp):
        with open(tmp, "wb") as f:   # a file object: np.save would append ".npy" to a name
            np.save(f, np.concatenate([np.load(_part_paths(out, i)[1]) for i in range(total)]).astype(np.int32))

    _atomic_path(out / KEYS, write_keys)
    _atomic_path(out / VALUES, write_values)
    seconds = {"assemble": time.perf_counter() - t0, "train": 0.0, "add": 0.0}
    keys = np.load(out / KEYS, mmap_mode="r")
    if spec.kind == "ivfpq":
        t0 = time.perf_counter()
        rng = np.random.default_rng(SEED)
        sample = np.sort(rng.choice(n, size=spec.train_points(n), replace=False))
        xt = np.ascontiguousarray(keys[sample], dtype=np.float32)
        with tqdm(total=2, desc="train index", unit="stage", disable=not runs.progress_enabled()) as bar:
            # Coarse centroids first, so the bar can show the two stages; IndexIVFPQ.train()
            # then skips the (already trained, full) quantizer and fits the PQ on residuals.
            km = faiss.Kmeans(d, spec.nlist, niter=20, seed=SEED + 1, max_points_per_centroid=256)
            km.train(xt)
            quantizer = faiss.IndexFlatL2(d)
            quantizer.add(km.centroids)
            bar.update(1)
            index = faiss.IndexIVFPQ(quantizer, d, spec.nlist, spec.m, PQ_NBITS)
            index.pq.cp.seed = SEED + 2
            index.train(xt)
            bar.update(1)
        del xt
        seconds["train"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for s in tqdm(range(0, n, ADD_BATCH), desc="add to index", unit="batch", disable=not runs.progress_enabled()):
            index.add(np.ascontiguousarray(keys[s:s + ADD_BATCH], dtype=np.float32))
        seconds["add"] = time.perf_counter() - t0
        _atomic_path(out / INDEX, lambda tmp: faiss.write_index(index, str(tmp)))
    manifest = dict(settings)
    manifest["seconds"] = seconds
    manifest["bytes"] = {name: (out / name).stat().st_size for name in (KEYS, VALUES, INDEX) if (out / name).is_file()}
    return manifest


# --------------------------------------------------------------------------- open / search

class Datastore:
    """A complete datastore opened for search. Keys stay memory-mapped (read only for
    exact distances and the flat index); values are held in RAM."""

    def __init__(self, path, *, threads: int | None = None):
        import faiss

        self.path = Path(path)
        if not self.path.is_dir():
            raise LmadaptError(f"datastore not found: {self.path}")
        if not (self.path / MANIFEST).is_file():
            raise LmadaptError(f"{self.path} is not a complete datastore (no {MANIFEST}: an interrupted build? "
                               f"rerun `lmadapt datastore build` to resume it)")
        self.manifest = runs.read_json(self.path / MANIFEST)
        if self.manifest.get("format") != FORMAT:
            raise LmadaptError(f"{self.path / MANIFEST} is not an lmadapt datastore manifest")
        self.keys = np.load(self.path / KEYS, mmap_mode="r")
        self.values = torch.from_numpy(np.load(self.path / VALUES).astype(np.int64))
        self.kind = self.manifest["index"]["type"]
        self.key_kind = self.manifest.get("key", "output")
        if threads:
            faiss.omp_set_num_threads(threads)
        self._index = None
        self._keys_t = None
        # Search results by query bytes: `lmadapt tune` streams the same split once per setting,
        # and every pass asks the same queries (only k and T change), so one search serves all.
        # A smaller k is served from a larger one (faiss returns neighbours sorted by its own
        # distance, so its top k' are the first k' of its top k). Filled until the budget, never
        # evicted: a sequential scan would evict exactly what the next pass needs first.
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cache_bytes = 0
        self.cache_budget = CACHE_BYTES

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    @property
    def dim(self) -> int:
        return int(self.keys.shape[1])

    @property
    def index(self):
        import faiss

        if self._index is None:
            if self.kind == "flat":
                index = faiss.IndexFlatL2(self.dim)
                for s in range(0, len(self), ADD_BATCH):
                    index.add(np.ascontiguousarray(self.keys[s:s + ADD_BATCH], dtype=np.float32))
            else:
                index = faiss.read_index(str(self.path / INDEX))
            self._index = index
        return self._index

    @property
    def nlist(self) -> int:
        return int(self.manifest["index"].get("nlist", 0))

    def search(self, queries: torch.Tensor, k: int, nprobe: int = 32, recompute: bool = False):
        """(squared L2 distances (L, k) float32, ids (L, k) int64; -1 where fewer than k found)."""
        q = np.ascontiguousarray(queries.detach().cpu().numpy(), dtype=np.float32)
        k = min(k, len(self))
        nprobe = min(nprobe, self.nlist) if self.kind == "ivfpq" else 0
        key = (hashlib.blake2b(q.tobytes(), digest_size=16).digest(), q.shape, nprobe, recompute)
        hit = self._cache.get(key)
        if hit is not None and hit[1].size(1) >= k:
            return hit[0][:, :k].float(), hit[1][:, :k].long()
        index = self.index
        if self.kind == "ivfpq":
            index.nprobe = nprobe
        dist, ids = index.search(q, k)
        dist, ids = torch.from_numpy(dist), torch.from_numpy(ids)
        if recompute:
            dist = self.exact_distances(torch.from_numpy(q), ids)
        size = dist.numel() * 8
        if hit is not None:
            self._cache_bytes -= hit[1].numel() * 8
            del self._cache[key]
        if self._cache_bytes + size <= self.cache_budget:
            self._cache[key] = (dist.clone(), ids.to(torch.int32))
            self._cache_bytes += size
        return dist, ids

    def exact_distances(self, q: torch.Tensor, ids: torch.Tensor, rows: int = 16) -> torch.Tensor:
        """sum((q - key)^2) from the stored keys for each returned id (inf for id -1)."""
        if self._keys_t is None:
            # Copy-on-write mapping: a writable array for torch (never written), pages shared.
            # torch's index_select gathers the rows ~3x faster than numpy fancy indexing of the
            # memmap (0.58 vs 1.9 ms per query of k=1024, d=300, measured on the PTB datastore).
            self._keys_t = torch.from_numpy(np.load(self.path / KEYS, mmap_mode="c"))
        out = torch.empty(ids.shape, dtype=torch.float32)
        for s in range(0, ids.size(0), rows):
            idx = ids[s:s + rows]
            keys = self._keys_t.index_select(0, idx.clamp(min=0).reshape(-1)).view(*idx.shape, -1).float()
            keys.sub_(q[s:s + rows].unsqueeze(1))   # in place: one (rows x k x d) temporary
            out[s:s + rows] = keys.square_().sum(-1).masked_fill(idx < 0, float("inf"))
        return out

    def check_for_eval(self, run_dir, stream: torch.Tensor, split: str, model=None) -> None:
        """Refuse a datastore built from another model, or from the split being evaluated."""
        m = self.manifest
        run_dir = Path(run_dir)
        if file_sha256(run_dir / runs.BEST) != m["checkpoint_sha256"]:
            raise LmadaptError(f"datastore {self.path} was built from another model ({m['run_dir']}); "
                               f"build one from {run_dir}")
        if tokens_sha256(stream) == m["split_sha256"]:
            raise LmadaptError(f"datastore {self.path} was built from the {m['split']} split being evaluated: "
                               f"it would hold the answers")
        if model is not None and backbone_sizes(model)[0] != self.dim:
            raise LmadaptError(f"datastore {self.path} has keys of dimension {self.dim}, "
                               f"the model {backbone_sizes(model)[0]}")


_OPEN: dict[tuple[str, int], Datastore] = {}


def open_datastore(path, threads: int | None = None) -> Datastore:
    """Open once per process: tuning runs many passes over the same datastore."""
    key = (str(Path(path).resolve()), os.stat(Path(path) / MANIFEST).st_mtime_ns if (Path(path) / MANIFEST).is_file() else 0)
    if key not in _OPEN:
        _OPEN.clear()
        _OPEN[key] = Datastore(path, threads=threads)
    elif threads:
        import faiss

        faiss.omp_set_num_threads(threads)   # a process-wide setting: apply it on every open
    return _OPEN[key]


def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr)
