"""The classifier path: IDX loading, the exact MLP MbPA, the predictors, EWC, the training loop
and its plugins, and the experiments end to end."""

from __future__ import annotations

import copy
import gzip
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmadapt.adapt import functional_mbpa, kernel_weights, mlp_base_pass, mlp_mbpa, naive_mbpa
from lmadapt.classify.loop import Plugin, Task, minibatches, train
from lmadapt.classify.mnist import load_mnist, make_fake_mnist, read_idx, write_idx
from lmadapt.classify.models import MLPConfig, build
from lmadapt.classify.plugins import EWC, MbPA
from lmadapt.classify.predict import ClassifierMbPA, mbpa_log_probs, predict, predict_many
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
    net = build(MLPConfig(d, (5,), classes))
    return mem, net, torch.randn(9, d, generator=g)


def test_nonparametric_is_eq9_and_mixture_endpoints():
    mem, net, q = _memory_and_net()
    cfg = ClassifierMbPA(k=7, eps=1e-3)
    out = {name: predict(net, mem, q, name, cfg) for name in ("parametric", "nonparametric")}
    sq, idx, valid = mem.knn(q, 7)
    w = 1.0 / (1e-3 + sq)
    votes = torch.zeros(9, 4).index_put_((torch.arange(9)[:, None].expand(-1, 7), mem.values[idx]), w, accumulate=True)
    assert torch.equal(out["nonparametric"], votes.argmax(1))
    assert torch.equal(out["parametric"], net(q).argmax(1))
    assert torch.equal(predict(net, mem, q, "mixture", ClassifierMbPA(k=7, mixture_lambda=1.0)), out["parametric"])
    assert torch.equal(predict(net, mem, q, "mixture", ClassifierMbPA(k=7, mixture_lambda=0.0)), out["nonparametric"])


def _naive_mbpa_predictor(net, keys, values, q, *, k, eps, alpha, steps, optimizer):
    """MbPA written out per query: sort the distances to every memory entry, weight the K
    nearest by 1 / (eps + d^2) normalised, copy the network, step torch.optim on the
    weighted NLL, score the query."""
    out = []
    for qi in q:
        d2 = ((keys - qi) ** 2).sum(1)
        near = torch.sort(d2, stable=True).indices[:k]
        w = 1.0 / (eps + d2[near])
        w = w / w.sum()
        local = copy.deepcopy(net)
        opt = {"sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop}[optimizer](local.parameters(), lr=alpha)
        for _ in range(steps):
            opt.zero_grad()
            loss = (w * F.cross_entropy(local(keys[near]), values[near], reduction="none")).sum()
            loss.backward()
            opt.step()
        with torch.no_grad():
            out.append(F.log_softmax(local(qi[None]), -1)[0])
    return torch.stack(out)


@pytest.mark.parametrize("optimizer", ["sgd", "rmsprop"])
def test_mbpa_predictor_equals_a_naive_per_query_reference(optimizer):
    mem, net, q = _memory_and_net(seed=1)
    cfg = ClassifierMbPA(k=5, alpha=0.3, steps=3, optimizer=optimizer)
    ref = _naive_mbpa_predictor(net, mem.keys, mem.values, q, k=5, eps=cfg.eps, alpha=0.3, steps=3, optimizer=optimizer)
    sq, idx, valid = mem.knn(q, 5)
    base = mlp_base_pass(net.head, mem.keys, mem.values) if optimizer == "sgd" else None
    got = mbpa_log_probs(net.head, q, mem, sq, idx, valid, cfg, base)
    assert torch.allclose(got, ref, atol=1e-5)
    assert (ref - F.log_softmax(net(q), -1)).abs().max() > 1e-2  # the steps really moved the prediction
    assert torch.equal(predict(net, mem, q, "mbpa", cfg), ref.argmax(1))


def test_one_search_serves_settings_with_different_k():
    """predict_many searches the largest K once; each setting must see exactly its own K."""
    mem, net, q = _memory_and_net(seed=3)
    settings = [ClassifierMbPA(k=k, alpha=a, steps=2) for k, a in ((2, 0.5), (9, 0.5), (9, 2.0))]
    together = predict_many(net, mem, q, {"mbpa": settings, "nonparametric": settings[:2]})
    for c, pred in zip(settings, together["mbpa"]):
        assert torch.equal(pred, predict(net, mem, q, "mbpa", c))
    for c, pred in zip(settings[:2], together["nonparametric"]):
        assert torch.equal(pred, predict(net, mem, q, "nonparametric", c))
    assert not torch.equal(together["nonparametric"][0], together["nonparametric"][1])  # K matters here


def test_functional_and_span_paths_agree_on_an_mlp():
    mem, net, q = _memory_and_net(seed=2)
    sq, idx, valid = mem.knn(q, 6)
    w = kernel_weights(sq, valid, 1e-3, True)
    a = mlp_mbpa(net.head, q, mem.keys[idx], mem.values[idx], w, steps=4, lr=0.7)
    b = functional_mbpa(net.head, q, mem.keys[idx], mem.values[idx], w, steps=4, lr=0.7, optimizer="sgd")
    assert torch.allclose(a, b, atol=1e-5)


# ------------------------------------------------------------------ EWC
def test_ewc_fisher_is_the_expected_fisher_and_penalty_has_the_half():
    torch.manual_seed(0)
    net = build(MLPConfig(5, (4,), 3))
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


def test_ewc_penalty_sums_every_finished_task():
    """The penalty's running sums against the per-task formula, as tasks are added."""
    torch.manual_seed(0)
    net = build(MLPConfig(5, (4,), 3)).double()
    ewc = EWC(lam=3.0)

    def by_hand():
        return 0.5 * 3.0 * sum((f[n] * (p - a[n]) ** 2).sum() for a, f in ewc.anchors for n, p in net.named_parameters())

    for task in range(3):
        ewc.consolidate(net, torch.randn(6, 5, dtype=torch.float64))
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        assert len(ewc.anchors) == task + 1
        assert torch.allclose(ewc.penalty(net), by_hand(), rtol=1e-9, atol=1e-12)


def test_ewc_penalty_holds_weights_near_the_anchor():
    torch.manual_seed(0)
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))

    def drift(lam):
        torch.manual_seed(1)
        net = build(MLPConfig(5, (4,), 3))
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


