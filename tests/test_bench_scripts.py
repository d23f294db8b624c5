"""The bench scripts: they import against the installed package, and the pieces whose
figures the docs report compute what they claim (bench/ is not a package)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from conftest import motif_stream, tiny_lm
from lmadapt.methods import REGISTRY
from lmadapt.report import frequency_buckets
from lmadapt.tune import DEFAULT_LAMBDA_GRID

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(BENCH.rglob("*.py"))


def _load(relpath: str):
    """Import bench/RELPATH as `python bench/RELPATH` would see it (its folder first on sys.path),
    without running its main."""
    path = BENCH / relpath
    name = "bench_" + relpath.replace("/", "_").removesuffix(".py")
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def test_bench_is_organised_by_experiment():
    """bench/<experiment>/ holds its scripts and results/; nothing loose at the top."""
    assert not [p.name for p in BENCH.iterdir() if p.is_file()]
    for folder in (p for p in BENCH.iterdir() if p.is_dir() and p.name != "out"):
        assert [*folder.glob("*.py"), *folder.glob("*.sh")], f"bench/{folder.name} has no script"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(BENCH)))
def test_bench_script_imports_the_installed_package(script):
    """Every script imports cleanly and none edits sys.path to find lmadapt."""
    assert not re.search(r"sys\.path\s*(?:\.\w+\(|\[|\+?=)", script.read_text())
    if script.name == "run.py" and script.parent.name == "kv_window":
        pytest.importorskip("transformers")
    _load(str(script.relative_to(BENCH)))


def test_table2_grids_are_the_methods_own():
    t2 = _load("table2/run.py")
    for segment in (5, 20):
        dyneval = REGISTRY["dyneval"].grid_for({"segment": segment})
        tune_grid = t2.experiment_grid("tune", segment)
        assert tune_grid["dyneval"] == dyneval
        assert tune_grid["lambda"] == DEFAULT_LAMBDA_GRID
        for name in ("mbpa", "cache"):
            assert tune_grid[name] == REGISTRY[name].grid_for({})
        for size in ("small", "local", "tiny"):
            grid = t2.experiment_grid(size, segment)["dyneval"]
            assert grid["lr"] and set(grid["lr"]) <= set(dyneval["lr"])
            assert grid["decay"] and set(grid["decay"]) <= set(dyneval["decay"])
    assert t2.experiment_grid("small", 20)["dyneval"]["lr"] == [4 * v for v in t2.experiment_grid("small", 5)["dyneval"]["lr"]]


def test_bucket_mass_json_is_the_recorded_printout():
    """The committed JSON is what mass_from_log.py makes of the printout, and it matches the
    printout's rounded table."""
    conv = _load("hebbian/mass_from_log.py")
    for txt in sorted((BENCH / "hebbian" / "results").glob("bucket-mass-*.txt")):
        src = str(txt.relative_to(BENCH.parent))
        made = conv.convert(txt.read_text(), src)
        assert json.loads(txt.with_suffix(".json").read_text()) == made
        table = {line.split("|")[1].strip(): [float(v) for v in line.split("|")[2:-1]]
                 for line in txt.read_text().splitlines() if line.startswith("| ") and "bucket 1" not in line}
        for run, r in made["runs"].items():
            assert table[run] == [round(m, 4) for m in r["mass"]]
            assert table["targets"] == [round(m, 4) for m in r["target_share"]]


def test_bucket_mass_matches_report_buckets_and_a_direct_sum(one_thread):
    bm = _load("hebbian/bucket_mass.py")
    vocab = 30
    stream = motif_stream(400, vocab)
    # train counts with distinct values, so no type ties across a bucket edge
    train_counts = torch.randperm(vocab, generator=torch.Generator().manual_seed(3)) * 7 + 1
    kinds = bm.type_buckets(stream[1:], train_counts, 4)
    assert torch.equal(kinds[stream[1:]], frequency_buckets(stream[1:], train_counts, 4))
    # bucket 0 holds the most frequent types
    assert train_counts[kinds == 0].min() > train_counts[kinds == 3].max()

    model = tiny_lm(vocab)
    mass = bm.bucket_mass(model, stream, kinds, 4, rows=4, bptt=7)  # chunked, state carried
    assert abs(mass.sum().item() - 1) < 1e-5
    n = (stream.numel() - 1) // 4 * 4
    with torch.no_grad():
        _, logits, _ = model(stream[:n].view(4, -1))
    probs = logits.softmax(-1)
    direct = torch.stack([probs[..., kinds == b].sum(-1).mean() for b in range(4)])
    torch.testing.assert_close(mass, direct, atol=1e-5, rtol=1e-5)

    # raising the bias of the rarest bucket's types moves mass there
    with torch.no_grad():
        model.decoder.bias[kinds == 3] += 2.0
    assert bm.bucket_mass(model, stream, kinds, 4, rows=4)[3] > mass[3] + 0.05


