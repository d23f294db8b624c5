"""`lmadapt eval`, `tune` and `report` end to end on a tiny trained run."""

from __future__ import annotations

import json

import pytest
import torch

from lmadapt.evaluate import load_tokens
from lmadapt.report import bucket_report, frequency_buckets, method_log_probs

from conftest import cli as _cli
from conftest import write_markov_corpus


@pytest.fixture(scope="module")
def trained(tiny_run):
    return tiny_run.root, tiny_run.corpus, tiny_run.results


def test_eval_writes_table_json_and_tokens(trained, tmp_path, capsys):
    root, _, results = trained
    out_json, out_tok = tmp_path / "e.json", tmp_path / "t.pt"
    assert _cli("eval", root / "run", "--split", "test", "--method", "mbpa+cache", "--mbpa-memory", 50,
                "--mbpa-k", 8, "--lambda-mbpa", 0.1, "--lambda-cache", 0.2, "--json", out_json,
                "--save-tokens", out_tok) == 0
    table = capsys.readouterr().out
    assert "mbpa+cache" in table and "base (lstm)" in table
    rep = json.loads(out_json.read_text())
    assert set(rep["methods"]) == {"base", "mbpa+cache"} and rep["split"] == "test"
    # The streaming base model equals the trainer's batch-size-1 test perplexity.
    assert rep["methods"]["base"]["ppl"] == pytest.approx(results["test_ppl"], rel=1e-4)
    assert rep["tokens"] == results["test_tokens_scored"]
    entry = rep["methods"]["mbpa+cache"]
    assert entry["params"]["mbpa"]["k"] == 8 and entry["lambdas"] == {"mbpa": 0.1, "cache": 0.2}  # as given
    assert entry["tokens_per_second"] > 0
    tokens = load_tokens(out_tok)
    assert tokens["targets"].numel() == rep["tokens"]
    assert torch.exp(-tokens["methods"]["mbpa+cache"].double().mean()).item() == pytest.approx(entry["ppl"], rel=1e-6)
    # lstm+cache rebuilt from columns equals the same-pass figure in the report.
    ppl = torch.exp(-method_log_probs(tokens, "lstm+cache").double().mean()).item()
    assert ppl == pytest.approx(rep["mixtures_from_same_pass"]["cache"], rel=1e-6)


def test_tune_then_eval_with_config(trained, tmp_path):
    root, _, _ = trained
    best = tmp_path / "best.json"
    assert _cli("tune", root / "run", "--method", "mbpa+cache", "--out", best,
                "--grid", "mbpa.memory=40", "--grid", "mbpa.k=4,16", "--grid", "mbpa.steps=1",
                "--grid", "mbpa.alpha=0.1,1", "--grid", "cache.window=40", "--grid", "cache.theta=0.3,1",
                "--grid", "lambda=0,0.1,0.3") == 0
    b = json.loads(best.read_text())
    assert b["passes"] == 1 + 1  # the plain model, then all 6 mixer settings in one pass
    assert b["ppl"] <= b["base_ppl"] + 1e-9  # λ = 0 is in the grid
    # The same sweep gives the best smaller mixtures; none can beat the joint best.
    assert {"cache", "mbpa", "mbpa+cache"} <= set(b["subsets"])
    for key, sub in b["subsets"].items():
        assert sub["ppl"] >= b["ppl"] - 1e-9
        assert set(sub["lambdas"]) == set(key.split("+")) - {"base"}
    # Applying the tuned config reproduces the tuned perplexity.
    out = tmp_path / "e.json"
    assert _cli("eval", root / "run", "--config", best, "--json", out) == 0
    rep = json.loads(out.read_text())
    assert rep["methods"]["mbpa+cache"]["ppl"] == pytest.approx(b["ppl"], rel=1e-5)


