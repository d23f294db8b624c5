"""No method ever uses the token it is scoring, or any later one.

For every registered method (the registry is iterated, so a new method is covered when it
is registered) and the mixtures below, at several segment lengths, on a tiny model of every
backbone (the LSTM, and through the transformers backbone a GPT-2, whose KV window re-encodes
when it fills, and a Llama-style model, whose rotary window is trimmed):

* changing the stream from token t on leaves every score of tokens before t bit-identical
  (base, each component, its availability, the mixture) -- checked at cuts t, t+1, t+2,
  so the score of token t+1 after a change of token t can only differ through tokens
  <= t+1, its legitimate inputs;
* the scores of token t over every value v it could take form a distribution (sum_v p = 1):
  a method that looked at the token it scores (e.g. a memory holding the current target
  before scoring it) would put extra mass on whichever v is there;
* changing token t does change the score of token t+1 (the check can see a difference).

result.base[i] scores token i + 1 of the stream, so token t's score is at index t - 1.
"""

from __future__ import annotations

import pytest
import torch

from lmadapt.evaluate import build_methods
from lmadapt.methods import REGISTRY, MixtureMethod, combination_name
from lmadapt.methods import dyneval as dyneval_module
from lmadapt.stream import stream_eval

from conftest import TrainSplit as _Corpus
from conftest import BUILDERS, motif_stream, tiny_lm

V = 10          # vocabulary of the tiny model: check 2 runs the stream once per value
N = 26          # stream tokens
T = 13          # the changed token: inside a segment at L = 3 and L = 16, not its first

# Small settings so that memories fill, windows slide and updates matter within N tokens.
# A method not listed here runs at its defaults.
SETTINGS = {
    "dyneval": [{"lr": 0.01, "decay": 0.002, "stat_batch": 4},
                {"lr": 0.0, "lr_scaled": 0.05, "decay": 0.002, "stat_batch": 4}],  # fixed η and the scaled one
    "mbpa": [{"memory": 12, "k": 4, "alpha": 0.5, "steps": 1},
             {"memory": 12, "k": 4, "alpha": 0.5, "steps": 2, "beta": 0.1}],
    "cache": [{"window": 8, "theta": 0.5}, {"window": 8}],  # fixed θ and the scaled one
}
# Each component keeps its own column in a mixture, so the mixture of every method also checks
# each one on an adapting model (dyneval+mbpa+cache is that mixture less knn, which adds nothing
# to the stream's memory); mbpa+cache and knn+cache check them on the fixed model.
MIXTURES = [["mbpa", "cache"], ["knn", "cache"], ["dyneval", "knn", "mbpa", "cache"]]


def _cases():
    cases = []
    for names in [[n] for n in REGISTRY] + MIXTURES:
        options = [SETTINGS.get(n, [{}]) for n in names]
        # one case per setting of each method, the others at their first setting
        for i, name in enumerate(names):
            for j, setting in enumerate(options[i]):
                if j == 0 and i > 0:
                    continue
                params = {n: (setting if n == name else opts[0]) for n, opts in zip(names, options)}
                cases.append(pytest.param(names, params, id=f"{combination_name(names)}-{i}.{j}"))
    return cases


@pytest.fixture(scope="module", params=["lstm", "gpt2", "llama"])
def setup(request, one_thread, tmp_path_factory):
    from lmadapt import datastore, runs

    dyneval_module._RECENT.clear()
    if request.param == "lstm":
        model = tiny_lm(vocab=V, seed=2)
    else:
        pytest.importorskip("transformers")
        # context 8, keep 3: the 26-token stream fills the window several times
        model = BUILDERS[request.param](vocab=V, seed=2, context=8, keep=3)
    corpus = _Corpus(motif_stream(300, vocab=V, seed=5))
    # knn reads a datastore of the training stream (exact index): built once for the module.
    root = tmp_path_factory.mktemp(f"causal-{request.param}")
    runs.save_tensors(root / runs.BEST, model.state_dict())
    datastore.build(root, root / "ds", model=model, corpus=corpus, index="flat",
                    layout=datastore.Layout(row=100, warmup=10, rows_per_part=1), log=lambda m: None)
    SETTINGS["knn"] = [{"k": 8, "temperature": 1.0, "datastore": str(root / "ds")}]
    yield model, corpus, motif_stream(N, vocab=V, seed=3)
    dyneval_module._RECENT.clear()


def _run(model, corpus, stream, names, params, L):
    params = {n: dict(p) for n, p in params.items()}
    if "knn" in names:
        params["knn"] = dict(SETTINGS["knn"][0])  # the datastore exists only once the fixture ran
    if "dyneval" in params:
        params["dyneval"]["segment"] = L  # dyneval sets the stream's segment length itself
    methods = build_methods(names, params)
    lambdas = {m.name: 0.2 for m in methods if isinstance(m, MixtureMethod)}
    return stream_eval(model, stream, methods, lambdas, corpus=corpus, segment_len=L)


def _columns(r):
    cols = {"base": r.base, "mixed": r.mixed}
    for name, (log_p, available) in r.components.items():
        cols[name] = log_p
        cols[f"{name}.available"] = available
    return cols


@pytest.mark.parametrize("L", [1, 3, 16])
@pytest.mark.parametrize("names,params", _cases())
def test_no_method_uses_the_scored_token_or_later(setup, names, params, L):
    model, corpus, stream = setup
    ref = _columns(_run(model, corpus, stream, names, params, L))
    g = torch.Generator().manual_seed(11)

    # 1. Change everything from token c on: scores of tokens < c (indices < c - 1) are bit-identical.
    for c in (T, T + 1, T + 2):
        other = stream.clone()
        other[c:] = (stream[c:] + torch.randint(1, V, (N - c,), generator=g)) % V  # every token differs
        got = _columns(_run(model, corpus, other, names, params, L))
        for key, col in ref.items():
            assert torch.equal(got[key][:c - 1], col[:c - 1]), f"{key}: a score before token {c} changed"
        if c == T:
            # 3. the legitimate path exists: token T is an input of token T+1's prediction
            assert not torch.equal(got["mixed"][T], ref["mixed"][T])

    # 2. Token T's scores over all V values it can take are a distribution.
    scores = {key: [] for key in ref}
    for v in range(V):
        other = stream.clone()
        other[T] = v
        got = _columns(_run(model, corpus, other, names, params, L))
        for key, col in got.items():
            scores[key].append(col[T - 1])
            assert torch.equal(col[:T - 1], ref[key][:T - 1])
    for key, values in scores.items():
        if key.endswith(".available"):
            assert len(set(bool(a) for a in values)) == 1, f"{key} of token {T} depends on its value"
            continue
        name = key.partition(".")[0]
        if f"{name}.available" in scores and not bool(scores[f"{name}.available"][0]):
            continue  # no prediction from this component at token T
        total = torch.logsumexp(torch.stack(values).double(), 0).item()
        assert abs(total) < 1e-5, f"{key}: p(token {T}) sums to {torch.tensor(total).exp():.6f} over its values"
