"""Dynamic evaluation (Krause et al. 2017, "Dynamic Evaluation of Neural Sequence Models").

After each scored segment of L tokens, one gradient step on that segment's mean NLL.
The default rule, `rms`, is the one of the paper's reference code (benkrause/
dynamic-evaluation, dynamiceval.py), "RMS norm with decay to the global prior":

    θ ← θ − η ∇ / (MS + ε) + λ · r ⊙ (θ₀ − θ)

* MS is the root-mean-square gradient per weight, collected on the training split in
  consecutive segments of the same length L at batch size `stat_batch` (100), the
  recurrent state carried across segments, dropout off: MS = √(Σ_b g_b² / B) over the
  B batches (all of them, or the first `max_batches`).  Despite its name MS is the
  root, and the step divides by it (not by its square root).
* r = MS / m with m the mean over weight *tensors* of each tensor's mean MS (not the
  mean over all weights), clipped at 1/λ so the decay never overshoots θ₀.
* θ₀ are the trained weights.  The reference's defaults: η = 5e-5, λ = 0.002,
  ε = 2e-5, L = 5; its grid (η ∈ 3e-5 … 1e-4, λ ∈ 0.001 … 0.005) scales with L/5.

The default η is scaled to the model (lr 0): η = c / (mean ‖h‖²)^p, the mean over the
positions the stream has scored so far (h: the output layer's input; `lr_scaled` = c,
`lr_power` = p).  Why: the rms rule moves every weight by about η, so a step changes an
output logit by about η · Σ|h_i|, which grows with ‖h‖; the same η that is best for an
LSTM (‖h‖² ≈ 27) diverges on a GPT-2 (‖h‖² ≈ 332).  The exponent is measured, not derived:
the best rates of the three recipe models (PTB and WikiText-2 LSTMs, a WikiText-2 GPT-2)
fall faster with ‖h‖ than 1/‖h‖ (p 0.5) and lie near one curve (‖h‖²)^-0.75, on which
c = 6.6e-4 (bench/defaults; the evidence in docs/results.md, "Choosing the scaled rate").
A fixed η (`--dyneval-lr 5e-5`, or `--preset paper`) is the reference's rule exactly.

Where lmadapt differs: `adapt` may restrict the update to a subset of the weights (the
normaliser is then the mean over that subset's tensors); the reference always adapts
every weight.  The `sgd` variant is θ ← θ − η ∇ + λ (θ₀ − θ), no statistics.

The statistics pass (one forward/backward over the training split at batch 100) is the
slow part of starting; when the stream loop is given a cache directory (the run
directory) its result is stored there, keyed by a hash of the weights, of the training
stream, L and the batch settings, so a second evaluation of the same run skips it.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from lmadapt.errors import LmadaptError
from lmadapt.methods.base import ModelAdapter, Segment
from lmadapt.params import NON_NEGATIVE, POSITIVE, at_least, between

# The statistics of the most recent key, in this process.
_RECENT: dict[str, list[torch.Tensor]] = {}

# The reference's hyper-parameter grid at L = 5 (dynamiceval.py --grid); both axes scale by L/5.
REFERENCE_LRS = [3e-5, 4e-5, 5e-5, 6e-5, 7e-5, 1e-4]
REFERENCE_DECAYS = [0.001, 0.002, 0.003, 0.005]
# Below the reference's grid, for Transformers: every reference rate diverged on the GPT-2
# recipe models (their output layer's inputs have ~23x the LSTM's squared norm, so a step of
# the same size moves the logits further); 1e-5 gained most on PTB, 5e-6 on WikiText-2
# (docs/dyneval.md, docs/backbones.md). tune drops a diverging rate early, so the reference
# rates cost a Transformer's search little.
LOW_LRS = [5e-6, 1e-5, 2e-5]


@dataclass
class DynEvalParams:
    lr: float = 0.0          # η; 0: scaled to the model, η = lr_scaled / (mean ‖h‖²)^lr_power (module docstring)
    lr_scaled: float = 6.6e-4   # c of the scaled η (chosen on three recipe models; module docstring)
    lr_power: float = 0.75      # p of the scaled η (ditto; 0.5 is η ∝ 1/RMS ‖h‖)
    decay: float = 0.002     # λ, pull toward the trained weights
    eps: float = 2e-5        # ε of the rms rule
    segment: int = 5         # L, tokens per update
    variant: str = "rms"     # rms (the reference rule) | sgd
    adapt: str = "all"       # all | output | lstm: which parameters move
    stat_batch: int = 100    # batch size of the gradient statistics (rms)
    max_batches: int = 0     # statistics over the first N batches of the training split (0: all of it)

    RANGES: ClassVar[dict] = {"lr": NON_NEGATIVE, "lr_scaled": NON_NEGATIVE, "lr_power": NON_NEGATIVE,
                              "decay": between(0, 1), "eps": POSITIVE, "segment": at_least(1),
                              "stat_batch": at_least(1), "max_batches": NON_NEGATIVE}
    HELP: ClassVar[dict] = {"lr": "learning rate η; 0 scales it to the model: lr_scaled / (mean squared norm of "
                                  "the output layer's inputs so far) ** lr_power",
                            "lr_scaled": "c of the scaled η = c / (mean squared norm of the output layer's "
                                         "inputs) ** p",
                            "lr_power": "p of the scaled η = c / (mean squared norm of the output layer's "
                                        "inputs) ** p"}


def select_parameters(model, adapt: str) -> list[torch.nn.Parameter]:
    """The parameters dynamic evaluation moves, each once (tied weights are one Parameter);
    which ones `adapt` names is the backbone's business (lmadapt.backbones)."""
    return model.adaptable_parameters(adapt)


