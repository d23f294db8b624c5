"""The streaming loop and its methods against naive references."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lmadapt.adapt import naive_mbpa
from lmadapt.errors import LmadaptError
from lmadapt.methods import parse_combination
from lmadapt.methods.cache import CacheParams, NeuralCache
from lmadapt.methods.dyneval import DynamicEvaluation, DynEvalParams
from lmadapt.methods.mbpa import MbPA, MbPAParams
from lmadapt.mix import check_lambdas, mix_log_probs

from conftest import TrainSplit as _Corpus
from conftest import mbpa_reference_neighbours, motif_stream, tiny_lm
from lmadapt.stream import stream_eval


def _methods():
    return [MbPA(MbPAParams(memory=60, k=8, alpha=0.5, steps=2, beta=0.1)), NeuralCache(CacheParams(window=40, theta=0.5))]


def test_results_do_not_depend_on_segment_length():
    model, stream = tiny_lm(), motif_stream(260)
    lambdas = {"mbpa": 0.2, "cache": 0.2}
    results = [stream_eval(model, stream, _methods(), lambdas, segment_len=L) for L in (1, 7, 128)]
    ref = results[0]
    assert ref.tokens == stream.numel() - 1
    for r in results[1:]:
        torch.testing.assert_close(r.base, ref.base, atol=1e-5, rtol=0)
        torch.testing.assert_close(r.mixed, ref.mixed, atol=1e-5, rtol=0)
        for name in ("mbpa", "cache"):
            torch.testing.assert_close(r.components[name][0], ref.components[name][0], atol=1e-5, rtol=0)
            assert torch.equal(r.components[name][1], ref.components[name][1])


def _hidden_and_logits(model, stream):
    with torch.no_grad():
        hidden, logits, _ = model(stream[:-1].unsqueeze(0))
    return hidden[0], logits[0]


@pytest.mark.parametrize("theta", [0.7, 0.0])  # fixed θ, and the scaled θ (the default)
def test_cache_matches_per_token_reference_and_starts_empty(theta):
    model, stream = tiny_lm(), motif_stream(120)
    window, c = 15, 2.5
    params = CacheParams(window=window, theta=theta, theta_scaled=c, select=False)
    r = stream_eval(model, stream, [NeuralCache(params)], {"cache": 0.3}, segment_len=32)
    hidden, _ = _hidden_and_logits(model, stream)
    targets = stream[1:]
    log_p, available = r.components["cache"]
    assert not available[0] and available[1:].all()
    torch.testing.assert_close(r.mixed[0], r.base[0])  # empty cache: λ goes back to the model
    for t in range(1, len(targets)):
        lo = max(0, t - window)
        # the scaled θ: c over the mean squared norm of the keys t can see (positions lo..t-1)
        th = theta if theta > 0 else c / hidden[lo:t].pow(2).sum(1).mean()
        scores = th * hidden[lo:t] @ hidden[t]
        attn = torch.softmax(scores, 0)
        p = attn[targets[lo:t] == targets[t]].sum()
        expected = torch.log(p) if p > 0 else torch.tensor(float("-inf"))
        assert torch.allclose(log_p[t], expected, atol=1e-5) or (p == 0 and log_p[t] == float("-inf")), t


@pytest.mark.parametrize("theta,segment", [(0.0, 23), (0.6, 23), (0.0, 300)])  # fixed θ; rows in several blocks
def test_online_cache_is_the_bayesian_average_of_its_experts(theta, segment):
    """Per token, the selecting cache's p(target) is Σ_k w_k p_k(target) over its experts k (window
    w_k, θ_t·m_k with θ_t = c / mean ‖h_i‖² over the last N keys, or the fixed θ), with
    w_k ∝ Π_{s<t} ((1−λ) p_model(y_s) + λ p_k(y_s)): written here as a plain loop over tokens."""
    model, stream = tiny_lm(), motif_stream(300)
    N, c = 60, 2.0
    online = NeuralCache(CacheParams(window=N, theta=theta, theta_scaled=c))
    experts = online.experts()
    assert len(experts) == (4 if theta else 28) and {w for w, _ in experts} == {6, 12, 24, 60}
    r = stream_eval(model, stream, [online], {"cache": 0.2}, segment_len=segment)
    hidden, _ = _hidden_and_logits(model, stream)
    hidden, targets, base = hidden.double(), stream[1:], r.base.double()
    lam = NeuralCache.default_lambda
    log_p, available = r.components["cache"]
    assert not available[0] and available[1:].all()
    evidence = torch.zeros(len(experts), dtype=torch.float64)
    for t in range(1, r.tokens):
        th = theta if theta else c / hidden[max(0, t - N):t].pow(2).sum(1).mean()
        p = []
        for window, x in experts:
            lo = max(0, t - window)
            attn = torch.softmax((th if theta else th * x / c) * hidden[lo:t] @ hidden[t], 0)
            p.append(attn[targets[lo:t] == targets[t]].sum())
        p = torch.stack(p)
        expected = torch.log((torch.softmax(evidence, 0) * p).sum())
        torch.testing.assert_close(log_p[t].double(), expected, atol=1e-4, rtol=0)
        evidence += torch.log((1 - lam) * base[t].exp() + lam * p)
    # After a stream that repeats motifs the weight has moved off the uniform prior.
    assert max(online.weights().values()) > 2 / len(experts)
    torch.testing.assert_close(torch.tensor(list(online.weights().values()), dtype=torch.float64),
                               torch.softmax(evidence, 0), atol=1e-6, rtol=0)


def test_mbpa_in_the_stream_matches_the_naive_reference():
    model, stream = tiny_lm(), motif_stream(90)
    params = MbPAParams(memory=30, k=6, alpha=0.4, steps=3, beta=0.05, eps=1e-3, normalise=False, select=False)
    r = stream_eval(model, stream, [MbPA(params)], {"mbpa": 0.5}, segment_len=16)
    hidden, _ = _hidden_and_logits(model, stream)
    targets = stream[1:]
    log_p = r.components["mbpa"][0]
    for t in (10, 31, 55, 88):
        keys, vals, w = mbpa_reference_neighbours(hidden, targets, t, params)
        layer = copy.deepcopy(model.decoder).double()
        ref = naive_mbpa(layer, hidden[t:t + 1].double(), keys.unsqueeze(0), vals.unsqueeze(0),
                         w.unsqueeze(0), steps=params.steps, lr=params.alpha, beta=params.beta)
        torch.testing.assert_close(log_p[t].double(), ref[0, targets[t]], atol=1e-4, rtol=0)


def test_mixture_and_lambda_checks():
    base = torch.log(torch.tensor([0.5, 0.1]))
    comp = (torch.log(torch.tensor([0.1, 0.9])), torch.tensor([True, False]))
    mixed = mix_log_probs(base, {"cache": comp}, {"cache": 0.25})
    torch.testing.assert_close(mixed.exp(), torch.tensor([0.75 * 0.5 + 0.25 * 0.1, 0.1]))
    for bad in ({"cache": 1.2}, {"cache": -0.1}, {"cache": 0.6, "mbpa": 0.5}):
        with pytest.raises(LmadaptError):
            check_lambdas(bad)
    with pytest.raises(LmadaptError, match="valid methods: base, dyneval, knn, mbpa, cache"):
        parse_combination("mbpa+cahce")
    assert parse_combination("cache+mbpa+dyneval") == ["dyneval", "mbpa", "cache"]
    with pytest.raises(LmadaptError, match="larger than its memory"):
        MbPA(MbPAParams(memory=10, k=20))


@pytest.mark.parametrize("variant", ["sgd", "rms"])
def test_dyneval_fused_update_is_the_textbook_rule(variant):
    from lmadapt.methods.dyneval import apply_update

    g = torch.Generator().manual_seed(3)
    shapes = [(7, 5), (11,)]
    w = [torch.randn(s, generator=g) for s in shapes]
    w0 = [torch.randn(s, generator=g) for s in shapes]
    rms = [torch.rand(s, generator=g) for s in shapes]
    lr, decay, eps = 0.01, 0.05, 1e-3
    mean = torch.cat([r.flatten() for r in rms]).mean()
    rate = [(r / mean).clamp(max=1 / decay) if variant == "rms" else torch.ones_like(r) for r in rms]
    fused = [t.clone() for t in w]
    ref = [t.clone() for t in w]
    for _ in range(20):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for i in range(len(ref)):  # the rule as written in the paper
            step = grads[i] / (rms[i] + eps) if variant == "rms" else grads[i]
            ref[i] = ref[i] + decay * rate[i] * (w0[i] - ref[i]) - lr * step
        apply_update(fused, grads, lr=lr, keep=[1 - decay * r for r in rate],
                     anchor=[decay * r * a for r, a in zip(rate, w0)],
                     inv=[1 / (r + eps) for r in rms] if variant == "rms" else None)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["sgd", "rms"])
def test_dynamic_evaluation_adapts_and_leaves_the_model_alone(variant):
    model, stream = tiny_lm(), motif_stream(400)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    corpus = _Corpus(motif_stream(300, seed=5))
    plain = stream_eval(model, stream, [], {}, segment_len=5)
    # lr 0 is the scaled rate; with its c at 0 too nothing moves
    frozen = stream_eval(model, stream, [DynamicEvaluation(DynEvalParams(lr=0.0, lr_scaled=0.0, decay=0.0,
                                                                         variant=variant))], {}, corpus=corpus)
    torch.testing.assert_close(frozen.base, plain.base, atol=1e-5, rtol=0)
    lr = 0.3 if variant == "sgd" else 0.01
    adapted = stream_eval(model, stream, [DynamicEvaluation(DynEvalParams(lr=lr, decay=0.0, variant=variant,
                                                                          stat_batch=4))], {}, corpus=corpus)
    # The stream repeats a motif: adapting on it must lower the NLL, and scoring happens
    # before each update, so the first segment is unchanged.
    assert adapted.base.mean() > plain.base.mean() + 0.1
    torch.testing.assert_close(adapted.base[:5], plain.base[:5], atol=1e-5, rtol=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def _dyneval_reference(model, stream, lr, adapt, segment, lr_scaled=0.0, lr_power=0.5):
    """Plain SGD dynamic evaluation written the obvious way: a full autograd backward of
    each segment's mean NLL, then w -= lr * grad, for the chosen parameters. lr 0: the
    scaled rate, lr_scaled / (mean ‖h‖² over every position scored so far) ** lr_power."""
    import torch.nn.functional as F

    model = copy.deepcopy(model)
    chosen = {"all": list(model.parameters()), "output": list(model.decoder.parameters()),
              "lstm": list(model.layers.parameters())}[adapt]
    unique = list({id(p): p for p in chosen}.values())
    state, out, norms = None, [], []
    for s in range(0, stream.numel() - 1, segment):
        x, y = stream[s:s + segment], stream[s + 1:s + 1 + segment]
        x = x[:y.numel()]
        hidden, logits, state = model(x.unsqueeze(0), state)
        log_p = F.log_softmax(logits[0], -1).gather(1, y.unsqueeze(1)).squeeze(1)
        grads = torch.autograd.grad(-log_p.mean(), unique, allow_unused=True)
        norms.extend(float(v) for v in hidden[0].detach().pow(2).sum(1))
        step = lr if lr > 0 else lr_scaled / (sum(norms) / len(norms)) ** lr_power
        with torch.no_grad():
            for p, g in zip(unique, grads):
                if g is not None:
                    p.sub_(step * g)
        state = [(h.detach(), c.detach()) for h, c in state]
        out.append(log_p.detach())
    return torch.cat(out)


@pytest.mark.parametrize("shape", ["tied", "tied+projection", "untied"])
@pytest.mark.parametrize("adapt", ["all", "output", "lstm"])
def test_dyneval_in_the_stream_matches_a_plain_autograd_loop(shape, adapt):
    # Over 12 adapted segments the stream's per-token scores must equal a plain loop's
    # (score, then w -= lr * grad), whichever parameters adapt and however the weights are
    # tied (tied weights must get the embedding's and the softmax's gradient summed).
    from lmadapt.model import LMConfig, LSTMLM

    torch.manual_seed(4)
    hidden = 10 if shape == "tied+projection" else 8
    model = LSTMLM(LMConfig(vocab_size=30, emb_size=8, hidden_size=hidden, num_layers=2,
                            tie_weights=shape != "untied")).eval()
    with torch.no_grad():
        model.decoder.weight.mul_(6)
    stream = motif_stream(61)
    lr = 0.5
    got = stream_eval(model, stream, [DynamicEvaluation(DynEvalParams(lr=lr, decay=0.0, variant="sgd",
                                                                      adapt=adapt, segment=5))], {})
    ref = _dyneval_reference(model, stream, lr, adapt, 5)
    plain = stream_eval(model, stream, [], {})
    assert (ref - plain.base).abs().max() > 1e-2  # the updates do change the scores
    torch.testing.assert_close(got.base, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("power", [0.5, 0.75])
def test_dyneval_scaled_rate_matches_a_running_norm_reference(power):
    """lr 0: each update's η = lr_scaled / (mean ‖h‖² over the positions scored so far) ** lr_power."""
    from lmadapt.model import LMConfig, LSTMLM

    torch.manual_seed(4)
    model = LSTMLM(LMConfig(vocab_size=30, emb_size=8, hidden_size=8, num_layers=2)).eval()
    with torch.no_grad():
        model.decoder.weight.mul_(6)
    stream = motif_stream(61)
    method = DynamicEvaluation(DynEvalParams(lr=0.0, lr_scaled=0.4, lr_power=power, decay=0.0, variant="sgd",
                                             segment=5))
    got = stream_eval(model, stream, [method], {})
    ref = _dyneval_reference(model, stream, 0.0, "all", 5, lr_scaled=0.4, lr_power=power)
    plain = stream_eval(model, stream, [], {})
    assert (ref - plain.base).abs().max() > 1e-2
    # the power matters here (mean ‖h‖² is not 1), so a rule that ignored it would fail
    other = _dyneval_reference(model, stream, 0.0, "all", 5, lr_scaled=0.4, lr_power=1.25 - power)
    assert (ref - other).abs().max() > 1e-3
    torch.testing.assert_close(got.base, ref, atol=1e-5, rtol=0)


