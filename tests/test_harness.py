"""lmadapt inside lm-evaluation-harness (lmadapt.harness, `lmadapt harness`): the same numbers as
lm-eval's own hf model with method=none, every method in both adaptation scopes, document scope
resetting state. Skipped where lm-eval is not installed (the [harness] extra)."""

from __future__ import annotations

import builtins
import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from conftest import tiny_config, write_markov_corpus  # noqa: E402

from lmadapt.cli import main  # noqa: E402
from lmadapt.corpus import load_corpus  # noqa: E402
from lmadapt.train import fit  # noqa: E402

CONTEXT = 16
GPT2 = ["model.arch=gpt2", "model.n_layer=1", "model.n_embd=16", "model.n_head=2", f"model.context={CONTEXT}",
        "model.dropout=0.1", "train.lr=0.01", "train.eval_interval=0", "train.epochs=1"]
METHODS = ["none", "cache", "mbpa", "dyneval", "mbpa+cache", "dyneval+mbpa+cache"]
SMALL = "mbpa_k=8,mbpa_memory=200,cache_window=100,dyneval_stat_batch=4,dyneval_lr=0.001"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No hub, and no cache written outside the test's folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_home" / "datasets"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def our_tasks_only(monkeypatch):
    """lm-eval's CLI indexes its own thousands of task files on every run (seconds each time);
    the runs here use only lmadapt's tasks."""
    from lm_eval.tasks import TaskManager

    real = TaskManager.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **{**kwargs, "include_defaults": False})

    monkeypatch.setattr(TaskManager, "__init__", init)


def _page(i: int, lines: list[str]) -> str:
    return f" = Doc {i} = \n" + "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A GPT-2-architecture run trained by lmadapt (saved in HF format too), an LSTM run, and a
    3-document WikiText-style file whose documents span several windows of CONTEXT tokens."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("harness")
    corpus_dir = write_markov_corpus(root / "corpus", lines=(150, 30, 30))
    no_periodic = ["train.checkpoint_interval=1000"]  # nothing here resumes
    fit(root / "gpt2", tiny_config(corpus_dir, GPT2 + no_periodic), load_corpus(str(corpus_dir)))
    fit(root / "lstm", tiny_config(corpus_dir, ["train.epochs=1", "train.eval_interval=0", *no_periodic]),
        load_corpus(str(corpus_dir)))
    lines = (corpus_dir / "test.txt").read_text().splitlines()
    pages = [_page(1, lines[:3]), _page(2, lines[3:10]), _page(3, lines[10:14])]
    (root / "docs.txt").write_text("".join(pages))
    other = _page(9, lines[20:26])  # a different first document
    return SimpleNamespace(root=root, gpt2=root / "gpt2", hf=root / "gpt2" / "hf", lstm=root / "lstm",
                           docs=root / "docs.txt", pages=pages, other=other, corpus=corpus_dir)


def harness_results(model: str, model_args: str, tasks: list[str], task_file: Path, **kw) -> dict:
    from lm_eval.tasks import TaskManager

    from lmadapt.harness import TASK_DIR

    # Our tasks only: indexing lm-eval's own thousands of task files takes seconds per call.
    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata={"task_file": str(task_file)})
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=tm,
                                   device="cpu", batch_size=1, **kw)


def metric(results: dict, task: str, name: str) -> float:
    return results["results"][task][f"{name},none"]


# ------------------------------------------------------------------ equality with lm-eval's hf model


