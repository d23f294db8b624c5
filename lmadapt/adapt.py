"""Memory-based parameter adaptation (MbPA; Sprechmann et al. 2018) of an output network.

For a query q with retrieved neighbours (h_k, v_k) and kernel weights w_k, MbPA takes T
gradient steps of size alpha from the trained output parameters theta on

    L(theta_x) = sum_k w_k * NLL(v_k | h_k; theta_x) + beta * ||theta_x - theta||^2

predicts for q with theta_x and throws theta_x away (paper, Algorithm 1 and eqs 4/8).

Three implementations, all computing the same numbers:

* :func:`adapted_log_probs_lowrank` -- plain gradient steps on a linear softmax layer
  (W, b).  Never forms a per-query copy of W; see the derivation in its docstring.
* :func:`functional_mbpa` -- any small output network and SGD / RMSprop / Adam, batched
  over queries with ``torch.func`` (each query gets its own parameter copy).
* :func:`naive_mbpa` -- the obvious reference (deep copy + ``torch.optim``, one query at a
  time), for tests and benchmarks only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad, vmap

# Elements allowed in one large temporary (128 MiB in float32); bounds chunk sizes.
_BUDGET = 1 << 25
# Per-chunk (queries x K x V) working set of the T-step loop.  Small enough to stay in a
# typical L3 cache: the loop is a few memory passes per step, and measured ~15% faster
# than 8x larger chunks (V=10k, K=256, 2 threads).
_STEP_BUDGET = 1 << 22
# Largest (distinct neighbours x V) probability matrix the T = 1 pool path makes in one go
# (1 GiB in float32).  Beyond it P is built in column blocks in two passes, the first for
# the softmax normalisers, which costs a second W h + b when logits are not given.
_POOL_BUDGET = 1 << 28
# Bytes of one column slab (U x block) of a stored probability table read by one
# embedding_bag call of the T = 1 path: about one core's L2, so the ~mK/U reuses of each
# row hit the cache instead of DRAM.  Measured (V=11,847, U=5,128..5,512, K=256, 1 thread):
# slabs of 32-128 columns 2-4x faster than one call over whole rows, larger slabs slower.
_SLAB_BYTES = 1 << 20


def kernel_weights(sq_dist: Tensor, valid_mask: Tensor, eps: float = 1e-3, normalise: bool = True) -> Tensor:
    """w_k = 1 / (eps + ||h_k - q||^2) on valid entries, 0 elsewhere; optionally rows sum to 1.

    A row without any valid entry stays all zero (MbPA then leaves that query unadapted).
    """
    w = torch.where(valid_mask, 1.0 / (eps + sq_dist.clamp_min(0)), torch.zeros((), dtype=sq_dist.dtype))
    if normalise:
        total = w.sum(-1, keepdim=True)
        w = torch.where(total > 0, w / total.clamp_min(torch.finfo(w.dtype).tiny), w)
    return w


# What the local steps of a linear softmax layer move, as the (x.y, 1) coefficients of the
# kernel k(x, y) = s_w x.y + s_b its rank-K form sums (s_b is the bias's share).
KERNELS = {"all": (1.0, 1.0), "weight": (1.0, 0.0), "bias": (0.0, 1.0)}


# --------------------------------------------------------------------------- linear layer
def scaled_step_weights(w: Tensor, nb_sq_norms: Tensor, valid: Tensor, c: float) -> Tensor:
    """Kernel weights (m, K) with a per-query step size folded in: α_q = c / mean ‖h_k‖² over
    query q's valid neighbours, for c = `alpha_scaled` (the cache's scaled θ, for MbPA's α).

    A plain step moves the logits by α Σ_k w_k (h_k.q + 1)(...), so how far one step goes
    grows with the squared norm of the hidden states, which differs ~25x between the recipe
    models (bench/defaults/results/key-norms.json). The update depends on α and the weights
    only through the products α w_k when T = 1 (any β: the prior's gradient is zero at the
    first step) or when β = 0 (any T), so w_k α_q with α = 1 is MbPA at step α_q exactly.
    Rows with no valid neighbour keep their zero weights."""
    n = valid.sum(1).clamp(min=1).to(w.dtype)
    mean_sq = (nb_sq_norms.to(w.dtype) * valid.to(w.dtype)).sum(1) / n
    return w * (c / mean_sq.clamp(min=1e-12)).unsqueeze(1)


def adapted_log_probs_lowrank(
    queries: Tensor,
    nb_keys: Tensor,
    nb_values: Tensor,
    nb_weights: Tensor,
    W: Tensor,
    b: Tensor,
    *,
    alpha: float,
    steps: int = 1,
    beta: float = 0.0,
    nb_logits: Tensor | None = None,
    nb_index: Tensor | None = None,
    nb_probs: Tensor | None = None,
    query_logits: Tensor | None = None,
    nb_sq_dist: Tensor | None = None,
    chunk: int | None = None,
    adapt: str = "all",
) -> Tensor:
    """Log-probabilities (m, V) of a linear softmax layer after T plain MbPA gradient steps.

    ``adapt`` chooses what the local steps move: "all" (W and b, the paper), "weight" (W
    only) or "bias" (b only). In the kernel below that is k(x, y) = x.y + 1, x.y or 1.

    Neighbours come in one of two layouts:

    * per query: ``nb_keys`` (m, K, d), ``nb_values`` (m, K), ``nb_logits`` (m, K, V);
    * pool: ``nb_index`` (m, K) indexes rows of ``nb_keys`` (U, d), ``nb_values`` (U,) and
      ``nb_logits`` (U, V) -- e.g. ``memory.keys`` and the slots from ``memory.knn``.
      Neighbours shared between queries are then only processed once per call, which is
      what makes T = 1 cheap.

    ``nb_weights`` is (m, K) in both.  ``nb_logits`` are the base logits W h_k + b of the
    neighbours (e.g. stored when their positions were scored); recomputed when None.  Any
    per-row shift of them serves as well, e.g. the base log-probabilities: only softmaxes
    of them are used.  ``nb_probs`` (pool layout, T = 1 only) are the neighbours' base
    probabilities softmax(W h_k + b), in any float dtype (e.g. a float16 store), either
    (U, V) or column-blocked (U, blocks, block) with blocks x block >= V (extra columns
    ignored), as EpisodicMemory keeps a "column-blocked" extra, whose [:, i] slabs are
    contiguous: T = 1 then needs no softmax and no compaction of the pool, only K rows
    per query summed.
    ``query_logits`` (m, V), when given, are the queries' base logits W q + b (saves
    recomputing them).  ``nb_sq_dist`` (m, K), when given with ``nb_probs``, are the squared
    distances ||h_k - q||^2 of the neighbours (e.g. from the kNN search): the T = 1 path
    then takes h_k.q = (||h_k||^2 + ||q||^2 - ||h_k - q||^2) / 2 from them instead of a
    (m x U) product (same float32 accuracy relative to ||h|| ||q||).  Padding neighbours
    must have weight 0.  In the per-query layout their keys/logits may
    then hold anything; in the pool layout they must index finite entries (memory.knn's
    padding points at slot 0, a real entry).

    Why the rank-K form is exact.  For logits z = W x + b the gradient of
    w_k * NLL(v_k | h_k) is r_k [h_k; 1]^T with r_k = w_k (softmax(z_k) - e_{v_k}) in R^V, and
    the prior adds 2 beta (theta_x - theta).  So with D_t = theta_t - theta (a V x (d+1)
    matrix, D_0 = 0) a plain step is

        D_{t+1} = (1 - 2 alpha beta) D_t - alpha sum_k r_k^{(t)} [h_k; 1]^T.

    By induction D_t = sum_k a_k^{(t)} [h_k; 1]^T: the update stays in the span of the K
    neighbour inputs (rank <= K) and only the coefficient vectors a_k in R^V change:
    a^{(t+1)} = gamma a^{(t)} - alpha r^{(t)}, gamma = 1 - 2 alpha beta.  Every logit the
    algorithm needs is a kernel sum with k(x, y) = x.y + 1 (the +1 is the bias):

        neighbour j:  z_j + sum_k a_k^{(t)} (h_k.h_j + 1) = z_j + (G~ a^{(t)})_j,  G~ = H H^T + 1
        query:        z_q + sum_k a_k^{(T)} (h_k.q + 1).

    We carry M = G~ a (K x V, the neighbour logit shifts) and u = sum_k a_k (h_k.q + 1)
    (the query shift) through the same linear recursion, so T steps cost K x K key products
    plus O(T K^2 V) and no V x d matrix is ever formed per query.  For T = 1,
    Delta z(q) = -alpha sum_k w_k (h_k.q + 1)(p_k - e_{v_k}) needs only the base
    probabilities p_k, which depend on the neighbour alone: in the pool layout they are
    computed once per distinct neighbour and each query sums K of them (embedding_bag).
    """
    dt, dev = W.dtype, W.device
    q = queries.to(dev, dt)
    w = nb_weights.to(dev, dt)
    m, K, V = q.shape[0], w.shape[1], W.shape[0]
    if steps < 0:
        raise ValueError("steps must be >= 0")
    if w.shape[0] != m:
        raise ValueError(f"nb_weights must be (m, K) with m = {m}, got {tuple(w.shape)}")
    if nb_index is None:
        if nb_keys.shape[:2] != w.shape or nb_values.shape != w.shape:
            raise ValueError("per-query layout: nb_keys (m, K, d) and nb_values (m, K) must match nb_weights")
        if nb_logits is not None and nb_logits.shape != (m, K, V):
            raise ValueError(f"nb_logits must be (m, K, V) = {(m, K, V)}, got {tuple(nb_logits.shape)}")
    else:
        U = nb_keys.shape[0]
        if nb_index.shape != w.shape or nb_values.shape != (U,):
            raise ValueError("pool layout: nb_index (m, K), nb_keys (U, d), nb_values (U,) expected")
        if nb_logits is not None and nb_logits.shape != (U, V):
            raise ValueError(f"nb_logits must be (U, V) = {(U, V)}, got {tuple(nb_logits.shape)}")
        if nb_probs is not None and not (
            nb_probs.shape == (U, V)
            or (nb_probs.dim() == 3 and nb_probs.shape[0] == U and nb_probs.shape[1] * nb_probs.shape[2] >= V)
        ):
            raise ValueError(f"nb_probs must be (U, V) = {(U, V)} or (U, blocks, block), got {tuple(nb_probs.shape)}")
    if nb_probs is not None and (nb_index is None or steps > 1):
        raise ValueError("nb_probs serves T = 1 in the pool layout only; give nb_logits (or log-probs) otherwise")
    if query_logits is not None:
        if query_logits.shape != (m, V):
            raise ValueError(f"query_logits must be (m, V) = {(m, V)}, got {tuple(query_logits.shape)}")
        base = query_logits.to(dev, dt)
    else:
        base = F.linear(q, W, b)
    if steps == 0 or K == 0 or m == 0:
        return F.log_softmax(base, -1)
    gamma = 1.0 - 2.0 * alpha * beta
    if adapt not in KERNELS:
        raise ValueError(f"adapt must be one of {', '.join(KERNELS)}, not {adapt!r}")
    kern = KERNELS[adapt]

    if nb_probs is not None:
        z = _one_step_probs(q, base, nb_keys, nb_values, nb_probs, nb_index.to(dev), w, alpha, kern, nb_sq_dist)
        return F.log_softmax(z, -1)
    if nb_index is not None:
        # Restrict the pool to the entries actually referenced (the memory may be larger).
        uniq, inv = _compact(nb_index.to(dev), U)
        if uniq is None:  # every entry is used: no copies
            keys, vals, logits = nb_keys.to(dev, dt), nb_values.to(dev), nb_logits
        else:
            keys = nb_keys[uniq.to(nb_keys.device)].to(dev, dt)
            vals = nb_values[uniq.to(nb_values.device)].to(dev)
            logits = None if nb_logits is None else nb_logits[uniq.to(nb_logits.device)]
        if steps == 1:
            delta = _one_step_pool(q, keys, vals, logits, inv, w, W, b, alpha, kern)
            return F.log_softmax(base + delta, -1)
        if logits is None and keys.shape[0] * V <= _POOL_BUDGET:
            logits = F.linear(keys, W, b)  # once per distinct neighbour, not per query

        def gather(s, e):
            i = inv[s:e]
            z = F.linear(keys[i], W, b) if logits is None else logits[i].to(dt)
            return keys[i], vals[i], z
    else:

        def gather(s, e):
            k = nb_keys[s:e].to(dev, dt)
            z = F.linear(k, W, b) if nb_logits is None else nb_logits[s:e].to(dev, dt)
            return k, nb_values[s:e].to(dev), z

    chunk = chunk or max(1, _STEP_BUDGET // (K * V))
    delta = torch.empty_like(base)
    for s in range(0, m, chunk):
        e = min(m, s + chunk)
        k, y, z = gather(s, e)
        delta[s:e] = _steps_chunk(q[s:e], k, y, w[s:e], z, alpha, gamma, steps, kern)
    return F.log_softmax(base + delta, -1)


def _compact(index: Tensor, U: int):
    """Distinct entries used by ``index`` and ``index`` renumbered into them.

    Returns (None, index) when all U entries are used.  A mark-and-renumber pass, O(mK + U):
    cheaper than torch.unique, whose sort dominated the T = 1 path.
    """
    used = torch.zeros(U, dtype=torch.bool, device=index.device)
    used[index] = True
    uniq = used.nonzero().squeeze(1)
    if uniq.numel() == U:
        return None, index
    new_id = torch.empty(U, dtype=torch.long, device=index.device)
    new_id[uniq] = torch.arange(uniq.numel(), device=index.device)
    return uniq, new_id[index]


def _steps_chunk(q, keys, vals, w, z, alpha, gamma, steps, kern=(1.0, 1.0)):
    """Query logit shifts (c, V) after ``steps`` plain steps, per-query neighbours (c, K, .)."""
    pad = w == 0
    if bool(pad.any()):  # padding keys/logits may hold anything: make them finite
        keys = keys.masked_fill(pad[..., None], 0)
        z = z.masked_fill(pad[..., None], 0)
    # The weights w_k multiply r_k = w_k (p_k - e_{v_k}) everywhere r_k is used, so they are
    # folded into the columns of the two kernels instead of into the (c, K, V) residuals.
    sw, sb = kern
    gram_w = (keys @ keys.transpose(1, 2) * sw + sb) * w[:, None, :]  # G~_{jk} w_k, (c, K, K)
    cq_w = ((keys @ q[:, :, None]).squeeze(-1) * sw + sb) * w  # (s_w h_k.q + s_b) w_k, (c, K)
    u = torch.zeros(q.shape[0], z.shape[-1], dtype=q.dtype, device=q.device)
    ones = torch.ones(vals.shape + (1,), dtype=q.dtype, device=q.device)
    logits = z  # current neighbour logits z_k + (G~ a)_k; replaced before any in-place update
    for t in range(steps):
        res = torch.softmax(logits, -1).scatter_add_(-1, vals[..., None], -ones)  # p_k - e_{v_k}
        u = torch.baddbmm(u[:, None, :], cq_w[:, None, :], res, beta=gamma, alpha=-alpha).squeeze(1)
        if t + 1 < steps:
            # z + M_{t+1} = gamma (z + M_t) + (1 - gamma) z - alpha G~ diag(w) (P_t - E)
            if logits is z:
                logits = torch.baddbmm(z, gram_w, res, beta=gamma, alpha=-alpha)
            else:
                logits.baddbmm_(gram_w, res, beta=gamma, alpha=-alpha)
            if gamma != 1.0:
                logits.add_(z, alpha=1.0 - gamma)
    return u


def _one_step_pool(q, keys, vals, logits, inv, w, W, b, alpha, kern=(1.0, 1.0)):
    """T = 1 in the pool layout: Delta z(q) = -alpha sum_k c_k (p_{u_k} - e_{v_k}).

    c_k = w_k (s_w h_k.q + s_b) (1 and 1 unless only W or b adapts); p_u are the base probabilities of the U distinct entries, built
    once per call.  The weighted sum of K rows of P per query is F.embedding_bag (a fused
    gather + weighted sum, memory bound); it measured faster than a dense (m x U) @ (U x V)
    product (which multiplies U - K zeros per row) and than torch.sparse CSR/COO products.
    When U x V is too large for one temporary, P is produced in column blocks, with the
    softmax normaliser found in a first pass (which recomputes W h + b when not given).
    """
    m, U, V = q.shape[0], keys.shape[0], W.shape[0]
    dt = q.dtype
    coef = torch.empty_like(w)
    step = max(1, _BUDGET // U)  # bounds the (queries x U) dot-product matrix
    for s in range(0, m, step):
        dots = (q[s : s + step] @ keys.T).gather(1, inv[s : s + step])
        coef[s : s + step] = w[s : s + step] * (dots * kern[0] + kern[1])
    # the -e_{v_k} part lands on the label column of each neighbour
    delta = torch.zeros(m, V, dtype=dt, device=q.device).scatter_add_(1, vals[inv], -coef)

    def block_logits(s, e):
        if logits is None:
            return F.linear(keys, W[s:e], b[s:e])
        return logits[:, s:e].to(dt)

    def weighted_rows(p_block):  # (m, block): sum_k c_k p_block[u_k]
        return F.embedding_bag(inv, p_block, per_sample_weights=coef, mode="sum")

    if U * V <= _POOL_BUDGET:  # one block: no second pass
        delta += weighted_rows(torch.softmax(block_logits(0, V), -1))
    else:
        vb = max(1, _POOL_BUDGET // (4 * U))
        lse = torch.full((U,), -float("inf"), dtype=dt, device=q.device)
        for s in range(0, V, vb):
            lse = torch.logaddexp(lse, torch.logsumexp(block_logits(s, min(V, s + vb)), -1))
        for s in range(0, V, vb):
            e = min(V, s + vb)
            delta[:, s:e] += weighted_rows(torch.exp(block_logits(s, e) - lse[:, None]))
    return delta.mul_(-alpha)


def _one_step_probs(q, base, keys, vals, probs, index, w, alpha, kern=(1.0, 1.0), sq_dist=None):
    """T = 1 from stored base probabilities: adapted logits z(q) + Delta z(q), where
    Delta z(q) = -alpha sum_k c_k (p_{u_k} - e_{v_k}) and c_k = w_k (s_w h_k.q + s_b).

    h_k.q comes from the squared distances when given, else from one (m x U) product (a
    GEMM: measured 3x faster than gathering the m K keys for K dot products per query).
    The weighted sum of K rows of P per query is F.embedding_bag over column slabs of P: a
    slab of all U rows (about one L2 cache) is read once per call and every query then
    reads its K rows from cache, where whole-row gathers stream ~mK rows of V from DRAM.
    A column-blocked table is read slab by slab as stored; a (U, V) one is cut into slabs
    of _SLAB_BYTES, each copied contiguous by embedding_bag (measured 4-6x slower to read
    than a stored slab).  A low-precision table is converted one slab at a time: sums are
    in the queries' dtype (float32) whatever the table's.
    """
    m, K = index.shape
    U, V = probs.shape[0], base.shape[1]
    dt, dev = q.dtype, q.device
    keys = keys.to(dev, dt)
    if sq_dist is not None:
        k_sq = (keys * keys).sum(1)[index]
        dots = (k_sq + (q * q).sum(1, keepdim=True) - sq_dist.to(dev, dt)) * 0.5
        # padding entries (weight 0) may carry an infinite distance: keep them at 0
        coef = torch.where(w != 0, (dots * kern[0] + kern[1]) * w, torch.zeros((), dtype=dt, device=dev))
    else:
        coef = torch.empty(m, K, dtype=dt, device=dev)
        step = max(1, _BUDGET // max(1, U))  # bounds the (queries x U) product
        for s in range(0, m, step):
            e = min(m, s + step)
            coef[s:e] = (q[s:e] @ keys.T).gather(1, index[s:e]).mul_(kern[0]).add_(kern[1]).mul_(w[s:e])
    probs = probs.to(dev)
    stored = probs.dim() == 3
    if stored:
        block = probs.shape[2]
        slabs = (probs[:, i] for i in range(probs.shape[1]))
    else:
        block = max(16, _SLAB_BYTES // (max(1, U) * q.element_size()) // 16 * 16)
        slabs = (probs[:, s : s + block] for s in range(0, V, block))
    z = base.clone()
    # 1-D bags with explicit offsets, made once (a 2-D input makes them on every call)
    flat, flat_coef = index.reshape(-1), coef.reshape(-1)
    offsets = torch.arange(0, m * K, K, device=dev)
    for s, slab in zip(range(0, V, block), slabs):  # each (m x block) result is added while in cache
        if slab.dtype != dt:
            slab = slab.to(dt)  # a sequential read of a stored slab
        elif stored and slab.is_contiguous():
            # Read the slab once in order first: the hardware prefetchers then bring it into
            # cache, where the gather's scattered first touches would each wait on DRAM
            # (measured 11-21% faster overall at V = 12k-33k, U = 5,512, K = 256).
            slab.sum()
        part = F.embedding_bag(flat, slab, offsets, per_sample_weights=flat_coef, mode="sum")
        z[:, s : s + block].add_(part[:, : min(block, V - s)], alpha=-alpha)
    return z.scatter_add_(1, vals[index].to(dev), coef * alpha)  # the +alpha c_k e_{v_k} part


@dataclass
class LinearMbPA:
    """MbPA on a linear softmax output layer (W, b), reading neighbours from an EpisodicMemory.

    ``logits_extra`` names a memory extra holding each entry's base logits or log-probs
    (saves recomputing W h + b); None recomputes them from W.  ``probs_extra`` names one
    holding each entry's base probabilities, used for T = 1 (no softmax per call).
    """

    weight: Tensor
    bias: Tensor
    k: int = 256
    alpha: float = 0.15
    steps: int = 1
    beta: float = 0.0
    eps: float = 1e-3
    normalise: bool = True
    logits_extra: str | None = None
    probs_extra: str | None = None
    adapt: str = "all"
    alpha_scaled: float = 0.0  # > 0: α_q = alpha_scaled / mean ‖h_k‖² per query (scaled_step_weights)

    def log_probs(self, queries: Tensor, memory, *, window=None, query_logits: Tensor | None = None) -> Tensor:
        sq, idx, valid = memory.knn(queries, self.k, window=window)
        w = kernel_weights(sq, valid, self.eps, self.normalise)
        alpha = self.alpha
        if self.alpha_scaled > 0:
            norms = memory.keys.pow(2).sum(1)  # once per call, then K gathered per query
            w, alpha = scaled_step_weights(w, norms[idx], valid, self.alpha_scaled), 1.0
        probs = logits = None
        if self.probs_extra and self.steps == 1:
            probs = memory.extra(self.probs_extra)
        elif self.logits_extra:
            logits = memory.extra(self.logits_extra)
        return adapted_log_probs_lowrank(
            queries, memory.keys, memory.values, w, self.weight, self.bias,
            alpha=alpha, steps=self.steps, beta=self.beta, nb_logits=logits, nb_index=idx,
            nb_probs=probs, query_logits=query_logits, nb_sq_dist=sq if probs is not None else None,
            adapt=self.adapt,
        )


# --------------------------------------------------------------------------- any network
def functional_mbpa(
    module: torch.nn.Module,
    queries: Tensor,
    nb_inputs: Tensor,
    nb_values: Tensor,
    nb_weights: Tensor,
    *,
    steps: int,
    lr: float,
    beta: float = 0.0,
    optimizer: str = "sgd",
    rms_alpha: float = 0.99,
    eps: float = 1e-8,
    betas: tuple[float, float] = (0.9, 0.999),
    chunk: int | None = None,
    trainable: set[str] | None = None,
) -> Tensor:
    """MbPA for an arbitrary output network ``module`` (inputs -> logits); returns (m, V) log-probs.

    ``queries`` (m, ...), ``nb_inputs`` (m, K, ...), ``nb_values`` / ``nb_weights`` (m, K).
    Each query gets its own copy of the module's parameters, adapted with ``steps`` steps of
    ``optimizer`` ("sgd", "rmsprop" or "adam", with torch.optim's default hyper-parameters
    and update formulas, written out below) on the weighted NLL plus beta ||theta_x - theta||^2.
    Queries are processed ``chunk`` at a time with vmap, so memory is chunk x (a few copies
    of the parameters); the module must behave identically per sample (eval mode).
    ``trainable``: names of the parameters the steps move (None: all).
    """
    if optimizer not in ("sgd", "rmsprop", "adam"):
        raise ValueError(f"optimizer must be 'sgd', 'rmsprop' or 'adam', not {optimizer!r}")
    theta = {n: p.detach() for n, p in module.named_parameters()}
    moving = set(theta) if trainable is None else set(trainable)
    buffers = {n: t.detach() for n, t in module.named_buffers()}
    b1, b2 = betas

    def nll(params, x, y, w):
        logp = F.log_softmax(functional_call(module, (params, buffers), (x,)), -1)
        return -(w * logp.gather(-1, y[:, None]).squeeze(-1)).sum()

    nll_grad = grad(nll)

    def adapt_one(q, x, y, w):
        p = dict(theta)
        s1 = {n: torch.zeros_like(v) for n, v in theta.items()}  # RMSprop/Adam square avg, Adam m
        s2 = {n: torch.zeros_like(v) for n, v in theta.items()}
        for t in range(1, steps + 1):
            g = nll_grad(p, x, y, w)
            for n in p:
                if n not in moving:
                    continue
                gn = g[n] + 2.0 * beta * (p[n] - theta[n]) if beta else g[n]  # prior gradient
                if optimizer == "sgd":
                    p[n] = p[n] - lr * gn
                elif optimizer == "rmsprop":  # torch.optim.RMSprop, centered=False, momentum=0
                    s1[n] = rms_alpha * s1[n] + (1 - rms_alpha) * gn * gn
                    p[n] = p[n] - lr * gn / (s1[n].sqrt() + eps)
                else:  # torch.optim.Adam, amsgrad=False
                    s2[n] = b1 * s2[n] + (1 - b1) * gn
                    s1[n] = b2 * s1[n] + (1 - b2) * gn * gn
                    denom = s1[n].sqrt() / (1 - b2**t) ** 0.5 + eps
                    p[n] = p[n] - (lr / (1 - b1**t)) * s2[n] / denom
        out = functional_call(module, (p, buffers), (q[None],))[0]
        return F.log_softmax(out, -1)

    batched = vmap(adapt_one)
    m = queries.shape[0]
    if chunk is None:
        n_par = sum(v.numel() for v in theta.values())
        chunk = max(1, _BUDGET // (5 * n_par))  # params, grad, two states, temporaries
    with torch.no_grad():
        return torch.cat(
            [batched(queries[s : s + chunk], nb_inputs[s : s + chunk], nb_values[s : s + chunk], nb_weights[s : s + chunk])
             for s in range(0, m, chunk)]
        )


def naive_mbpa(
    module: torch.nn.Module,
    queries: Tensor,
    nb_inputs: Tensor,
    nb_values: Tensor,
    nb_weights: Tensor,
    *,
    steps: int,
    lr: float,
    beta: float = 0.0,
    optimizer: str = "sgd",
    trainable: set[str] | None = None,
    **opt_kwargs,
) -> Tensor:
    """Reference MbPA: per query, deep-copy ``module`` and run ``torch.optim`` on the loss.

    Slow on purpose (one query at a time, full parameter copy); used to check the fast paths.
    """
    opt_cls = {"sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam}[optimizer]
    out = []
    with torch.enable_grad():
        for i in range(queries.shape[0]):
            local = copy.deepcopy(module)
            params = [p for n, p in local.named_parameters() if trainable is None or n in trainable]
            theta = [p.detach().clone() for p in params]
            opt = opt_cls(params, lr=lr, **opt_kwargs)
            for _ in range(steps):
                opt.zero_grad()
                nll = F.cross_entropy(local(nb_inputs[i]), nb_values[i], reduction="none")
                loss = (nb_weights[i] * nll).sum()
                if beta:
                    loss = loss + beta * sum(((p - p0) ** 2).sum() for p, p0 in zip(params, theta))
                loss.backward()
                opt.step()
            with torch.no_grad():
                out.append(F.log_softmax(local(queries[i : i + 1]), -1)[0])
    return torch.stack(out)


# --------------------------------------------------------------------------- MLP, exact
@dataclass
class _Layer:
    weight: Tensor  # (out, in)
    bias: Tensor  # (out,)
    act: str  # "relu", "tanh" or "none" (applied after this layer)


def mlp_layers(module: torch.nn.Module) -> list[_Layer]:
    """Read an ``nn.Sequential`` of Linear layers with optional ReLU/Tanh between them."""
    mods = list(module) if isinstance(module, torch.nn.Sequential) else [module]
    layers: list[_Layer] = []
    for m in mods:
        if isinstance(m, torch.nn.Linear):
            bias = m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device)
            layers.append(_Layer(m.weight.detach(), bias.detach(), "none"))
        elif isinstance(m, (torch.nn.ReLU, torch.nn.Tanh)) and layers and layers[-1].act == "none":
            layers[-1].act = "relu" if isinstance(m, torch.nn.ReLU) else "tanh"
        elif isinstance(m, (torch.nn.Identity, torch.nn.Dropout, torch.nn.Flatten)):
            continue  # eval-time no-ops on flat inputs
        else:
            raise ValueError(f"mlp_mbpa handles Linear/ReLU/Tanh stacks, not {type(m).__name__}")
    if not layers:
        raise ValueError("mlp_mbpa needs at least one Linear layer")
    return layers


def _act(z: Tensor, kind: str) -> Tensor:
    return z.relu() if kind == "relu" else z.tanh() if kind == "tanh" else z


def _act_grad(z: Tensor, a: Tensor, kind: str) -> Tensor:
    if kind == "relu":
        return (z > 0).to(z.dtype)
    if kind == "tanh":
        return 1 - a * a
    return torch.ones_like(z)


def mlp_base_pass(module: torch.nn.Module, inputs: Tensor, values: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Per-example quantities of the first MbPA step, at the trained weights.

    Returns (inputs of every layer, gradient of NLL(value) at every layer's pre-activation),
    unweighted.  At step 1 every neighbour's gradient is its kernel weight times these, the
    same for whichever query retrieves it, so a memory computes them once per entry and
    :func:`mlp_mbpa` gathers them (``nb_base``) instead of re-running the network per query.
    """
    layers = mlp_layers(module)
    with torch.no_grad():
        acts, zs, a = [], [], inputs
        for layer in layers:
            acts.append(a)
            z = a @ layer.weight.T + layer.bias
            a = _act(z, layer.act)
            zs.append(z)
        g = torch.softmax(zs[-1], -1)
        g[torch.arange(g.shape[0]), values] -= 1.0
        deltas = [None] * len(layers)
        for l in range(len(layers) - 1, -1, -1):
            if l < len(layers) - 1:
                g = g * _act_grad(zs[l], acts[l + 1], layers[l].act)
            deltas[l] = g
            g = g @ layers[l].weight
    return acts, deltas


