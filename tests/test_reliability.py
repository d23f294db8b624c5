"""Nothing a user has is lost, and every bad input is one line with exit 2.

Each class of failure of the reliability issue has a test here: --force with a bad new
run, two concurrent writers, overwrite attempts, outputs that cannot be written, aborted
starts, moved corpora, the precision fallback, and a table of bad values for every
numeric setting (generated from the declared ranges, so a new setting is covered).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import signal
import time
import zlib
from pathlib import Path

import pytest
import torch

from lmadapt import runs
from lmadapt.config import DataConfig, TrainConfig
from lmadapt.methods import REGISTRY, MixtureMethod
from lmadapt.model import LMConfig

from conftest import cli as _cli
from conftest import copy_run, forked_cli, write_markov_corpus
from conftest import one_line_error as _one_line_error
from conftest import train_args as _train_args

def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


@pytest.fixture(scope="module")
def finished_run(tiny_run, tmp_path_factory):
    """A finished run of this module's own: these tests try to damage it."""
    return tiny_run.corpus, copy_run(tiny_run.run, tmp_path_factory.mktemp("rel") / "run")


# --------------------------------------------------------------------------- --force


@pytest.mark.parametrize("bad", [["--data", "no-such-corpus-dir-xyz"], ["--set", "train.lr=nan"],
                                 ["--set", "model.hiden=3"], ["--set", "train.batch_size=0"]])
def test_force_with_bad_new_inputs_keeps_the_old_run(finished_run, tmp_path, capsys, bad):
    corpus, out = finished_run
    before = _snapshot(out)
    assert _cli(*_train_args(corpus, out, "--force"), *bad) == 2
    _one_line_error(capsys)
    assert _snapshot(out) == before


def test_force_keeps_the_old_run_when_the_new_one_dies_before_its_first_checkpoint(finished_run, tmp_path,
                                                                                   monkeypatch, capsys):
    corpus, out = finished_run
    before = _snapshot(out)
    import lmadapt.train as train

    real_fit = train.fit

    def dying_fit(run_dir, cfg, corpus, **kw):  # writes the new run's metadata, then dies
        train.write_run_metadata(Path(run_dir), cfg, corpus)
        raise train.TrainingDiverged("simulated failure in the first step")

    monkeypatch.setattr(train, "fit", dying_fit)
    assert _cli(*_train_args(corpus, out, "--force")) == 2
    assert "simulated failure" in capsys.readouterr().err
    assert _snapshot(out) == before
    assert not (out / ".lmadapt-replaced").exists()
    monkeypatch.setattr(train, "fit", real_fit)


# --------------------------------------------------------------------------- lock


def test_a_second_writer_is_refused_while_the_first_trains(tmp_path, capfd):
    corpus = write_markov_corpus(tmp_path / "corpus", lines=(60, 10, 10))
    out = tmp_path / "run"
    # A first process, on a time budget it cannot reach by epochs. It is held stopped
    # (SIGSTOP) while the others knock, so it is still running however slow this machine is.
    first = forked_cli(*_train_args(corpus, out, "--set", "train.epochs=400", "--set", "train.max_minutes=0.03"))
    try:
        pid_file = out / (runs.LOCK + ".pid")
        deadline = time.time() + 120
        def started():  # locked, and far enough to have a checkpoint of best weights
            return pid_file.exists() and pid_file.read_text().strip() and (out / runs.BEST).exists()

        while not started() and time.time() < deadline:
            assert first.is_alive(), capfd.readouterr().err
            time.sleep(0.02)
        os.kill(first.pid, signal.SIGSTOP)
        assert first.is_alive(), "the first process ended before the others could knock"
        assert pid_file.read_text().strip() == str(first.pid)
        capfd.readouterr()  # what it printed so far (it shares this test's stderr)
        # Second writers: a resume, a --force restart, an eval writing into the run.
        assert _cli("train", "--out", out, "--resume") == 2
        assert f"PID {first.pid}" in _one_line_error(capfd)
        assert _cli(*_train_args(corpus, out, "--force")) == 2
        assert f"in use by another lmadapt process (PID {first.pid})" in _one_line_error(capfd)
        assert _cli("eval", out, "--json", out / "eval.json") == 2
        assert f"PID {first.pid}" in _one_line_error(capfd)
        os.kill(first.pid, signal.SIGCONT)
        first.join(300)
    finally:
        if first.is_alive():
            os.kill(first.pid, signal.SIGCONT)
            first.kill()
            first.join()
    assert first.exitcode == 0, capfd.readouterr().err
    results = json.loads((out / runs.RESULTS).read_text())
    assert math.isfinite(results["test_ppl"]) and results["stopped_because"] == "time budget"
    assert not (out / (runs.LOCK + ".pid")).exists()
    assert not (out / "eval.json").exists()


