"""The evaluation seam: the two kinds of method and what the loop calls on each, evaluation
without the trainer, `--checkpoint best|last|PATH`, and the base model's row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch

from lmadapt import runs
from lmadapt.checkpoint import load_model
from lmadapt.cli import main
from lmadapt.corpus import load_corpus
from lmadapt.errors import LmadaptError
from lmadapt.evaluate import evaluate_run, load_tokens, mixture_lambdas
from lmadapt.methods import MIXTURE_LAMBDAS, REGISTRY, MixtureMethod, ModelAdapter, parse_combination
from lmadapt.methods.base import Method
from lmadapt.methods.cache import CacheParams, NeuralCache
from lmadapt.mix import perplexity
from lmadapt.report import bucket_report, method_log_probs
from lmadapt.stream import stream_eval
from lmadapt.train import Progress, fit

from conftest import motif_stream, tiny_config, tiny_lm, write_markov_corpus

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("seam")
    corpus_dir = write_markov_corpus(root / "corpus", lines=(200, 40, 40))
    cfg = tiny_config(corpus_dir, ["train.epochs=1"])
    fit(root / "run", cfg, load_corpus(cfg.data.name))
    return root / "run", load_corpus(cfg.data.name)


def _cli(*args) -> int:
    return main([str(a) for a in args])


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in captured.err + captured.out
    assert err.startswith("lmadapt: error:") and len(err.splitlines()) == 1, err
    return err


# --------------------------------------------------------------------------- the protocol


def test_every_method_is_one_kind_and_mixtures_own_their_lambda():
    for name, cls in REGISTRY.items():
        assert issubclass(cls, MixtureMethod) != issubclass(cls, ModelAdapter), name
        if issubclass(cls, MixtureMethod):
            assert 0.0 <= cls.default_lambda <= 1.0, name
    # A given λ wins; the others keep the mixture's own default.
    own = MIXTURE_LAMBDAS[frozenset({"mbpa", "cache"})]
    assert mixture_lambdas(["dyneval", "mbpa", "cache"], {"cache": 0.3}) == {"mbpa": own["mbpa"], "cache": 0.3}
    assert mixture_lambdas(["dyneval", "mbpa"], {}) == {"mbpa": REGISTRY["mbpa"].default_lambda}


@dataclass
class _NoParams:
    pass


class _Recorder(ModelAdapter):
    """An adapter that moves nothing and records the segments the loop hands it."""

    name = "recorder"
    Params = _NoParams

    def __init__(self, length: int):
        super().__init__()
        self.length, self.seen = length, []

    def segment_len(self) -> int:
        return self.length

    def update(self, seg, loss) -> None:
        assert loss.requires_grad  # the loop keeps the forward graph for adapters
        self.seen.append(seg.positions.tolist())


def test_the_loop_takes_its_segment_length_from_the_adapter():
    model, stream = tiny_lm(), motif_stream(40)
    adapter = _Recorder(3)
    r = stream_eval(model, stream, [adapter, NeuralCache(CacheParams(window=10))], {"cache": 0.2}, segment_len=16)
    assert [len(s) for s in adapter.seen[:-1]] == [3] * (len(adapter.seen) - 1)
    assert sum(adapter.seen, []) == list(range(39))
    # an adapter that moves nothing leaves every score as the plain loop gives it
    plain = stream_eval(model, stream, [NeuralCache(CacheParams(window=10))], {"cache": 0.2})
    torch.testing.assert_close(r.mixed, plain.mixed, atol=1e-6, rtol=0)
    with pytest.raises(LmadaptError, match="different segment lengths"):
        stream_eval(model, stream, [_Recorder(3), _Recorder(5)], {})
    with pytest.raises(TypeError, match="MixtureMethod or a ModelAdapter"):
        stream_eval(model, stream, [Method(_NoParams())], {})


# --------------------------------------------------------------------------- no trainer in evaluation


def test_evaluation_modules_do_not_import_the_trainer():
    code = ("import sys, lmadapt.evaluate, lmadapt.stream, lmadapt.tune, lmadapt.report, lmadapt.checkpoint, "
            "lmadapt.text; assert 'lmadapt.train' not in sys.modules, 'lmadapt.train was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_an_evaluation_with_every_kind_of_method_runs_without_the_trainer(trained):
    run, _ = trained
    code = ("import sys\nfrom lmadapt.cli import main\n"
            f"assert main(['eval', {str(run)!r}, '--split', 'test', '--method', 'dyneval+mbpa+cache',"
            " '--mbpa-memory', '50', '--mbpa-k', '8', '--threads', '1']) == 0\n"
            "assert 'lmadapt.train' not in sys.modules, 'lmadapt.train was imported'\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "dyneval+mbpa+cache" in out.stdout


# --------------------------------------------------------------------------- --checkpoint


def _perturbed_last(run: Path) -> dict:
    """Make last.pt's model differ from model.pt's; returns the weights written."""
    data = runs.load_tensors(run / runs.LAST)
    g = torch.Generator().manual_seed(0)
    weights = {k: v + 0.3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
               for k, v in data["model"].items()}
    data["model"] = weights
    runs.save_tensors(run / runs.LAST, data)
    return weights


def test_checkpoint_last_evaluates_last_pt(trained, tmp_path, capsys):
    run, corpus = trained
    weights = _perturbed_last(run)
    best_json, last_json = tmp_path / "best.json", tmp_path / "last.json"
    assert _cli("eval", run, "--split", "test", "--json", best_json) == 0
    assert _cli("eval", run, "--split", "test", "--checkpoint", "last", "--json", last_json) == 0
    best, last = json.loads(best_json.read_text()), json.loads(last_json.read_text())
    assert (best["checkpoint"], last["checkpoint"]) == ("best", "last")
    model, _, _ = load_model(run)
    model.load_state_dict(weights)
    expected = perplexity(stream_eval(model, corpus.test, [], {}).base)
    assert last["methods"]["base"]["ppl"] == pytest.approx(expected, rel=1e-6)
    assert abs(last["methods"]["base"]["ppl"] / best["methods"]["base"]["ppl"] - 1) > 1e-3
    # a path to a copy of model.pt is the best weights again
    copy = tmp_path / "copy.pt"
    copy.write_bytes((run / runs.BEST).read_bytes())
    again = tmp_path / "again.json"
    assert _cli("eval", run, "--split", "test", "--checkpoint", copy, "--json", again) == 0
    assert json.loads(again.read_text())["methods"]["base"]["ppl"] == best["methods"]["base"]["ppl"]


def test_checkpoint_last_under_nt_asgd_gives_the_averaged_weights(trained, tmp_path):
    run, _ = trained
    other = tmp_path / "run"
    other.mkdir()
    for name in (runs.CONFIG, runs.VOCAB, runs.BEST):
        (other / name).write_bytes((run / name).read_bytes())
    model, _, _ = load_model(run)
    opt = torch.optim.ASGD(model.parameters(), lr=0.5, t0=0, lambd=0.0)
    x = torch.randint(0, model.vocab_size, (2, 6))
    for _ in range(3):
        opt.zero_grad()
        _, logits, _ = model(x)
        logits.logsumexp(-1).mean().backward()
        opt.step()
    runs.save_tensors(other / runs.LAST, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                          "progress": asdict(Progress(asgd=True)), "state": None, "rng": []})
    loaded, _, _ = load_model(other, checkpoint="last")
    for p, q in zip(model.parameters(), loaded.parameters()):
        torch.testing.assert_close(q, opt.state[p]["ax"])
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), loaded.parameters()))


def test_foreign_checkpoints_are_refused_in_one_line(trained, tmp_path, capsys):
    run, _ = trained
    tokens = tmp_path / "t.pt"
    assert _cli("eval", run, "--method", "cache", "--save-tokens", tokens) == 0
    capsys.readouterr()
    assert _cli("eval", run, "--checkpoint", tokens) == 2
    assert "holds no model weights" in _one_line_error(capsys)
    other = tmp_path / "other.pt"
    runs.save_tensors(other, tiny_lm(vocab=7).state_dict())  # another model's weights
    assert _cli("eval", run, "--checkpoint", other) == 2
    assert "does not match" in _one_line_error(capsys)
    assert _cli("eval", run, "--checkpoint", tmp_path / "nothing.pt") == 2
    assert "no such file" in _one_line_error(capsys)
    assert _cli("eval", "--hf-model", tmp_path, "--text", tokens, "--checkpoint", "last") == 2
    assert "--checkpoint" in _one_line_error(capsys)
    # a datastore holds the hidden states of model.pt's weights
    assert _cli("eval", run, "--checkpoint", "last", "--method", "knn", "--datastore", tmp_path) == 2
    assert "cannot serve --checkpoint last" in _one_line_error(capsys)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in (runs.CONFIG, runs.VOCAB, runs.BEST):
        (bare / name).write_bytes((run / name).read_bytes())
    assert _cli("eval", bare, "--checkpoint", "last") == 2
    assert "has no last.pt" in _one_line_error(capsys)


# --------------------------------------------------------------------------- the base row


def test_lstm_is_accepted_for_the_base_model():
    assert parse_combination("lstm") == parse_combination("base") == []
    assert parse_combination("lstm+cache") == parse_combination("base+cache") == ["cache"]


def test_the_base_row_names_the_gpt2_backbone(tmp_path, capsys):
    pytest.importorskip("transformers")
    from lmadapt import backbones
    from lmadapt.train import write_run_metadata

    corpus_dir = write_markov_corpus(tmp_path / "corpus", lines=(40, 10, 10))
    cfg = tiny_config(corpus_dir, ["model.arch=gpt2", "model.n_layer=1", "model.n_embd=16", "model.n_head=2",
                                   "model.context=16"])
    corpus = load_corpus(cfg.data.name)
    cfg.model.vocab_size = len(corpus.vocab)
    run = tmp_path / "run"
    write_run_metadata(run, cfg, corpus)  # an untrained GPT-2 is enough for the labels
    runs.save_tensors(run / runs.BEST, backbones.build(cfg.model).state_dict())
    out = tmp_path / "e.json"
    assert _cli("eval", run, "--method", "lstm+cache", "--json", out) == 0
    table = capsys.readouterr().out
    assert "base (gpt2)" in table and "Δ vs base" in table and "lstm" not in table
    rep = json.loads(out.read_text())
    assert rep["backbone"] == "gpt2" and set(rep["methods"]) == {"base", "cache"}
    assert "delta_vs_base_percent" in rep["methods"]["cache"]


def _as_version_1(tokens: dict) -> dict:
    """The record as version 1 wrote it: the base column "lstm", the pass's base as "base"."""
    methods, columns = tokens["methods"], tokens["columns"]
    adapters = "+".join(n for n in parse_combination(tokens["pass"]) if issubclass(REGISTRY[n], ModelAdapter))
    return {"format": tokens["format"], "version": 1, "split": tokens["split"], "targets": tokens["targets"],
            "train_counts": tokens["train_counts"], "lambdas": tokens["lambdas"],
            "columns": {"lstm": methods["base"], "base": methods[adapters or "base"], **columns},
            "methods": {"lstm": methods["base"], tokens["pass"]: methods[tokens["pass"]]}}