class DynamicEvaluation(ModelAdapter):
    name = "dyneval"
    Params = DynEvalParams
    grid = {"lr": [0.0] + REFERENCE_LRS + LOW_LRS, "decay": REFERENCE_DECAYS}
    # The reference code's setting (benkrause/dynamic-evaluation, dynamiceval.py): a fixed η.
    PRESETS = {"paper": {"lr": 5e-5, "decay": 0.002}}

    def __init__(self, params=None):
        super().__init__(params)
        p = self.params
        if p.variant not in ("rms", "sgd"):
            raise LmadaptError(f"dyneval variant must be rms or sgd, got {p.variant!r}")
        if p.adapt not in ("all", "output", "lstm"):
            raise LmadaptError(f"dyneval adapt must be all, output or lstm, got {p.adapt!r}")
        if p.segment < 1:
            raise LmadaptError(f"dyneval segment must be >= 1, got {p.segment}")
        if p.stat_batch < 1:
            raise LmadaptError(f"dyneval stat_batch must be >= 1, got {p.stat_batch}")
        if p.max_batches < 0:
            raise LmadaptError(f"dyneval max_batches must be >= 0 (0: all), got {p.max_batches}")
        if p.decay < 0 or p.eps < 0:
            raise LmadaptError("dyneval decay and eps must be >= 0")
        self.stats_source = None  # rms: "computed", "cache" (file) or "memory" (this process) once started
        # The scaled η's running statistic: Σ ‖h‖² and the count of scored positions.
        self._sq_sum, self._count = 0.0, 0

    @classmethod
    def settings_from_file(cls, params: dict) -> dict:
        """Files written before `lr_power` existed (their `lr_scaled` without it) ran the
        square-root rule: give them p 0.5 so that `--config` reproduces their figures."""
        if "lr_scaled" in params and "lr_power" not in params:
            return {**params, "lr_power": 0.5}
        return params

    @classmethod
    def grid_for(cls, fixed: dict) -> dict:
        """The scaled η (0), then the reference's grid (with LOW_LRS after it), both axes scaled
        by L/5 as its --grid does."""
        scale = float(fixed.get("segment", cls.Params().segment)) / 5.0
        return {"lr": [0.0] + [v * scale for v in REFERENCE_LRS + LOW_LRS],
                "decay": [v * scale for v in REFERENCE_DECAYS]}

    def start(self, ctx) -> None:
        model = ctx.model
        self.model = model
        self.device = ctx.device
        self.adapted = select_parameters(model, self.params.adapt)
        if hasattr(model, "sparse_embedding_grad"):  # the stream's own copy of the model
            model.sparse_embedding_grad = True
        chosen = {id(p) for p in self.adapted}
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
        self.theta0 = [p.detach().clone() for p in self.adapted]
        p = self.params
        if p.variant == "rms":
            self.rms = self._statistics(ctx.corpus, getattr(ctx, "cache_dir", None))
            rate = decay_rates(self.rms, p.decay)
        else:
            self.rms = None
            rate = [torch.ones_like(w) for w in self.theta0]
        # The update rule rewritten so that one step is two passes over the weights:
        #   w <- w + decay * r (w0 - w) - lr * g * inv  =  keep * w + anchor - lr * g * inv
        # with keep = 1 - decay * r, anchor = decay * r * w0 and inv = 1 / (MS + eps)
        # precomputed here (r = 1 and inv = 1 for sgd).  The textbook form made ~8 passes and
        # temporaries per weight per segment, and the update dominates at L = 5.
        self.keep = [1.0 - p.decay * r for r in rate] if p.decay else None
        self.anchor = [p.decay * r * w0 for r, w0 in zip(rate, self.theta0)] if p.decay else None
        self.inv = [1.0 / (r + p.eps) for r in self.rms] if p.variant == "rms" else None

    # ------------------------------------------------------------------ statistics
    def _statistics(self, corpus, cache_dir) -> list[torch.Tensor]:
        """MS of the adapted weights.  Computed (and cached) for every weight: the gradient
        of a weight does not depend on which others adapt, so one pass serves all `adapt`
        choices."""
        if corpus is None or getattr(corpus, "train", None) is None:
            raise LmadaptError("dyneval's rms rule needs the training split for its gradient statistics")
        p = self.params
        every = select_parameters(self.model, "all")
        key = self._cache_key(corpus.train, every)
        rms = _RECENT.get(key)  # e.g. the passes of `lmadapt tune`, which share one model
        if rms is not None:
            self.stats_source = "memory"
        else:
            path = Path(cache_dir) / f"dyneval-stats-{key}.pt" if cache_dir is not None else None
            rms = _load_cached(path, every) if path is not None else None
            if rms is not None:
                self.stats_source = "cache"
            else:
                flags = [q.requires_grad for q in every]
                for q in every:
                    q.requires_grad_(True)
                try:
                    rms = gradient_rms(self.model, every, corpus.train.to(self.device), p.segment, p.stat_batch,
                                       p.max_batches)
                finally:
                    for q, f in zip(every, flags):
                        q.requires_grad_(f)
                self.stats_source = "computed"
                if path is not None:
                    _store(path, rms)
            _RECENT.clear()  # keep one entry: statistics are the size of the model
            _RECENT[key] = rms
        index = {id(q): i for i, q in enumerate(every)}
        return [rms[index[id(q)]].to(q.device) for q in self.adapted]

    def _cache_key(self, train: torch.Tensor, params) -> str:
        """Hash of everything the statistics depend on: the weights, which ones the
        statistics cover, the training stream, L and the batch settings."""
        h = hashlib.sha256()
        for name, t in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        names = {id(q): n for n, q in self.model.named_parameters()}
        h.update(",".join(names[id(q)] for q in params).encode())
        h.update(train.to("cpu", torch.int64).contiguous().numpy().tobytes())
        p = self.params
        h.update(f"split=train;L={p.segment};batch={p.stat_batch};max_batches={p.max_batches};v1".encode())
        # A wrapper that changes how a pass over other text runs (the harness's windows) says so
        context = getattr(self.model, "statistics_context", "")
        if context:
            h.update(f";context={context}".encode())
        return h.hexdigest()[:24]

    # ------------------------------------------------------------------ the loop's hooks
    def segment_len(self) -> int:
        return self.params.segment

    def update(self, seg: Segment, loss) -> None:
        grads = _dense(torch.autograd.grad(loss, self.adapted))
        lr = self._lr(seg)
        with torch.no_grad():
            apply_update(self.adapted, grads, lr=lr, keep=self.keep, anchor=self.anchor, inv=self.inv)

    def _lr(self, seg: Segment) -> float:
        """The fixed η, or the scaled one over the positions scored so far (this segment's
        included: they are scored before the update, so the statistic stays causal)."""
        p = self.params
        if p.lr > 0:
            return p.lr
        self._sq_sum += float(seg.hidden.float().pow(2).sum())
        self._count += seg.hidden.size(0)
        return p.lr_scaled / max(self._sq_sum / max(self._count, 1), 1e-12) ** p.lr_power


