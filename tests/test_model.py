"""LSTM LM and configs: shapes, the hidden/logits contract, tying, dropout modes, recipes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmadapt.config import RunConfig, apply_overrides, load_recipe, recipe_names
from lmadapt.errors import LmadaptError
from lmadapt.model import LMConfig, LSTMLM, count_parameters


def test_forward_returns_softmax_inputs_and_logits():
    torch.manual_seed(0)
    model = LSTMLM(LMConfig(vocab_size=50, emb_size=8, hidden_size=12, num_layers=2)).eval()
    tokens = torch.randint(0, 50, (3, 7))
    hidden, logits, state = model(tokens)
    assert hidden.shape == (3, 7, 8) and logits.shape == (3, 7, 50)
    # The memory keys are exactly what the softmax layer sees.
    torch.testing.assert_close(logits, hidden @ model.decoder.weight.T + model.decoder.bias)
    assert model.projection is not None and model.decoder.weight is model.embedding.weight
    # Carried state: two halves equal one pass.
    h1, l1, s1 = model(tokens[:, :3])
    h2, l2, _ = model(tokens[:, 3:], s1)
    torch.testing.assert_close(torch.cat([l1, l2], 1), logits)


def test_untied_model_has_no_projection():
    model = LSTMLM(LMConfig(vocab_size=30, emb_size=8, hidden_size=12, tie_weights=False))
    assert model.projection is None and model.feature_size == 12
    assert model.decoder.weight is not model.embedding.weight


@pytest.mark.parametrize("variational", [True, False])
def test_dropout_only_in_training(variational):
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=40, emb_size=10, hidden_size=10, num_layers=2, dropout_embedding=0.2,
                   dropout_input=0.3, dropout_hidden=0.3, dropout_output=0.3, weight_drop=0.5,
                   variational=variational)
    model = LSTMLM(cfg)
    x = torch.randint(0, 40, (2, 6))
    model.train()
    a, b = model(x)[1], model(x)[1]
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model(x)[1], model(x)[1])


def test_weight_drop_masks_recurrent_weight_and_keeps_parameter():
    torch.manual_seed(0)
    no_dropout = dict(dropout_input=0, dropout_hidden=0, dropout_output=0, dropout_embedding=0)
    model = LSTMLM(LMConfig(vocab_size=20, emb_size=6, hidden_size=6, num_layers=1, weight_drop=0.5, **no_dropout))
    before = model.layers[0].weight_hh_l0.detach().clone()
    model.train()
    _, logits, _ = model(torch.randint(0, 20, (2, 5)))
    logits.sum().backward()
    # A dropped recurrent weight gets exactly no gradient, a kept one some: about half of each.
    zero = (model.layers[0].weight_hh_l0.grad == 0).float().mean().item()
    assert 0.3 < zero < 0.7
    assert torch.equal(model.layers[0].weight_hh_l0.detach(), before)  # the parameter itself is untouched


def test_variational_mask_is_shared_over_time():
    from lmadapt.model import sequence_dropout

    torch.manual_seed(0)
    out = sequence_dropout(torch.ones(3, 9, 5), 0.5, training=True, variational=True)
    assert torch.equal(out, out[:, :1].expand_as(out))


@pytest.mark.parametrize("name, params", [("ptb-paper", 10.0e6), ("wt2-paper", 24.0e6)])
def test_paper_recipes_build_and_take_a_step(name, params):
    cfg = load_recipe(name)
    cfg.model.vocab_size = {"ptb-paper": 10000, "wt2-paper": 33278}[name]
    torch.manual_seed(0)
    model = LSTMLM(cfg.model)
    assert count_parameters(model) == pytest.approx(params, rel=0.01)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, betas=cfg.train.betas)
    x = torch.randint(0, cfg.model.vocab_size, (2, 6))
    y = torch.randint(0, cfg.model.vocab_size, (2, 6))
    before = model.decoder.bias.detach().clone()
    _, logits, _ = model(x)
    F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).backward()
    opt.step()
    assert not torch.equal(before, model.decoder.bias.detach())


def test_all_recipes_load():
    names = recipe_names()
    assert {"ptb-cpu", "wt2-cpu", "ptb-paper", "wt2-paper"} <= set(names)
    for name in names:
        cfg = load_recipe(name)
        cfg.model.validate()


def test_set_overrides_are_typed_and_checked():
    cfg = RunConfig()
    apply_overrides(cfg, ["model.hidden_size=33", "train.lr=1e-3", "model.variational=false",
                          "train.betas=[0.0, 0.99]", "data.data_dir=/x", "data.data_dir=none"])
    assert cfg.model.hidden_size == 33 and cfg.train.lr == 1e-3 and cfg.model.variational is False
    assert cfg.train.betas == (0.0, 0.99) and cfg.data.data_dir is None
    for bad in ("model.hidden_size=3.5", "model.variational=maybe", "train.nope=1", "nope.x=1"):
        with pytest.raises(LmadaptError):
            apply_overrides(cfg, [bad])
    with pytest.raises(LmadaptError, match="dropout_input"):
        apply_overrides(cfg, ["model.dropout_input=1.5"])
        cfg.model.validate()