def _columns(seed: int, n: int = 400) -> dict:
    """Sweep-style per-token columns: a base and two settings of each of two mixture methods,
    with some tokens where a method is unavailable (its λ mass goes back to the base)."""
    g = torch.Generator().manual_seed(seed)
    lp = lambda: torch.log(torch.rand(n, generator=g, dtype=torch.float64) * 0.5 + 1e-3)  # noqa: E731
    avail = lambda: torch.rand(n, generator=g) > 0.1  # noqa: E731
    return {"base": lp(), "mbpa:a=1": (lp(), avail()), "mbpa:a=2": (lp(), avail()),
            "cache:w=1": (lp(), avail()), "cache:w=2": (lp(), avail())}


def test_choose_mixture_candidates_equal_the_log_space_mixture():
    """choose.py mixes in probability space, vectorised over λ tuples; every candidate must be
    the perplexity lmadapt.mix gives for the same columns and λ (the function eval uses)."""
    from lmadapt.mix import mix_log_probs, perplexity

    choose = _load("defaults/choose.py")
    cols = _columns(0)
    sweep = {"lambdas": [0.05, 0.3, 0.6]}
    got = choose.mixture_candidates(sweep, cols, ["mbpa", "cache"])
    assert len(got) == 4 * 8  # 2x2 settings; the λ pairs with sum <= 1 (0.6+0.6 is left out)
    base = perplexity(cols["base"])
    for (keys, lams), delta in got.items():
        comps = {n: cols[f"{n}:{k}"] for n, k in zip(["mbpa", "cache"], keys)}
        ppl = perplexity(mix_log_probs(cols["base"], comps, dict(zip(["mbpa", "cache"], lams))))
        assert delta == pytest.approx(100 * (ppl / base - 1), abs=1e-9)


def test_choose_mixture_minimises_the_largest_shortfall(tmp_path):
    """The joint λ is the tuple (at each method's chosen setting) whose worst shortfall from any
    model's own best mixture is smallest: recomputed here by brute force over the candidates."""
    choose = _load("defaults/choose.py")
    sweeps, files = [], []
    for seed in (1, 2, 3):
        path = tmp_path / f"cols{seed}.pt"
        torch.save(_columns(seed), path)
        sweeps.append({"model": f"m{seed}", "lambdas": [0.05, 0.1, 0.2, 0.3]})
        files.append(str(path))
    methods = {"mbpa": {"chosen": {"setting": "a=2", "lambda": 0.05}},
               "cache": {"chosen": {"setting": "w=1", "lambda": 0.2}}}
    out = choose.choose_mixture("mbpa+cache", sweeps, files, methods)
    fulls = [choose.mixture_candidates(s, torch.load(f, weights_only=True), ["mbpa", "cache"])
             for s, f in zip(sweeps, files)]
    best = [min(f.values()) for f in fulls]
    regret = {c: max(f[c] - b for f, b in zip(fulls, best)) for c in fulls[0] if c[0] == ("a=2", "w=1")}
    want = min(regret, key=lambda c: (round(regret[c], 6), sum(f[c] for f in fulls)))
    assert out["chosen"]["lambdas"] == dict(zip(["mbpa", "cache"], want[1]))
    assert out["chosen"]["max_shortfall_points"] == pytest.approx(regret[want])
    assert out["lambdas_alone"]["lambdas"] == {"mbpa": 0.05, "cache": 0.2}
    assert out["free_settings"]["max_shortfall_points"] <= out["chosen"]["max_shortfall_points"] + 1e-12
    assert out["own_best"]["m1"]["delta_percent"] == pytest.approx(best[0])