# --------------------------------------------------------------------------- outputs


def test_existing_outputs_are_never_overwritten_without_asking(finished_run, tmp_path, capsys, monkeypatch):
    corpus, out = finished_run
    import lmadapt.evaluate as evaluate

    def no_eval(*a, **k):
        raise AssertionError("computed before refusing the output")

    monkeypatch.setattr(evaluate, "evaluate_run", no_eval)
    mine = tmp_path / "mine.json"
    mine.write_text("precious")
    for flag in ("--json", "--save-tokens"):
        assert _cli("eval", out, "--method", "cache", flag, mine) == 2
        assert "already exists" in _one_line_error(capsys)
        assert mine.read_text() == "precious"
    # A run's own files are refused even with --overwrite.
    for name in (runs.BEST, runs.CONFIG):
        before = (out / name).read_bytes()
        assert _cli("eval", out, "--json", out / name, "--overwrite") == 2
        assert "run's own" in _one_line_error(capsys)
        assert (out / name).read_bytes() == before
    assert _cli("tune", out, "--method", "cache", "--out", mine) == 2
    assert "already exists" in _one_line_error(capsys)
    assert _cli("eval", out, "--json", tmp_path) == 2
    assert "is a directory" in _one_line_error(capsys)
    assert mine.read_text() == "precious"


def _unwritable_dir(tmp_path: Path) -> Path:
    """A folder no file can be created in, for this user (root ignores permission bits)."""
    if os.geteuid() == 0:
        return Path("/proc/lmadapt-no-such-dir")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def test_unwritable_output_fails_before_any_computation(finished_run, tmp_path, capsys, monkeypatch):
    corpus, out = finished_run
    import lmadapt.evaluate as evaluate

    monkeypatch.setattr(evaluate, "evaluate_run", lambda *a, **k: pytest.fail("computed before refusing"))
    target = _unwritable_dir(tmp_path) / "e.json"
    start = time.perf_counter()
    assert _cli("eval", out, "--method", "cache", "--json", target) == 2
    assert time.perf_counter() - start < 5
    assert "not writable" in _one_line_error(capsys)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert _cli("eval", out, "--json", blocker / "e.json") == 2
    assert "is a file, not a directory" in _one_line_error(capsys)
    assert _cli(*_train_args(corpus, blocker)) == 2
    assert "not a directory" in _one_line_error(capsys)


def test_a_write_that_fails_after_the_computation_keeps_the_results(finished_run, tmp_path, capsys, monkeypatch):
    corpus, out = finished_run
    target = tmp_path / "e.json"
    real = runs.write_json

    def disk_full(path, obj):
        if Path(path) == target:
            raise OSError(28, "No space left on device")
        real(path, obj)

    monkeypatch.setattr(runs, "write_json", disk_full)
    monkeypatch.chdir(tmp_path)
    rescued_before = set(out.glob("lmadapt-rescued-*"))
    assert _cli("eval", out, "--method", "cache", "--json", target) == 2
    err = _one_line_error(capsys)
    assert "No space left on device" in err and "saved to" in err
    rescued = set(out.glob("lmadapt-rescued-*")) - rescued_before
    assert len(rescued) == 1 and str(next(iter(rescued))) in err
    report = json.loads(next(iter(rescued)).read_text())
    next(iter(rescued)).unlink()
    # what was saved is the computed report: the same as a write that succeeds
    monkeypatch.setattr(runs, "write_json", real)
    assert _cli("eval", out, "--method", "cache", "--json", target) == 0
    written = json.loads(target.read_text())
    assert {m: e["ppl"] for m, e in report["methods"].items()} == {m: e["ppl"] for m, e in written["methods"].items()}
    assert report["tokens"] == written["tokens"] and report["split"] == written["split"]


