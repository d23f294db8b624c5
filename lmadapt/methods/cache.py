"""Neural cache (Grave et al. 2016).

p_cache(w | t) ∝ Σ_{t-N <= i < t, y_i = w} exp(θ h_t·h_i). Only the target's
probability is needed for scoring, so this is an (L x memory) attention, never
a V-sized vector. Unlike awd-lstm-lm's pointer.py it works from the first
token: with an empty window the cache is unavailable and its λ goes back to
the model.

θ by default scales with the model: θ_t = c / mean ‖h_i‖² over the keys in
t's window (c = `theta_scaled`), a causal running statistic of the stream's own
past. The best fixed θ differs threefold between the PTB and WikiText-2 recipe
models (0.3 vs 0.1) and their keys' mean squared norms differ in step (22 vs 50);
c = 6.7 matched each model's best fixed θ on valid (bench/defaults). `theta > 0`
fixes θ as in Grave et al. (the paper preset's 0.3).

By default (`select`) the window and the scaled θ's c are chosen per position from the
stream itself, because no one fixed pair serves every model: the PTB recipe LSTM's best
window is 500 and it loses 5 points of gain at 5000, while the WikiText-2 recipe GPT-2's
best is 5000 with a θ five times the scaled one (bench/defaults). The cache holds one
expert per window in N·(0.1, 0.2, 0.4, 1) and c in c·(1, 1.5, 2, 3, 4, 6, 8) (or the fixed θ), and
gives their Bayesian average: expert k's weight at position t is proportional to
Π_{s<t} ((1−λ) p_model(y_s) + λ p_k(y_s)), how well it would have scored the tokens
already scored, mixed with the model at the cache's default λ. Only past targets enter the
weights, so the cache stays causal; mixed with the model at that λ, its total log-loss is
within log(number of experts) nats of the best expert's in hindsight on the same stream (a
fraction of a percent of perplexity over a few thousand tokens; lmadapt.methods.selection). `select` false is the single cache of
Grave et al. with window N.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lmadapt.errors import LmadaptError
from lmadapt.methods.base import MixtureMethod, Segment
from lmadapt.methods.selection import OnlineSelection, wide
from lmadapt.params import NON_NEGATIVE, POSITIVE, at_least

_ROWS = 128  # segment rows per attention block
# Online selection's experts: windows as fractions of N, and multiples of the scaled θ's c.
WINDOW_FRACTIONS = (0.1, 0.2, 0.4, 1.0)
THETA_MULTIPLES = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)


@dataclass
class CacheParams:
    window: int = 5000         # N: how many past positions the cache attends over (select: the longest window)
    theta: float = 0.0         # a fixed inverse temperature (Grave et al.'s θ); 0: scaled, below
    theta_scaled: float = 6.7  # c of the scaled θ = c / mean ‖h_i‖² over the window (bench/defaults)
    select: bool = True        # choose the window and c online among experts (module docstring)

    RANGES: ClassVar[dict] = {"window": at_least(1), "theta": NON_NEGATIVE, "theta_scaled": POSITIVE}
    HELP: ClassVar[dict] = {"theta": "fixed inverse temperature θ; 0 scales it to the keys' norms",
                            "theta_scaled": "c of the scaled θ = c / mean squared key norm in the window",
                            "select": "choose the window (among N/10, N/5, N/2.5, N) and the scaled θ's c "
                                      "(among c·{1, 1.5, 2, 3, 4, 6, 8}) per position by Bayesian averaging over the "
                                      "stream scored so far; false: one cache of window N"}


class NeuralCache(MixtureMethod):
    name = "cache"
    Params = CacheParams
    default_lambda = 0.2  # bench/defaults
    # theta 0 is the scaled θ (at the default c); the fixed values are Grave et al.'s.
    # The grid's settings are single caches; online selection (the default) is tried as the
    # default setting alone (DEFAULT_POINT_AXES): crossed with every window and θ it would
    # be a search over searches.
    grid = {"window": [500, 1000, 5000], "theta": [0.0, 0.1, 0.3, 0.5, 1.0], "select": [False]}
    DEFAULT_POINT_AXES = frozenset({"select"})
    PRESETS = {"paper": {"window": 500, "theta": 0.3, "select": False, "lambda": 0.15}}

    def __init__(self, params=None):
        super().__init__(params)
        if self.params.window < 1:
            raise LmadaptError(f"cache window must be >= 1, got {self.params.window}")

    @classmethod
    def settings_from_file(cls, params: dict) -> dict:
        """Files written before `select` existed ran one cache of their window."""
        return params if "select" in params else {**params, "select": False}

    def experts(self) -> list[tuple[int, float]]:
        """(window, θ or scaled-θ c) of each expert of the online selection (one: no selection)."""
        p = self.params
        if not p.select:
            return [(p.window, p.theta or p.theta_scaled)]
        windows = sorted({max(1, round(p.window * f)) for f in WINDOW_FRACTIONS})
        thetas = [p.theta] if p.theta > 0 else [p.theta_scaled * m for m in THETA_MULTIPLES]
        return [(w, t) for w in windows for t in thetas]

    def memory_window(self) -> int:
        return self.params.window

    def start(self, ctx) -> None:
        self.memory = ctx.memory
        self.selection = OnlineSelection(self.experts(), self.default_lambda, ctx.device)

    def weights(self) -> dict[tuple[int, float], float]:
        """The experts' posterior weights after the tokens scored so far."""
        return self.selection.weights()

    def summary(self) -> dict:
        """The selection's three heaviest experts at the end of the stream."""
        if not self.params.select or not hasattr(self, "selection"):
            return {}
        name = "theta" if self.params.theta > 0 else "theta_scaled"
        top = self.selection.top(3)
        (w, t), p = top[0]
        theta = f"θ {t:g}" if name == "theta" else f"scaled θ with c {t:g}"
        return {"selected": [{"window": w, name: t, "weight": round(p, 4)} for (w, t), p in top],
                "text": f"selected window {w}, {theta} (weight {p:.2f} at the end of the stream)"}

    def target_log_probs(self, seg: Segment):
        if self.params.select:
            base = seg.log_probs.gather(1, seg.targets.unsqueeze(1)).squeeze(1)
            parts = [self._select(seg.hidden[s:s + _ROWS], seg.positions[s:s + _ROWS], seg.targets[s:s + _ROWS],
                                  base[s:s + _ROWS]) for s in range(0, seg.positions.numel(), _ROWS)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        # Rows go in blocks: each block attends over its own window (N + block entries), so a
        # long stream segment (MbPA prefers 512) costs no more per row than a short one.
        parts = [self._rows(seg.hidden[s:s + _ROWS], seg.positions[s:s + _ROWS], seg.targets[s:s + _ROWS])
                 for s in range(0, seg.positions.numel(), _ROWS)]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _rows(self, hidden, rows, targets):
        mem = self.memory
        keys, values, positions = mem.keys, mem.values, mem.positions
        t = rows.unsqueeze(1)
        # The shared memory may be much longer than this window (MbPA's N): attend only over
        # the entries some row can see.
        near = (positions >= rows.min() - self.params.window) & (positions < rows.max())
        if not bool(near.all()):
            slots = near.nonzero().squeeze(1)
            keys, values, positions = keys[slots], values[slots], positions[slots]
        # Strictly earlier, and within the last N positions.
        visible = (positions.unsqueeze(0) < t) & (positions.unsqueeze(0) >= t - self.params.window)
        dots = hidden @ keys.T
        if self.params.theta > 0:
            theta = self.params.theta
        else:  # c / mean squared norm of each row's visible keys
            seen = visible.to(dots.dtype)
            mean_sq = (seen @ keys.to(dots.dtype).pow(2).sum(1)) / seen.sum(1).clamp(min=1)
            theta = (self.params.theta_scaled / mean_sq.clamp(min=1e-12)).unsqueeze(1)
        scores = theta * dots
        scores = scores.masked_fill(~visible, float("-inf"))
        available = visible.any(1)
        # Rows with nothing visible get a harmless 0 instead of NaN from an all -inf softmax.
        log_attn = torch.log_softmax(torch.where(available.unsqueeze(1), scores, torch.zeros_like(scores)), 1)
        hits = values.unsqueeze(0) == targets.unsqueeze(1)
        log_p = torch.logsumexp(log_attn.masked_fill(~(hits & visible), float("-inf")), 1)
        return log_p, available

    def _select(self, hidden, rows, targets, base):
        """The Bayesian average of the experts for a block of rows (in stream order).

        Every expert's θ is a multiple of one θ_t (the fixed θ, or c / mean ‖h_i‖² over the
        row's longest window), so one exponential per key serves all of them: with
        E = exp(θ_t h_t·h_i − max), the expert at multiple m reads E^m (squares and
        products of powers already taken), and a window's sums are prefix sums over the keys
        sorted nearest first. float64 keeps a short window's sum from underflowing beside the
        longest window's maximum in all but extreme cases, which are recomputed in log space."""
        mem, N = self.memory, self.params.window
        first, last = rows.min(), rows.max()
        near = (mem.positions >= first - N) & (mem.positions < last)
        slots = near.nonzero().squeeze(1)
        if slots.numel() == 0:  # nothing stored before these rows yet: no expert has a say
            return torch.zeros_like(base), torch.zeros_like(rows, dtype=torch.bool)
        slots = slots[mem.positions[slots].argsort(descending=True)]  # nearest first: a window is a prefix
        keys, values, positions = mem.keys[slots], mem.values[slots], mem.positions[slots]
        M = positions.numel()
        # Keys a row may not see sit in two thin slabs (element-wise work with a boolean mask
        # over the whole block is several times slower than an exponential): its own and later
        # positions at the head, positions beyond its window N at the tail.
        head = int((positions >= first).sum())
        tail = int((positions < last - N).sum())
        ascending = positions.flip(0).contiguous()
        windows = sorted({w for w, _ in self.experts()})
        starts = rows.unsqueeze(1) - torch.tensor(windows, device=rows.device).unsqueeze(0)   # (rows, windows)
        ends = M - torch.searchsorted(ascending, starts.contiguous())   # prefix length of each window
        begin = M - torch.searchsorted(ascending, rows.unsqueeze(1).contiguous())  # keys at positions >= row
        available = begin.squeeze(1) < ends[:, -1]   # a key in the longest window (then in every window)
        dt = wide(rows.device)
        scores = (hidden @ keys.T).to(dt)
        if self.params.theta > 0:
            theta = torch.full_like(scores[:, :1], self.params.theta)
        else:  # c / mean ‖h_i‖² over the row's longest window: prefix sums of the sorted squared norms
            sq = torch.cat([torch.zeros(1, dtype=dt, device=rows.device), keys.pow(2).sum(1).to(dt).cumsum(0)])
            count = (ends[:, -1:] - begin).clamp(min=1)
            mean_sq = (sq[ends[:, -1:]] - sq[begin]) / count
            theta = self.params.theta_scaled / mean_sq.clamp(min=1e-12)
        scores.mul_(theta)
        ago = rows.unsqueeze(1) - positions.unsqueeze(0)
        if head:
            scores[:, :head].masked_fill_(ago[:, :head] < 1, float("-inf"))
        if tail:
            scores[:, M - tail:].masked_fill_(ago[:, M - tail:] > N, float("-inf"))
        top = scores.amax(1, keepdim=True)
        scores.sub_(torch.where(torch.isfinite(top), top, torch.zeros_like(top)))
        e = scores.exp_()   # 0 where not visible
        # The target's keys are few: the numerators gather them instead of a masked sum over all.
        hit_rows, hit_cols = (values.unsqueeze(0) == targets.unsqueeze(1)).nonzero(as_tuple=True)
        inside = (hit_cols.unsqueeze(1) < ends[hit_rows]).to(dt)           # (hits, windows)
        multiples = [1.0] if self.params.theta > 0 else list(THETA_MULTIPLES)
        last_col = (ends - 1).clamp(min=0)
        columns = {}
        powers = {1.0: e}

        def power(m: float):
            """E^m from powers already taken (squares and products are far cheaper than pow)."""
            if m not in powers:
                if m / 2 in powers:
                    powers[m] = powers[m / 2] * powers[m / 2]
                elif m - 1 in powers:
                    powers[m] = powers[m - 1] * e
                elif m == 1.5:
                    powers[m] = e * e.sqrt()
                else:
                    powers[m] = e.pow(m)
            return powers[m]

        for m in sorted(multiples):
            p = power(m)
            den = p.cumsum(1).gather(1, last_col)                          # (rows, windows)
            num = torch.zeros_like(den).index_add_(0, hit_rows, p[hit_rows, hit_cols].unsqueeze(1) * inside)
            # A short window whose keys all score far below the longest window's maximum sums to
            # 0 (underflow): those few entries are recomputed in log space from their own keys.
            for r, j in ((den == 0) & available.unsqueeze(1)).nonzero().tolist():
                keep = slice(int(begin[r]), int(ends[r, j]))
                raw = (hidden[r] @ keys[keep].T).to(dt) * theta[r] * m
                hit = values[keep] == targets[r]
                den[r, j] = 1.0
                num[r, j] = torch.exp(torch.logsumexp(raw[hit], 0) - torch.logsumexp(raw, 0)) if bool(hit.any()) else 0.0
            for j, w in enumerate(windows):
                columns[(w, m)] = torch.log(num[:, j]) - torch.log(den[:, j])
        order = [(w, m) for w in windows for m in multiples]
        log_p = torch.stack([columns[k] for k in order], 1)          # (rows, experts), experts() order
        return self.selection.average(log_p, base, available), available