def test_a_dyneval_config_without_lr_power_runs_the_square_root_rule(trained, tmp_path):
    # Configs written before `lr_power` existed hold `lr_scaled` alone and ran p 0.5: replayed
    # through --config they must give their recorded figure, not today's default power.
    root, _, _ = trained
    common = ["--split", "valid", "--tokens", 60, "--method", "dyneval", "--dyneval-variant", "sgd",
              "--dyneval-decay", 0]
    flags = {}
    for power in (0.5, 0.75):
        out = tmp_path / f"flags-{power}.json"
        assert _cli("eval", root / "run", *common, "--dyneval-lr-scaled", 0.5, "--dyneval-lr-power", power,
                    "--json", out) == 0
        flags[power] = json.loads(out.read_text())["methods"]["dyneval"]["ppl"]
    assert abs(flags[0.5] - flags[0.75]) > 1e-3 * flags[0.5]  # the power matters on this model
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"method": "dyneval", "params": {"dyneval": {"lr": 0.0, "lr_scaled": 0.5}}}))
    out = tmp_path / "replay.json"
    assert _cli("eval", root / "run", *common[:4], "--dyneval-variant", "sgd", "--dyneval-decay", 0,
                "--config", old, "--json", out) == 0
    rep = json.loads(out.read_text())
    assert rep["params"]["dyneval"]["lr_power"] == 0.5
    assert rep["methods"]["dyneval"]["ppl"] == pytest.approx(flags[0.5], rel=1e-9)


def test_tune_on_a_prefix_scores_only_that_prefix(trained, tmp_path):
    root, _, _ = trained
    best = tmp_path / "best.json"
    assert _cli("tune", root / "run", "--method", "cache", "--tokens", 60, "--out", best,
                "--grid", "cache.window=20", "--grid", "cache.theta=0.3,1", "--grid", "lambda=0.1,0.3") == 0
    b = json.loads(best.read_text())
    assert b["tokens"] == 60
    # The same prefix through eval gives the tuned figures; the whole split gives others.
    prefix, whole = tmp_path / "p.json", tmp_path / "w.json"
    assert _cli("eval", root / "run", "--config", best, "--tokens", 60, "--json", prefix) == 0
    assert _cli("eval", root / "run", "--config", best, "--json", whole) == 0
    p, w = json.loads(prefix.read_text()), json.loads(whole.read_text())
    assert p["tokens"] == 60 and w["tokens"] > 60
    assert p["methods"]["cache"]["ppl"] == pytest.approx(b["ppl"], rel=1e-6)
    assert p["methods"]["base"]["ppl"] == pytest.approx(b["base_ppl"], rel=1e-6)
    assert w["methods"]["base"]["ppl"] != pytest.approx(b["base_ppl"], rel=1e-6)


def test_report_buckets_and_outputs(trained, tmp_path):
    root, _, _ = trained
    tok = tmp_path / "t.pt"
    assert _cli("eval", root / "run", "--method", "cache", "--save-tokens", tok) == 0
    md = tmp_path / "r.md"
    assert _cli("report", tok, "--baseline", "lstm", "--method", "lstm+cache", "--buckets", 3, "--out", md) == 0
    assert md.read_text().count("\n| ") >= 4
    rep = json.loads(md.with_suffix(".json").read_text())
    assert [r["bucket"] for r in rep["buckets"]] == [1, 2, 3]
    assert sum(r["tokens"] for r in rep["buckets"]) == load_tokens(tok)["targets"].numel()
    assert md.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert rep["buckets"][0]["train_freq_min"] >= rep["buckets"][-1]["train_freq_max"]


def test_report_across_two_tokens_files(trained, tmp_path, capsys):
    root, _, _ = trained
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    assert _cli("eval", root / "run", "--method", "cache", "--save-tokens", a) == 0
    assert _cli("eval", root / "run", "--method", "cache", "--lambda-cache", 0.3, "--save-tokens", b) == 0
    md = tmp_path / "x.md"
    # lstm of file a vs lstm+cache of file b == the same comparison within file b
    assert _cli("report", a, "--baseline", "lstm", "--method", "lstm+cache", "--method-tokens", b,
                "--buckets", 2, "--out", md) == 0
    across = json.loads(md.with_suffix(".json").read_text())
    within = bucket_report(load_tokens(b), "lstm", "lstm+cache", 2)
    assert across["overall"]["ppl_method"] == pytest.approx(within["overall"]["ppl_method"], rel=1e-9)
    assert across["method"].endswith("[b.pt]")
    other = load_tokens(b)
    other["targets"] = other["targets"].flip(0)
    with pytest.raises(Exception, match="different streams"):
        bucket_report(load_tokens(a), "lstm", "lstm", 2, method_tokens=other)