# --------------------------------------------------------------------------- aborted starts, moved corpora


def test_an_aborted_start_does_not_block_a_rerun(tmp_path, capsys):
    corpus = write_markov_corpus(tmp_path / "corpus", lines=(60, 10, 10))
    out = tmp_path / "run"
    out.mkdir()
    for name in (runs.CONFIG, runs.VOCAB, runs.METRICS):  # what the first second writes
        (out / name).write_text("{}" if name != runs.METRICS else "")
    assert _cli(*_train_args(corpus, out)) == 0
    assert "aborted start" in capsys.readouterr().err
    assert (out / runs.RESULTS).is_file()
    # --resume on an aborted start starts over with the run's own config.
    for name in (runs.BEST, runs.LAST, runs.RESULTS):
        (out / name).unlink()
    assert _cli("train", "--out", out, "--resume", "--threads", 1) == 0
    assert (out / runs.RESULTS).is_file()


def test_config_records_absolute_paths_checksums_and_precision(tmp_path, monkeypatch, capsys):
    write_markov_corpus(tmp_path / "corpus", lines=(60, 10, 10))
    monkeypatch.chdir(tmp_path)
    assert _cli(*_train_args("corpus", "run")) == 0  # relative paths
    meta = json.loads((tmp_path / "run" / runs.CONFIG).read_text())
    assert meta["data"]["name"] == str((tmp_path / "corpus").resolve())
    assert set(meta["corpus"]["sha256"]) == {"train", "valid", "test"}
    assert meta["precision"]["used"] == "float32" and meta["format_version"] >= 2
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert _cli("eval", tmp_path / "run", "--method", "cache") == 0  # works from another directory
    capsys.readouterr()
    # A corpus that changed under a run is refused on resume, naming the split.
    (tmp_path / "run" / runs.RESULTS).unlink()
    text = (tmp_path / "corpus" / "valid.txt").read_text().splitlines()
    (tmp_path / "corpus" / "valid.txt").write_text("\n".join(text[1:]) + "\n")
    assert _cli("train", "--out", tmp_path / "run", "--resume") == 2
    assert "valid split" in _one_line_error(capsys)
    # A moved corpus: the error names the missing file.
    (tmp_path / "corpus").rename(tmp_path / "moved")
    assert _cli("train", "--out", tmp_path / "run", "--resume") == 2
    assert str(tmp_path / "corpus") in _one_line_error(capsys)


# --------------------------------------------------------------------------- precision


def test_unsupported_bf16_falls_back_to_float32_and_says_so(tmp_path, monkeypatch, capsys):
    import lmadapt.train as train

    corpus = write_markov_corpus(tmp_path / "corpus", lines=(60, 10, 10))
    calls = []

    def unsupported(model, device, amp):
        calls.append(amp)
        return "could not create a primitive descriptor (simulated)" if amp == "bf16" else None

    monkeypatch.setattr(train, "amp_problem", unsupported)
    out = tmp_path / "run"
    assert _cli(*_train_args(corpus, out, "--set", "train.amp=bf16")) == 0
    err = capsys.readouterr().err
    assert calls == ["bf16"]
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "training in float32" in warnings[0]
    meta = json.loads((out / runs.CONFIG).read_text())
    assert meta["precision"] == {"requested": "bf16", "used": "float32"}
    assert meta["train"]["amp"] == "none"
    assert json.loads((out / runs.RESULTS).read_text())["precision"] == "float32"


def test_the_amp_probe_leaves_the_rng_and_the_model_as_they_were():
    from lmadapt.model import LSTMLM
    from lmadapt.train import amp_problem

    model = LSTMLM(LMConfig(vocab_size=20, emb_size=8, hidden_size=8, num_layers=1)).eval()
    torch.manual_seed(3)
    before = torch.get_rng_state()
    assert amp_problem(model, torch.device("cpu"), "none") is None
    amp_problem(model, torch.device("cpu"), "bf16")  # supported or not, it must not disturb
    assert torch.equal(torch.get_rng_state(), before)
    assert not model.training and all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- bad values, every numeric setting