def test_mbpa_scaled_alpha_in_the_stream_matches_a_per_query_reference():
    """alpha 0: each position adapts with α_t = alpha_scaled / mean ‖h_k‖² of its own
    neighbours, on the stream's T = 1 path (stored probabilities)."""
    model, stream = tiny_lm(), motif_stream(90)
    params = MbPAParams(memory=30, k=6, alpha=0.0, alpha_scaled=2.0, steps=1, eps=1e-3, select=False)
    r = stream_eval(model, stream, [MbPA(params)], {"mbpa": 0.5})
    hidden, _ = _hidden_and_logits(model, stream)
    targets = stream[1:]
    log_p = r.components["mbpa"][0]
    steps = []
    for t in (10, 31, 55, 88):
        keys, vals, w = mbpa_reference_neighbours(hidden, targets, t, params)
        lr = params.alpha_scaled / keys.pow(2).sum(1).mean()
        steps.append(float(lr))
        layer = copy.deepcopy(model.decoder).double()
        ref = naive_mbpa(layer, hidden[t:t + 1].double(), keys.unsqueeze(0), vals.unsqueeze(0),
                         w.unsqueeze(0), steps=1, lr=float(lr))
        torch.testing.assert_close(log_p[t].double(), ref[0, targets[t]], atol=1e-4, rtol=0)
    assert (log_p - r.base).abs().max() > 1e-2  # it adapts