def gradient_rms(model, params: list[torch.Tensor], train: torch.Tensor, segment: int, batch: int,
                 max_batches: int = 0) -> list[torch.Tensor]:
    """MS per weight of `params`: √(mean over batches of the squared gradient of each
    batch's mean NLL), the training stream cut into `batch` contiguous columns walked in
    segments of `segment` tokens with the state carried (the reference's gradstat())."""
    from lmadapt.corpus import batchify

    if train.numel() < 2 * batch + 2:
        raise LmadaptError(f"dyneval's statistics need at least {2 * batch + 2} training tokens at stat_batch "
                           f"{batch}, got {train.numel()}")
    from lmadapt.heap import reuse_freed_memory

    was_training = model.training
    model.eval()
    try:
        with reuse_freed_memory():  # large logits at every step: see lmadapt/heap.py
            return _gradient_rms(model, params, batchify(train, batch), segment, max_batches)
    finally:
        model.train(was_training)


def _gradient_rms(model, params, data: torch.Tensor, segment: int, max_batches: int) -> list[torch.Tensor]:
    """gradient_rms over `data` (batch, n), the model in eval mode."""
    batch = data.size(0)
    n = data.size(1)
    sums = [torch.zeros_like(q) for q in params]
    state, count, i = model.init_state(batch, data.device), 0, 0
    while i < n - 2:  # the reference's bound: its last segment may be shorter
        seq = min(segment, n - 1 - i)
        x, y = data[:, i:i + seq], data[:, i + 1:i + 1 + seq]
        _, logits, state = model(x, state)
        state = model.detach_state(state)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        grads = _dense(torch.autograd.grad(loss, params))
        torch._foreach_addcmul_(sums, grads, grads)
        count += 1
        i += seq
        if max_batches and count >= max_batches:
            break
    return [(acc / count).sqrt() for acc in sums]


