"""MbPA drawing its K neighbours from a kNN-LM datastore of the training set, or from the
datastore and the test stream's memory together (`--mbpa-source datastore|both`).

The local adaptation is the same exact rank-K form as stream MbPA
(lmadapt.adapt.adapted_log_probs_lowrank, pool layout). What differs is where the
neighbours' base predictions come from: the stream memory stored them when each position
was scored, a datastore holds only keys and values, so their logits W h_k + b are
recomputed per block of queries (U unique neighbours x V x d). That makes this source
slower than the stream's for the same K; blocks of queries bound the (U x V) temporaries.
Datastore distances are recomputed exactly from the stored keys (the kernel weights
1 / (eps + d) need precise small distances, which PQ does not give).
"""

from __future__ import annotations

import numpy as np
import torch

from lmadapt.adapt import adapted_log_probs_lowrank, kernel_weights, scaled_step_weights

SOURCES = ("stream", "datastore", "both")
_ROWS = 32   # queries per block: U <= rows x K (x 2 for both) neighbour logits at a time


def _datastore_pool(store, hidden: torch.Tensor, k: int, nprobe: int):
    """(sq (m, K), valid (m, K), pool keys (U, d), pool values (U,), index (m, K))."""
    dist, ids = store.search(hidden, k, nprobe=nprobe, recompute=True)
    valid = ids >= 0
    uniq, inv = torch.unique(ids.clamp(min=0), return_inverse=True)
    keys = torch.from_numpy(store.keys[uniq.numpy()].astype(np.float32))
    return dist.masked_fill(~valid, float("inf")), valid, keys, store.values[uniq], inv


def _stream_pool(memory, hidden: torch.Tensor, k: int, window):
    sq, idx, valid = memory.knn(hidden, k, window=window)
    uniq, inv = torch.unique(idx, return_inverse=True)
    return sq.cpu().float(), valid.cpu(), memory.keys[uniq].cpu().float(), memory.values[uniq].cpu(), inv.cpu()


def mbpa_log_probs(source: str, store, memory, hidden: torch.Tensor, logits: torch.Tensor, window, *, k: int,
                   nprobe: int, weight: torch.Tensor, bias: torch.Tensor, alpha: float, steps: int, beta: float,
                   eps: float, normalise: bool, adapt: str, alpha_scaled: float = 0.0) -> torch.Tensor:
    """(m, V) adapted log-probabilities with neighbours from `source` ("datastore" or "both");
    alpha_scaled > 0 takes a per-query step as lmadapt.adapt.scaled_step_weights does."""
    out = []
    device = hidden.device
    W, b = weight.detach().cpu().float(), bias.detach().cpu().float()
    for s in range(0, hidden.size(0), _ROWS):
        q, ql = hidden[s:s + _ROWS].cpu().float(), logits[s:s + _ROWS].cpu().float()
        lo, hi = window
        sq, valid, keys, values, idx = _datastore_pool(store, q, k, nprobe)
        if source == "both" and memory is not None and len(memory) > 0:
            s_sq, s_valid, s_keys, s_values, s_idx = _stream_pool(memory, q, k, (lo[s:s + _ROWS], hi[s:s + _ROWS]))
            s_sq = s_sq.masked_fill(~s_valid, float("inf"))
            # The K nearest of the union, each candidate pointing into the joined pool.
            cand_sq = torch.cat([sq, s_sq], 1)
            cand_idx = torch.cat([idx, s_idx + keys.size(0)], 1)
            cand_valid = torch.cat([valid, s_valid], 1)
            kk = min(k, cand_sq.size(1))
            sq, order = cand_sq.topk(kk, dim=1, largest=False)
            idx, valid = cand_idx.gather(1, order), cand_valid.gather(1, order)
            keys, values = torch.cat([keys, s_keys]), torch.cat([values, s_values])
        w = kernel_weights(sq.masked_fill(~valid, 0.0), valid, eps, normalise)
        step = alpha
        if alpha_scaled > 0:
            w, step = scaled_step_weights(w, keys.pow(2).sum(1)[idx], valid, alpha_scaled), 1.0
        out.append(adapted_log_probs_lowrank(q, keys, values, w, W, b, alpha=step, steps=steps, beta=beta,
                                             nb_index=idx, query_logits=ql, adapt=adapt))
    return torch.cat(out).to(device)