def test_method_none_matches_lm_evals_own_hf_model(runs):
    from lmadapt.tasks.utils import split_documents

    from lmadapt.harness import LmadaptLM

    # the documents are several windows long and the last window is short: the whole policy is exercised
    lm = LmadaptLM(hf_model=str(runs.hf))
    lengths = [len(lm.encoder.encode(p)) for p in split_documents(runs.docs.read_text())]
    assert len(lengths) == 3 and all(n > 2 * CONTEXT and n % CONTEXT for n in lengths)

    tasks = ["lmadapt_wikitext_local", "lmadapt_wikitext_local_tokenized"]
    stock = harness_results("hf", f"pretrained={runs.hf}", tasks, runs.docs)
    ours = harness_results("lmadapt", f"hf_model={runs.hf},method=none", tasks, runs.docs)
    from_run = harness_results("lmadapt", f"run={runs.gpt2},method=none", tasks[1:], runs.docs)
    for task in tasks:
        for name in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
            assert metric(ours, task, name) == pytest.approx(metric(stock, task, name), rel=1e-4), (task, name)
    assert metric(from_run, tasks[1], "word_perplexity") == pytest.approx(
        metric(stock, tasks[1], "word_perplexity"), rel=1e-4)
    # the settings are recorded in the results
    info = ours["config"]["lmadapt"]
    assert (info["scope"], info["context"], info["max_length"], info["method"]) == ("document", "windows", CONTEXT,
                                                                                   "base")
    # the context policy is what makes them equal: the backbone's own sliding window differs
    carry = harness_results("lmadapt", f"hf_model={runs.hf},context=carry", tasks[1:], runs.docs)
    assert metric(carry, tasks[1], "word_perplexity") != pytest.approx(
        metric(stock, tasks[1], "word_perplexity"), rel=1e-4)


def test_loglikelihood_matches_lm_evals_hf_model(runs):
    from lm_eval.models.huggingface import HFLM

    from lmadapt.harness import LmadaptLM

    words = runs.pages[1].split()
    reqs = [SimpleNamespace(args=(" ".join(words[:5]), " " + " ".join(words[5:9]))),
            SimpleNamespace(args=("", " ".join(words[:3]))),
            SimpleNamespace(args=(" ".join(words[:30]), " " + words[30])),  # context longer than the window
            # a continuation that crosses the window's end: lm-eval's hf model scores it in one
            # window of the last max_length tokens; so must the windows policy
            SimpleNamespace(args=(" ".join(words[:12]), " " + " ".join(words[12:21])))]
    stock = HFLM(pretrained=str(runs.hf), device="cpu", batch_size=1).loglikelihood(reqs, disable_tqdm=True)
    ours = LmadaptLM(hf_model=str(runs.hf)).loglikelihood(reqs)
    for (a, ga), (b, gb) in zip(ours, stock):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-4)
        assert ga == gb


# ------------------------------------------------------------------ every method, both scopes


def rolling(lm, pages: list[str]) -> list[float]:
    return lm.loglikelihood_rolling([SimpleNamespace(args=(p,)) for p in pages])


def make(runs, backbone: str, method: str, scope: str, context: str = "windows"):
    from lmadapt.harness import LmadaptLM

    settings = {k: v for k, v in (kv.split("=") for kv in SMALL.split(","))
                if k.split("_")[0] in method.split("+")}
    settings = {k: (float(v) if "." in v else int(v)) for k, v in settings.items()}
    return LmadaptLM(run=str(getattr(runs, backbone)), method=method, scope=scope, context=context, **settings)