def _dense(grads) -> list[torch.Tensor]:
    # An untied embedding's gradient comes sparse (model.sparse_embedding_grad); a tied
    # one is already summed into the softmax's dense gradient.
    return [g.to_dense() if g.is_sparse else g for g in grads]


def decay_rates(rms: list[torch.Tensor], decay: float) -> list[torch.Tensor]:
    """r = MS / (mean over tensors of each tensor's mean MS), clipped at 1/λ."""
    norm = torch.stack([r.mean() for r in rms]).mean()
    rates = [r / norm for r in rms]
    if decay > 0:
        rates = [r.clamp(max=1.0 / decay) for r in rates]
    return rates


def _load_cached(path: Path, params) -> list[torch.Tensor] | None:
    if not path.is_file():
        return None
    from lmadapt import runs

    try:
        data = runs.load_tensors(path, map_location=params[0].device)
    except LmadaptError:
        return None  # a damaged cache file: recompute (and overwrite it)
    rms = data.get("rms") if isinstance(data, dict) else None
    if not isinstance(rms, list) or len(rms) != len(params) or any(
            not isinstance(r, torch.Tensor) or r.shape != q.shape for r, q in zip(rms, params)):
        return None
    return [r.to(q.dtype) for r, q in zip(rms, params)]


def _store(path: Path, rms) -> None:
    from lmadapt import runs

    try:
        runs.save_tensors(path, {"rms": [r.detach().cpu() for r in rms]})
    except OSError as exc:
        # A read-only run directory only costs the next evaluation the pass again.
        print(f"lmadapt: dyneval statistics not cached ({path.parent}: {exc.strerror or exc})", file=sys.stderr)


def apply_update(weights, grads, *, lr: float, keep=None, anchor=None, inv=None) -> None:
    """w <- keep * w + anchor - lr * g * inv, in place, in two passes over each weight."""
    if keep is not None:
        for w, k, a in zip(weights, keep, anchor):  # one pass: w <- anchor + w * keep
            torch.addcmul(a, w, k, out=w)
    if inv is not None:
        torch._foreach_addcmul_(weights, list(grads), inv, value=-lr)
    else:
        torch._foreach_add_(weights, list(grads), alpha=-lr)
