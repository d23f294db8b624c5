"""Episodic memory for MbPA: a ring buffer of (key, value, position, extras) with exact kNN.

Entries live in fixed-size slot tensors.  Slots fill 0, 1, 2, ... and then wrap, so the
filled slots are always ``[0, len(memory))``; a slot index returned by :meth:`knn` can be
used directly on the ``keys`` / ``values`` / ``extra(name)`` views (the "pool" form that
:func:`lmadapt.adapt.adapted_log_probs_lowrank` accepts with ``nb_index``).

Every entry carries an absolute stream position.  ``knn(..., window=(lo, hi))`` only
considers entries with ``lo[i] <= position < hi[i]`` for query ``i``.  A streaming
evaluator can therefore add a whole segment first and still give each query exactly the
entries strictly before it and within the last N positions, so results do not depend on
the segment length (give the memory a capacity of at least N + segment length).

Search back-ends:

* ``"exact"``: brute force in torch, ``|q|^2 - 2 q.h + |h|^2`` chunked over queries.
* ``"faiss"``: ``faiss.IndexIDMap(IndexFlatL2)`` (exact) or, with ``ivf_nlist``, an
  ``IndexIVFFlat`` (approximate).  Faiss ids are slot numbers; overwritten slots are
  removed with ``remove_ids`` before re-adding.  Faiss has no per-query filter, so with a
  window we ask for extra candidates and filter them (re-searching with more when too
  few survive).
* ``"auto"``: faiss when ``capacity > 20000``.

Both back-ends end with the same re-ranking: a few more than ``k`` candidates get their
squared distance recomputed as ``sum((q - h)^2)`` (no cancellation) and the best ``k`` are
kept.  This makes the flat-faiss and torch results identical up to exact ties, and the
returned distances precise even when ``q`` is very close to a key.
"""

from __future__ import annotations

import numpy as np
import torch

_AUTO_FAISS_CAPACITY = 20000
_DIST_BUDGET = 1 << 24  # elements in one (query chunk x memory) distance matrix
_RERANK_EXTRA = 8  # candidates beyond k that get an exact distance before the final cut
# Elements of one (query chunk x candidates x d) gather of the re-ranking: a cache-sized
# chunk, updated in place (measured 8x faster than 64 MiB chunks with two temporaries:
# 45 vs 370 us per query for 264 candidates of d=200, 1 thread, before index_select).
_RERANK_BUDGET = 1 << 20
# A "column-blocked" extra (see EpisodicMemory) is cut into blocks of columns of about this
# many bytes of float32 at full capacity: one block of all entries is then one contiguous
# slab of about one core's L2.
_SLAB_BYTES = 1 << 20
COLUMN_BLOCKED = "column-blocked"