@pytest.mark.parametrize("backbone", ["gpt2", "lstm"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_in_both_scopes_and_document_scope_resets(runs, backbone, method):
    pages, other = runs.pages, runs.other
    doc = make(runs, backbone, method, "document")
    a, b = rolling(doc, pages), rolling(doc, [other, *pages[1:]])
    assert all(math.isfinite(x) and x < 0 for x in a + b)
    # document scope: the later documents' scores do not depend on the first document
    assert a[1:] == b[1:]
    assert rolling(doc, pages[1:2]) == a[1:2]

    stream = make(runs, backbone, method, "stream")
    s, t = rolling(stream, pages), rolling(stream, [other, *pages[1:]])
    assert all(math.isfinite(x) and x < 0 for x in s + t)
    assert s[0] == pytest.approx(a[0], rel=1e-5)  # the first document sees nothing before it in either scope
    if method == "none":
        # no adaptation: the windows policy makes the two scopes the same
        assert s == pytest.approx(a, rel=1e-5)
    else:
        # stream scope carries memories/weights: the second document's score depends on the first
        assert s[1] != pytest.approx(t[1], rel=1e-6)
        assert s[1] != pytest.approx(a[1], rel=1e-6)


def test_dyneval_statistics_are_computed_once_per_process_not_per_document(runs, monkeypatch):
    """Document scope restarts dyneval per document; its gradient statistics depend only on the
    model and the training text, so they are computed once and reused (same scores)."""
    from lmadapt.methods import dyneval

    calls = []
    real = dyneval.gradient_rms
    monkeypatch.setattr(dyneval, "gradient_rms", lambda *a, **k: calls.append(1) or real(*a, **k))
    dyneval._RECENT.clear()
    for f in runs.gpt2.glob("dyneval-stats-*.pt"):  # left by earlier tests on this run
        f.unlink()
    doc = make(runs, "gpt2", "dyneval", "document")
    once = rolling(doc, runs.pages)
    assert len(calls) == 1
    dyneval._RECENT.clear()  # a new process: read from the run directory, as `lmadapt eval` does
    assert len(list(runs.gpt2.glob("dyneval-stats-*.pt"))) == 1
    assert rolling(make(runs, "gpt2", "dyneval", "document"), runs.pages[1:2]) == once[1:2]
    assert len(calls) == 1
    for f in runs.gpt2.glob("dyneval-stats-*.pt"):  # without the cached file: recomputed, the same score
        f.unlink()
    dyneval._RECENT.clear()
    assert rolling(make(runs, "gpt2", "dyneval", "document"), runs.pages[1:2]) == once[1:2]
    assert len(calls) == 2
    # another window length makes other statistics: a separate cache entry
    dyneval._RECENT.clear()
    settings = {"dyneval_stat_batch": 4, "dyneval_lr": 0.001, "max_length": 8}
    from lmadapt.harness import LmadaptLM

    rolling(LmadaptLM(run=str(runs.gpt2), method="dyneval", scope="document", **settings), runs.pages[1:2])
    assert len(calls) == 3
    assert len(list(runs.gpt2.glob("dyneval-stats-*.pt"))) == 2


def test_greedy_choices_are_not_recorded_during_the_statistics_pass(runs, monkeypatch):
    """The statistics pass runs through the same wrapper at batch > 1; recording its argmax there
    kept thousands of small tensors alive among that pass's large freed blocks and grew the
    process by ~3 MB a step on WikiText-2. Only the scored stream (batch 1) is recorded."""
    from lmadapt import harness
    from lmadapt.methods import dyneval

    in_stats, recorded = [False], []
    real_rms = dyneval.gradient_rms

    def rms(*a, **k):
        in_stats[0] = True
        try:
            return real_rms(*a, **k)
        finally:
            in_stats[0] = False

    real_append = harness._Sink.append
    monkeypatch.setattr(dyneval, "gradient_rms", rms)
    monkeypatch.setattr(harness._Sink, "append", lambda self, x: recorded.append(in_stats[0]) or real_append(self, x))
    dyneval._RECENT.clear()
    for f in runs.lstm.glob("dyneval-stats-*.pt"):  # so that the statistics pass runs here
        f.unlink()
    rolling(make(runs, "lstm", "dyneval", "document"), runs.pages[:1])
    assert recorded and not any(recorded)


def test_carry_context_in_stream_scope_carries_the_lstm_state(runs):
    doc = make(runs, "lstm", "none", "document", "carry")
    stream = make(runs, "lstm", "none", "stream", "carry")
    a, s = rolling(doc, runs.pages), rolling(stream, runs.pages)
    assert s[0] == pytest.approx(a[0], rel=1e-6) and s[1] != pytest.approx(a[1], rel=1e-6)


# ------------------------------------------------------------------ CLI, tasks, errors


def test_cli_runs_the_harness_and_records_the_scope(runs, tmp_path, capsys, our_tasks_only):
    out = tmp_path / "out"
    code = main(["harness", "--task-file", str(runs.docs), "--model", "lmadapt", "--model_args",
                 f"run={runs.lstm},method=cache,scope=stream,lambda_cache=0.2,cache_window=100",
                 "--tasks", "lmadapt_wikitext_local_tokenized", "--device", "cpu", "--output_path", str(out)])
    assert code == 0
    assert "word_perplexity" in capsys.readouterr().out
    (result_file,) = out.rglob("results_*.json")
    results = json.loads(result_file.read_text())
    info = results["config"]["lmadapt"]
    assert (info["scope"], info["method"], info["lambdas"]) == ("stream", "cache", {"cache": 0.2})
    # every setting the row ran with, the defaults too, so the figure stays reproducible
    from lmadapt.methods.cache import CacheParams

    assert info["params"] == {"cache": {**dataclasses.asdict(CacheParams()), "window": 100}}
    assert results["configs"]["lmadapt_wikitext_local_tokenized"]["metadata"]["form"] == "tokenized"
    assert not (Path.home() / ".cache" / "huggingface" / "datasets" / "lmadapt").exists()


def test_cli_without_device_runs_where_there_is_no_cuda(runs, tmp_path, monkeypatch, our_tasks_only):
    # lm-eval's CLI default is cuda:0; without CUDA `lmadapt harness` must fall back to the CPU
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    code = main(["harness", "--task-file", str(runs.docs), "--model", "lmadapt", "--model_args",
                 f"run={runs.lstm},method=none", "--tasks", "lmadapt_wikitext_local_tokenized",
                 "--output_path", str(out)])
    assert code == 0
    (result_file,) = out.rglob("results_*.json")
    assert json.loads(result_file.read_text())["config"]["device"] == "cpu"


@pytest.mark.parametrize("args, message", [
    ("method=cahce", "unknown method"),
    ("method=cache,mbpa_k=3", "mbpa is not part of method=cache"),
    ("scope=corpus", "scope must be one of"),
    ("context=sliding", "context must be one of"),
    ("method=cache,lambda_cache=1.5", "lambda"),
    ("colour=blue", "unknown lmadapt model_args colour"),
])
def test_bad_model_args_are_refused(runs, args, message):
    from lmadapt.errors import LmadaptError
    from lmadapt.harness import LmadaptLM

    # as lm-eval builds the model from --model_args
    with pytest.raises(LmadaptError, match=message):
        LmadaptLM.create_from_arg_string(f"run={runs.lstm},{args}", {"batch_size": 1, "device": "cpu"})


def test_a_config_without_lr_power_keeps_the_square_root_rule(runs, tmp_path):
    # as `eval --config`: a file from before `lr_power` existed ran p 0.5
    from lmadapt.harness import LmadaptLM

    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps({"method": "dyneval", "params": {"dyneval": {"lr": 0.0, "lr_scaled": 2e-4}}}))
    new.write_text(json.dumps({"method": "dyneval", "params": {"dyneval": {"lr_scaled": 2e-4, "lr_power": 1.0}}}))
    for path, power in ((old, 0.5), (new, 1.0)):
        lm = LmadaptLM.create_from_arg_string(f"run={runs.lstm},config={path}", {"batch_size": 1, "device": "cpu"})
        assert lm.params["dyneval"]["lr_power"] == power


def test_bad_model_args_are_a_one_line_error_from_the_cli(runs, capsys, our_tasks_only):
    code = main(["harness", "--task-file", str(runs.docs), "--model", "lmadapt", "--model_args",
                 f"run={runs.lstm},colour=blue", "--tasks", "lmadapt_wikitext_local", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == ("lmadapt: error: unknown lmadapt model_args colour; see `lmadapt harness "
                                     "--help` and docs/harness.md")


def test_generation_is_refused(runs):
    from lmadapt.errors import LmadaptError
    from lmadapt.harness import LmadaptLM

    with pytest.raises(LmadaptError, match="not supported"):
        LmadaptLM(run=str(runs.lstm)).generate_until([SimpleNamespace(args=("a", {}))])


def test_missing_lm_eval_is_a_one_line_error(monkeypatch, capsys, tmp_path):
    real = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    assert main(["harness", "--model", "lmadapt", "--tasks", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "lmadapt[harness]" in err


def test_task_file_documents():
    from lmadapt.tasks.utils import split_documents

    wiki = " \n = A = \n \n x y \n = = Sub = = \n z \n = B = \n w \n"
    pages = split_documents(wiki)
    assert len(pages) == 2 and " = = Sub = = " in pages[0] and pages[1].startswith(" = B = ")
    assert split_documents("one two\nthree\n\n\nfour\n\nfive six\n") == ["one two\nthree\n", "four\n", "five six\n"]
