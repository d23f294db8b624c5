"""Memory-based parameter adaptation of the softmax layer (Sprechmann et al. 2018).

For each query: the K nearest of the last N (hidden, next word) pairs, kernel
weights 1/(ε + ‖h_k − q‖²), T steps of size α on the output layer's weight and
bias against the weighted neighbour NLL plus β‖θ_x − θ‖², predict, discard.
With plain gradient steps the adapted logits come from the exact rank-K form
(lmadapt.adapt.adapted_log_probs_lowrank), reusing what the memory stored for
each neighbour when its position was scored: for T = 1 its base probabilities
(the step needs exactly those: no softmax per query or per segment, only a
gather of K rows per query), for T > 1 its base log-probabilities (a shift of
the logits, which serves the same). `store` sets the dtype of the T = 1
probability table (N x V, the largest thing in memory): float32 (default,
exact up to float32 rounding), or float16 / bfloat16 to halve its memory (not
its time: each slab is converted back to float32 before the gather). Sums are
float32 either way; the only error is the rounding of each stored probability
(relative 2^-11 for float16, which has the smaller error on [0, 1] and only
loses relative precision below 6e-5, i.e. absolute errors < 3e-8; 2^-8 for
bfloat16); bench/eval_speed/run.py --store-error measures it on a real stream.
RMSprop/Adam steps break the low-rank structure and go through the batched
torch.func path instead (nothing stored).

With dynamic evaluation the stored base predictions lag the current weights
(they are what the model predicted when that position was scored); we keep
them as they are: MbPA then adapts from the current weights using slightly
stale neighbour predictions, which costs nothing and changes little for
small dynamic-evaluation learning rates.

By default (`select`) the memory N is chosen per position from the stream itself
(lmadapt.methods.selection), because no one N serves every model: on valid the PTB
recipe LSTM does best with N = 500 and loses 0.6 points of gain at 2,000, while both
WikiText-2 recipe models lose about 3 points at 500 (each at its best λ; bench/defaults).
MbPA runs one local adaptation per memory in N·(0.25, 1) and gives their Bayesian
average, weighted by how well each, mixed with the model at MbPA's default λ, scored the
tokens already scored. `select` false is one memory of N, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lmadapt.adapt import KERNELS, LinearMbPA, functional_mbpa, kernel_weights
from lmadapt.errors import LmadaptError
from lmadapt.methods.base import MixtureMethod, Segment
from lmadapt.methods.mbpa_source import SOURCES, mbpa_log_probs
from lmadapt.methods.selection import OnlineSelection
from lmadapt.params import NON_NEGATIVE, POSITIVE, at_least


@dataclass
class MbPAParams:
    # N, K, the scaled alpha, the selection and λ 0.15: the setting that lost least against
    # each recipe model's own best on valid (bench/defaults, docs/results.md section 9); the
    # paper's App. B setting is the preset "paper".
    memory: int = 2000      # N: past positions searched (select: the longest window)
    k: int = 32             # neighbours per query
    alpha: float = 0.0      # local learning rate; 0: scaled to the hidden states' norms, below
    alpha_scaled: float = 67.0  # c of the scaled α = c / mean ‖h_k‖² of each query's neighbours
    steps: int = 1          # T local steps
    beta: float = 0.0       # prior weight on ||theta_x - theta||^2
    eps: float = 1e-3       # kernel epsilon
    normalise: bool = True  # kernel weights sum to 1
    optimizer: str = "sgd"  # sgd (exact rank-K path) | rmsprop | adam (torch.func path)
    store: str = "float32"  # dtype of the stored neighbour probabilities (T=1): float32 | float16 | bfloat16
    adapt: str = "all"      # what the local steps move: all (W and b, the paper) | weight | bias
    source: str = "stream"  # neighbours from: stream (the paper) | datastore (training set) | both
    datastore: str = ""     # kNN-LM datastore for source datastore|both (--datastore)
    select: bool = True     # choose the memory among N/4 and N online (module docstring)

    RANGES: ClassVar[dict] = {"memory": at_least(1), "k": at_least(1), "alpha": NON_NEGATIVE, "steps": at_least(1),
                              "beta": NON_NEGATIVE, "eps": POSITIVE, "alpha_scaled": POSITIVE}
    HELP: ClassVar[dict] = {"alpha": "local learning rate α; 0 scales it to the neighbours' squared norms",
                            "alpha_scaled": "c of the scaled α = c / mean squared norm of each query's neighbours",
                            "select": "choose the memory (N/4 or N) per position by Bayesian averaging over the "
                                      "stream scored so far (one local adaptation per memory); false: one memory of N"}


# Online selection's experts: memories as fractions of N.
WINDOW_FRACTIONS = (0.25, 1.0)
_STORE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Stream segment length the T = 1 path prefers: the (N + L) x V table is read from DRAM
# once per segment and then served from cache, so longer segments amortise it.  Measured
# end to end (bench/eval_speed/run.py RUN --skip 5000 --tokens 10000 --only mbpa --segment L,
# V=11,847, d=200, N=5000, K=256, 1 thread, column-blocked store): L=128: 1.52k tokens/s,
# 256: 1.62-1.75k, 512: 1.72-1.94k; before the column-blocked store 1024 was slower than 512.
_SEGMENT = 512


class MbPA(MixtureMethod):
    name = "mbpa"
    Params = MbPAParams
    default_lambda = 0.15  # bench/defaults (with the scaled α and the selection; the paper's App. B PTB setting is 0.1)
    # Searched by `lmadapt tune`: the paper's App. B grid (PAPER_GRID) tops out at alpha 1 and
    # K >= 256, while on the CPU-scale models here small K with large alpha does best
    # (bench/defaults: every setting of this grid on each recipe model's valid split).
    # alpha 0 is the scaled α at the default c (67 = 3 x 22.4: the fixed α = 3 on the model
    # whose mean squared hidden norm is 22.4, bench/defaults); the others are fixed steps.
    # The grid's settings are single memories; the online selection (the default) is tried as
    # the default setting alone (DEFAULT_POINT_AXES), as the cache's is.
    grid = {"memory": [500, 2000, 5000], "k": [32, 256], "steps": [1], "alpha": [0.0, 0.15, 1.0, 3.0, 10.0, 30.0],
            "select": [False]}
    DEFAULT_POINT_AXES = frozenset({"select"})
    PAPER_GRID = {"memory": [500, 1000, 5000], "k": [256, 512], "steps": [1, 5, 10],
                  "alpha": [0.01, 0.1, 0.15, 0.2, 0.5, 1.0]}
    PRESETS = {"paper": {"memory": 5000, "k": 256, "alpha": 0.15, "steps": 1, "select": False,
                         "lambda": 0.1}}  # App. B, PTB

    def __init__(self, params=None):
        super().__init__(params)
        p = self.params
        if p.k < 1 or p.memory < 1:
            raise LmadaptError(f"mbpa needs k >= 1 and memory >= 1, got k={p.k}, memory={p.memory}")
        if p.k > p.memory:
            raise LmadaptError(f"mbpa k={p.k} is larger than its memory N={p.memory}")
        if p.optimizer not in ("sgd", "rmsprop", "adam"):
            raise LmadaptError(f"mbpa optimizer must be sgd, rmsprop or adam, got {p.optimizer!r}")
        if p.adapt not in KERNELS:
            raise LmadaptError(f"mbpa adapt must be one of {', '.join(KERNELS)}, got {p.adapt!r}")
        if p.store not in _STORE:
            raise LmadaptError(f"mbpa store must be one of {', '.join(_STORE)}, got {p.store!r}")
        if p.source not in SOURCES:
            raise LmadaptError(f"mbpa source must be one of {', '.join(SOURCES)}, got {p.source!r}")
        if p.source != "stream" and not p.datastore:
            raise LmadaptError(f"mbpa source {p.source} needs --datastore DIR")
        if p.source != "stream" and p.optimizer != "sgd":
            raise LmadaptError("mbpa source datastore|both supports optimizer sgd only")
        if p.alpha == 0 and p.optimizer != "sgd":
            raise LmadaptError(f"mbpa's scaled alpha (alpha 0) needs optimizer sgd, got {p.optimizer}: give a fixed --mbpa-alpha")
        if p.alpha == 0 and p.steps > 1 and p.beta > 0:
            # The per-query step is folded into the kernel weights, exact only without the prior
            # after the first step (lmadapt.adapt.scaled_step_weights).
            raise LmadaptError("mbpa's scaled alpha (alpha 0) with steps > 1 needs beta 0: give a fixed --mbpa-alpha")

    @classmethod
    def settings_from_file(cls, params: dict) -> dict:
        """Files written before `select` existed ran one memory of N."""
        return params if "select" in params else {**params, "select": False}

    def experts(self) -> list[int]:
        """The memory N of each expert of the online selection (one: no selection). A
        datastore-only source has no stream memory to choose."""
        p = self.params
        if not p.select or p.source == "datastore":
            return [p.memory]
        return sorted({max(p.k, round(p.memory * f)) for f in WINDOW_FRACTIONS})

    def summary(self) -> dict:
        """The memory the selection weighs most at the end of the stream."""
        if len(self.experts()) < 2 or not hasattr(self, "selection"):
            return {}
        top = self.selection.top(3)
        n, w = top[0]
        return {"selected": [{"memory": m, "weight": round(p, 4)} for m, p in top],
                "text": f"selected memory {n} (weight {w:.2f} at the end of the stream)"}

    def _scaled_step(self) -> float:
        """c of the scaled step when alpha is 0, else 0 (a fixed step)."""
        return self.params.alpha_scaled if self.params.alpha == 0 else 0.0

    def _one_step(self) -> bool:
        return self.params.optimizer == "sgd" and self.params.steps == 1

    def memory_window(self) -> int:
        return self.params.memory if self.params.source != "datastore" else 0

    def memory_extras(self) -> dict[str, torch.dtype]:
        if self.params.optimizer != "sgd" or self.params.source != "stream":
            return {}  # the torch.func path recomputes everything from the neighbours' inputs
        if self._one_step():
            return {"probs": _STORE[self.params.store]}
        return {"log_probs": torch.float32}

    def preferred_segment_len(self) -> int | None:
        return _SEGMENT if self._one_step() and self.params.source == "stream" else None

    def start(self, ctx) -> None:
        self.memory = ctx.memory
        self.selection = OnlineSelection(self.experts(), self.default_lambda, ctx.device)
        if self.params.source != "stream":
            from lmadapt.datastore import open_datastore

            self.store = open_datastore(self.params.datastore, threads=torch.get_num_threads())
            if self.store.key_kind != "output":
                raise LmadaptError(f"mbpa source {self.params.source} adapts the output layer at the datastore's keys, "
                                   f"so it needs a datastore of output keys; {self.store.path} holds "
                                   f"{self.store.key_kind} keys")
        self.decoder = ctx.model.output_layer()  # shares the weight: sees dyneval's updates
        p = self.params
        self.local = LinearMbPA(self.decoder.weight.detach(), self.decoder.bias.detach(), k=p.k, alpha=p.alpha,
                                alpha_scaled=self._scaled_step(),
                                steps=p.steps, beta=p.beta, eps=p.eps, normalise=p.normalise,
                                logits_extra="log_probs", probs_extra="probs", adapt=p.adapt)

    def target_log_probs(self, seg: Segment):
        experts = self.experts()
        if len(experts) == 1:
            log_p = self._target_log_probs(seg, experts[0])
        else:
            base = seg.log_probs.gather(1, seg.targets.unsqueeze(1)).squeeze(1)
            columns = torch.stack([self._target_log_probs(seg, n) for n in experts], 1)
            log_p = self.selection.average(columns, base, torch.ones_like(base, dtype=torch.bool))
        # Rows with no neighbour yet come back unadapted (= the base model): no need to
        # mark them unavailable, mixing them in changes nothing.
        return log_p, torch.ones_like(log_p, dtype=torch.bool)

    def _target_log_probs(self, seg: Segment, memory: int):
        """log p(target) of each row after adapting to its neighbours among the last `memory`
        positions."""
        t = seg.positions
        window = (t - memory, t)
        p = self.params
        if p.source != "stream":
            log_probs = mbpa_log_probs(p.source, self.store, self.memory, seg.hidden, seg.logits, window, k=p.k,
                                       nprobe=32, weight=self.decoder.weight, bias=self.decoder.bias,
                                       alpha=p.alpha, steps=p.steps, beta=p.beta, eps=p.eps,
                                       alpha_scaled=self._scaled_step(),
                                       normalise=p.normalise, adapt=p.adapt)
        elif p.optimizer == "sgd":
            # Dynamic evaluation may have moved the weights: always adapt from the current ones.
            self.local.weight, self.local.bias = self.decoder.weight.detach(), self.decoder.bias.detach()
            log_probs = self.local.log_probs(seg.hidden, self.memory, window=window, query_logits=seg.logits)
        else:
            sq, idx, valid = self.memory.knn(seg.hidden, p.k, window=window)
            w = kernel_weights(sq, valid, p.eps, p.normalise)
            log_probs = functional_mbpa(
                self.decoder, seg.hidden, self.memory.keys[idx], self.memory.values[idx], w,
                steps=p.steps, lr=p.alpha, beta=p.beta, optimizer=p.optimizer,
                trainable={"all": None, "weight": {"weight"}, "bias": {"bias"}}[p.adapt])
        return log_probs.gather(1, seg.targets.unsqueeze(1)).squeeze(1)