def _bad_values(default, rng) -> list[str]:
    """Values outside a field's declared range, plus non-finite and (for ints) fractional ones."""
    bad = ["nan", "inf", "-inf"]
    if isinstance(default, int) and not isinstance(default, bool):
        bad += ["1.5", "1e999"]
    if rng is not None and rng.lo is not None:
        bad.append(str(rng.lo if rng.lo_open else rng.lo - 1))
    if rng is not None and rng.hi is not None:
        bad.append(str(rng.hi if rng.hi_open else rng.hi + 1))
    return bad


def _config_cases():
    for section, cls in (("train", TrainConfig), ("model", LMConfig), ("data", DataConfig)):
        for f in dataclasses.fields(cls):
            default = getattr(cls(), f.name)
            if isinstance(default, bool) or not isinstance(default, (int, float, tuple)):
                continue
            rng = cls.RANGES.get(f.name)
            for v in _bad_values(default[0] if isinstance(default, tuple) else default, rng):
                value = f"[{v}, 0.9]" if isinstance(default, tuple) and v not in ("nan", "inf", "-inf") else v
                yield f"{section}.{f.name}", value


def _method_cases():
    for name, cls in REGISTRY.items():
        for f in dataclasses.fields(cls.Params):
            default = getattr(cls.Params(), f.name)
            if isinstance(default, bool) or not isinstance(default, (int, float)):
                continue
            for v in _bad_values(default, cls.Params.RANGES.get(f.name)):
                yield f"--{name}-{f.name.replace('_', '-')}", v
        if issubclass(cls, MixtureMethod):
            for v in ("nan", "-0.1", "1.5", "inf"):
                yield f"--lambda-{name}", v


def test_every_training_setting_declares_a_range():
    for cls in (TrainConfig, LMConfig):
        for f in dataclasses.fields(cls):
            default = getattr(cls(), f.name)
            if isinstance(default, (int, float, tuple)) and not isinstance(default, bool) and f.name != "seed":
                assert f.name in cls.RANGES, f"{cls.__name__}.{f.name} has no declared range"


