"""The classifier path: IDX loading, the exact MLP MbPA, the predictors, EWC and both experiments."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmadapt.adapt import functional_mbpa, kernel_weights, mlp_base_pass, mlp_mbpa, naive_mbpa
from lmadapt.classify.core import EWC, MbPAConfig, MLPConfig, build_mlp, predict
from lmadapt.classify.mnist import load_mnist, make_fake_mnist, read_idx, write_idx
from lmadapt.cli import main
from lmadapt.errors import LmadaptError
from lmadapt.memory import EpisodicMemory

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fake_mnist(tmp_path_factory):
    return make_fake_mnist(tmp_path_factory.mktemp("mnist"), n_train=720, n_test=100)


# ------------------------------------------------------------------ IDX
def test_idx_round_trip_gz_and_plain(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", a)
    write_idx(tmp_path / "a", a, gz=False)
    assert (read_idx(tmp_path / "a.gz") == a).all()
    assert (read_idx(tmp_path / "a") == a).all()


@pytest.mark.parametrize("mutate, message", [
    (lambda raw: b"\x01\x02" + raw[2:], "bad magic"),
    (lambda raw: raw[:-5], "truncated"),
    (lambda raw: raw[:6], "truncated IDX header"),
    (lambda raw: raw[:2] + b"\x0d" + raw[3:], "not uint8"),
])
def test_malformed_idx_is_a_one_line_error(tmp_path, mutate, message):
    write_idx(tmp_path / "a", np.zeros((3, 4, 4), np.uint8), gz=False)
    (tmp_path / "a").write_bytes(mutate((tmp_path / "a").read_bytes()))
    with pytest.raises(LmadaptError, match=message):
        read_idx(tmp_path / "a")


def test_load_mnist_shapes_and_missing_file(fake_mnist, tmp_path):
    d = load_mnist(fake_mnist)
    assert d.train_x.shape == (720, 784) and d.test_x.shape == (100, 784)
    assert 0.0 <= float(d.train_x.min()) and float(d.train_x.max()) == 1.0
    assert set(d.train_y.tolist()) == set(range(10))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"junk"))
    with pytest.raises(LmadaptError, match="not found"):
        load_mnist(tmp_path)


# ------------------------------------------------------------------ MbPA on an MLP, exactly
@pytest.mark.parametrize("steps, beta", [(1, 0.0), (2, 0.0), (5, 0.0), (5, 0.3), (2, 0.7)])
def test_mlp_mbpa_matches_deep_copy_reference(steps, beta):
    g = torch.Generator().manual_seed(steps)
    with torch.random.fork_rng():
        torch.manual_seed(steps)
        net = torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.ReLU(), torch.nn.Linear(9, 7), torch.nn.Tanh(),
                                  torch.nn.Linear(7, 5)).double()
    m, K = 6, 4
    q = torch.randn(m, 12, generator=g, dtype=torch.float64)
    x = torch.randn(m, K, 12, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (m, K), generator=g)
    w = torch.rand(m, K, generator=g, dtype=torch.float64)
    ref = naive_mbpa(net, q, x, y, w, steps=steps, lr=0.5, beta=beta)
    fast = mlp_mbpa(net, q, x, y, w, steps=steps, lr=0.5, beta=beta)
    # the per-entry step-1 cache (what a memory precomputes), gathered per query, in chunks
    acts, deltas = mlp_base_pass(net, x.reshape(m * K, 12), y.reshape(-1))
    base = ([a.reshape(m, K, -1) for a in acts], [d.reshape(m, K, -1) for d in deltas])
    chunked = mlp_mbpa(net, q, x, y, w, steps=steps, lr=0.5, beta=beta, nb_base=base, chunk=4)
    assert torch.allclose(fast, ref, atol=1e-10) and torch.allclose(chunked, ref, atol=1e-10)
    plain = F.log_softmax(net(q), -1).detach()
    assert (fast - plain).abs().max() > 1e-3  # the steps really changed the prediction


def test_mlp_mbpa_rejects_non_mlp():
    with pytest.raises(ValueError, match="Linear/ReLU/Tanh"):
        mlp_mbpa(torch.nn.Sequential(torch.nn.Conv1d(1, 1, 1)), torch.zeros(1, 1), torch.zeros(1, 1, 1),
                 torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1), steps=1, lr=0.1)


# ------------------------------------------------------------------ predictors
def _memory_and_net(seed=0, n=40, d=6, classes=4):
    g = torch.Generator().manual_seed(seed)
    mem = EpisodicMemory(n, d)
    mem.add(torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g))
    torch.manual_seed(seed)
    net = build_mlp(MLPConfig(d, (5,), classes))
    return mem, net, torch.randn(9, d, generator=g)


def test_nonparametric_is_eq9_and_mixture_endpoints():
    mem, net, q = _memory_and_net()
    cfg = MbPAConfig(k=7, eps=1e-3)
    out = predict(("parametric", "nonparametric", "mixture"), torch.nn.Identity(), net, mem, q, cfg)
    sq, idx, valid = mem.knn(q, 7)
    w = 1.0 / (1e-3 + sq)
    votes = torch.zeros(9, 4).index_put_((torch.arange(9)[:, None].expand(-1, 7), mem.values[idx]), w, accumulate=True)
    assert torch.equal(out["nonparametric"], votes.argmax(1))
    assert torch.equal(predict(("mixture",), torch.nn.Identity(), net, mem, q, MbPAConfig(k=7, mixture_lambda=1.0))["mixture"],
                       out["parametric"])
    assert torch.equal(predict(("mixture",), torch.nn.Identity(), net, mem, q, MbPAConfig(k=7, mixture_lambda=0.0))["mixture"],
                       out["nonparametric"])


@pytest.mark.parametrize("optimizer", ["sgd", "rmsprop"])
def test_predict_mbpa_uses_the_reference_update(optimizer):
    mem, net, q = _memory_and_net(seed=1)
    cfg = MbPAConfig(k=5, alpha=0.3, steps=3, optimizer=optimizer, normalise=True)
    got = predict(("mbpa",), torch.nn.Identity(), net, mem, q, cfg)["mbpa"]
    sq, idx, valid = mem.knn(q, 5)
    w = kernel_weights(sq, valid, cfg.eps, True)
    ref = naive_mbpa(net, q, mem.keys[idx], mem.values[idx], w, steps=3, lr=0.3, optimizer=optimizer)
    assert torch.equal(got, ref.argmax(1))
    zero = predict(("mbpa", "parametric"), torch.nn.Identity(), net, mem, q, MbPAConfig(k=5, steps=0))
    assert torch.equal(zero["mbpa"], zero["parametric"])


def test_functional_and_span_paths_agree_on_an_mlp():
    mem, net, q = _memory_and_net(seed=2)
    sq, idx, valid = mem.knn(q, 6)
    w = kernel_weights(sq, valid, 1e-3, True)
    a = mlp_mbpa(net, q, mem.keys[idx], mem.values[idx], w, steps=4, lr=0.7)
    b = functional_mbpa(net, q, mem.keys[idx], mem.values[idx], w, steps=4, lr=0.7, optimizer="sgd")
    assert torch.allclose(a, b, atol=1e-5)


# ------------------------------------------------------------------ EWC
def test_ewc_fisher_is_the_expected_fisher_and_penalty_has_the_half():
    torch.manual_seed(0)
    net = build_mlp(MLPConfig(5, (4,), 3))
    x = torch.randn(7, 5)
    ewc = EWC(lam=10.0)
    ewc.consolidate(net, x)
    theta_star, fisher = ewc.anchors[0]
    manual = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    for xi in x:  # F = mean_x sum_y p(y|x) (d log p(y|x))^2, by plain autograd
        logp = F.log_softmax(net(xi[None])[0], -1)
        for c in range(3):
            grads = torch.autograd.grad(logp[c], list(net.parameters()), retain_graph=True)
            for (n, _), gr in zip(net.named_parameters(), grads):
                manual[n] += logp[c].exp().item() * gr**2 / len(x)
    for n in manual:
        assert torch.allclose(fisher[n], manual[n], atol=1e-6)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1)
    expected = 0.5 * 10.0 * sum((fisher[n] * (p - theta_star[n]) ** 2).sum() for n, p in net.named_parameters())
    assert torch.allclose(ewc.penalty(net), expected, rtol=1e-5)


def test_ewc_penalty_holds_weights_near_the_anchor():
    torch.manual_seed(0)
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))

    def drift(lam):
        torch.manual_seed(1)
        net = build_mlp(MLPConfig(5, (4,), 3))
        ewc = EWC(lam)
        ewc.consolidate(net, x)
        start = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
        opt = torch.optim.Adam(net.parameters(), lr=0.05)
        for _ in range(50):
            loss = F.cross_entropy(net(x), (y + 1) % 3) + ewc.penalty(net)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float((torch.cat([p.detach().flatten() for p in net.parameters()]) - start).norm())

    assert drift(1e5) < 0.3 * drift(0.0)


# ------------------------------------------------------------------ experiments end to end
def test_permuted_mnist_cli(fake_mnist, tmp_path, capsys):
    out = tmp_path / "pm"
    rc = main(["classify", "permuted-mnist", "--data-dir", str(fake_mnist), "--out", str(out), "--tasks", "3",
               "--examples-per-task", "200", "--memory-per-task", "10,30", "--hidden", "16,16",
               "--ewc-grid", "1,1000", "--alpha-grid", "0.1,0.5", "--steps-grid", "1,2", "--test-per-task", "60"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == {"mlp", "ewc", "mbpa@10", "mbpa@30", "mbpa+ewc@10", "mbpa+ewc@30"}
    for m in res["methods"].values():
        assert len(m["average_accuracy"]) == 3 and len(m["final_per_task_accuracy"]) == 3
        assert all(0.0 <= a <= 1.0 for a in m["average_accuracy"])
    assert res["tuning"]["ewc_lambda"]["best"] in (1.0, 1000.0)
    assert res["methods"]["mbpa@30"]["mbpa"]["alpha"] in (0.1, 0.5)
    assert (out / "permuted-mnist.png").read_bytes()[:4] == b"\x89PNG"
    # a second run into the same folder is refused, nothing overwritten
    before = (out / "results.json").read_bytes()
    assert main(["classify", "permuted-mnist", "--data-dir", str(fake_mnist), "--out", str(out), "--tasks", "1"]) == 2
    assert (out / "results.json").read_bytes() == before
    assert "already holds" in capsys.readouterr().err


def test_permuted_memory_gets_about_m_per_task_without_boundaries(fake_mnist):
    from lmadapt.classify.continual import ContinualConfig, Tasks, _new_memories, _train_sequence

    cfg = ContinualConfig(tasks=3, examples_per_task=200, epochs_per_task=2, memory_per_task=(20, 60), hidden=(8,),
                          tune=False)
    mems = _new_memories(cfg)
    _train_sequence(Tasks(load_mnist(fake_mnist), cfg), cfg, None, memories=mems)
    for m_size, mem in mems.items():
        assert 0.6 * 3 * m_size <= len(mem) <= 1.4 * 3 * m_size


def test_incremental_cli(fake_mnist, tmp_path):
    out = tmp_path / "inc"
    rc = main(["classify", "incremental", "--data-dir", str(fake_mnist), "--out", str(out), "--splits", "2",
               "--epochs", "1", "--eval-epochs", "0.1,0.5,1", "--memory-size", "300", "--hidden", "16,8",
               "--alpha-grid", "0.1,1", "--steps-grid", "1,3", "--unbalanced"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["reported_splits"] == [1] and res["epochs"] == [0.0, 0.1, 0.5, 1.0]
    assert len(res["splits"][0]["scarce_classes"]) == 2
    # before any training on them the parametric model cannot name a novel class
    assert res["methods"]["parametric"]["novel_accuracy"][0] == 0.0
    table = (out / "table.md").read_text()
    assert "| Novel | MbPA |" in table and "| Pre-trained | Parametric |" in table
    assert (out / "incremental.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--memory-per-task", "0,5"], "must be >= 1"),
    (["--methods", "mlp,foo"], "unknown method"),
    (["--mbpa-optimizer", "lbfgs"], "--mbpa-optimizer"),
])
def test_classify_bad_input(fake_mnist, tmp_path, capsys, args, message):
    rc = main(["classify", "permuted-mnist", "--data-dir", str(fake_mnist), "--out", str(tmp_path / "x"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


def test_classify_bad_idx_file(tmp_path, capsys):
    folder = make_fake_mnist(tmp_path / "m", n_train=20, n_test=10)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 9))
    rc = main(["classify", "incremental", "--data-dir", str(folder), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "train-images" in err and len(err.strip().splitlines()) == 1
