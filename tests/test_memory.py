"""EpisodicMemory: ring buffer, windows, exact/chunked/faiss kNN, state round trip."""

import pytest
import torch

from lmadapt import memory as memory_mod
from lmadapt.memory import EpisodicMemory


# Tiny tensors: extra threads only add contention (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _brute_knn(keys, positions, q, k, lo=None, hi=None):
    """Per query: sorted (sq_dist, slot) of the k nearest entries inside the window."""
    out = []
    for i in range(q.shape[0]):
        ok = torch.ones(keys.shape[0], dtype=torch.bool)
        if lo is not None:
            ok = (positions >= lo[i]) & (positions < hi[i])
        slots = ok.nonzero().squeeze(1)
        d = ((keys[slots] - q[i]) ** 2).sum(1)
        order = torch.argsort(d)[:k]
        out.append((d[order], slots[order]))
    return out


def _check_against_brute(mem, q, k, window=None):
    sq, idx, valid = mem.knn(q, k, window=window)
    lo, hi = window if window is not None else (None, None)
    if lo is not None:
        lo, hi = (torch.as_tensor(b).expand(q.shape[0]) for b in (lo, hi))
    ref = _brute_knn(mem.keys, mem.positions, q, k, lo, hi)
    assert sq.shape == idx.shape == valid.shape == (q.shape[0], min(k, len(mem)))
    for i, (rd, rs) in enumerate(ref):
        n = rd.shape[0]
        assert valid[i].sum() == n and bool(valid[i, :n].all())
        assert torch.equal(idx[i, :n], rs), i
        torch.testing.assert_close(sq[i, :n], rd)
        assert bool(torch.isinf(sq[i, n:]).all())
        assert bool(((idx[i] >= 0) & (idx[i] < len(mem))).all())  # padding slots stay gatherable


def test_ring_buffer_wraparound():
    mem = EpisodicMemory(5, 2, extras={"tag": ((), torch.int32)})
    keys = torch.arange(18, dtype=torch.float32).reshape(9, 2)
    s1 = mem.add(keys[:3], torch.arange(3), tag=torch.arange(3))
    assert len(mem) == 3 and s1.tolist() == [0, 1, 2]
    s2 = mem.add(keys[3:7], torch.arange(3, 7), tag=torch.arange(3, 7))
    assert s2.tolist() == [3, 4, 0, 1] and len(mem) == 5
    # slots 0,1 were overwritten by entries 5,6; default positions continue the counter
    assert mem.values.tolist() == [5, 6, 2, 3, 4]
    assert mem.positions.tolist() == [5, 6, 2, 3, 4]
    assert mem.extra("tag").tolist() == [5, 6, 2, 3, 4]
    assert torch.equal(mem.gather_keys(torch.tensor([[0, 2]])), keys[[5, 2]][None])
    assert mem.gather_values(torch.tensor([1])).tolist() == [6]
    assert mem.gather_positions(torch.tensor([4])).tolist() == [4]
    assert mem.gather_extra("tag", torch.tensor([0])).tolist() == [5]
    # more than capacity in one call: the last 5 land where sequential adds would put them
    big = torch.randn(12, 2)
    mem2 = EpisodicMemory(5, 2)
    mem2.add(torch.randn(2, 2), torch.zeros(2))
    mem2.add(big, torch.arange(12), positions=torch.arange(100, 112))
    seq = EpisodicMemory(5, 2)
    seq.add(torch.randn(2, 2), torch.zeros(2))
    for i in range(12):
        seq.add(big[i : i + 1], torch.tensor([i]), positions=torch.tensor([100 + i]))
    assert torch.equal(mem2.keys, seq.keys) and torch.equal(mem2.positions, seq.positions)
    assert torch.equal(mem2.values, seq.values)
    mem2.add(torch.randn(1, 2), torch.zeros(1))
    assert mem2.positions.max().item() == 112  # counter continues after explicit positions
    mem.clear()
    assert len(mem) == 0 and mem.knn(torch.zeros(3, 2), 4)[0].shape == (3, 0)


def test_add_validates_extras():
    mem = EpisodicMemory(4, 3, extras={"logits": ((5,), torch.float16)})
    with pytest.raises(ValueError):
        mem.add(torch.zeros(2, 3), torch.zeros(2))  # missing extra
    with pytest.raises(ValueError):
        mem.add(torch.zeros(2, 3), torch.zeros(2), logits=torch.zeros(2, 4))  # wrong shape
    with pytest.raises(ValueError):
        mem.add(torch.zeros(2, 4), torch.zeros(2), logits=torch.zeros(2, 5))  # wrong key dim
    mem.add(torch.zeros(2, 3), torch.zeros(2), logits=torch.ones(2, 5))
    assert mem.extra("logits").dtype == torch.float16


@pytest.mark.parametrize("budget", [1 << 24, 7])
def test_exact_knn_chunked_matches_brute_force(monkeypatch, budget):
    monkeypatch.setattr(memory_mod, "_DIST_BUDGET", budget)  # 7 -> one query per chunk
    g = torch.Generator().manual_seed(0)
    mem = EpisodicMemory(60, 8, dtype=torch.float64)
    mem.add(torch.randn(75, 8, generator=g, dtype=torch.float64), torch.arange(75))  # wraps
    q = torch.randn(9, 8, generator=g, dtype=torch.float64)
    _check_against_brute(mem, q, 10)
    _check_against_brute(mem, q, 100)  # k > len: k' = len


