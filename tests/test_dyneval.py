"""Dynamic evaluation's default rule against a transcription of the reference code's
formulas (benkrause/dynamic-evaluation, dynamiceval.py), its statistics, grid and cache."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lmadapt.errors import LmadaptError
from lmadapt.methods import dyneval as dyneval_module
from lmadapt.methods.dyneval import LOW_LRS, DynamicEvaluation, DynEvalParams, REFERENCE_DECAYS, REFERENCE_LRS
from lmadapt.stream import stream_eval

from conftest import TrainSplit as _Corpus
from conftest import motif_stream, tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _fresh_statistics():
    # Each test computes its own statistics (the in-process memo would serve an earlier test's).
    dyneval_module._RECENT.clear()
    yield
    dyneval_module._RECENT.clear()


def _reference(model, train, stream, *, lr, lamb, eps, bptt, batch_size, max_batches=-1):
    """The reference's gradstat() and evaluate(), written from its formulas.

    gradstat: train cut into batch_size columns (time-major), segments of bptt with the
    state carried, MS_p += grad_p^2 per batch, MS_p = sqrt(MS_p / batches),
    gsum = mean over parameter tensors of mean(MS_p), decrate_p = MS_p / gsum.
    evaluate: decrate clipped at 1/lamb; per segment (scored first, at batch 1)
    dW = lamb * decrate * (W0 - W) - lr * grad / (MS + epsilon).
    Returns the final weights (one per parameter tensor) and MS.
    """
    model = copy.deepcopy(model)
    params = list(model.parameters())  # tied weights are one tensor here, as in the reference
    nb = train.numel() // batch_size
    data = train[: nb * batch_size].view(batch_size, -1).t().contiguous()  # (time, batch)
    MS = [torch.zeros_like(p) for p in params]
    hidden, batches, i = None, 0, 0
    while i < data.size(0) - 1 - 1:
        seq_len = min(bptt, data.size(0) - 1 - i)
        x, y = data[i:i + seq_len], data[i + 1:i + 1 + seq_len]
        _, logits, hidden = model(x.t(), hidden)  # lmadapt's model is batch-first
        hidden = [(h.detach(), c.detach()) for h, c in hidden]
        loss = F.cross_entropy(logits.transpose(0, 1).reshape(-1, logits.size(-1)), y.reshape(-1))
        grads = torch.autograd.grad(loss, params)
        MS = [m + g * g for m, g in zip(MS, grads)]
        batches += 1
        i += seq_len
        if max_batches > 0 and batches >= max_batches:
            break
    MS = [torch.sqrt(m / batches) for m in MS]
    gsum = sum(torch.mean(m) for m in MS) / len(MS)
    decrate = [torch.clamp(m / gsum, max=1 / lamb) for m in MS]
    data0 = [p.detach().clone() for p in params]

    hidden, i = None, 0
    while i < stream.numel() - 1:  # every token after the first is scored
        seq_len = min(bptt, stream.numel() - 1 - i)
        x, y = stream[i:i + seq_len], stream[i + 1:i + 1 + seq_len]
        _, logits, hidden = model(x.unsqueeze(0), hidden)
        hidden = [(h.detach(), c.detach()) for h, c in hidden]
        loss = F.cross_entropy(logits[0], y)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g, p0, r, m in zip(params, grads, data0, decrate, MS):
                dW = lamb * r * (p0 - p) - lr * g / (m + eps)
                p += dW
        i += seq_len
    return [p.detach() for p in params], MS, decrate


@pytest.mark.parametrize("stat_batch,max_batches", [(100, 0), (4, 0), (4, 7)])
def test_default_rule_is_the_reference_update(stat_batch, max_batches):
    model = tiny_lm()
    train = motif_stream(2000 if stat_batch == 100 else 300, seed=5)
    stream = motif_stream(16, seed=7)  # 15 scored tokens: 3 segments of L = 5
    # Larger steps than the reference's defaults, so that 3 updates move the weights far
    # beyond the tolerance and the 1/λ clip binds for some weights.
    lr, lamb, eps = 3e-3, 0.2, 2e-5
    method = DynamicEvaluation(DynEvalParams(lr=lr, decay=lamb, eps=eps, segment=5, stat_batch=stat_batch,
                                             max_batches=max_batches))
    stream_eval(model, stream, [method], {}, corpus=_Corpus(train))
    ref_w, ref_ms, ref_rate = _reference(model, train, stream, lr=lr, lamb=lamb, eps=eps, bptt=5,
                                         batch_size=stat_batch, max_batches=max_batches or -1)
    assert len(method.adapted) == len(ref_w)
    for got, want in zip(method.rms, ref_ms):
        torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-5)
    moved = max((w - w0).abs().max().item() for w, w0 in zip(ref_w, model.parameters()))
    assert moved > 1e-3  # the test can tell an update from none
    assert any((r >= 1 / lamb).any() for r in ref_rate)  # the clip is exercised
    for got, want in zip(method.adapted, ref_w):
        torch.testing.assert_close(got.detach(), want, atol=1e-6, rtol=0)


def test_normaliser_is_the_mean_of_tensor_means():
    rms = [torch.full((100,), 1.0), torch.full((2,), 3.0)]
    # mean over tensors of their means = 2 (the mean over all weights would be 1.04)
    rates = dyneval_module.decay_rates(rms, decay=0.0)
    torch.testing.assert_close(rates[0], torch.full((100,), 0.5))
    torch.testing.assert_close(rates[1], torch.full((2,), 1.5))
    clipped = dyneval_module.decay_rates(rms, decay=1 / 1.2)
    assert clipped[1].max().item() == pytest.approx(1.2)


def test_defaults_scale_the_rate_and_the_grid_and_preset_hold_the_reference_ones():
    p = DynEvalParams()
    # The scaled η (lr 0) with c = 6.6e-4, p = 0.75 (docs/results.md, "Choosing the scaled rate"); the rest is
    # the reference code's setting.
    assert (p.lr, p.lr_scaled, p.lr_power, p.decay, p.eps, p.segment, p.variant, p.stat_batch, p.max_batches) == \
        (0.0, 6.6e-4, 0.75, 0.002, 2e-5, 5, "rms", 100, 0)
    assert DynamicEvaluation.PRESETS["paper"] == {"lr": 5e-5, "decay": 0.002}
    assert DynamicEvaluation.grid_for({}) == {"lr": [0.0] + REFERENCE_LRS + LOW_LRS, "decay": REFERENCE_DECAYS}
    g20 = DynamicEvaluation.grid_for({"segment": "20"})  # as from a CLI flag
    assert g20["lr"] == pytest.approx([0.0] + [4 * v for v in REFERENCE_LRS + LOW_LRS])
    assert g20["decay"] == pytest.approx([4 * v for v in REFERENCE_DECAYS])

    from lmadapt.tune import _settings

    settings = _settings("dyneval", {"segment": 10}, {})
    assert len(settings) == (1 + len(REFERENCE_LRS + LOW_LRS)) * len(REFERENCE_DECAYS) == 40
    assert sorted({s["lr"] for s in settings}) == pytest.approx(sorted([0.0] + [2 * v for v in REFERENCE_LRS + LOW_LRS]))


def test_bad_settings_are_one_line_errors():
    with pytest.raises(LmadaptError, match="stat_batch"):
        DynamicEvaluation(DynEvalParams(stat_batch=0))
    with pytest.raises(LmadaptError, match="max_batches"):
        DynamicEvaluation(DynEvalParams(max_batches=-1))
    with pytest.raises(LmadaptError, match="training tokens"):
        stream_eval(tiny_lm(), motif_stream(12), [DynamicEvaluation()], {}, corpus=_Corpus(motif_stream(150)))


def _counting(monkeypatch):
    calls = []
    real = dyneval_module.gradient_rms

    def counted(*args, **kwargs):
        calls.append(args[3])  # the segment length it ran at
        return real(*args, **kwargs)

    monkeypatch.setattr(dyneval_module, "gradient_rms", counted)
    return calls


def test_statistics_are_cached_in_the_run_directory(tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    model, train, stream = tiny_lm(), motif_stream(300, seed=5), motif_stream(40)

    def run(**kw):
        m = DynamicEvaluation(DynEvalParams(lr=1e-3, stat_batch=4, **kw))
        r = stream_eval(model, stream, [m], {}, corpus=_Corpus(train), cache_dir=tmp_path)
        dyneval_module._RECENT.clear()  # a new process: only the file remains
        return m, r

    first, r1 = run()
    assert calls == [5] and first.stats_source == "computed"
    assert len(list(tmp_path.glob("dyneval-stats-*.pt"))) == 1
    second, r2 = run()
    assert calls == [5] and second.stats_source == "cache"  # the pass was skipped
    assert torch.equal(r1.base, r2.base)
    for a, b in zip(first.rms, second.rms):
        assert torch.equal(a, b)
    # Other settings that change the statistics get their own entry.
    third, _ = run(segment=3)
    assert calls == [5, 3] and third.stats_source == "computed"
    with torch.no_grad():
        model.decoder.bias.add_(0.1)  # other weights: another checkpoint
    fourth, _ = run()
    assert calls == [5, 3, 5] and fourth.stats_source == "computed"
    assert len(list(tmp_path.glob("dyneval-stats-*.pt"))) == 3


def test_in_process_memo_and_unwritable_cache(tmp_path, monkeypatch, capsys):
    calls = _counting(monkeypatch)
    model, train, stream = tiny_lm(), motif_stream(300, seed=5), motif_stream(20)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    for _ in range(2):  # e.g. two passes of `lmadapt tune`
        m = DynamicEvaluation(DynEvalParams(stat_batch=4))
        stream_eval(model, stream, [m], {}, corpus=_Corpus(train), cache_dir=blocker)
    assert calls == [5] and m.stats_source == "memory"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not cached" in err[0]


def test_one_statistics_pass_serves_every_adapt_choice(tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    model, train, stream = tiny_lm(), motif_stream(300, seed=5), motif_stream(20)
    by_choice = {}
    for adapt in ("all", "lstm", "output"):
        dyneval_module._RECENT.clear()
        m = DynamicEvaluation(DynEvalParams(stat_batch=4, adapt=adapt))
        stream_eval(model, stream, [m], {}, corpus=_Corpus(train), cache_dir=tmp_path)
        by_choice[adapt] = {id_: r for id_, r in zip(_names(m), m.rms)}
    assert calls == [5]
    for adapt in ("lstm", "output"):
        assert by_choice[adapt] and set(by_choice[adapt]) < set(by_choice["all"])
        for name, r in by_choice[adapt].items():
            assert torch.equal(r, by_choice["all"][name])


def _names(method):
    names = {id(q): n for n, q in method.model.named_parameters()}
    return [names[id(q)] for q in method.adapted]