def mlp_mbpa(
    module: torch.nn.Module,
    queries: Tensor,
    nb_inputs: Tensor,
    nb_values: Tensor,
    nb_weights: Tensor,
    *,
    steps: int,
    lr: float,
    beta: float = 0.0,
    nb_base: tuple[list[Tensor], list[Tensor]] | None = None,
    chunk: int | None = None,
) -> Tensor:
    """Exact MbPA with plain gradient steps on a ReLU/Tanh MLP, never copying the first layer.

    Same numbers as ``functional_mbpa(..., optimizer="sgd")`` / :func:`naive_mbpa`, much
    cheaper.  Why it works: the gradient of the weighted neighbour NLL with respect to a
    linear layer's weight is sum_k g_k a_k^T (g_k the gradient at the layer's output for
    neighbour k, a_k its input), so a step changes each layer by K outer products, and the
    prior beta||dW||^2 only rescales earlier changes by (1 - 2 lr beta).  Hence:

    * the first layer's inputs are always the K neighbours x_k, so its change stays
      ``dW1 = sum_k c_k x_k^T`` for all T: applying it costs K dot products (a K x K Gram
      matrix for the neighbours, K products x_k . q for the query), never a (H1 x d) copy;
    * step 1 happens at the trained weights, where every neighbour's gradient is its kernel
      weight times a per-entry quantity (``nb_base``, from :func:`mlp_base_pass`), so T = 1
      costs O(K (d + sum of layer widths)) per query;
    * later layers (small) become per-query dense deltas from step 2 on.

    ``queries`` (m, d), ``nb_inputs`` (m, K, d), ``nb_values``/``nb_weights`` (m, K),
    ``nb_base`` the gathered (m, K, ...) output of :func:`mlp_base_pass` (optional);
    returns (m, C) log-probabilities of the adapted network for each query.
    """
    layers = mlp_layers(module)
    if steps < 0:
        raise ValueError("steps must be >= 0")
    m, K = nb_values.shape
    if chunk is None:
        dense = sum(l.weight.numel() for l in layers[1:]) if steps > 1 else 0
        widest = max(max(l.weight.shape) for l in layers)
        chunk = max(1, _BUDGET // max(1, 3 * dense + K * (K + 4 * widest)))
    out = []
    with torch.no_grad():
        for s in range(0, m, chunk):
            e = min(m, s + chunk)
            base = None
            if nb_base is not None:
                base = ([t[s:e] for t in nb_base[0]], [t[s:e] for t in nb_base[1]])
            out.append(_mlp_mbpa_chunk(layers, queries[s:e], nb_inputs[s:e], nb_values[s:e], nb_weights[s:e],
                                       steps, lr, beta, base))
    return torch.cat(out) if out else queries.new_zeros(0, layers[-1].weight.shape[0])


def _mlp_mbpa_chunk(layers, q, x, y, w, steps, lr, beta, base):
    keep = 1.0 - 2.0 * lr * beta  # the prior's pull toward the trained layer, per step
    L = len(layers)
    m = x.shape[0]
    C1 = None  # first layer: dW1 = sum_k C1[:, k] x_k^T, C1 (m, K, H1)
    span: list = [None] * L  # later layers after step 1: (C (m, K, out), U (m, K, in)), dW = C^T U
    dense: list = [None] * L  # later layers from step 2: dW (m, out, in)
    dbias = [None] * L
    gram = None

    def delta(l: int, a: Tensor) -> Tensor | None:  # dW_l a for a (m, n, in), l >= 1
        if dense[l] is not None:
            return torch.bmm(a, dense[l].transpose(1, 2))
        if span[l] is not None:
            C, U = span[l]
            return torch.bmm(torch.bmm(a, U.transpose(1, 2)), C)
        return None

    for t in range(steps):
        if t == 0 and base is not None:
            acts, deltas = base
            grads = [d * w[..., None] for d in deltas]
        else:
            if t == 1:
                gram = torch.bmm(x, x.transpose(1, 2))  # (m, K, K): x_j . x_k
                for l in range(1, L):  # from here on the later layers are cheaper dense
                    C, U = span[l]
                    dense[l] = torch.bmm(C.transpose(1, 2), U)
                    span[l] = None
            acts, zs, a = [], [], x
            for l, layer in enumerate(layers):
                acts.append(a)
                z = a @ layer.weight.T + layer.bias
                if dbias[l] is not None:
                    z = z + dbias[l][:, None]
                if l == 0 and C1 is not None:
                    z = z + torch.bmm(gram, C1)
                elif l > 0:
                    d = delta(l, a)
                    if d is not None:
                        z = z + d
                a = _act(z, layer.act)
                zs.append(z)
            g = torch.softmax(zs[-1], -1)
            g = g.scatter_add(-1, y[..., None], -torch.ones_like(g[..., :1])) * w[..., None]
            grads = [None] * L
            for l in range(L - 1, -1, -1):
                if l < L - 1:
                    g = g * _act_grad(zs[l], acts[l + 1], layers[l].act)
                grads[l] = g
                if l > 0:  # through the adapted layer: (W + dW)^T g
                    g_prev = g @ layers[l].weight
                    if dense[l] is not None:
                        g_prev = g_prev + torch.bmm(g, dense[l])
                    g = g_prev
        # the step (with the prior), in the forms above
        C1 = -lr * grads[0] if C1 is None else keep * C1 - lr * grads[0]
        for l in range(L):
            step_b = -lr * grads[l].sum(1)
            dbias[l] = step_b if dbias[l] is None else keep * dbias[l] + step_b
            if l == 0:
                continue
            if t == 0:
                span[l] = (-lr * grads[l], acts[l])
            else:
                dense[l] = keep * dense[l] - lr * torch.bmm(grads[l].transpose(1, 2), acts[l])
    # the query through the adapted network
    a = q[:, None]
    for l, layer in enumerate(layers):
        z = a @ layer.weight.T + layer.bias
        if dbias[l] is not None:
            z = z + dbias[l][:, None]
        if l == 0 and C1 is not None:
            z = z + torch.bmm(torch.bmm(x, q[:, :, None]).transpose(1, 2), C1)
        elif l > 0:
            d = delta(l, a)
            if d is not None:
                z = z + d
        a = _act(z, layer.act)
    return torch.log_softmax(a.squeeze(1), -1)
