"""kNN-LM (Khandelwal et al. 2020): nearest neighbours in a datastore of the training set.

For a query h_t (the output layer's input), the k nearest datastore keys by squared L2
give p_knn(w) ∝ Σ_{j in kNN, v_j = w} exp(−d_j / T). Only the target's probability is
needed for scoring: one faiss search per stream segment, then per row a logsumexp over
the neighbours whose value is the target minus a logsumexp over all k, so nothing of
size V is formed. Distances are faiss's (approximate under PQ) or, with `recompute`,
sum((q − key)²) from the stored float16 keys, as the reference code allows.

T: a fixed temperature, or (temperature 0) one scaled per query to its neighbours,
T_t = c · mean_j d_j(t) over its k distances (c = `temperature_scaled`). Distances between
hidden states grow with the model (squared norms ~20 for the PTB LSTMs, ~500 for the
GPT-2's output-layer inputs), so a fixed T right for one model is far off for another:
the best fixed T on valid was 0.3 for an LSTM and 30 for the GPT-2, while T / (mean
neighbour distance) was 0.14 and 0.12; c = 0.13 did better than the best fixed T on both
(docs/knn.md). The scaled T uses only the query and the datastore, so it stays causal.

The datastore never contains the stream being scored (lmadapt.datastore refuses one
built from the evaluated split), so no position window is needed: the method reads
nothing of the stream and its results do not depend on the segment length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lmadapt.errors import LmadaptError
from lmadapt.methods.base import MixtureMethod, Segment
from lmadapt.params import NON_NEGATIVE, POSITIVE, at_least

_SEGMENT = 256   # faiss amortises its per-call overhead over the rows of one search


@dataclass
class KnnParams:
    k: int = 1024               # neighbours per query
    temperature: float = 0.0    # T in exp(−d / T); 0: scaled per query (temperature_scaled)
    temperature_scaled: float = 0.13  # c of the scaled T = c · mean distance to the k neighbours
    nprobe: int = 32            # IVF lists visited per query (ignored by a flat index)
    recompute: bool = False     # exact distances from the stored keys instead of faiss's
    datastore: str = ""         # datastore directory (`lmadapt datastore build`); --datastore

    RANGES: ClassVar[dict] = {"k": at_least(1), "temperature": NON_NEGATIVE, "temperature_scaled": POSITIVE,
                              "nprobe": at_least(1)}
    HELP: ClassVar[dict] = {"temperature": "T of exp(-d/T); 0 scales it per query to its neighbours' distances",
                            "temperature_scaled": "c of the scaled T = c * mean distance to the k neighbours"}


def knn_target_log_probs(dist: torch.Tensor, ids: torch.Tensor, values: torch.Tensor, targets: torch.Tensor,
                         temperature: float, scaled: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """log p_knn(target) per row from (L, k) squared distances and datastore ids (−1: none).
    `temperature` 0: each row's T is `scaled` times its mean distance over its neighbours.

    Rows where no neighbour has the target get −inf (p_knn = 0, which the λ mixture
    handles); rows with no neighbour at all are unavailable.
    """
    found = ids >= 0
    dist = dist.float()
    if temperature > 0:
        t = temperature
    else:  # per row: c · mean of its found distances (a row with none is unavailable below)
        count = found.sum(1, keepdim=True).clamp(min=1)
        t = (scaled * dist.masked_fill(~found, 0.0).sum(1, keepdim=True) / count).clamp(min=1e-12)
    scores = (-dist / t).masked_fill(~found, float("-inf"))
    neighbour_values = values[ids.clamp(min=0)]
    hits = found & (neighbour_values == targets.unsqueeze(1))
    available = found.any(1)
    safe = torch.where(available.unsqueeze(1), scores, torch.zeros_like(scores))
    log_p = torch.logsumexp(safe.masked_fill(~hits, float("-inf")), 1) - torch.logsumexp(safe, 1)
    return log_p, available


class KnnLM(MixtureMethod):
    name = "knn"
    Params = KnnParams
    default_lambda = 0.25  # kNN-LM's WikiText-103 setting
    # Largest k first: its searches are cached and serve the smaller k (Datastore.search).
    # T: the scaled one (0) and fixed values from the PTB LSTM's best (0.3; its neighbour
    # distances run 0.3 to 2.8) to the GPT-2's (30; distances ~90 to ~300).
    grid = {"k": [1024, 256, 64], "temperature": [0.0, 0.3, 1.0, 3.0, 10.0, 30.0]}

    def __init__(self, params=None):
        super().__init__(params)
        p = self.params
        if p.k < 1:
            raise LmadaptError(f"knn k must be >= 1, got {p.k}")
        if not p.temperature >= 0:
            raise LmadaptError(f"knn temperature must be >= 0 (0: scaled), got {p.temperature}")
        if not p.temperature_scaled > 0:
            raise LmadaptError(f"knn temperature_scaled must be > 0, got {p.temperature_scaled}")
        if p.nprobe < 1:
            raise LmadaptError(f"knn nprobe must be >= 1, got {p.nprobe}")
        if not p.datastore:
            raise LmadaptError("knn needs a datastore: --datastore DIR (build one with `lmadapt datastore build`)")

    def preferred_segment_len(self) -> int | None:
        return _SEGMENT

    def start(self, ctx) -> None:
        from lmadapt.datastore import backbone_sizes, open_datastore

        self.store = open_datastore(self.params.datastore, threads=torch.get_num_threads())
        d = backbone_sizes(ctx.model)[0]
        if self.store.key_kind == "output" and d != self.store.dim:
            raise LmadaptError(f"datastore {self.store.path} has keys of dimension {self.store.dim}, the model {d}")

    def key_kind(self) -> str:
        return self.store.key_kind  # queries of the kind the datastore's keys are

    def neighbours(self, hidden: torch.Tensor):
        p = self.params
        return self.store.search(hidden, p.k, nprobe=p.nprobe, recompute=p.recompute)

    def target_log_probs(self, seg: Segment):
        queries = seg.keys.get(self.store.key_kind, seg.hidden) if self.store.key_kind != "output" else seg.hidden
        if queries.size(-1) != self.store.dim:
            raise LmadaptError(f"datastore {self.store.path} has keys of dimension {self.store.dim}, "
                               f"the model's {self.store.key_kind} vectors {queries.size(-1)}")
        dist, ids = self.neighbours(queries)
        log_p, available = knn_target_log_probs(dist, ids, self.store.values, seg.targets.cpu(),
                                                self.params.temperature, self.params.temperature_scaled)
        return log_p.to(seg.hidden.device), available.to(seg.hidden.device)
