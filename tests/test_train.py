"""Trainer: learning happens, resume is exact, DDP matches one process, bad input is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmadapt import runs
from lmadapt.corpus import load_corpus
from lmadapt.errors import LmadaptError
from lmadapt.train import TrainingDiverged, fit

from conftest import cli as _cli
from conftest import copy_run, free_port, tiny_config, torchrun, train_args, write_markov_corpus


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_training_learns_and_writes_run_dir(tiny_corpus_dir, tmp_path):
    # Checkpoints at validations only: the periodic ones are the resume tests' business.
    cfg = tiny_config(tiny_corpus_dir, ["train.epochs=3", "train.checkpoint_interval=1000"])
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


@pytest.fixture(scope="module")
def straight_and_killed(tmp_path_factory):
    """A two-epoch run with dropout and DropConnect on (so the RNG state matters), and the
    same run killed after 13 steps: the last periodic checkpoint is at step 12 (interval 3)
    and a validation at step 10 wrote a metrics row; step 13 is lost with the "kill"."""
    root = tmp_path_factory.mktemp("resume")
    corpus_dir = write_markov_corpus(root / "corpus", lines=(100, 20, 20))
    corpus = load_corpus(str(corpus_dir))
    fit(root / "straight", tiny_config(corpus_dir), corpus)
    assert fit(root / "killed", tiny_config(corpus_dir), corpus, interrupt_after_steps=13) is None
    return root, corpus_dir, corpus


def _resume_a_copy(straight_and_killed, dest: Path) -> Path:
    root, corpus_dir, corpus = straight_and_killed
    killed = copy_run(root / "killed", dest)
    fit(killed, tiny_config(corpus_dir), corpus, resume=True)
    return killed


def test_resume_after_kill_ends_with_identical_weights(straight_and_killed, tmp_path):
    root = straight_and_killed[0]
    last = _weights(root / "killed" / runs.LAST)["progress"]
    assert last["global_step"] == 12 and last["epoch"] == 0  # mid-epoch, one step behind the kill
    assert not (root / "killed" / runs.RESULTS).exists()
    killed = _resume_a_copy(straight_and_killed, tmp_path / "killed")

    a, b = _weights(root / "straight" / runs.BEST), _weights(killed / runs.BEST)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    last_a = _weights(root / "straight" / runs.LAST)["model"]
    last_b = _weights(killed / runs.LAST)["model"]
    for k in last_a:
        assert torch.equal(last_a[k], last_b[k]), k
    rows_a = runs.read_jsonl(root / "straight" / runs.METRICS)
    rows_b = runs.read_jsonl(killed / runs.METRICS)
    assert [r["valid_loss"] for r in rows_a] == [r["valid_loss"] for r in rows_b]
    assert json.loads((killed / runs.RESULTS).read_text())["stopped_because"] == "epochs"


def test_killed_mid_epoch_resume_differs_without_rng_restore(straight_and_killed, tmp_path, monkeypatch):
    """Guard for the test above: if resume forgot the RNG state, weights would differ."""
    import lmadapt.train as train_module

    monkeypatch.setattr(train_module, "_set_rng_state", lambda state, device: torch.manual_seed(12345))
    killed = _resume_a_copy(straight_and_killed, tmp_path / "killed")
    a, b = _weights(straight_and_killed[0] / "straight" / runs.BEST), _weights(killed / runs.BEST)
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


def test_cli_refuses_to_overwrite_a_finished_run(tiny_run, tmp_path, capsys):
    out = copy_run(tiny_run.run, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert _cli(*train_args(tiny_run.corpus, out)) == 2
    err = capsys.readouterr().err.strip()
    assert "already holds a finished run" in err and len(err.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # --resume on a finished run is a no-op; --force starts over.
    assert _cli("train", "--out", out, "--resume") == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _cli(*train_args(tiny_run.corpus, out, "--set", "train.max_steps=2", "--force")) == 0
    assert json.loads((out / runs.RESULTS).read_text())["stopped_because"] == "step budget"
    assert json.loads((out / runs.CONFIG).read_text())["train"]["max_steps"] == 2


@pytest.mark.parametrize("args, message", [
    (["train", "--recipe", "no-such-recipe"], "unknown recipe 'no-such-recipe'"),
    (["train", "--data", "no-such-corpus-xyz"], "no-such-corpus-xyz"),
    (["train", "--set", "model.hiden_size=3"], "unknown setting 'model.hiden_size'"),
    (["train", "--set", "train.lr=fast"], "train.lr expects a number"),
    (["train", "--set", "train.optimizer=lbfgs"], "train.optimizer must be one of"),
    (["train", "--set", "lr"], "--set expects key=value"),
    (["train", "--device", "cuda"], "no CUDA device") if not torch.cuda.is_available() else
    (["train", "--recipe", "nope"], "unknown recipe 'nope'"),
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


def test_load_model_rejects_corrupt_weights(tiny_run, tmp_path):
    from lmadapt.checkpoint import load_model

    run = copy_run(tiny_run.run, tmp_path / "run")
    model, loaded_cfg, meta = load_model(run)
    assert loaded_cfg.model.hidden_size == 24
    for k, v in model.state_dict().items():
        assert torch.equal(v, _weights(run / runs.BEST)[k]), k
    (run / runs.BEST).write_bytes(b"\x00garbage")
    with pytest.raises(LmadaptError, match="cannot read checkpoint"):
        load_model(run)


@pytest.mark.slow
def test_ddp_two_processes_gloo_match_one_process(tmp_path):
    """torchrun with 2 CPU processes: same global batch, so (without dropout) the same weights."""
    corpus_dir = write_markov_corpus(tmp_path / "corpus", lines=(60, 10, 10))
    no_dropout = ["--set", "model.dropout_input=0", "--set", "model.dropout_hidden=0",
                  "--set", "model.dropout_output=0", "--set", "model.dropout_embedding=0",
                  "--set", "model.weight_drop=0"]
    proc = torchrun(*train_args(corpus_dir, tmp_path / "ddp", *no_dropout))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _cli(*train_args(corpus_dir, tmp_path / "single", *no_dropout)) == 0
    a, b = _weights(tmp_path / "ddp" / runs.BEST), _weights(tmp_path / "single" / runs.BEST)
    for k in a:
        # float reduction order differs across processes; Adam amplifies it a little
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=2e-4)
    ra = json.loads((tmp_path / "ddp" / runs.RESULTS).read_text())
    rb = json.loads((tmp_path / "single" / runs.RESULTS).read_text())
    assert ra["test_ppl"] == pytest.approx(rb["test_ppl"], rel=1e-3)


def test_ddp_wrapper_is_gone_before_the_process_group_is_destroyed(tmp_path, monkeypatch):
    """DistributedDataParallel sits in a reference cycle and holds the process group: if it
    outlives destroy_process_group, gloo's threads are torn down at interpreter exit, where a
    finished torchrun worker can abort. One process, a world of one, the real DDP path."""
    import gc

    import torch.distributed as dist
    import lmadapt.train as train_module

    class Enabled(train_module.Dist):
        def __init__(self, device):
            super().__init__(device)
            self.enabled = True  # WORLD_SIZE is 1: the group below is initialised by hand

    alive = []
    real_destroy = dist.destroy_process_group

    def destroy(*a, **k):
        alive.append(sum(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects()))
        real_destroy(*a, **k)

    monkeypatch.setattr(train_module, "Dist", Enabled)
    monkeypatch.setattr(dist, "destroy_process_group", destroy)
    corpus_dir = write_markov_corpus(tmp_path / "corpus", lines=(20, 5, 5))
    cfg = tiny_config(corpus_dir, ["train.max_steps=3"])
    for interrupt in (None, 2):  # the end of training, and the simulated kill
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        try:
            fit(tmp_path / f"run{interrupt}", cfg, load_corpus(str(corpus_dir)), interrupt_after_steps=interrupt)
        finally:
            if dist.is_initialized():
                real_destroy()
    assert alive == [0, 0]


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
                                        "train.sampled_softmax_until=0.7", "train.checkpoint_interval=1000"])
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