@pytest.mark.parametrize("key, value", list(_config_cases()))
def test_bad_config_values_are_refused_before_any_work(key, value, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _cli("train", "--set", f"{key}={value}", "--out", tmp_path / "out") == 2
    assert key in _one_line_error(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value", list(_method_cases()))
def test_bad_method_values_are_refused_before_loading_anything(flag, value, tmp_path, capsys):
    method = flag[len("--lambda-"):] if flag.startswith("--lambda-") else flag[2:].split("-")[0]
    # The run directory does not exist: a value error must come first, without a traceback.
    assert _cli("eval", tmp_path / "no-run", "--method", method, f"{flag}={value}") == 2
    err = _one_line_error(capsys)
    assert flag in err


@pytest.mark.parametrize("argv, message", [
    (["eval", "RUN", "--threads", "-1"], "--threads"),
    (["eval", "RUN", "--segment", "0"], "--segment"),
    (["eval", "RUN", "--device", "gpu0"], "unknown --device 'gpu0'"),
    (["eval", "RUN", "--method", "mbpa++cache"], "empty part"),
    (["eval", "RUN", "--method", "mbpa", "--mbpa-k", "inf"], "--mbpa-k must be a finite integer"),
    (["eval", "RUN", "--method", "mbpa", "--mbpa-steps", "-1"], "--mbpa-steps must be >= 1"),
    (["tune", "RUN", "--method", "cache", "--out", "OUT", "--grid", "cache.theta=0.1,nan"], "cache-theta"),
    (["tune", "RUN", "--method", "cache", "--out", "OUT", "--grid", "lambda=0.1,nan"], "--grid lambda"),
    (["tune", "RUN", "--method", "cache", "--out", "OUT", "--max-passes", "0"], "--max-passes"),
    (["train", "--threads", "-1"], "--threads"),
    (["train", "--device", "cuda:x"], "unknown --device"),
    (["train", "--set", "train.max_steps=1e999"], "train.max_steps"),
    (["train", "--set", "train.betas=[0.9, 1.0]"], "train.betas"),
    (["train", "--set", "train.betas=0.9"], "train.betas"),
    (["train", "--set", "train.epochs=0"], "train.epochs must be >= 1"),
    (["report", "TOKENS", "--buckets", "0"], "--buckets"),
])
def test_bad_flags_table(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("RUN", str(tmp_path / "no-run")).replace("OUT", str(tmp_path / "o.json"))
            .replace("TOKENS", str(tmp_path / "t.pt")) for a in argv]
    assert _cli(*argv) == 2
    assert message in _one_line_error(capsys)


def test_bad_files_are_one_line_errors(finished_run, tmp_path, capsys):
    corpus, out = finished_run
    # --config holding a list, or values of the wrong type
    for content, message in (("[1, 2]", "must hold a JSON object"),
                             ('{"params": {"mbpa": {"k": "many"}}, "method": "mbpa"}', "--mbpa-k expects an integer"),
                             ('{"params": [1]}', "'params' must map"),
                             ('{"lambdas": {"cache": "x"}}', "lambdas.cache")):
        (tmp_path / "c.json").write_text(content)
        assert _cli("eval", out, "--config", tmp_path / "c.json") == 2
        assert message in _one_line_error(capsys)
    # a config.json that is a list
    fake = tmp_path / "fake-run"
    fake.mkdir()
    for name in (runs.CONFIG, runs.VOCAB, runs.BEST):
        (fake / name).write_bytes((out / name).read_bytes())
    (fake / runs.CONFIG).write_text("[]")
    assert _cli("eval", fake) == 2
    assert "must hold a JSON object" in _one_line_error(capsys)
    # random bytes as a checkpoint: no advice to unpickle untrusted data
    (fake / runs.CONFIG).write_bytes((out / runs.CONFIG).read_bytes())
    (fake / runs.BEST).write_bytes(os.urandom(4096))
    assert _cli("eval", fake) == 2
    err = _one_line_error(capsys)
    assert "cannot read checkpoint" in err and "weights_only" not in err
    # a tokens file that lacks keys
    torch.save({"format": "lmadapt-tokens", "version": 1, "targets": torch.zeros(3)}, tmp_path / "t.pt")
    assert _cli("report", tmp_path / "t.pt") == 2
    assert "damaged lmadapt tokens file" in _one_line_error(capsys)
    # train.txt that is a directory
    bad = write_markov_corpus(tmp_path / "bad-corpus", lines=(20, 5, 5))
    (bad / "train.txt").unlink()
    (bad / "train.txt").mkdir()
    assert _cli("train", "--data", bad, "--out", tmp_path / "r") == 2
    assert "is a directory" in _one_line_error(capsys)


def test_report_refuses_more_buckets_than_words(finished_run, tmp_path, capsys):
    corpus, out = finished_run
    tokens = tmp_path / "t.pt"
    assert _cli("eval", out, "--method", "cache", "--save-tokens", tokens) == 0
    capsys.readouterr()
    assert _cli("report", tokens, "--baseline", "lstm", "--method", "cache", "--buckets", 100000) == 2
    assert "distinct words" in _one_line_error(capsys)


def test_classify_bad_values(tmp_path, capsys):
    from lmadapt.classify.mnist import make_fake_mnist

    data = make_fake_mnist(tmp_path / "mnist", n_train=20, n_test=10)
    cases = [
        (["incremental", "--lr", "-1"], "--lr"),
        (["incremental", "--mbpa-alpha", "nan"], "--mbpa-alpha"),
        (["permuted-mnist", "--hidden", "0,100"], "--hidden must be >= 1"),
        (["permuted-mnist", "--memory-per-task", "10,nan"], "--memory-per-task"),
        (["curriculum", "--hebbian-gamma", "2"], "--hebbian-gamma"),
        (["permuted-mnist", "--alpha-grid", "0.1,inf"], "--alpha-grid"),
    ]
    for argv, message in cases:
        assert _cli("classify", *argv, "--data-dir", data, "--out", tmp_path / "o") == 2
        assert message in _one_line_error(capsys)
        assert not (tmp_path / "o").exists()
    # a damaged gzip file
    victim = next(data.glob("train-images*"))
    raw = victim.read_bytes()
    victim.write_bytes(raw[:20] + bytes(64) + raw[84:])
    with pytest.raises((OSError, EOFError, zlib.error)):  # still gzip-framed; its stream is not
        gzip.decompress(victim.read_bytes())
    assert victim.read_bytes()[:2] == b"\x1f\x8b"
    assert _cli("classify", "incremental", "--data-dir", data, "--out", tmp_path / "o", "--no-tune") == 2
    assert "cannot read" in _one_line_error(capsys)
