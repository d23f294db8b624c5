"""`lmadapt eval --tune`: settings tuned on a valid prefix within a time budget, then the
requested split scored with them, in one command."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import lmadapt.tune as tune_module
from lmadapt.corpus import load_corpus
from lmadapt.errors import LmadaptError
from lmadapt.methods import NeuralCache
from lmadapt.mix import perplexity
from lmadapt.stream import stream_eval
from lmadapt.checkpoint import load_model

from conftest import cli as _cli
from conftest import write_markov_corpus


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run.run


class _Guard:
    """A corpus that fails on any access to the test split and records the splits read."""

    def __init__(self, corpus, seen: set):
        self._corpus, self._seen = corpus, seen

    def split(self, name):
        assert name != "test", "tuning read the evaluated split"
        self._seen.add(name)
        return self._corpus.split(name)

    def __getattr__(self, key):
        assert key != "test", "tuning read the evaluated split"
        return getattr(self._corpus, key)


def test_tune_picks_at_least_the_defaults_on_valid_and_never_reads_test(run, tmp_path, monkeypatch, capsys):
    seen: set = set()
    real = tune_module.tune_in_budget
    monkeypatch.setattr(tune_module, "tune_in_budget",
                        lambda model, corpus, *a, **k: real(model, _Guard(corpus, seen), *a, **k))
    out = tmp_path / "tuned.json"
    assert _cli("eval", run, "--split", "test", "--method", "cache", "--tune", "--tune-minutes", 0.25,
                "--json", out, "--threads", 1) == 0
    captured = capsys.readouterr()
    assert "tuned on valid[:" in captured.err and "settings: tune" in captured.out
    assert seen == {"valid"}
    rep = json.loads(out.read_text())
    on = rep["settings"]["tuned_on"]
    assert rep["settings"]["source"] == "tune" and rep["methods"]["cache"]["settings"] == "tune"
    assert 0 < on["tokens"] <= on["of"]

    # On the prefix it tuned on, the chosen setting is at least as good as the defaults
    # (the defaults are on the grid, so this is guaranteed, and checked here directly).
    model, _, _ = load_model(run)
    corpus = load_corpus(json.loads((run / "config.json").read_text())["data"]["name"])
    prefix = corpus.valid[:on["tokens"] + 1]
    default = stream_eval(model, prefix, [NeuralCache()], {"cache": NeuralCache.default_lambda}, corpus=corpus)
    assert rep["settings"]["tune_valid_ppl"] <= perplexity(default.mixed) + 1e-9
    chosen = stream_eval(model, prefix, [NeuralCache(NeuralCache.Params(**rep["params"]["cache"]))],
                         rep["lambdas"], corpus=corpus)
    assert perplexity(chosen.mixed) == pytest.approx(rep["settings"]["tune_valid_ppl"], rel=1e-9)

    # The report is a --config file that reproduces the test figure.
    again = tmp_path / "again.json"
    assert _cli("eval", run, "--split", "test", "--config", out, "--json", again, "--threads", 1) == 0
    rep2 = json.loads(again.read_text())
    assert rep2["methods"]["cache"]["ppl"] == pytest.approx(rep["methods"]["cache"]["ppl"], rel=1e-6)
    assert rep2["settings"]["source"] == "config"


def test_a_budget_too_small_falls_back_to_the_defaults_and_says_so(run, tmp_path, capsys):
    out = tmp_path / "fallback.json"
    assert _cli("eval", run, "--split", "test", "--method", "cache", "--tune", "--tune-minutes", 1e-6,
                "--json", out, "--threads", 1) == 0
    err = capsys.readouterr().err
    assert "too short" in err and "evaluating with the settings from defaults" in err
    rep = json.loads(out.read_text())
    assert rep["settings"]["source"].startswith("defaults") and "tune_fallback" in rep["settings"]
    assert rep["params"]["cache"] == dataclasses.asdict(NeuralCache.Params())


def test_tune_refuses_to_score_the_split_it_tunes_on(run, capsys):
    assert _cli("eval", run, "--split", "valid", "--method", "cache", "--tune") == 2
    assert "cannot also score it" in capsys.readouterr().err


def test_tune_on_a_text_holds_out_the_lines_it_read(run, tmp_path, monkeypatch, capsys):
    """No valid split with --text: tuning reads at most half the text, and the lines it read
    are not scored; the score equals evaluating the remaining lines alone with the chosen setting."""
    rng_lines = (run.parent / "corpus" / "test.txt").read_text().splitlines()
    doc = tmp_path / "doc.txt"
    doc.write_text("\n".join(rng_lines * 2) + "\n")
    read = []
    real = tune_module.tune_in_budget
    monkeypatch.setattr(tune_module, "tune_in_budget",
                        lambda model, corpus, *a, **k: read.append(k["max_tokens"]) or real(model, corpus, *a, **k))
    out = tmp_path / "tuned.json"
    assert _cli("eval", run, "--text", doc, "--method", "cache", "--tune", "--tune-minutes", 0.25,
                "--json", out, "--threads", 1) == 0
    err = capsys.readouterr().err
    assert "tuned on text[:" in err and "are not scored" in err
    rep = json.loads(out.read_text())
    on = rep["settings"]["tuned_on"]
    total_lines = len(doc.read_text().splitlines())
    assert on["split"] == "text" and on["excluded_from_score"] and 0 < on["held_out_lines"] < total_lines
    assert read[0] == on["of"] // 2 and on["tokens"] <= read[0]  # at most half the text is tuned on
    rest = tmp_path / "rest.txt"
    rest.write_text("\n".join(doc.read_text().splitlines()[on["held_out_lines"]:]) + "\n")
    again = tmp_path / "again.json"
    assert _cli("eval", run, "--text", rest, "--config", out, "--json", again, "--threads", 1) == 0
    rep2 = json.loads(again.read_text())
    assert rep2["tokens"] == rep["tokens"] and rep["tokens"] + on["tokens"] <= on["of"]
    assert rep2["methods"]["cache"]["ppl"] == pytest.approx(rep["methods"]["cache"]["ppl"], rel=1e-6)
    assert rep2["units"] == rep["units"]  # per-word figures count only the scored lines


def test_preset_paper_gives_the_papers_settings_and_is_recorded(run, tmp_path):
    from lmadapt.methods import MbPA

    out = tmp_path / "paper.json"
    assert _cli("eval", run, "--split", "test", "--method", "mbpa+cache", "--preset", "paper",
                "--json", out, "--threads", 1) == 0
    rep = json.loads(out.read_text())
    paper = dict(MbPA.PRESETS["paper"])
    assert rep["lambdas"]["mbpa"] == paper.pop("lambda") and rep["lambdas"]["cache"] == NeuralCache.PRESETS["paper"]["lambda"]
    assert {k: rep["params"]["mbpa"][k] for k in paper} == paper
    assert rep["settings"] == {"source": "preset paper", "preset": "paper"}
    # a flag still overrides the preset
    out2 = tmp_path / "paper2.json"
    assert _cli("eval", run, "--split", "test", "--method", "mbpa", "--preset", "paper", "--mbpa-k", 8,
                "--json", out2, "--threads", 1) == 0
    rep2 = json.loads(out2.read_text())
    assert rep2["params"]["mbpa"]["k"] == 8 and rep2["params"]["mbpa"]["memory"] == paper["memory"]
    assert rep2["settings"]["source"] == "preset paper+flags"


@pytest.mark.parametrize("args, message", [
    (["--preset", "nope"], "unknown --preset 'nope'"),
    (["--preset", "paper", "--config", "CONFIG"], "--preset and --config"),
    (["--tokens", "0"], "--tokens"),
])
def test_preset_and_tokens_refusals(run, tmp_path, capsys, args, message):
    config = tmp_path / "c.json"
    config.write_text('{"method": "cache"}')
    args = [str(config) if a == "CONFIG" else a for a in args]
    assert _cli("eval", run, "--split", "test", "--method", "cache", *args) == 2
    assert message in capsys.readouterr().err


def test_tokens_scores_only_a_prefix(run, tmp_path):
    out = tmp_path / "prefix.json"
    assert _cli("eval", run, "--split", "test", "--tokens", 50, "--json", out, "--threads", 1) == 0
    rep = json.loads(out.read_text())
    model, _, _ = load_model(run)
    corpus = load_corpus(json.loads((run / "config.json").read_text())["data"]["name"])
    plain = stream_eval(model, corpus.test[:51], [], {}, corpus=corpus)
    assert rep["tokens"] == 50 and "units" not in rep
    assert rep["methods"]["base"]["ppl"] == pytest.approx(perplexity(plain.base), rel=1e-9)


def test_tune_on_an_hf_model_uses_the_corpus_valid_split(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from lmadapt.backbones.gpt2 import word_tokenizer
    from lmadapt.backbones.hf import HFCausalLM

    corpus_dir = write_markov_corpus(tmp_path / "corpus", lines=(60, 30, 20))
    corpus = load_corpus(str(corpus_dir))
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(corpus.vocab), n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                  bos_token_id=None, eos_token_id=None)
    d = tmp_path / "m"
    HFCausalLM(transformers.GPT2LMHeadModel(cfg), context=16, keep=5).lm.save_pretrained(d)
    word_tokenizer(corpus.vocab).save_pretrained(d)
    out = tmp_path / "hf.json"
    # the window held fixed: a 6-pass grid fits the 6-second budget even on a loaded machine
    assert _cli("eval", "--hf-model", d, "--data", corpus_dir, "--split", "test", "--method", "cache", "--tune",
                "--cache-window", 50, "--tune-minutes", 0.1, "--json", out, "--threads", 1) == 0
    rep = json.loads(out.read_text())
    assert "tuned on valid[:" in capsys.readouterr().err
    assert rep["settings"]["tuned_on"]["split"] == "valid" and rep["settings"]["tuned_on"]["of"] == corpus.valid.numel() - 1
    assert rep["tokens"] == corpus.test.numel() - 1


@pytest.mark.parametrize("adapter", [[], ["dyneval"]])
def test_mixer_settings_in_one_pass_equal_one_pass_each(adapter, one_thread):
    """tune runs every mixer setting side by side in one pass (labelled columns reading one
    shared memory); each column must equal that setting's own pass, on a fixed model and on
    top of dynamic evaluation (which the one pass pays once instead of once per setting)."""
    from conftest import TrainSplit, motif_stream, tiny_lm
    from lmadapt.evaluate import build_methods
    from lmadapt.methods import dyneval as dyneval_module

    model, corpus = tiny_lm(seed=4), TrainSplit(motif_stream(400, seed=6))
    stream = motif_stream(150, seed=7)
    plan = {"cache": [{"window": 20, "theta": 0.5}, {"window": 100, "theta": 0.0}],
            "mbpa": [{"memory": 30, "k": 4, "alpha": 0.5, "steps": 1},
                     {"memory": 120, "k": 16, "alpha": 3.0, "steps": 2, "beta": 0.1}]}
    fixed = {"dyneval": {"lr": 0.01, "decay": 0.002, "stat_batch": 4}}
    dyneval_module._RECENT.clear()
    labelled = tune_module.mixer_pass(list(plan), plan)
    together = stream_eval(model, stream, build_methods(adapter, fixed) + [m for _, _, m in labelled], {},
                           corpus=corpus, segment_len=7)
    assert len(together.components) == 4
    for name, setting, m in labelled:
        alone = stream_eval(model, stream, build_methods(adapter, fixed) + build_methods([name], {name: setting}),
                            {}, corpus=corpus, segment_len=7)
        assert torch.equal(together.components[m.column][1], alone.components[name][1])
        torch.testing.assert_close(together.components[m.column][0], alone.components[name][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(together.base, alone.base, atol=1e-6, rtol=0)
    dyneval_module._RECENT.clear()


def test_two_unlabelled_settings_of_one_method_are_refused():
    from conftest import motif_stream, tiny_lm

    with pytest.raises(ValueError, match="share a column"):
        stream_eval(tiny_lm(), motif_stream(20), [NeuralCache(), NeuralCache()], {})


class _TwoSplits:
    name = "motif"

    def __init__(self, train, valid):
        self.train, self._valid = train, valid

    def split(self, name):
        return {"train": self.train, "valid": self._valid}[name]


def test_stream_stop_ends_early_and_keeps_only_the_scored_tokens(one_thread):
    from conftest import motif_stream, tiny_lm

    model, stream = tiny_lm(seed=1), motif_stream(100)
    full = stream_eval(model, stream, [NeuralCache()], {}, segment_len=8)
    seen = []
    r = stream_eval(model, stream, [NeuralCache()], {}, segment_len=8,
                    stop=lambda n, lp: seen.append((n, lp.numel())) or n >= 40)
    assert r.stopped and not full.stopped and r.tokens == 40 == r.base.numel() == r.components["cache"][0].numel()
    assert seen == [(8 * i, 8) for i in range(1, 6)]
    assert torch.equal(r.base, full.base[:40])


def test_tune_drops_a_diverging_dyneval_rate_early_and_chooses_as_without_it(one_thread):
    from conftest import motif_stream, tiny_lm
    from lmadapt.methods import dyneval as dyneval_module

    model = tiny_lm(seed=4)
    corpus = _TwoSplits(motif_stream(400, seed=6), motif_stream(200, seed=8))
    fixed = {"dyneval": {"stat_batch": 4, "decay": 0.002}}
    dyneval_module._RECENT.clear()
    good = tune_module.tune(model, corpus, "dyneval+cache", params=fixed, grid_overrides={
        "dyneval": {"lr": [0.001, 0.01]}, "cache": {"window": [50], "theta": [0.5]}})
    both = tune_module.tune(model, corpus, "dyneval+cache", params=fixed, grid_overrides={
        "dyneval": {"lr": [0.001, 0.01, 1e4]}, "cache": {"window": [50], "theta": [0.5]}})
    dropped = [t for t in both["top"] if t["ppl"] is None]
    assert [t["params"]["dyneval"]["lr"] for t in dropped] == [1e4]
    assert 0 < dropped[0]["stopped_after_tokens"] < 200   # stopped, not run to the end
    assert both["params"] == good["params"] and both["ppl"] == pytest.approx(good["ppl"], rel=1e-9)
    with pytest.raises(LmadaptError, match="every dyneval setting of the grid diverged"):
        tune_module.tune(model, corpus, "dyneval", params=fixed, grid_overrides={"dyneval": {"lr": [1e4]}})
    dyneval_module._RECENT.clear()


def test_halving_rungs_shrink_by_three_on_three_times_longer_prefixes():
    assert tune_module.halving_rungs(36, 2700) == [(36, 100), (12, 300), (4, 900), (2, 2700)]
    assert tune_module.halving_rungs(3, 500) == [(3, 500)]        # no more than ETA: the plain grid
    assert tune_module.halving_rungs(36, 270) == [(36, 50), (12, 50), (4, 90), (2, 270)]  # the rung floor
    assert tune_module.halving_rungs(36, 30) == [(36, 30), (12, 30), (4, 30), (2, 30)]    # never past the prefix


def test_halving_keeps_each_rungs_best_third_and_costs_fewer_tokens(one_thread, monkeypatch):
    from conftest import motif_stream, tiny_lm
    from lmadapt.methods import dyneval as dyneval_module

    model = tiny_lm(seed=4)
    corpus = _TwoSplits(motif_stream(400, seed=6), motif_stream(200, seed=8))
    fixed = {"dyneval": {"stat_batch": 4, "decay": 0.002}}
    grid = {"dyneval": {"lr": [1e-4, 3e-4, 1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2e-2, 3e-2, 1e4]}}
    streamed = []
    real = tune_module.stream_eval

    def counting(model, stream, *a, **k):
        streamed.append(stream.numel() - 1)
        return real(model, stream, *a, **k)

    monkeypatch.setattr(tune_module, "stream_eval", counting)
    dyneval_module._RECENT.clear()
    full = tune_module.tune(model, corpus, "dyneval", params=fixed, grid_overrides=grid)
    full_tokens, streamed[:] = sum(streamed), []
    half = tune_module.tune(model, corpus, "dyneval", params=fixed, grid_overrides=grid, search="halving")
    dyneval_module._RECENT.clear()

    assert half["search"] == "halving" and half["rungs"]["dyneval"] == [[10, 50], [4, 66], [2, 199]]
    # The plain pass, then 10 settings on 50 tokens, 4 on 66, 2 on all 199 (the diverging rate stops early).
    assert streamed == [199] + [50] * 10 + [66] * 4 + [199] * 2
    assert full_tokens == 199 * 11 and half["passes"] == 1 + 10 + 4 + 2
    by_rung = {}
    for t in half["top"]:
        if "dyneval" in t["params"]:   # (the last entry is the chosen model without a mixture)
            by_rung.setdefault(t["tokens"], []).append(t)
    assert [len(by_rung[n]) for n in (50, 66, 199)] == [10, 4, 2]
    for this, nxt in ((50, 66), (66, 199)):   # each rung runs exactly the best of the one before
        ranked = sorted((t for t in by_rung[this] if t["ppl"] is not None), key=lambda t: t["ppl"])
        assert ([t["params"]["dyneval"]["lr"] for t in ranked[:len(by_rung[nxt])]]
                == sorted((t["params"]["dyneval"]["lr"] for t in by_rung[nxt]),
                          key=lambda lr: [t["params"]["dyneval"]["lr"] for t in ranked].index(lr)))
    assert [t["params"]["dyneval"]["lr"] for t in by_rung[50] if t["ppl"] is None] == [1e4]
    # The last rung ran on the whole prefix: its figures are the full grid's for the same settings,
    # and the choice is the best of them (here the full grid's own best survived).
    full_ppl = {t["params"]["dyneval"]["lr"]: t["ppl"] for t in full["top"] if "dyneval" in t["params"]}
    for t in by_rung[199]:
        assert t["ppl"] == pytest.approx(full_ppl[t["params"]["dyneval"]["lr"]], rel=1e-9)
    assert half["ppl"] == pytest.approx(min(t["ppl"] for t in by_rung[199]), rel=1e-9)
    assert half["ppl"] >= full["ppl"] - 1e-9
    assert half["params"]["dyneval"]["lr"] == full["params"]["dyneval"]["lr"]


def test_tune_in_budget_searches_a_large_dyneval_grid_by_halving(one_thread):
    from conftest import motif_stream, tiny_lm
    from lmadapt.methods import dyneval as dyneval_module

    model = tiny_lm(seed=4)
    corpus = _TwoSplits(motif_stream(400, seed=6), motif_stream(300, seed=8))
    dyneval_module._RECENT.clear()
    res = tune_module.tune_in_budget(model, corpus, "dyneval+cache", minutes=2,
                                     params={"dyneval": {"stat_batch": 4}})
    dyneval_module._RECENT.clear()
    on = res["tuned_on"]
    assert on["search"] == "halving" and res["search"] == "halving"
    rungs = res["rungs"]["dyneval"]
    assert rungs[0][0] > 3 and rungs[-1][1] == on["tokens"] == 299   # a tiny model: the whole split fits
    assert on["passes"] == 1 + sum(n for n, _ in rungs) + 1


def test_one_time_costs_are_paid_before_the_budget_starts(one_thread, monkeypatch):
    """dyneval's statistics pass is the evaluation's cost (cached, reused), not tuning's: a pass
    longer than the whole budget must not turn --tune into a fallback."""
    import time

    from conftest import motif_stream, tiny_lm
    from lmadapt.methods import dyneval as dyneval_module

    model = tiny_lm(seed=4)
    corpus = _TwoSplits(motif_stream(400, seed=6), motif_stream(300, seed=8))
    real = dyneval_module.gradient_rms
    monkeypatch.setattr(dyneval_module, "gradient_rms", lambda *a, **k: (time.sleep(8), real(*a, **k))[1])
    dyneval_module._RECENT.clear()
    # 6 s of budget, less than the 8 s statistics pass; the lr axis alone (decay fixed): 9 settings
    res = tune_module.tune_in_budget(model, corpus, "dyneval", minutes=0.1,
                                     params={"dyneval": {"stat_batch": 4, "decay": 0.002}})
    dyneval_module._RECENT.clear()
    assert "fallback" not in res, res
    assert res["tuned_on"]["one_time_seconds"] >= 8 and res["tuned_on"]["tokens"] >= tune_module.MIN_TUNE_TOKENS


def test_a_deadline_cuts_the_mixer_pass_and_chooses_as_tune_on_that_prefix(one_thread):
    """Memories fill as a pass goes, so tune_in_budget's short probe underprices a mixture
    pass; tune's deadline stops that pass (after MIN_TUNE_TOKENS) and chooses on what it
    scored: the same choice as a search on that prefix alone, and `tokens` still says what
    the search read."""
    import time

    from conftest import motif_stream, tiny_lm

    model = tiny_lm(seed=4)
    corpus = _TwoSplits(motif_stream(400, seed=6), motif_stream(600, seed=8))
    grid = {"cache": {"window": [20, 200], "theta": [0.0, 0.5]}, "mbpa": {"memory": [50, 400], "k": [4]}}
    cut = tune_module.tune(model, corpus, "mbpa+cache", grid_overrides=grid, segment_len=16,
                           deadline=time.perf_counter())
    n = cut["mixer_tokens"]
    assert cut["tokens"] == 599 and tune_module.MIN_TUNE_TOKENS <= n < tune_module.MIN_TUNE_TOKENS + 16
    alone = tune_module.tune(model, corpus, "mbpa+cache", grid_overrides=grid, segment_len=16, tokens=n)
    assert "mixer_tokens" not in alone
    assert (cut["params"], cut["lambdas"]) == (alone["params"], alone["lambdas"])
    assert cut["ppl"] == pytest.approx(alone["ppl"], rel=1e-9)
    assert cut["base_ppl"] == pytest.approx(alone["base_ppl"], rel=1e-9)
    late = tune_module.tune(model, corpus, "mbpa+cache", grid_overrides=grid, segment_len=16,
                            deadline=time.perf_counter() + 3600)
    assert "mixer_tokens" not in late and late["tokens"] == 599


def test_cache_grid_is_single_caches_plus_the_selecting_default():
    # The selection is tried once, as the default setting; crossed with every window and θ it
    # would run 15 searches over the grid inside the grid.
    from lmadapt.methods.cache import CacheParams
    from lmadapt.tune import _settings, grid_with_defaults

    plan = _settings("cache", {}, grid_with_defaults(["cache"], {})["cache"])
    selecting = [s for s in plan if s["select"]]
    assert len(plan) == 16 and selecting == [{"select": True, "theta": 0.0, "window": CacheParams().window}]
    assert {(s["window"], s["theta"]) for s in plan if not s["select"]} == \
        {(w, t) for w in (500, 1000, 5000) for t in (0.0, 0.1, 0.3, 0.5, 1.0)}
    # A given window holds in every setting, the selecting one included.
    assert {s["window"] for s in _settings("cache", {"window": 300}, {})} == {300}
    # A --grid that leaves the default out leaves the selecting setting out too.
    assert not any(s["select"] for s in _settings("cache", {}, {"window": [500]}))
    assert not any(s["select"] for s in _settings("cache", {}, {"theta": [0.3]}))
    assert sum(s["select"] for s in _settings("cache", {}, {"window": [500, 5000]})) == 1
    # An explicit --grid over `select` is crossed like any axis.
    assert len(_settings("cache", {}, {"select": [True, False], "window": [50], "theta": [0.0]})) == 2


def test_mbpa_grid_is_single_memories_plus_the_selecting_default():
    from lmadapt.methods.mbpa import MbPAParams
    from lmadapt.tune import _settings, grid_with_defaults

    plan = _settings("mbpa", {}, grid_with_defaults(["mbpa"], {})["mbpa"])
    d = MbPAParams()
    selecting = [s for s in plan if s["select"]]
    assert len(plan) == 37 and selecting == [{"select": True, "memory": d.memory, "k": d.k, "alpha": d.alpha,
                                               "steps": d.steps}]
    assert not any(s["select"] for s in _settings("mbpa", {}, {"memory": [500]}))
    assert sum(s["select"] for s in _settings("mbpa", {}, {"memory": [500, 2000]})) == 1


def test_joint_sweep_matches_the_log_space_mixture_of_every_pick_and_lambda():
    from lmadapt.mix import mix_log_probs, perplexity
    from lmadapt.tune import joint_sweep

    g = torch.Generator().manual_seed(0)
    n = 300
    base = torch.log_softmax(torch.randn(n, 50, generator=g), 1)[:, 0]
    def column(p_off):
        log_p = torch.log_softmax(torch.randn(n, 50, generator=g), 1)[:, 0]
        log_p[::7] = float("-inf")             # a cache that gives the target nothing
        avail = torch.rand(n, generator=g) > p_off
        return log_p, avail
    columns = {"mbpa": [({"k": 1}, column(0.0)), ({"k": 2}, column(0.0))],
               "cache": [({"w": 1}, column(0.1)), ({"w": 2}, column(0.3)), ({"w": 3}, column(0.0))]}
    grid = [0.0, 0.2, 0.5, 0.9]
    got = list(joint_sweep(base, columns, ["mbpa", "cache"], grid))
    # λ (0.5, 0.5) leaves the base model nothing: where both columns give the target 0 the
    # mixture is -inf, and such a pick is left out, as a non-finite perplexity always was.
    assert len(got) == 2 * 3 * (sum(a + b <= 1 for a in grid for b in grid) - 1)
    for setting, lam, ppl in got:
        comps = {n: next(c for s, c in columns[n] if s == setting[n])
                 for n in ("mbpa", "cache")}
        assert ppl == pytest.approx(perplexity(mix_log_probs(base, comps, lam)), rel=1e-6)  # the reference mixes in float32


def test_the_mixer_pass_stops_before_a_segment_that_would_end_past_the_deadline(monkeypatch):
    clock = iter([100.0, 104.0, 108.0, 112.0, 113.0])   # the pass starts at 100; segments end at 104, 108, ...
    monkeypatch.setattr(tune_module.time, "perf_counter", lambda: next(clock))
    stop = tune_module.before_deadline(115.0)
    many = tune_module.MIN_TUNE_TOKENS
    assert not stop(many, None)        # 104 + 4 <= 115
    assert not stop(many - 1, None)    # 108 + 4 > 115, but too few tokens scored yet
    assert stop(many, None)            # 112 + 4 > 115: the next segment would end at 116
    assert not stop(many, None)        # a short segment (1 s): 113 + 1 <= 115


def test_the_budget_keeps_time_for_a_slow_evaluation(one_thread, monkeypatch):
    """With eval_tokens, the evaluation's cost beyond a plain pass (priced at the current
    settings) comes out of the tuning's share of the budget, at most RESERVE_SHARE of it."""
    import time

    from conftest import motif_stream, tiny_lm

    model = tiny_lm(seed=4)
    corpus = _TwoSplits(motif_stream(400, seed=6), motif_stream(300, seed=8))
    real = tune_module.stream_eval

    def slow_single_method(model, stream, methods, *a, **k):  # only the pricing of the evaluated setting runs one mbpa
        if len(methods) == 1:
            time.sleep(1.0)
        return real(model, stream, methods, *a, **k)

    monkeypatch.setattr(tune_module, "stream_eval", slow_single_method)
    params = {"mbpa": {"k": 4, "memory": 50}}
    long = tune_module.tune_in_budget(model, corpus, "mbpa", minutes=0.2, params=params, eval_tokens=10**9)
    assert long["tuned_on"]["reserved_seconds"] == pytest.approx(tune_module.RESERVE_SHARE * 12, rel=1e-6)
    short = tune_module.tune_in_budget(model, corpus, "mbpa", minutes=0.2, params=params, eval_tokens=100)
    # 1 s over the 299-token probe, for 100 tokens: about a third of a second
    assert 0.2 < short["tuned_on"]["reserved_seconds"] < 1.0
    assert "reserved_seconds" not in tune_module.tune_in_budget(model, corpus, "mbpa", minutes=0.2,
                                                                 params=params)["tuned_on"]