def test_frequency_buckets_are_balanced_and_ordered():
    counts = torch.tensor([100, 50, 10, 5, 1, 1])
    targets = torch.tensor([0] * 4 + [1] * 4 + [2] * 4 + [3] * 2 + [4] * 1 + [5] * 1)
    ids = frequency_buckets(targets, counts, 4)
    assert ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4


@pytest.mark.parametrize("args, message", [
    (["--method", "mbpa+cahce"], "valid methods: base, dyneval, knn, mbpa, cache"),
    (["--method", "cache", "--lambda-cache", "1.5"], "must be in [0, 1]"),
    (["--method", "mbpa+cache", "--lambda-cache", "0.6", "--lambda-mbpa", "0.6"], "sum to 1.2"),
    (["--method", "mbpa", "--mbpa-k", "600", "--mbpa-memory", "500"], "larger than its memory"),
    (["--method", "mbpa", "--mbpa-k", "0"], "--mbpa-k must be >= 1"),
    (["--method", "mbpa", "--mbpa-k", "abc"], "--mbpa-k expects an integer"),
    (["--method", "mbpa", "--mbpa-adapt", "both"], "mbpa adapt must be one of all, weight, bias"),
    (["--method", "dyneval", "--dyneval-lr-power", "-1"], "--dyneval-lr-power must be >= 0, got -1"),
])
def test_eval_bad_input(trained, tmp_path, capsys, args, message):
    root, _, _ = trained
    out = tmp_path / "x.json"
    assert _cli("eval", root / "run", *args, "--json", out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmadapt: error:") and len(err.splitlines()) == 1 and message in err
    assert not out.exists()


def test_eval_help_describes_method_settings(capsys):
    # A method's HELP text reaches `eval --help` beside its default, not only the default.
    assert _cli("eval", "--help") == 0
    text = " ".join(capsys.readouterr().out.split())
    assert ("--dyneval-lr-power FLOAT p of the scaled η = c / (mean squared norm of the output layer's inputs) "
            "** p (default 0.75)") in text
    assert "--cache-theta-scaled FLOAT c of the scaled θ" in text


def test_eval_missing_run_and_vocab_mismatch(trained, tmp_path, capsys):
    root, _, _ = trained
    assert _cli("eval", tmp_path / "nope", "--method", "cache") == 2
    assert "run directory not found" in capsys.readouterr().err
    other = write_markov_corpus(tmp_path / "other", seed=7, words=25)
    assert _cli("eval", root / "run", "--data", other, "--method", "cache") == 2
    assert "does not match corpus" in capsys.readouterr().err


@pytest.mark.parametrize("lr, warned", [(5.0, True), (0.0, False)])
def test_eval_warns_when_dyneval_makes_the_model_worse(trained, tmp_path, capsys, lr, warned):
    from conftest import copy_run

    run = copy_run(trained[0] / "run", tmp_path / "run")  # dyneval caches its statistics in the run
    assert _cli("eval", run, "--split", "test", "--method", "dyneval", "--dyneval-lr", lr, "--dyneval-variant",
                "sgd", "--tokens", 150, "--threads", 1) == 0
    assert ("made perplexity worse than the base model" in capsys.readouterr().err) == warned


def test_cache_selects_online_by_default_and_old_configs_run_one_cache(trained, tmp_path, capsys):
    root, _, _ = trained
    common = ("eval", root / "run", "--split", "test", "--method", "cache", "--cache-window", 40)
    assert _cli(*common, "--json", tmp_path / "online.json") == 0
    assert "cache: selected window " in capsys.readouterr().out
    online = json.loads((tmp_path / "online.json").read_text())["methods"]["cache"]
    assert online["params"]["cache"]["select"] is True
    picks = online["summary"]["cache"]["selected"]
    assert len(picks) == 3 and picks[0]["window"] in (4, 8, 16, 40) and 0 < picks[0]["weight"] <= 1
    assert _cli(*common, "--cache-no-select", "--json", tmp_path / "single.json") == 0
    single = json.loads((tmp_path / "single.json").read_text())["methods"]["cache"]
    assert single["params"]["cache"]["select"] is False and "summary" not in single
    assert single["ppl"] != pytest.approx(online["ppl"], rel=1e-6)
    # A --config written before `select` existed names no `select`: it ran one cache of its window.
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"method": "cache", "params": {"cache": {"window": 40, "theta": 0.0, "theta_scaled": 6.7}},
                               "lambdas": {"cache": 0.2}}))
    assert _cli("eval", root / "run", "--split", "test", "--config", old, "--json", tmp_path / "old-out.json") == 0
    replay = json.loads((tmp_path / "old-out.json").read_text())["methods"]["cache"]
    assert replay["ppl"] == pytest.approx(single["ppl"], rel=1e-9) and replay["params"]["cache"]["select"] is False