def test_version_1_tokens_files_still_load(trained, tmp_path, capsys):
    run, corpus = trained
    model, _, _ = load_model(run)
    for method in ("mbpa+cache", "dyneval+cache"):
        _, v2 = evaluate_run(model, corpus, "test", method, {"mbpa": {"memory": 50, "k": 8}})
        path = tmp_path / f"{method}-v1.pt"
        runs.save_tensors(path, _as_version_1(v2))
        v1 = load_tokens(path)
        assert v1["version"] == 2 and v1["pass"] == method
        for name in ("lstm", "base", method, "lstm+cache" if method == "mbpa+cache" else "dyneval"):
            assert torch.equal(method_log_probs(v1, name), method_log_probs(v2, name)), (method, name)
        a = bucket_report(v1, "lstm", method, 2)
        b = bucket_report(v2, "base", method, 2)
        assert a["buckets"] == b["buckets"]
        assert _cli("report", path, "--baseline", "lstm", "--method", method, "--buckets", 2) == 0
        capsys.readouterr()
    # cache was computed on the dynamically evaluated model: not available alone from that pass
    with pytest.raises(LmadaptError, match="not in this tokens file"):
        method_log_probs(v1, "cache")
    assert not torch.equal(v1["methods"]["dyneval"], v1["methods"]["base"])


def test_a_run_of_a_newer_format_is_refused_in_one_line(trained, tmp_path, capsys):
    run, _ = trained
    newer = tmp_path / "newer"
    newer.mkdir()
    for name in (runs.VOCAB, runs.BEST):
        (newer / name).write_bytes((run / name).read_bytes())
    meta = json.loads((run / runs.CONFIG).read_text())
    (newer / runs.CONFIG).write_text(json.dumps({**meta, "format_version": meta["format_version"] + 1}))
    assert _cli("eval", newer) == 2
    assert "upgrade lmadapt" in _one_line_error(capsys)