@pytest.mark.parametrize("segment", [17, None])
def test_online_mbpa_is_the_bayesian_average_of_its_memories(segment):
    """Per token, the selecting MbPA's p(target) is Σ_k w_k p_k(target) over one-memory MbPAs of
    N/4 and N, with w_k ∝ Π_{s<t} ((1−λ) p_model(y_s) + λ p_k(y_s)): a plain loop over tokens
    on the single memories' own columns."""
    model, stream = tiny_lm(), motif_stream(240)
    common = dict(k=4, alpha=0.0, alpha_scaled=2.0, steps=1)
    online = MbPA(MbPAParams(memory=80, **common))
    assert online.experts() == [20, 80]
    r = stream_eval(model, stream, [online], {"mbpa": 0.3}, segment_len=segment)
    singles = [stream_eval(model, stream, [MbPA(MbPAParams(memory=n, select=False, **common))], {"mbpa": 0.3},
                           segment_len=segment).components["mbpa"][0].double() for n in (20, 80)]
    p = torch.stack(singles, 1).exp()
    assert (singles[0] - singles[1]).abs().max() > 1e-3  # the two memories differ
    base, lam = r.base.double(), MbPA.default_lambda
    log_p = r.components["mbpa"][0]
    evidence = torch.zeros(2, dtype=torch.float64)
    for t in range(r.tokens):
        expected = torch.log((torch.softmax(evidence, 0) * p[t]).sum())
        torch.testing.assert_close(log_p[t].double(), expected, atol=1e-5, rtol=0)
        evidence += torch.log((1 - lam) * base[t].exp() + lam * p[t])
    weights = online.selection.weights()
    assert set(weights) == {20, 80}
    torch.testing.assert_close(torch.tensor(list(weights.values()), dtype=torch.float64), torch.softmax(evidence, 0))
    summary = online.summary()
    assert summary["selected"][0]["memory"] == max(weights, key=weights.get) and "selected memory" in summary["text"]