def test_the_evaluation_is_priced_once_its_memory_is_full(one_thread, monkeypatch):
    """MbPA's cost grows with its memory: the reserve prices the evaluated setting on the
    segments after its memory window, not on the first tokens."""
    from conftest import motif_stream, tiny_lm

    model = tiny_lm(seed=4)
    corpus = _TwoSplits(motif_stream(400, seed=6), motif_stream(300, seed=8))
    real = tune_module.stream_eval
    clock = [0.0]
    monkeypatch.setattr(tune_module.time, "perf_counter", lambda: clock[0])

    def fake(model, stream, methods, lambdas, **k):
        stop = k.pop("stop", None)
        if len(methods) == 1 and stop is not None:   # the steady-state pricing of the evaluated mbpa
            n = stream.numel() - 1
            for e in range(25, n, 25):               # 0.001 s a token while the memory fills, then 0.01
                clock[0] += 25 * (0.001 if e <= 50 else 0.01)
                stop(e, None)
            clock[0] += 25 * 0.01
        return real(model, stream, methods, lambdas, **k)

    monkeypatch.setattr(tune_module, "stream_eval", fake)
    deadlines = []
    real_tune = tune_module.tune
    monkeypatch.setattr(tune_module, "tune", lambda *a, **k: (deadlines.append(k["deadline"]), real_tune(*a, **k))[1])
    res = tune_module.tune_in_budget(model, corpus, "mbpa", minutes=0.2, probe_tokens=100,
                                     params={"mbpa": {"k": 4, "memory": 50}}, eval_tokens=100)
    # 0.01 s a token after the 50-token memory (the plain pass costs nothing on this clock)
    assert res["tuned_on"]["reserved_seconds"] == pytest.approx(1.0)
    # ... and it comes off the tuning's deadline: the budget (12 s) started at 0 on this clock
    assert deadlines == [pytest.approx(12.0 - 1.0)]