def test_window_masking():
    g = torch.Generator().manual_seed(1)
    mem = EpisodicMemory(30, 4, dtype=torch.float64)
    mem.add(torch.randn(30, 4, generator=g, dtype=torch.float64), torch.arange(30))
    q = torch.randn(4, 4, generator=g, dtype=torch.float64)
    lo = torch.tensor([0, 10, 25, 5])
    hi = torch.tensor([30, 20, 28, 5])  # 30, 10, 3 and 0 entries in the window
    _check_against_brute(mem, q, 6, window=(lo, hi))
    sq, idx, valid = mem.knn(q, 6, window=(lo, hi))
    assert valid.sum(1).tolist() == [6, 6, 3, 0]
    pos = mem.gather_positions(idx)
    assert bool(((pos >= lo[:, None]) & (pos < hi[:, None]))[valid].all())
    # scalar bounds broadcast
    _check_against_brute(mem, q, 6, window=(3, 12))


def test_window_makes_streaming_independent_of_segment_length():
    """Add a whole segment, then let each position see only the N entries before it."""
    g = torch.Generator().manual_seed(2)
    T, d, N, k = 40, 5, 12, 6
    states = torch.randn(T, d, generator=g)
    results = {}
    for L in (1, 7, 40):
        mem = EpisodicMemory(N + L, d)
        got = []
        for s in range(0, T, L):
            e = min(T, s + L)
            mem.add(states[s:e], torch.arange(s, e))
            t = torch.arange(s, e)
            sq, idx, valid = mem.knn(states[s:e], k, window=(t - N, t))
            for i in range(e - s):
                got.append(sorted(mem.gather_positions(idx[i][valid[i]]).tolist()))
        results[L] = got
    assert results[1] == results[7] == results[40]
    assert results[1][0] == [] and len(results[1][N + 5]) == k


@pytest.mark.parametrize("window", [False, True])
def test_faiss_matches_exact(window):
    g = torch.Generator().manual_seed(3)
    d, cap = 16, 300
    exact = EpisodicMemory(cap, d, index="exact")
    fa = EpisodicMemory(cap, d, index="faiss")
    for _ in range(4):  # 4 x 120 entries: wraps, so faiss must drop overwritten slots
        keys = torch.randn(120, d, generator=g)
        vals = torch.randint(0, 50, (120,), generator=g)
        exact.add(keys, vals)
        fa.add(keys, vals)
    assert fa._faiss.ntotal == cap
    q = torch.randn(25, d, generator=g)
    win = None
    if window:
        # stored positions are 180..479; windows of 250 positions, some reaching past the
        # oldest entry (excluding > half the memory: those rows use the torch search)
        hi = torch.randint(300, 481, (25,), generator=g)
        win = (hi - 250, hi)
        win[0][0], win[1][0] = 470, 475  # fewer than k valid
        # boundaries: query 2 sits on the entry just past its window (must be excluded),
        # query 3 on the first entry of its window (must be included)
        slot_of = {p: s for s, p in enumerate(exact.positions.tolist())}
        win[0][2], win[1][2] = 200, 400
        win[0][3], win[1][3] = 300, 450
        q[2], q[3] = exact.keys[slot_of[400]], exact.keys[slot_of[300]]
    a = exact.knn(q, 20, window=win)
    b = fa.knn(q, 20, window=win)
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    if window:
        assert exact.positions[b[1][2]].min() > 200 and 400 not in exact.positions[b[1][2]].tolist()
        assert exact.positions[b[1][3, 0]] == 300 and b[0][3, 0] == 0
    torch.testing.assert_close(a[0], b[0])
    _check_against_brute(fa, q, 20, window=win)


def test_auto_index_and_ivf():
    assert EpisodicMemory(100, 4, index="auto").index == "exact"
    assert EpisodicMemory(20001, 4, index="auto").index == "faiss"
    g = torch.Generator().manual_seed(4)
    mem = EpisodicMemory(500, 8, index="faiss", ivf_nlist=4, ivf_nprobe=4)  # nprobe = nlist: exhaustive
    mem.add(torch.randn(100, 8, generator=g), torch.arange(100))  # < 39 * nlist: not trained yet
    assert not mem._faiss.is_trained
    q = torch.randn(6, 8, generator=g)
    _check_against_brute(mem, q, 5)
    mem.add(torch.randn(500, 8, generator=g), torch.arange(500))  # trains, wraps
    assert mem._faiss.is_trained and mem._faiss.ntotal == 500
    _check_against_brute(mem, q, 5)
    _check_against_brute(mem, q, 5, window=(torch.full((6,), 300), torch.full((6,), 450)))


@pytest.mark.parametrize("index", ["exact", "faiss"])
def test_state_dict_round_trip(index):
    g = torch.Generator().manual_seed(5)
    spec = {"logits": ((3,), torch.float16)}
    mem = EpisodicMemory(10, 4, index=index, extras=spec)
    mem.add(torch.randn(13, 4, generator=g), torch.arange(13), logits=torch.randn(13, 3, generator=g))
    sd = mem.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    other = EpisodicMemory(10, 4, index=index, extras=spec)
    other.load_state_dict(sd)
    q = torch.randn(3, 4, generator=g)
    for x, y in zip(mem.knn(q, 4), other.knn(q, 4)):
        assert torch.equal(x, y)
    # counters restored: the next add goes to the same slot with the same position
    new = torch.randn(2, 4, generator=g)
    s1 = mem.add(new, torch.zeros(2), logits=torch.zeros(2, 3))
    s2 = other.add(new, torch.zeros(2), logits=torch.zeros(2, 3))
    assert torch.equal(s1, s2) and torch.equal(mem.positions, other.positions)
    assert torch.equal(mem.extra("logits"), other.extra("logits"))
    for x, y in zip(mem.knn(q, 4), other.knn(q, 4)):
        assert torch.equal(x, y)
    with pytest.raises(ValueError):
        EpisodicMemory(11, 4, extras=spec).load_state_dict(sd)