# ------------------------------------------------------------------ the loop and its plugins
class _Recorder(Plugin):
    def __init__(self):
        self.calls = []

    def before_task(self, model, task):
        self.calls.append(("before", task.index))

    def penalty(self, model):
        return 0.5 * sum((p**2).sum() for p in model.parameters())

    def after_step(self, model, x, y, hidden):
        self.calls.append(("step", x.shape[0]))

    def after_task(self, model, task):
        self.calls.append(("after", task.index))


def test_loop_steps_on_cross_entropy_plus_penalties_and_calls_hooks_in_order():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 6, generator=g), torch.randint(0, 3, (10,), generator=g)
    torch.manual_seed(0)
    model = build(MLPConfig(6, (5,), 3, embed=True))
    twin = copy.deepcopy(model)
    rec = _Recorder()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tasks = [Task(minibatches(x, y, batch=4, gen=torch.Generator().manual_seed(1)), index=t) for t in range(2)]
    train(model, opt, tasks, [rec])
    assert rec.calls == [("before", 0), ("step", 4), ("step", 4), ("step", 2), ("after", 0),
                         ("before", 1), ("step", 4), ("step", 4), ("step", 2), ("after", 1)]
    # the same steps written out
    opt2 = torch.optim.SGD(twin.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        order = torch.randperm(10, generator=gen)
        for s in range(0, 10, 4):
            b = order[s : s + 4]
            loss = F.cross_entropy(twin(x[b]), y[b]) + 0.5 * sum((p**2).sum() for p in twin.parameters())
            opt2.zero_grad()
            loss.backward()
            opt2.step()
        gen = torch.Generator().manual_seed(1)  # each task's minibatches had their own generator
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_minibatches_stop_at_max_steps_mid_epoch():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    got = list(minibatches(x, y, batch=4, gen=torch.Generator().manual_seed(0), epochs=None, max_steps=5))
    assert [len(b[1]) for b in got] == [4, 4, 2, 4, 4]
    assert sorted(torch.cat([b[1] for b in got[:3]]).tolist()) == list(range(10))  # an epoch is a permutation


def test_mbpa_plugin_writes_trunk_after_the_step_and_rates_nest():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 6, generator=g), torch.randint(0, 3, (200,), generator=g)
    torch.manual_seed(0)
    model = build(MLPConfig(6, (5,), 3, embed=True))
    before = model.trunk(x[:8]).detach()
    every = MbPA(EpisodicMemory(500, 5), ClassifierMbPA())
    train(model, torch.optim.SGD(model.parameters(), lr=0.5), [Task([(x[:8], y[:8])])], [every])
    assert torch.allclose(every.memory.keys, model.trunk(x[:8]).detach())  # f after the step, not before
    assert not torch.allclose(every.memory.keys, before, atol=1e-4)
    assert torch.equal(every.memory.values, y[:8])
    small, large = (MbPA(EpisodicMemory(500, 6), ClassifierMbPA(), rate=r, seed=5) for r in (0.1, 0.4))
    model = build(MLPConfig(6, (5,), 3))  # identity trunk: keys are the inputs
    batches = minibatches(x, y, batch=10, gen=torch.Generator().manual_seed(2), epochs=3)
    train(model, torch.optim.SGD(model.parameters(), lr=0.1), [Task(batches)], [small, large])
    assert 0.05 * 600 <= len(small.memory) <= 0.15 * 600 and 0.3 * 600 <= len(large.memory) <= 0.5 * 600
    big = {tuple(k.tolist()) for k in large.memory.keys}
    assert all(tuple(k.tolist()) in big for k in small.memory.keys)  # one draw per example serves both


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
        assert m["average_accuracy"][-1] == pytest.approx(sum(m["final_per_task_accuracy"]) / 3)
    # the tuning keeps the best of what it measured, and the curves use what it chose
    lam = res["tuning"]["ewc_lambda"]
    assert lam["best"] == float(max(lam["grid"], key=lam["grid"].get)) == res["methods"]["ewc"]["ewc_lambda"]
    for name in ("mbpa@30", "mbpa+ewc@10"):
        grid = res["tuning"][name]["grid"]
        best = max(grid, key=lambda r: r["valid_accuracy"])
        chosen = res["methods"][name]["mbpa"]
        assert (chosen["alpha"], chosen["steps"]) == (best["alpha"], best["steps"])
    # it learns (chance is 0.1), and the larger memory recovers old tasks the plain MLP forgot
    assert res["methods"]["mlp"]["average_accuracy"][0] > 0.4
    assert res["methods"]["mbpa@30"]["average_accuracy"][-1] > res["methods"]["mlp"]["average_accuracy"][-1] + 0.1
    assert (out / "permuted-mnist.png").read_bytes()[:4] == b"\x89PNG"
    # a second run into the same folder is refused, nothing overwritten
    before = (out / "results.json").read_bytes()
    assert main(["classify", "permuted-mnist", "--data-dir", str(fake_mnist), "--out", str(out), "--tasks", "1"]) == 2
    assert (out / "results.json").read_bytes() == before
    assert "already holds" in capsys.readouterr().err


