"""The fast paths of the streaming evaluator give the same numbers as the slow ones.

* MbPA T = 1 from stored base probabilities (nb_probs, column slabs, dots from kNN
  distances, float16/bfloat16 stores) against the naive reference;
* the stream's segment-length preference and its memory extras;
* the cache reading only its window of a longer shared memory (mbpa+cache);
* the kNN candidate search on keys far from the origin (centred distances).
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from lmadapt import adapt
from lmadapt.adapt import LinearMbPA, adapted_log_probs_lowrank, kernel_weights, naive_mbpa
from lmadapt.memory import EpisodicMemory
from lmadapt.methods.cache import CacheParams, NeuralCache
from lmadapt.methods.mbpa import MbPA, MbPAParams

from conftest import motif_stream, tiny_lm
from lmadapt.stream import make_memory, stream_eval

DT = torch.float64


# Tiny tensors: extra threads only add contention (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(seed, m=6, K=8, d=5, V=37, U=40, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(d, V).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(V, d, generator=g, dtype=dtype))
        lin.bias.copy_(torch.randn(V, generator=g, dtype=dtype) * 0.5)
    pool = torch.randn(U, d, generator=g, dtype=dtype)
    pool_y = torch.randint(0, V, (U,), generator=g)
    q = torch.randn(m, d, generator=g, dtype=dtype)
    idx = torch.stack([torch.randperm(U, generator=g)[:K] for _ in range(m)])
    sq = ((pool[idx] - q[:, None]) ** 2).sum(-1)
    valid = torch.ones_like(idx, dtype=torch.bool)
    valid[0, -2:] = False  # padding
    sq = sq.masked_fill(~valid, float("inf"))
    w = kernel_weights(sq, valid, eps=0.5, normalise=True)
    return lin, pool, pool_y, q, idx, sq, w


@pytest.mark.parametrize("slab", [None, 64, 300])  # bytes: one slab, or many narrow ones
@pytest.mark.parametrize("use_dist", [False, True])
def test_one_step_from_stored_probs_matches_naive(monkeypatch, slab, use_dist):
    lin, pool, pool_y, q, idx, sq, w = _problem(3)
    if slab is not None:
        monkeypatch.setattr(adapt, "_SLAB_BYTES", slab)
    W, b = lin.weight.detach(), lin.bias.detach()
    with torch.no_grad():
        ref = naive_mbpa(lin, q, pool[idx], pool_y[idx], w, steps=1, lr=0.7)
    assert (ref.exp() - F.softmax(lin(q), -1)).abs().max() > 1e-3  # it does adapt
    probs = F.softmax(F.linear(pool, W, b), -1)
    out = adapted_log_probs_lowrank(q, pool, pool_y, w, W, b, alpha=0.7, nb_index=idx, nb_probs=probs,
                                    query_logits=F.linear(q, W, b), nb_sq_dist=sq if use_dist else None)
    torch.testing.assert_close(out.exp(), ref.exp(), atol=1e-9, rtol=0)


@pytest.mark.parametrize("store,atol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_low_precision_store_is_close(store, atol):
    lin, pool, pool_y, q, idx, sq, w = _problem(4, dtype=torch.float32)
    W, b = lin.weight.detach(), lin.bias.detach()
    probs = F.softmax(F.linear(pool, W, b), -1)
    kw = dict(alpha=0.7, nb_index=idx)
    exact = adapted_log_probs_lowrank(q, pool, pool_y, w, W, b, nb_probs=probs, **kw)
    low = adapted_log_probs_lowrank(q, pool, pool_y, w, W, b, nb_probs=probs.to(store), **kw)
    assert low.dtype == torch.float32
    err = (low.exp() - exact.exp()).abs().max()
    assert 0 < err < atol


def test_nb_probs_is_one_step_pool_only():
    lin, pool, pool_y, q, idx, sq, w = _problem(5)
    W, b = lin.weight.detach(), lin.bias.detach()
    probs = F.softmax(F.linear(pool, W, b), -1)
    with pytest.raises(ValueError, match="T = 1"):
        adapted_log_probs_lowrank(q, pool, pool_y, w, W, b, alpha=0.5, steps=2, nb_index=idx, nb_probs=probs)
    with pytest.raises(ValueError, match="nb_probs must be"):
        adapted_log_probs_lowrank(q, pool, pool_y, w, W, b, alpha=0.5, nb_index=idx, nb_probs=probs[:, :3])


def test_linear_mbpa_probs_extra_matches_logits_extra():
    lin, pool, pool_y, q, idx, sq, w = _problem(6, dtype=torch.float32, U=50)
    W, b = lin.weight.detach(), lin.bias.detach()
    z = F.linear(pool, W, b)
    mem = EpisodicMemory(60, pool.shape[1], extras={"probs": ((W.shape[0],), torch.float32),
                                                    "logits": ((W.shape[0],), torch.float32)})
    mem.add(pool, pool_y, probs=F.softmax(z, -1), logits=z)
    window = (torch.tensor([0, 5, 10, 0, 20, 30]), torch.tensor([50, 40, 30, 3, 50, 50]))
    fast = LinearMbPA(W, b, k=8, alpha=0.5, probs_extra="probs", logits_extra="logits")
    slow = LinearMbPA(W, b, k=8, alpha=0.5, logits_extra="logits")
    torch.testing.assert_close(fast.log_probs(q, mem, window=window, query_logits=F.linear(q, W, b)),
                               slow.log_probs(q, mem, window=window), atol=2e-6, rtol=0)


# --------------------------------------------------------------------------- stream


def test_one_step_mbpa_stream_independent_of_segment_and_matches_naive():
    model, stream = tiny_lm(), motif_stream(300)
    params = MbPAParams(memory=50, k=10, alpha=0.5, steps=1, select=False)
    results = [stream_eval(model, stream, [MbPA(params)], {"mbpa": 0.3}, segment_len=L) for L in (1, 13, None)]
    for r in results[1:]:
        torch.testing.assert_close(r.components["mbpa"][0], results[0].components["mbpa"][0], atol=1e-5, rtol=0)
    with torch.no_grad():
        hidden = model(stream[:-1].unsqueeze(0))[0][0]
    targets, log_p = stream[1:], results[-1].components["mbpa"][0]
    for t in (3, 49, 120, 250):
        lo = max(0, t - params.memory)
        keys, vals = hidden[lo:t].double(), targets[lo:t]
        sq, idx = ((keys - hidden[t].double()) ** 2).sum(1).topk(min(params.k, t - lo), largest=False)
        w = kernel_weights(sq, torch.ones_like(sq, dtype=torch.bool), params.eps, params.normalise)
        ref = naive_mbpa(copy.deepcopy(model.decoder).double(), hidden[t:t + 1].double(), keys[idx][None],
                         vals[idx][None], w[None], steps=1, lr=params.alpha)
        torch.testing.assert_close(log_p[t].double(), ref[0, targets[t]], atol=1e-4, rtol=0)


def test_float16_store_in_the_stream_is_close():
    model, stream = tiny_lm(), motif_stream(300)
    base = dict(memory=50, k=10, alpha=0.5, steps=1)
    exact = stream_eval(model, stream, [MbPA(MbPAParams(**base))], {"mbpa": 0.3})
    half = stream_eval(model, stream, [MbPA(MbPAParams(**base, store="float16"))], {"mbpa": 0.3})
    err = (half.components["mbpa"][0] - exact.components["mbpa"][0]).abs().max()
    assert 0 < err < 1e-2  # close, and not the float32 store under another name


def test_memory_extras_and_segment_preference():
    model = tiny_lm()
    one = MbPA(MbPAParams(memory=50, k=10, steps=1, store="bfloat16"))
    many = MbPA(MbPAParams(memory=50, k=10, steps=3))
    assert one.memory_extras() == {"probs": torch.bfloat16} and many.memory_extras() == {"log_probs": torch.float32}
    assert one.preferred_segment_len() > 128 and many.preferred_segment_len() is None
    assert NeuralCache().preferred_segment_len() is None
    mem = make_memory(model, [one, NeuralCache(CacheParams(window=80))], 16, "cpu")
    assert mem.capacity == 80 + 16 and mem.extra("probs").dtype == torch.bfloat16
    assert make_memory(model, [], 16, "cpu") is None


def test_cache_reads_only_its_window_of_a_longer_memory():
    model, stream = tiny_lm(), motif_stream(300)
    cache = CacheParams(window=20, theta=0.5)
    alone = stream_eval(model, stream, [NeuralCache(cache)], {"cache": 0.2}, segment_len=32)
    shared = stream_eval(model, stream, [MbPA(MbPAParams(memory=150, k=10)), NeuralCache(cache)],
                         {"cache": 0.2, "mbpa": 0.1}, segment_len=32)
    torch.testing.assert_close(shared.components["cache"][0], alone.components["cache"][0], atol=1e-6, rtol=0)
    assert torch.equal(shared.components["cache"][1], alone.components["cache"][1])


def test_knn_candidates_far_from_the_origin():
    """Keys in a tiny ball far from 0 (as collapsed LSTM states are): the candidate search
    must still find the true nearest ones (uncentred float32 distances did not)."""
    g = torch.Generator().manual_seed(0)
    centre = torch.randn(64, generator=g) * 2  # ||centre||^2 ~ 256
    keys = centre + 1e-3 * torch.randn(400, 64, generator=g)
    q = centre + 1e-3 * torch.randn(5, 64, generator=g)
    mem = EpisodicMemory(400, 64)
    mem.add(keys, torch.zeros(400, dtype=torch.long))
    sq, idx, _ = mem.knn(q, 10)
    ref = ((keys.double()[None] - q.double()[:, None]) ** 2).sum(-1).topk(10, largest=False)
    assert torch.equal(idx.sort(1).values, ref.indices.sort(1).values)


def test_cache_row_blocks(monkeypatch):
    import lmadapt.methods.cache as cache_mod

    model, stream = tiny_lm(), motif_stream(300)
    cache = CacheParams(window=20, theta=0.5)
    ref = stream_eval(model, stream, [NeuralCache(cache)], {"cache": 0.2}, segment_len=1)
    monkeypatch.setattr(cache_mod, "_ROWS", 16)
    blocked = stream_eval(model, stream, [NeuralCache(cache)], {"cache": 0.2}, segment_len=70)
    torch.testing.assert_close(blocked.components["cache"][0], ref.components["cache"][0], atol=1e-6, rtol=0)
    assert torch.equal(blocked.components["cache"][1], ref.components["cache"][1])


@pytest.mark.parametrize("V", [37, 64])  # with and without padding columns
def test_column_blocked_extra_matches_entry_major(monkeypatch, V):
    import lmadapt.memory as memory_mod

    monkeypatch.setattr(memory_mod, "_SLAB_BYTES", 16 * 4 * 10)  # capacity 10: blocks of 16 columns
    g = torch.Generator().manual_seed(0)
    spec = ((V,), torch.float32)
    plain = EpisodicMemory(10, 3, extras={"p": spec})
    blocked = EpisodicMemory(10, 3, extras={"p": (*spec, memory_mod.COLUMN_BLOCKED)})
    for n in (4, 7, 13, 2):  # wraps around, and one add larger than the capacity
        keys, vals, p = torch.randn(n, 3, generator=g), torch.randint(0, 5, (n,), generator=g), torch.rand(n, V, generator=g)
        assert torch.equal(plain.add(keys, vals, p=p), blocked.add(keys, vals, p=p))
        view = blocked.extra("p")
        assert view.shape == (len(plain), -(-V // 16), 16)
        assert all(view[:, i].is_contiguous() for i in range(view.shape[1]))
        flat = view.reshape(len(plain), -1)
        assert torch.equal(flat[:, :V], plain.extra("p")) and not flat[:, V:].any()
    slots = torch.tensor([0, 9, 4])
    assert torch.equal(blocked.gather_extra("p", slots).reshape(3, -1)[:, :V], plain.gather_extra("p", slots))
    copy_ = EpisodicMemory(10, 3, extras={"p": (*spec, memory_mod.COLUMN_BLOCKED)})
    copy_.load_state_dict(blocked.state_dict())
    assert torch.equal(copy_.extra("p"), blocked.extra("p"))
    with pytest.raises(ValueError, match="layout"):
        EpisodicMemory(10, 3, extras={"p": ((2, 3), torch.float32, memory_mod.COLUMN_BLOCKED)})


def test_one_step_from_a_column_blocked_table(monkeypatch):
    import lmadapt.memory as memory_mod

    monkeypatch.setattr(memory_mod, "_SLAB_BYTES", 8 * 4 * 40)
    lin, pool, pool_y, q, idx, sq, w = _problem(8, dtype=torch.float32, V=37, U=40)
    W, b = lin.weight.detach(), lin.bias.detach()
    probs = F.softmax(F.linear(pool, W, b), -1)
    mem = EpisodicMemory(40, pool.shape[1], extras={"p": ((37,), torch.float32, memory_mod.COLUMN_BLOCKED)})
    mem.add(pool, pool_y, p=probs)
    assert mem.extra("p").shape == (40, 3, 16)
    kw = dict(alpha=0.7, nb_index=idx)
    flat = adapted_log_probs_lowrank(q, pool, pool_y, w, W, b, nb_probs=probs, **kw)
    blocked = adapted_log_probs_lowrank(q, pool, pool_y, w, W, b, nb_probs=mem.extra("p"), **kw)
    torch.testing.assert_close(blocked, flat, atol=1e-6, rtol=0)