def test_mbpa_selects_its_memory_online_by_default_and_old_configs_run_one_memory(trained, tmp_path, capsys):
    root, _, _ = trained
    common = ("eval", root / "run", "--split", "test", "--method", "mbpa", "--mbpa-memory", 40, "--mbpa-k", 4)
    assert _cli(*common, "--json", tmp_path / "online.json") == 0
    assert "mbpa: selected memory " in capsys.readouterr().out
    online = json.loads((tmp_path / "online.json").read_text())["methods"]["mbpa"]
    assert online["params"]["mbpa"]["select"] is True
    picks = online["summary"]["mbpa"]["selected"]
    assert {p["memory"] for p in picks} == {10, 40} and sum(p["weight"] for p in picks) == pytest.approx(1, abs=1e-3)
    assert picks[0]["weight"] >= picks[1]["weight"]
    assert _cli(*common, "--mbpa-no-select", "--json", tmp_path / "single.json") == 0
    single = json.loads((tmp_path / "single.json").read_text())["methods"]["mbpa"]
    assert single["params"]["mbpa"]["select"] is False and "summary" not in single
    assert single["ppl"] != pytest.approx(online["ppl"], rel=1e-6)
    # A --config written before `select` existed names no `select`: it ran one memory of N.
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"method": "mbpa", "params": {"mbpa": {"memory": 40, "k": 4}}, "lambdas": {"mbpa": 0.15}}))
    assert _cli("eval", root / "run", "--split", "test", "--config", old, "--json", tmp_path / "old-out.json") == 0
    replay = json.loads((tmp_path / "old-out.json").read_text())["methods"]["mbpa"]
    assert replay["ppl"] == pytest.approx(single["ppl"], rel=1e-9) and replay["params"]["mbpa"]["select"] is False


def test_a_mixture_has_its_own_default_lambdas_and_given_ones_win():
    # mbpa+cache at the methods' own λs (0.15 + 0.2) was chosen against on the recipe models
    # (bench/defaults/results/choice-mbpasel.json): inside it MbPA takes 0.1 and the cache 0.15.
    from lmadapt.evaluate import mixture_lambdas

    assert mixture_lambdas(["mbpa", "cache"], {}) == {"mbpa": 0.1, "cache": 0.15}
    assert mixture_lambdas(["dyneval", "mbpa", "cache"], {}) == {"mbpa": 0.1, "cache": 0.15}
    assert mixture_lambdas(["cache"], {}) == {"cache": 0.2} and mixture_lambdas(["mbpa"], {}) == {"mbpa": 0.15}
    assert mixture_lambdas(["knn", "mbpa", "cache"], {}) == {"knn": 0.25, "mbpa": 0.15, "cache": 0.2}
    assert mixture_lambdas(["mbpa", "cache"], {"cache": 0.3}) == {"mbpa": 0.1, "cache": 0.3}


def test_eval_help_names_a_mixtures_own_default(capsys):
    assert _cli("eval", "--help") == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--lambda-cache LAMBDA__CACHE mixture weight in [0, 1] (default 0.2; 0.15 in mbpa+cache)" in text
    assert "--lambda-mbpa LAMBDA__MBPA mixture weight in [0, 1] (default 0.15; 0.1 in mbpa+cache)" in text