def test_permuted_flags_reach_the_run(fake_mnist, tmp_path):
    out = tmp_path / "pm"
    rc = main(["classify", "permuted-mnist", "--data-dir", str(fake_mnist), "--out", str(out), "--tasks", "2",
               "--examples-per-task", "100", "--memory-per-task", "20", "--hidden", "8", "--methods", "mbpa",
               "--no-tune", "--mbpa-k", "4", "--mbpa-alpha", "0.2", "--mbpa-steps", "2", "--mbpa-eps", "0.5",
               "--mbpa-no-normalise", "--batch-size", "16", "--test-per-task", "30"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == {"mbpa@20"} and res["tuning"] == {}
    want = {"k": 4, "alpha": 0.2, "steps": 2, "beta": 0.0, "eps": 0.5, "normalise": False, "optimizer": "sgd"}
    assert {k: res["methods"]["mbpa@20"]["mbpa"][k] for k in want} == want
    assert res["config"]["batch_size"] == 16 and res["config"]["mbpa"]["eps"] == 0.5


def test_permuted_memory_gets_about_m_per_task_without_boundaries(fake_mnist):
    from lmadapt.classify.continual import ContinualConfig, Tasks, memory_writers, train_sequence

    cfg = ContinualConfig(tasks=3, examples_per_task=200, epochs_per_task=2, memory_per_task=(20, 60), hidden=(8,),
                          tune=False)
    writers = memory_writers(cfg)
    train_sequence(Tasks(load_mnist(fake_mnist), cfg), cfg, None, writers.values())
    for m_size, writer in writers.items():
        assert 0.6 * 3 * m_size <= len(writer.memory) <= 1.4 * 3 * m_size


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
    # after an epoch the memory-based predictors name them (5 novel classes: chance 0.2) and
    # keep the pre-trained ones
    for name in ("nonparametric", "mixture", "mbpa"):
        assert res["methods"][name]["novel_accuracy"][-1] > 0.35
        assert res["methods"][name]["pretrained_accuracy"][-1] > 0.8
    assert res["methods"]["mbpa"]["settings"]["alpha"] in (0.1, 1.0)
    assert res["methods"]["mixture"]["settings"]["lambda"] in (0.1, 0.3, 0.5, 0.7, 0.9)
    table = (out / "table.md").read_text()
    assert "| Novel | MbPA |" in table and "| Pre-trained | Parametric |" in table
    assert (out / "incremental.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--memory-per-task", "0,5"], "must be >= 1"),
    (["--methods", "mlp,foo"], "--methods must be one of"),
    (["--mbpa-optimizer", "lbfgs"], "--mbpa-optimizer"),
    (["--mbpa-steps", "0"], "--mbpa-steps must be >= 1"),
    (["--mbpa-normalise", "maybe"], "--mbpa-normalise expects true or false"),
    (["--tasks", "2.5"], "--tasks expects an integer"),
    (["--mbpa-mixture-lambda", "0.3"], "unrecognized arguments"),  # no mixture in this experiment
])
def test_classify_bad_input(fake_mnist, tmp_path, capsys, args, message):
    rc = main(["classify", "permuted-mnist", "--data-dir", str(fake_mnist), "--out", str(tmp_path / "x"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_classify_bad_idx_file(tmp_path, capsys):
    folder = make_fake_mnist(tmp_path / "m", n_train=20, n_test=10)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 9))
    rc = main(["classify", "incremental", "--data-dir", str(folder), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "train-images" in err and len(err.strip().splitlines()) == 1