def test_eval_tune_tells_the_budget_how_many_tokens_it_will_score(run, monkeypatch, capsys):
    seen = []
    real = tune_module.tune_in_budget
    monkeypatch.setattr(tune_module, "tune_in_budget",
                        lambda *a, **k: (seen.append(k["eval_tokens"]), real(*a, **k))[1])
    assert _cli("eval", run, "--split", "test", "--method", "cache", "--tune", "--tune-minutes", 0.1,
                "--tokens", 57, "--threads", 1) == 0
    assert _cli("eval", run, "--split", "test", "--method", "cache", "--tune", "--tune-minutes", 0.1,
                "--threads", 1) == 0
    corpus = load_corpus(json.loads((run / "config.json").read_text())["data"]["name"])
    assert seen == [57, corpus.test.numel() - 1]


def test_the_pricing_pass_stops_at_its_share_of_the_budget(one_thread, monkeypatch):
    """A slow combination's steady-state pricing pass stops once it has taken STEADY_SHARE of
    the budget and prices the evaluation at its last segment."""
    from conftest import motif_stream, tiny_lm

    model = tiny_lm(seed=4)
    corpus = _TwoSplits(motif_stream(400, seed=6), motif_stream(300, seed=8))
    real = tune_module.stream_eval
    clock = [0.0]
    monkeypatch.setattr(tune_module.time, "perf_counter", lambda: clock[0])
    segments = []

    def fake(model, stream, methods, lambdas, **k):
        stop = k.pop("stop", None)
        if len(methods) == 1 and stop is not None:   # the steady-state pricing: 0.5 s a 25-token segment
            for e in range(25, stream.numel() - 1, 25):
                clock[0] += 0.5
                segments.append(e)
                if stop(e, None):
                    r = real(model, stream[:e + 1], methods, lambdas, **k)
                    r.stopped = True
                    return r
        return real(model, stream, methods, lambdas, **k)

    monkeypatch.setattr(tune_module, "stream_eval", fake)
    res = tune_module.tune_in_budget(model, corpus, "mbpa", minutes=0.2, probe_tokens=100,
                                     params={"mbpa": {"k": 4, "memory": 50}}, eval_tokens=100)
    assert tune_module.STEADY_SHARE * 12 < 1.0 and segments == [25, 50]   # stopped past 0.6 s, at 1.0 s
    assert res["tuned_on"]["reserved_seconds"] == pytest.approx(0.5 / 25 * 100)
