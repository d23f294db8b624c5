"""`lmadapt eval --tune`: settings tuned on a valid prefix within a time budget, then the
requested split scored with them, in one command."""

from __future__ import annotations

import json

import pytest

import lmadapt.tune as tune_module
from lmadapt.cli import main
from lmadapt.corpus import load_corpus
from lmadapt.methods import NeuralCache
from lmadapt.mix import perplexity
from lmadapt.stream import stream_eval
from lmadapt.checkpoint import load_model
from lmadapt.train import fit

from conftest import tiny_config, write_markov_corpus


def _cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tunerun")
    corpus_dir = write_markov_corpus(root / "corpus", lines=(200, 60, 40))
    cfg = tiny_config(corpus_dir, ["train.epochs=1"])
    fit(root / "run", cfg, load_corpus(cfg.data.name))
    return root / "run"


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
    default = stream_eval(model, prefix, [NeuralCache()], {"cache": 0.15}, corpus=corpus)
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
    assert rep["params"]["cache"] == {"window": NeuralCache.Params().window, "theta": NeuralCache.Params().theta}


def test_tune_refuses_to_score_the_split_it_tunes_on(run, capsys):
    assert _cli("eval", run, "--split", "valid", "--method", "cache", "--tune") == 2
    assert "cannot also score it" in capsys.readouterr().err