def column_block(capacity: int, width: int) -> int:
    """Columns per block of a column-blocked extra of ``width`` columns."""
    return min(width, max(16, _SLAB_BYTES // (max(1, capacity) * 4) // 16 * 16))


def _as_bounds(b, m: int, device) -> torch.Tensor:
    t = torch.as_tensor(b, dtype=torch.long, device=device)
    return t.expand(m) if t.dim() == 0 else t.reshape(m)


class EpisodicMemory:
    """Ring buffer of ``capacity`` entries with ``key_dim``-dimensional keys.

    ``extras`` declares named per-entry tensors, e.g. ``{"logits": ((V,), torch.float16)}``;
    every :meth:`add` must then supply them.  A third element ``"column-blocked"`` (for a
    (V,) extra) stores it in blocks of columns, each block of all entries one contiguous
    slab: :meth:`extra` then returns a (len, blocks, block) view whose ``[:, i]`` is
    contiguous, columns past V being zero padding (:meth:`add` still takes (n, V)).  This is
    for readers that go through all entries one block of columns at a time (MbPA's T = 1
    gather): slicing columns of an entry-major (len, V) table reads it row by row with a
    stride of V, measured 4-6x slower than reading contiguous slabs.
    """

    def __init__(
        self,
        capacity: int,
        key_dim: int,
        *,
        device="cpu",
        dtype: torch.dtype = torch.float32,
        index: str = "exact",
        extras: dict[str, tuple] | None = None,
        ivf_nlist: int | None = None,
        ivf_nprobe: int = 8,
    ):
        if capacity <= 0 or key_dim <= 0:
            raise ValueError("capacity and key_dim must be positive")
        if index not in ("exact", "faiss", "auto"):
            raise ValueError(f"index must be 'exact', 'faiss' or 'auto', not {index!r}")
        self.capacity = int(capacity)
        self.key_dim = int(key_dim)
        self.device = torch.device(device)
        self.dtype = dtype
        if index == "auto":
            index = "faiss" if self.capacity > _AUTO_FAISS_CAPACITY else "exact"
        self.index = index
        self.ivf_nlist = ivf_nlist
        self.ivf_nprobe = ivf_nprobe
        self._keys = torch.zeros(self.capacity, self.key_dim, dtype=dtype, device=self.device)
        self._values = torch.zeros(self.capacity, dtype=torch.long, device=self.device)
        self._positions = torch.zeros(self.capacity, dtype=torch.long, device=self.device)
        self._extra_specs, self._extras, self._blocked = {}, {}, {}
        for name, spec in (extras or {}).items():
            shape, dt = tuple(spec[0]), spec[1]
            layout = spec[2] if len(spec) > 2 else None
            self._extra_specs[name] = (shape, dt)
            if layout is None:
                self._extras[name] = torch.zeros((self.capacity, *shape), dtype=dt, device=self.device)
            elif layout == COLUMN_BLOCKED and len(shape) == 1:
                block = column_block(self.capacity, shape[0])
                blocks = -(-shape[0] // block)
                slabs = torch.zeros((blocks, self.capacity, block), dtype=dt, device=self.device)
                self._extras[name] = slabs.permute(1, 0, 2)  # entry-major view of block-major storage
                self._blocked[name] = blocks * block - shape[0]  # padding columns
            else:
                raise ValueError(f"extra {name!r}: layout must be {COLUMN_BLOCKED!r} for a (V,) extra, not {layout!r}")
        self._len = 0
        self._ptr = 0  # next slot to write
        self._next_pos = 0  # default position of the next entry
        self._faiss = None
        if self.index == "faiss":
            self._faiss = self._new_faiss_index()

    # ------------------------------------------------------------------ storage
    def __len__(self) -> int:
        return self._len

    @property
    def keys(self) -> torch.Tensor:
        """Filled part of the key buffer, indexed by slot: (len, d)."""
        return self._keys[: self._len]

    @property
    def values(self) -> torch.Tensor:
        return self._values[: self._len]

    @property
    def positions(self) -> torch.Tensor:
        return self._positions[: self._len]

    def extra(self, name: str) -> torch.Tensor:
        return self._extras[name][: self._len]

    def gather_keys(self, slot_idx: torch.Tensor) -> torch.Tensor:
        return self._keys[slot_idx]

    def gather_values(self, slot_idx: torch.Tensor) -> torch.Tensor:
        return self._values[slot_idx]

    def gather_positions(self, slot_idx: torch.Tensor) -> torch.Tensor:
        return self._positions[slot_idx]

    def gather_extra(self, name: str, slot_idx: torch.Tensor) -> torch.Tensor:
        return self._extras[name][slot_idx]

    def add(self, keys, values, positions=None, **extras) -> torch.Tensor:
        """Append ``n`` entries (overwriting the oldest when full); returns their slots.

        ``positions`` defaults to a running counter continuing after the last added entry.
        If ``n > capacity`` only the last ``capacity`` entries are kept, in the slots they
        would have reached had they been added one by one.
        """
        keys = torch.as_tensor(keys).to(self.device, self.dtype)
        if keys.dim() != 2 or keys.shape[1] != self.key_dim:
            raise ValueError(f"keys must be (n, {self.key_dim}), got {tuple(keys.shape)}")
        n = keys.shape[0]
        values = torch.as_tensor(values).to(self.device, torch.long).reshape(-1)
        if positions is None:
            positions = torch.arange(self._next_pos, self._next_pos + n, device=self.device)
        positions = torch.as_tensor(positions).to(self.device, torch.long).reshape(-1)
        if values.shape[0] != n or positions.shape[0] != n:
            raise ValueError("keys, values and positions must have the same length")
        if set(extras) != set(self._extra_specs):
            raise ValueError(f"add() needs exactly the extras {sorted(self._extra_specs)}, got {sorted(extras)}")
        ex = {}
        for name, (shape, dt) in self._extra_specs.items():
            t = torch.as_tensor(extras[name]).to(self.device, dt)
            if tuple(t.shape) != (n, *shape):
                raise ValueError(f"extra {name!r} must be {(n, *shape)}, got {tuple(t.shape)}")
            ex[name] = t
        if n == 0:
            return torch.empty(0, dtype=torch.long, device=self.device)

        kept = min(n, self.capacity)
        skip = n - kept
        slots = (self._ptr + skip + torch.arange(kept, device=self.device)) % self.capacity
        overwritten = slots[slots < self._len]
        # index_copy_: a plain row scatter (the extras can be n x V floats per call)
        self._keys.index_copy_(0, slots, keys[skip:])
        self._values.index_copy_(0, slots, values[skip:])
        self._positions.index_copy_(0, slots, positions[skip:])
        first = (self._ptr + skip) % self.capacity
        for name, t in ex.items():
            if name in self._blocked:  # the slots are at most two runs: plain strided copies
                run = min(kept, self.capacity - first)
                self._write_blocked(name, first, t[skip : skip + run])
                self._write_blocked(name, 0, t[skip + run :])
            else:
                self._extras[name].index_copy_(0, slots, t[skip:])
        self._ptr = (self._ptr + n) % self.capacity
        self._len = min(self._len + n, self.capacity)
        self._next_pos = int(positions[-1]) + 1
        if self._faiss is not None:
            self._faiss_update(slots, overwritten)
        return slots

    def _write_blocked(self, name: str, start: int, t: torch.Tensor) -> None:
        """Rows ``t`` (k, V) into slots start..start+k-1 of a column-blocked extra."""
        k, V = t.shape
        if k == 0:
            return
        view = self._extras[name]
        block = view.shape[2]
        full = V // block
        if full:
            view[start : start + k, :full].copy_(t[:, : full * block].reshape(k, full, block))
        if full * block < V:
            view[start : start + k, full, : V - full * block].copy_(t[:, full * block :])

    def clear(self) -> None:
        self._len = 0
        self._ptr = 0
        self._next_pos = 0
        if self._faiss is not None:
            self._faiss = self._new_faiss_index()

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {
            "keys": self._keys.clone(),
            "values": self._values.clone(),
            "positions": self._positions.clone(),
            "counters": torch.tensor([self._len, self._ptr, self._next_pos], dtype=torch.long),
        }
        for name, t in self._extras.items():
            sd[f"extra.{name}"] = t.clone()
        return sd

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        want = {"keys", "values", "positions", "counters", *(f"extra.{n}" for n in self._extras)}
        if set(sd) != want:
            raise ValueError(f"state_dict keys {sorted(sd)} do not match {sorted(want)}")
        for name, buf in [("keys", self._keys), ("values", self._values), ("positions", self._positions)] + [
            (f"extra.{n}", t) for n, t in self._extras.items()
        ]:
            if tuple(sd[name].shape) != tuple(buf.shape):
                raise ValueError(f"state_dict[{name!r}] has shape {tuple(sd[name].shape)}, expected {tuple(buf.shape)}")
            buf.copy_(sd[name])
        self._len, self._ptr, self._next_pos = (int(x) for x in sd["counters"])
        if self._faiss is not None:
            self._faiss = self._new_faiss_index()
            if self._len:
                self._faiss_update(torch.arange(self._len, device=self.device), torch.empty(0, dtype=torch.long))

    # ------------------------------------------------------------------ search
    def knn(self, queries, k: int, *, window: tuple | None = None):
        """Exact Euclidean k nearest neighbours of each query among the stored entries.

        Returns ``(sq_dist, slot_idx, valid_mask)``, each (m, k') with k' = min(k, len),
        sorted by increasing distance.  Entries outside a query's window (or missing
        because fewer than k' are valid) are marked invalid: their ``sq_dist`` is +inf
        and their ``slot_idx`` is some filled slot, so gathers stay in range.
        """
        q = torch.as_tensor(queries).to(self.device, self.dtype)
        if q.dim() != 2 or q.shape[1] != self.key_dim:
            raise ValueError(f"queries must be (m, {self.key_dim}), got {tuple(q.shape)}")
        m, n = q.shape[0], self._len
        kk = min(int(k), n)
        if kk == 0 or m == 0:
            z = torch.zeros(m, kk, device=self.device)
            return z.to(self.dtype), z.long(), z.bool()
        lo = hi = None
        if window is not None:
            lo, hi = (_as_bounds(b, m, self.device) for b in window)
        n_cand = min(n, kk + _RERANK_EXTRA)
        if self._faiss is not None and self._faiss.is_trained:
            cand = self._faiss_candidates(q, n_cand, lo, hi)
        else:
            cand = self._exact_candidates(q, n_cand, lo, hi)
        return self._rerank(q, cand, kk, lo, hi)

    def _in_window(self, slots: torch.Tensor, lo, hi) -> torch.Tensor:
        pos = self._positions[slots.clamp_min(0)]
        ok = slots >= 0
        if lo is not None:
            shape = (-1,) + (1,) * (slots.dim() - 1)
            ok &= (pos >= lo.view(shape)) & (pos < hi.view(shape))
        return ok

    def _exact_candidates(self, q, n_cand, lo, hi) -> torch.Tensor:
        """Top ``n_cand`` slots per query by the expanded distance; -1 where invalid."""
        n = self._len
        # ||q - h||^2 = ||q~||^2 - 2 q~.h~ + ||h~||^2 with both shifted by the keys' mean: the
        # same distances, but the cancellation error scales with the keys' spread instead of
        # their norm.  LSTM states can sit in a small ball far from 0 (seen: mean ||h||^2 = 43,
        # spread 0.008, neighbour distances 1e-9..1e-5), where unshifted float32 rounding
        # (~1e-5) picked wrong candidates that the re-ranking could not recover.
        centre = self._keys[:n].mean(0)
        h = self._keys[:n] - centre
        q = q - centre
        h_sq = (h * h).sum(1)
        pos = self._positions[:n]
        out = []
        step = max(1, _DIST_BUDGET // n)  # query chunk: keeps the (chunk x n) matrix bounded
        for s in range(0, q.shape[0], step):
            qc = q[s : s + step]
            d = (qc * qc).sum(1, keepdim=True) - 2.0 * (qc @ h.T) + h_sq
            if lo is not None:
                ok = (pos >= lo[s : s + step, None]) & (pos < hi[s : s + step, None])
                d.masked_fill_(~ok, float("inf"))
            dv, di = torch.topk(d, n_cand, dim=1, largest=False, sorted=False)
            out.append(di.masked_fill_(torch.isinf(dv), -1))
        return torch.cat(out)

    def _rerank(self, q, cand, kk, lo, hi):
        """Recompute exact squared distances for the candidates and keep the best ``kk``."""
        ok = self._in_window(cand, lo, hi)
        safe = cand.clamp_min(0)
        d = torch.empty(cand.shape, dtype=self.dtype, device=self.device)
        step = max(1, _RERANK_BUDGET // max(1, cand.shape[1] * self.key_dim))
        for s in range(0, q.shape[0], step):
            block = safe[s : s + step]
            # a fresh gather (index_select: ~4x faster than keys[block] for row gathers), updated in place
            diff = self._keys.index_select(0, block.reshape(-1)).view(*block.shape, self.key_dim)
            diff.sub_(q[s : s + step, None, :])
            d[s : s + step] = diff.square_().sum(-1)
        d.masked_fill_(~ok, float("inf"))
        dv, order = torch.sort(d, dim=1, stable=True)
        dv, order = dv[:, :kk], order[:, :kk]
        slots = safe.gather(1, order)
        valid = torch.isfinite(dv)
        # Invalid entries point at slot 0 (always filled when len > 0): harmless to gather.
        return dv, slots.masked_fill(~valid, 0), valid

    # ------------------------------------------------------------------ faiss
    def _new_faiss_index(self):
        import faiss

        if self.ivf_nlist:
            ix = faiss.IndexIVFFlat(faiss.IndexFlatL2(self.key_dim), self.key_dim, int(self.ivf_nlist))
            ix.nprobe = int(self.ivf_nprobe)
            return ix
        return faiss.IndexIDMap(faiss.IndexFlatL2(self.key_dim))

    def _faiss_update(self, slots: torch.Tensor, overwritten: torch.Tensor) -> None:
        ix = self._faiss
        if not ix.is_trained:
            # IVF: train once enough entries exist (faiss wants ~39 points per centroid);
            # until then knn() falls back to the exact torch search.
            if self._len < 39 * int(self.ivf_nlist):
                return
            ix.train(self._keys[: self._len].float().cpu().numpy())
            slots = torch.arange(self._len, device=self.device)
            overwritten = slots[:0]
        if overwritten.numel():
            ix.remove_ids(overwritten.cpu().numpy().astype("int64"))
        ix.add_with_ids(
            np.ascontiguousarray(self._keys[slots].float().cpu().numpy()),
            slots.cpu().numpy().astype("int64"),
        )

    def _faiss_candidates(self, q, n_cand, lo, hi) -> torch.Tensor:
        """Top candidates from faiss, filtered by window; -1 where invalid.

        With a window, each query needs min(n_cand, #entries in its window) surviving
        candidates for the result to equal the exact path; we over-fetch by the number of
        entries outside the window and re-search with more for queries still short.
        Queries whose window excludes more than half the memory use the torch search
        (filtering would fetch most of the memory anyway).
        """
        n, m = self._len, q.shape[0]
        cand = torch.full((m, n_cand), -1, dtype=torch.long, device=self.device)
        need = torch.full((m,), n_cand, dtype=torch.long, device=self.device)
        todo = torch.arange(m, device=self.device)
        fetch = n_cand
        if lo is not None:
            pos_sorted = torch.sort(self._positions[:n]).values
            inside = torch.searchsorted(pos_sorted, hi) - torch.searchsorted(pos_sorted, lo)
            need = torch.minimum(need, inside)
            narrow = (n - inside) > n // 2
            if bool(narrow.any()):
                rows = narrow.nonzero().squeeze(1)
                cand[rows] = self._exact_candidates(q[rows], n_cand, lo[rows], hi[rows])
                todo = (~narrow).nonzero().squeeze(1)
            if todo.numel():
                fetch = min(n, n_cand + int((n - inside[todo]).max()))
        qn = np.ascontiguousarray(q.float().cpu().numpy())
        while todo.numel():
            _, ids = self._faiss.search(qn[todo.cpu().numpy()], fetch)
            ids = torch.from_numpy(ids).to(self.device)
            ok = self._in_window(ids, None if lo is None else lo[todo], None if hi is None else hi[todo])
            # keep valid ids in faiss order (stable sort puts valid ones first)
            order = torch.sort((~ok).to(torch.int8), dim=1, stable=True).indices[:, :n_cand]
            cand[todo] = ids.gather(1, order).masked_fill_(~ok.gather(1, order), -1)
            short = ok.sum(1) < need[todo]
            if fetch >= n or not bool(short.any()):
                break
            todo, fetch = todo[short], min(n, fetch * 4)
        return cand
