"""Hebbian softmax: the exact rows move by the exact amount, counts persist through --resume."""

from __future__ import annotations

import pytest
import torch

from lmadapt.hebbian import HebbianSoftmax

pytestmark = pytest.mark.usefixtures("one_thread")


def test_only_present_rows_move_by_the_rule():
    torch.manual_seed(0)
    V, d = 7, 4
    w = torch.nn.Parameter(torch.randn(V, d))
    before = w.detach().clone()
    heb = HebbianSoftmax(V, gamma=0.1, T=5)
    heb.counts[3] = 4  # c=4 < T: lam = max(1/4, 0.1) = 0.25
    heb.counts[5] = 5  # c=5 = T: frozen, lam = 0
    h = torch.randn(6, d)
    y = torch.tensor([1, 3, 1, 5, 3, 1])
    moved = heb.update(w, h, y)
    assert moved.tolist() == [1, 3, 5]
    w = w.detach()
    assert torch.allclose(w[1], h[[0, 2, 5]].mean(0))  # first sighting, c=1: lam = 1, the mean itself
    assert torch.allclose(w[3], 0.75 * before[3] + 0.25 * h[[1, 4]].mean(0))
    assert torch.equal(w[5], before[5])
    untouched = [0, 2, 4, 6]
    assert torch.equal(w[untouched], before[untouched])
    assert heb.counts.tolist() == [1, 4, 1, 6, 1, 6, 1]
    # gamma is the floor once 1/c drops below it
    rates = HebbianSoftmax(V, gamma=0.1, T=500).mixing_rates(torch.tensor([1, 2, 20, 499, 500]))
    assert torch.allclose(rates, torch.tensor([1.0, 0.5, 0.1, 0.1, 0.0]))


def test_all_reduce_path_matches_single_process():
    torch.manual_seed(1)
    w1 = torch.randn(9, 3)
    w2 = w1.clone()
    h, y = torch.randn(20, 3), torch.randint(0, 9, (20,))
    a, b = HebbianSoftmax(9, 0.01, 500), HebbianSoftmax(9, 0.01, 500)
    a.update(w1, h, y)
    b.update(w2, h, y, all_reduce=lambda t: None)  # one process: the reduction is the identity
    assert torch.allclose(w1, w2) and torch.equal(a.counts, b.counts)


def test_hebbian_training_moves_rows_and_resume_is_exact(tmp_path, tiny_corpus_dir):
    from conftest import tiny_config

    from lmadapt import runs
    from lmadapt.corpus import load_corpus
    from lmadapt.train import fit

    extra = ["model.softmax=hebbian", "model.tie_weights=false", "train.hebbian_T=50", "train.hebbian_gamma=0.05"]
    corpus = load_corpus(str(tiny_corpus_dir), None)
    cfg = tiny_config(tiny_corpus_dir, extra)
    fit(tmp_path / "full", cfg, corpus)
    cfg_a = tiny_config(tiny_corpus_dir, extra)
    assert fit(tmp_path / "cut", cfg_a, corpus, interrupt_after_steps=7) is None
    fit(tmp_path / "cut", tiny_config(tiny_corpus_dir, extra), corpus, resume=True)
    full = runs.load_tensors(tmp_path / "full" / runs.LAST)
    cut = runs.load_tensors(tmp_path / "cut" / runs.LAST)
    assert torch.equal(full["hebbian"]["counts"], cut["hebbian"]["counts"])
    for k in full["model"]:
        assert torch.equal(full["model"][k], cut["model"][k]), k
    counts = full["hebbian"]["counts"]
    assert counts.sum() > counts.numel()  # classes were counted
    plain = tiny_config(tiny_corpus_dir, ["model.tie_weights=false"])
    fit(tmp_path / "plain", plain, corpus)
    w_plain = runs.load_tensors(tmp_path / "plain" / runs.LAST)["model"]["decoder.weight"]
    assert not torch.allclose(full["model"]["decoder.weight"], w_plain, atol=1e-3)  # the option does something


def test_hebbian_plugin_mixes_toward_the_activations_the_loss_used():
    """In the classifier loop the rule sees the trunk outputs of the step's forward pass
    (before the step), and applies to the head's rows after the gradient step."""
    import copy

    import torch.nn.functional as F

    from lmadapt.classify.loop import Task, train
    from lmadapt.classify.models import MLPConfig, build
    from lmadapt.classify.plugins import Hebbian

    torch.manual_seed(0)
    model = build(MLPConfig(6, (5,), 4, embed=True))
    twin = copy.deepcopy(model)
    x, y = torch.randn(8, 6), torch.tensor([0, 0, 2, 2, 2, 3, 0, 2])
    train(model, torch.optim.SGD(model.parameters(), lr=0.3), [Task([(x, y)])], [Hebbian(4, gamma=0.01, T=500)])
    opt = torch.optim.SGD(twin.parameters(), lr=0.3)
    h = twin.trunk(x)
    F.cross_entropy(twin.head(h), y).backward()
    opt.step()
    w = twin.head[0].weight.detach()
    for c in (0, 2, 3):  # first sighting of each class: lam = 1, the row becomes the mean
        assert torch.allclose(model.head[0].weight[c], h[y == c].mean(0).detach(), atol=1e-6)
    assert torch.equal(model.head[0].weight[1], w[1])  # absent class: the gradient step only
    assert torch.allclose(model.trunk[0].weight, twin.trunk[0].weight)
    with pytest.raises(ValueError, match="one linear layer"):
        train(build(MLPConfig(6, (5,), 4)), torch.optim.SGD(model.parameters(), lr=0.1), [Task([(x, y)])],
              [Hebbian(4, 0.01, 500)])


def test_mnist_curriculum_cli(tmp_path):
    import json

    from lmadapt.classify.mnist import make_fake_mnist
    from lmadapt.cli import main

    data = make_fake_mnist(tmp_path / "m", n_train=600, n_test=100)
    out = tmp_path / "cur"
    rc = main(["classify", "curriculum", "--data-dir", str(data), "--out", str(out), "--classes-per-stage", "5",
               "--steps-per-stage", "20", "--seeds", "1", "--hidden", "16", "--exposures", "1,5,20", "--no-tune",
               "--hebbian-gamma", "0.1", "--hebbian-T", "50"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["arms"]) == {"plain", "hebbian"} and res["hebbian"] == {"gamma": 0.1, "T": 50}
    plain, hebbian = res["arms"]["plain"], res["arms"]["hebbian"]
    assert list(plain["new_class_accuracy"]) == ["1", "5", "20"] and len(hebbian["accuracy_after_stage"]) == 2
    # the first stage's 5 classes are learnt (chance 0.2), and so are all 10 by the end
    assert plain["accuracy_after_stage"][0] > 0.6 and plain["accuracy_after_stage"][1] > 0.5
    # the paper's claim on the fixture: a class seen once is named by the Hebbian layer, not the plain one
    assert plain["new_class_accuracy"]["1"] < 0.05 < hebbian["new_class_accuracy"]["1"]
    assert "| hebbian |" in (out / "table.md").read_text()


def test_curriculum_takes_no_mbpa_flags(tmp_path, capsys):
    from lmadapt.cli import main

    rc = main(["classify", "curriculum", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"), "--mbpa-k", "3"])
    assert rc == 2 and "unrecognized arguments: --mbpa-k" in capsys.readouterr().err
