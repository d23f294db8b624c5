"""Trainer: learning happens, resume is exact, DDP matches one process, bad input is refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmadapt import runs
from lmadapt.cli import main
from lmadapt.corpus import load_corpus
from lmadapt.errors import LmadaptError
from lmadapt.train import TrainingDiverged, fit

from conftest import TINY_SETTINGS, tiny_config


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_training_learns_and_writes_run_dir(tiny_corpus_dir, tmp_path):
    cfg = tiny_config(tiny_corpus_dir, ["train.epochs=3"])
    corpus = load_corpus(cfg.data.name)
    results = fit(tmp_path / "run", cfg, corpus)
    run = tmp_path / "run"
    for name in (runs.CONFIG, runs.VOCAB, runs.BEST, runs.LAST, runs.METRICS, runs.RESULTS):
        assert (run / name).is_file(), name
    saved = json.loads((run / runs.RESULTS).read_text())
    for key in ("valid_ppl", "test_ppl", "train_seconds", "tokens_per_second"):
        assert saved[key] > 0
    assert saved == pytest.approx(results)
    # Each word has 3 equally likely successors: a model that learnt the chain is far below
    # the uniform-over-vocabulary perplexity (~42); the chain's own is ~4.
    assert results["valid_ppl"] < 15
    metrics = runs.read_jsonl(run / runs.METRICS)
    assert len(metrics) >= 3 and metrics[-1]["valid_ppl"] < metrics[0]["valid_ppl"]
    meta = json.loads((run / runs.CONFIG).read_text())
    assert meta["model"]["vocab_size"] == len(corpus.vocab)
    assert meta["corpus"]["tokens"]["train"] == corpus.train.numel()


def test_resume_after_kill_ends_with_identical_weights(tiny_corpus_dir, tmp_path):
    # Dropout and DropConnect are on, so the RNG state must be restored too.
    cfg = tiny_config(tiny_corpus_dir)
    corpus = load_corpus(cfg.data.name)
    fit(tmp_path / "straight", cfg, corpus)

    killed = tmp_path / "killed"
    # 13 steps: the last periodic checkpoint is at step 12 (interval 3), and a validation at
    # step 10 wrote a metrics row; step 13 is lost with the "kill" and recomputed.
    assert fit(killed, tiny_config(tiny_corpus_dir), corpus, interrupt_after_steps=13) is None
    assert not (killed / runs.RESULTS).exists()
    fit(killed, tiny_config(tiny_corpus_dir), corpus, resume=True)

    a, b = _weights(tmp_path / "straight" / runs.BEST), _weights(killed / runs.BEST)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    last_a = _weights(tmp_path / "straight" / runs.LAST)["model"]
    last_b = _weights(killed / runs.LAST)["model"]
    for k in last_a:
        assert torch.equal(last_a[k], last_b[k]), k
    rows_a = runs.read_jsonl(tmp_path / "straight" / runs.METRICS)
    rows_b = runs.read_jsonl(killed / runs.METRICS)
    assert [r["valid_loss"] for r in rows_a] == [r["valid_loss"] for r in rows_b]


def test_killed_mid_epoch_resume_differs_without_rng_restore(tiny_corpus_dir, tmp_path, monkeypatch):
    """Guard for the test above: if resume forgot the RNG state, weights would differ."""
    cfg = tiny_config(tiny_corpus_dir)
    corpus = load_corpus(cfg.data.name)
    fit(tmp_path / "straight", cfg, corpus)
    killed = tmp_path / "killed"
    fit(killed, tiny_config(tiny_corpus_dir), corpus, interrupt_after_steps=13)
    import lmadapt.train as train_module

    monkeypatch.setattr(train_module, "_set_rng_state", lambda state, device: torch.manual_seed(12345))
    fit(killed, tiny_config(tiny_corpus_dir), corpus, resume=True)
    a, b = _weights(tmp_path / "straight" / runs.BEST), _weights(killed / runs.BEST)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tiny_corpus_dir, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_corpus_dir)
    corpus = load_corpus(cfg.data.name)
    real = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def poisoned(logits, target, *args, **kwargs):
        calls["n"] += 1
        out = real(logits, target, *args, **kwargs)
        return out * float("nan") if logits.requires_grad and calls["n"] > 7 else out

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
    with pytest.raises(TrainingDiverged, match="non-finite"):
        fit(tmp_path / "run", cfg, corpus)
    last = _weights(tmp_path / "run" / runs.LAST)
    assert last["progress"]["global_step"] == 6  # the checkpoint before the bad step
    assert all(torch.isfinite(v).all() for v in last["model"].values())


def _cli(*args) -> int:
    return main([str(a) for a in args])


def _tiny_cli_args(corpus_dir, out):
    args = ["train", "--data", corpus_dir, "--out", out, "--set", "train.epochs=1"]
    for s in TINY_SETTINGS:
        if not s.startswith("train.epochs"):
            args += ["--set", s]
    return args


def test_cli_refuses_to_overwrite_a_finished_run(tiny_corpus_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli(*_tiny_cli_args(tiny_corpus_dir, out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert _cli(*_tiny_cli_args(tiny_corpus_dir, out)) == 2
    err = capsys.readouterr().err.strip()
    assert "already holds a finished run" in err and len(err.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # --resume on a finished run is a no-op; --force starts over.
    assert _cli("train", "--out", out, "--resume") == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _cli(*_tiny_cli_args(tiny_corpus_dir, out), "--force") == 0


@pytest.mark.parametrize("args, message", [
    (["train", "--recipe", "no-such-recipe"], "unknown recipe 'no-such-recipe'"),
    (["train", "--data", "no-such-corpus-xyz"], "no-such-corpus-xyz"),
    (["train", "--set", "model.hiden_size=3"], "unknown setting 'model.hiden_size'"),
    (["train", "--set", "train.lr=fast"], "train.lr expects a number"),
    (["train", "--set", "train.optimizer=lbfgs"], "train.optimizer must be one of"),
    (["train", "--set", "lr"], "--set expects key=value"),
    (["train", "--device", "cuda"] if not torch.cuda.is_available() else ["train", "--recipe", "nope"], ""),
])
def test_cli_bad_input_is_one_line_exit_2(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _cli(*args, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmadapt: error:") and len(err.splitlines()) == 1
    assert message in err
    assert not (tmp_path / "out").exists()


def test_cli_missing_corpus_file_and_corrupt_checkpoint(tiny_corpus_dir, tmp_path, capsys):
    (tiny_corpus_dir / "valid.txt").unlink()
    assert _cli("train", "--data", tiny_corpus_dir, "--out", tmp_path / "a") == 2
    assert "valid" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()

    out = tmp_path / "run"
    out.mkdir()
    for name in (runs.CONFIG, runs.VOCAB):
        (out / name).write_text("{}")
    (out / runs.LAST).write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert _cli("train", "--out", out, "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lmadapt: error:" in err
    assert (out / runs.LAST).read_bytes() == b"not a checkpoint"


def test_load_model_rejects_corrupt_weights(tiny_corpus_dir, tmp_path):
    from lmadapt.checkpoint import load_model

    cfg = tiny_config(tiny_corpus_dir, ["train.epochs=1"])
    fit(tmp_path / "run", cfg, load_corpus(cfg.data.name))
    model, loaded_cfg, meta = load_model(tmp_path / "run")
    assert loaded_cfg.model.hidden_size == 24
    (tmp_path / "run" / runs.BEST).write_bytes(b"\x00garbage")
    with pytest.raises(LmadaptError, match="cannot read checkpoint"):
        load_model(tmp_path / "run")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_gloo_match_one_process(tiny_corpus_dir, tmp_path):
    """torchrun with 2 CPU processes: same global batch, so (without dropout) the same weights."""
    no_dropout = ["--set", "model.dropout_input=0", "--set", "model.dropout_hidden=0",
                  "--set", "model.dropout_output=0", "--set", "model.dropout_embedding=0",
                  "--set", "model.weight_drop=0"]
    args = _tiny_cli_args(tiny_corpus_dir, tmp_path / "ddp") + no_dropout
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "lmadapt"] + [str(a) for a in args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _cli(*_tiny_cli_args(tiny_corpus_dir, tmp_path / "single"), *no_dropout) == 0
    a, b = _weights(tmp_path / "ddp" / runs.BEST), _weights(tmp_path / "single" / runs.BEST)
    for k in a:
        # float reduction order differs across processes; Adam amplifies it a little
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=2e-4)
    ra = json.loads((tmp_path / "ddp" / runs.RESULTS).read_text())
    rb = json.loads((tmp_path / "single" / runs.RESULTS).read_text())
    assert ra["test_ppl"] == pytest.approx(rb["test_ppl"], rel=1e-3)


def test_sampled_softmax_estimates_full_cross_entropy():
    from lmadapt.train import sampled_softmax_loss, unigram_log_q

    torch.manual_seed(0)
    decoder = torch.nn.Linear(8, 50)
    hidden, targets = torch.randn(64, 8), torch.randint(0, 50, (64,))
    full = torch.nn.functional.cross_entropy(decoder(hidden), targets)
    counts = torch.randint(1, 100, (50,))
    est = sampled_softmax_loss(hidden, targets, decoder, 200_000, unigram_log_q(counts))
    assert est.item() == pytest.approx(full.item(), rel=0.02)
    few = sampled_softmax_loss(hidden, targets, decoder, 5, unigram_log_q(counts))
    assert abs(few.item() - full.item()) > 0.05  # a handful of samples is only an estimate


def test_training_with_sampled_softmax_learns(tiny_corpus_dir, tmp_path):
    cfg = tiny_config(tiny_corpus_dir, ["train.epochs=3", "train.sampled_softmax=16",
                                        "train.sampled_softmax_until=0.7"])
    results = fit(tmp_path / "run", cfg, load_corpus(cfg.data.name))
    assert results["valid_ppl"] < 15


def test_step_budget_stops_there_and_anneals_the_schedule_to_it(tiny_corpus_dir, tmp_path):
    # train.max_steps is the load-independent budget used for same-budget comparisons.
    cfg = tiny_config(tiny_corpus_dir, ["train.epochs=50", "train.max_steps=17", "train.lr_schedule=cosine",
                                        "train.eval_interval=0"])
    corpus = load_corpus(cfg.data.name)
    fit(tmp_path / "run", cfg, corpus)
    last = torch.load(tmp_path / "run" / runs.LAST, weights_only=True)
    assert last["progress"]["global_step"] == 17
    assert last["progress"]["stopped_because"] == "step budget"
    # The cosine reached zero at the budget: the last logged learning rate is ~0.
    metrics = runs.read_jsonl(tmp_path / "run" / runs.METRICS)
    assert metrics[-1]["lr"] < 1e-3 * cfg.train.lr