def test_mbpa_selection_has_one_expert_without_a_stream_memory_to_choose():
    assert MbPA(MbPAParams(memory=80, k=4, select=False)).experts() == [80]
    # N/4 below K would search fewer neighbours than K: the short memory is at least K.
    assert MbPA(MbPAParams(memory=80, k=32)).experts() == [32, 80]
    assert MbPA(MbPAParams(memory=80, k=4, source="datastore", datastore="x")).experts() == [80]
    assert MbPA.settings_from_file({"memory": 500}) == {"memory": 500, "select": False}
    assert MbPA.settings_from_file({"memory": 500, "select": True}) == {"memory": 500, "select": True}


@pytest.mark.parametrize("bad, message", [
    ({"optimizer": "adam"}, "needs optimizer sgd"),
    ({"steps": 3, "beta": 0.1}, "needs beta 0"),
])
def test_mbpa_scaled_alpha_refuses_what_it_cannot_do_exactly(bad, message):
    with pytest.raises(LmadaptError, match=message):
        MbPA(MbPAParams(memory=30, k=6, alpha=0.0, **bad))
    MbPA(MbPAParams(memory=30, k=6, alpha=0.5, **bad))  # a fixed alpha takes them


def test_online_cache_survives_a_short_window_far_below_the_longest_windows_maximum():
    """A key far back that matches the query much better than every recent key: the short windows'
    exponentials, taken against the longest window's maximum, underflow even in float64. Their
    p(target) must still be their own softmax, not NaN (which would poison every later weight)."""
    from lmadapt.memory import EpisodicMemory
    from lmadapt.methods.base import EvalContext

    d, n = 4, 40
    keys = torch.zeros(n, d)
    keys[0] = torch.tensor([50.0, 0, 0, 0])          # far back, aligned with the query
    keys[1:] = torch.tensor([-50.0, 1.0, 0, 0])      # recent, anti-aligned
    values = torch.arange(n) % 3
    mem = EpisodicMemory(64, d)
    mem.add(keys, values, torch.arange(n))
    cache = NeuralCache(CacheParams(window=40, theta=5.0))
    cache.start(EvalContext(model=None, corpus=None, memory=mem, device=torch.device("cpu"), segment_len=1))
    query = torch.tensor([[50.0, 0, 0, 0]])
    target = torch.tensor([values[n - 1].item()])
    base = torch.tensor([-3.0])
    log_p, available = cache._select(query, torch.tensor([n]), target, base)
    assert bool(available[0]) and torch.isfinite(log_p).all() and torch.isfinite(cache.selection.evidence).all()
    # window 4 (positions 36..39), fixed θ 5: its own softmax over four equal keys
    recent = values[n - 4:]
    expected = torch.log((recent == target).double().mean())
    w = [win for win, _ in cache.experts()].index(4)
    lam = NeuralCache.default_lambda
    scored = torch.logaddexp(torch.tensor(math.log1p(-lam) - 3.0, dtype=torch.float64),
                             torch.log(torch.tensor(lam, dtype=torch.float64)) + expected)
    torch.testing.assert_close(cache.selection.evidence[w] + cache.selection.shift, scored)
