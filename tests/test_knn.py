"""kNN-LM: datastore build (layout, resume, refusals, torchrun) and the knn method against
a brute-force numpy reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmadapt import datastore, runs
from lmadapt.corpus import load_corpus
from lmadapt.datastore import Datastore, Layout
from lmadapt.errors import LmadaptError
from lmadapt.methods.cache import CacheParams, NeuralCache
from lmadapt.methods.knn import KnnLM, KnnParams, knn_target_log_probs
from lmadapt.methods.mbpa import MbPA, MbPAParams
from lmadapt.model import LSTMLM
from lmadapt.stream import stream_eval
from lmadapt.train import write_run_metadata

from conftest import cli as _cli
from conftest import forked_ranks, tiny_config, write_markov_corpus

# Small rows and parts so the tiny corpus (~5k keys) has several parts to resume and shard.
LAYOUT = Layout(row=300, warmup=50, rows_per_part=3)
LAYOUT_ARGS = ["--row", "300", "--warmup", "50", "--rows-per-part", "3"]
PQ = "ivfpq:8,3"   # d = 12: three 4-dimensional sub-vectors


def _make_run(root, corpus_dir, seed: int):
    """A run directory holding an untrained tiny model (no training: the tests need a fixed
    model, not a good one)."""
    cfg = tiny_config(corpus_dir, ["model.emb_size=12", "model.hidden_size=12", "model.num_layers=1"])
    corpus = load_corpus(cfg.data.name)
    cfg.model.vocab_size = len(corpus.vocab)
    torch.manual_seed(seed)
    model = LSTMLM(cfg.model).eval()
    with torch.no_grad():
        model.decoder.weight.mul_(8)  # tied with the embedding: a peakier softmax, larger key norms
    run_dir = root / f"run{seed}"
    run_dir.mkdir()
    write_run_metadata(run_dir, cfg, corpus)
    runs.save_tensors(run_dir / runs.BEST, model.state_dict())
    return run_dir, model, corpus


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("knn")
    corpus_dir = write_markov_corpus(root / "corpus", lines=(600, 40, 40))
    run_dir, model, corpus = _make_run(root, corpus_dir, seed=0)
    flat = root / "ds-flat"
    datastore.build(run_dir, flat, model=model, corpus=corpus, layout=LAYOUT, log=lambda m: None)
    pq = root / "ds-pq"
    datastore.build(run_dir, pq, model=model, corpus=corpus, index=PQ, layout=LAYOUT, log=lambda m: None)
    return {"root": root, "corpus_dir": corpus_dir, "run": run_dir, "model": model, "corpus": corpus,
            "flat": flat, "pq": pq}


def _hidden(model, stream):
    with torch.no_grad():
        hidden, _, _ = model(stream[:-1].unsqueeze(0))
    return hidden[0]


# --------------------------------------------------------------------------- datastore contents

def test_keys_are_each_rows_hidden_states_after_burn_in(setup):
    model, train = setup["model"], setup["corpus"].train
    store = Datastore(setup["flat"])
    n = train.numel() - 1
    assert len(store) == n and store.manifest["index"]["type"] == "flat"
    assert torch.equal(store.values, train[1:])
    keys = torch.from_numpy(store.keys[:].astype(np.float32))
    # The first row starts at the beginning, like evaluation; later rows after WARMUP tokens.
    for a in (0, LAYOUT.row, 7 * LAYOUT.row):
        b = min(a + LAYOUT.row, n)
        warm = a - max(0, a - LAYOUT.warmup)
        ref = _hidden(model, train[a - warm:b + 1])[warm:]
        torch.testing.assert_close(keys[a:b], ref, atol=2e-3, rtol=1e-3)  # float16 storage
    assert store.manifest["checkpoint_sha256"] == datastore.file_sha256(setup["run"] / runs.BEST)
    assert store.manifest["split"] == "train" and store.manifest["embedding"]["row"] == LAYOUT.row


def test_auto_index_choice_and_override_parsing():
    assert datastore.choose_index(1000, 12).kind == "flat"
    spec = datastore.choose_index(2_000_000, 300)
    assert spec.kind == "ivfpq" and 300 % spec.m == 0 and spec.m <= 64 and spec.nlist == 2048
    assert datastore.choose_index(5000, 12, "ivfpq:16,4") == datastore.IndexSpec("ivfpq", 16, 4)
    for bad in ("hnsw", "ivfpq:16", "ivfpq:16,5", "ivfpq:a,b", "ivfpq:9000,4"):
        with pytest.raises(LmadaptError):
            datastore.choose_index(5000, 12, bad)


# --------------------------------------------------------------------------- knn probabilities

def _reference_knn_log_probs(keys: np.ndarray, values: np.ndarray, queries: np.ndarray, targets: np.ndarray,
                             k: int, temperature: float, scaled: float = 0.0) -> np.ndarray:
    """The formula over all keys, in float64: p(w) ∝ Σ_{j in kNN, v_j = w} exp(−d_j / T);
    temperature 0: T = scaled · the mean of the query's k neighbour distances."""
    out = np.empty(len(queries))
    for i, (q, y) in enumerate(zip(queries, targets)):
        d = ((keys - q) ** 2).sum(1)
        nn = np.argsort(d, kind="stable")[:k]
        t = temperature if temperature > 0 else scaled * d[nn].mean()
        w = np.exp(-(d[nn] - d[nn].min()) / t)
        with np.errstate(divide="ignore"):  # log 0 = -inf where no neighbour has the target
            out[i] = np.log(w[values[nn] == y].sum() / w.sum())
    return out


@pytest.mark.parametrize("recompute", [False, True])
def test_knn_equals_brute_force_reference_with_the_flat_index(setup, recompute):
    model, valid = setup["model"], setup["corpus"].valid
    k, T = 16, 0.003  # the tiny model's neighbour distances are ~0.001-0.01: exp(−d/T) must vary
    method = KnnLM(KnnParams(k=k, temperature=T, recompute=recompute, datastore=str(setup["flat"])))
    r = stream_eval(model, valid, [method], {"knn": 0.3}, segment_len=37)
    store = Datastore(setup["flat"])
    ref = _reference_knn_log_probs(store.keys[:].astype(np.float64), store.values.numpy(),
                                   _hidden(model, valid).double().numpy(), valid[1:].numpy(), k, T)
    log_p, available = r.components["knn"]
    assert available.all()
    finite = np.isfinite(ref)
    assert (~finite).any() and finite.any()  # both cases occur: some targets among the neighbours, some not
    np.testing.assert_array_equal(np.isfinite(log_p.numpy()), finite)
    np.testing.assert_allclose(log_p.numpy()[finite], ref[finite], atol=1e-5, rtol=0)
    # The mixture: p = (1 − λ) p_lstm + λ p_knn.
    expected = torch.log(0.7 * r.base.double().exp() + 0.3 * torch.from_numpy(ref).exp())
    torch.testing.assert_close(r.mixed.double(), expected, atol=1e-5, rtol=0)


def test_lambda_zero_reproduces_the_base_model_exactly(setup):
    model, valid = setup["model"], setup["corpus"].valid
    plain = stream_eval(model, valid, [], {})
    r = stream_eval(model, valid, [KnnLM(KnnParams(k=32, datastore=str(setup["pq"])))], {"knn": 0.0})
    assert torch.equal(r.base, plain.base)
    assert torch.equal(r.mixed, plain.base)


def test_ivfpq_with_every_list_probed_is_exact_search_over_the_pq_codes(setup):
    """With nprobe = nlist, IVF-PQ returns the exact top-k of the PQ-reconstructed keys, and its
    distances err from the true ones by at most the quantisation bound
    |‖q−x̂‖² − ‖q−x‖²| ≤ 2‖q−x‖‖x−x̂‖ + ‖x−x̂‖², so every key whose true distance is below the
    k-th PQ distance by more than its bound is among the PQ top-k."""
    store = Datastore(setup["pq"])
    index = store.index
    index.make_direct_map()
    recon = index.reconstruct_n(0, len(store)).astype(np.float64)
    keys = store.keys[:].astype(np.float64)
    err = np.sqrt(((keys - recon) ** 2).sum(1))
    assert err.max() > 1e-3  # the codes really are lossy
    q = _hidden(setup["model"], setup["corpus"].valid)[:60]
    k = 20
    dist, ids = store.search(q, k, nprobe=store.nlist)
    exact, _ = store.search(q, k, nprobe=store.nlist, recompute=True)
    qd = q.double().numpy()
    for i in range(len(qd)):
        d_pq = ((recon - qd[i]) ** 2).sum(1)
        order = np.argsort(d_pq, kind="stable")[:k]
        np.testing.assert_allclose(dist[i].numpy(), d_pq[order], rtol=1e-4, atol=1e-4)
        d_true = ((keys - qd[i]) ** 2).sum(1)
        np.testing.assert_allclose(exact[i].numpy(), d_true[ids[i].numpy()], rtol=1e-5, atol=1e-5)
        bound = 2 * np.sqrt(d_true) * err + err ** 2
        got = ids[i].numpy()
        assert (np.abs(d_pq[got] - d_true[got]) <= bound[got] + 1e-4).all()
        sure = np.nonzero(d_true + bound < dist[i, -1].item() - 1e-4)[0]
        assert set(sure) <= set(got)


def test_knn_column_is_the_same_alone_and_in_every_mixture(setup):
    model, valid = setup["model"], setup["corpus"].valid
    params = KnnParams(k=32, temperature=3.0, recompute=True, datastore=str(setup["pq"]))
    alone = stream_eval(model, valid, [KnnLM(params)], {"knn": 0.2})
    methods = [KnnLM(params), MbPA(MbPAParams(memory=60, k=8)), NeuralCache(CacheParams(window=40))]
    mixed = stream_eval(model, valid, methods, {"knn": 0.2, "mbpa": 0.1, "cache": 0.1}, segment_len=64)
    torch.testing.assert_close(mixed.components["knn"][0], alone.components["knn"][0], atol=1e-5, rtol=0)
    assert torch.isfinite(mixed.mixed).all()


def test_cli_eval_knn_with_every_other_method_in_one_run(setup, tmp_path):
    out = tmp_path / "rep.json"
    assert _cli("eval", setup["run"], "--split", "test", "--method", "dyneval+knn+mbpa+cache",
                "--datastore", setup["pq"], "--knn-k", 16, "--knn-nprobe", 4, "--knn-recompute",
                "--mbpa-memory", 50, "--mbpa-k", 8, "--lambda-knn", 0.2, "--json", out, "--threads", 1) == 0
    rep = json.loads(out.read_text())
    entry = rep["methods"]["dyneval+knn+mbpa+cache"]
    assert entry["params"]["knn"]["recompute"] is True and entry["params"]["knn"]["nprobe"] == 4
    assert entry["params"]["knn"]["k"] == 16 and entry["params"]["mbpa"]["memory"] == 50
    assert entry["lambdas"]["knn"] == 0.2
    assert {"dyneval+knn+cache", "dyneval+knn+mbpa", "dyneval+mbpa+cache"} <= set(rep["mixtures_from_same_pass"])


def test_tune_covers_knn_settings_and_lambda(setup, tmp_path):
    out = tmp_path / "best.json"
    assert _cli("tune", setup["run"], "--method", "knn+cache", "--datastore", setup["flat"], "--out", out,
                "--grid", "knn.k=8,32", "--grid", "knn.temperature=1,4", "--grid", "cache.window=50",
                "--grid", "cache.theta=0.3", "--grid", "lambda=0,0.2,0.4", "--threads", 1) == 0
    best = json.loads(out.read_text())
    assert best["passes"] == 1 + 1  # the plain model, then all 5 mixer settings in one pass
    assert sorted(best["grid"]["knn"]["k"]) == [8, 32]
    assert best["params"]["knn"]["datastore"] == str(setup["flat"])
    assert "knn" in best["subsets"] and best["ppl"] <= best["subsets"]["knn"]["ppl"]


def test_scaled_temperature_equals_the_reference_and_does_not_depend_on_the_distance_scale(setup):
    """temperature 0: T_t = c · mean of the query's k neighbour distances, per query."""
    model, valid = setup["model"], setup["corpus"].valid
    k, c = 16, 0.2
    method = KnnLM(KnnParams(k=k, temperature=0.0, temperature_scaled=c, recompute=True, datastore=str(setup["flat"])))
    r = stream_eval(model, valid, [method], {"knn": 0.3}, segment_len=37)
    store = Datastore(setup["flat"])
    ref = _reference_knn_log_probs(store.keys[:].astype(np.float64), store.values.numpy(),
                                   _hidden(model, valid).double().numpy(), valid[1:].numpy(), k, 0.0, c)
    log_p = r.components["knn"][0].numpy()
    finite = np.isfinite(ref)
    assert finite.any() and (~finite).any()
    np.testing.assert_array_equal(np.isfinite(log_p), finite)
    np.testing.assert_allclose(log_p[finite], ref[finite], atol=1e-5, rtol=0)
    # Scaling every distance by s leaves the scaled-T probabilities unchanged (a fixed T does not).
    dist = torch.rand(4, 8) * 3
    ids, values, targets = torch.arange(32).view(4, 8), torch.arange(32) % 3, torch.tensor([0, 1, 2, 0])
    a = knn_target_log_probs(dist, ids, values, targets, 0.0, c)[0]
    torch.testing.assert_close(knn_target_log_probs(dist * 100, ids, values, targets, 0.0, c)[0], a)
    assert not torch.allclose(knn_target_log_probs(dist * 100, ids, values, targets, 1.0)[0],
                              knn_target_log_probs(dist, ids, values, targets, 1.0)[0])


# --------------------------------------------------------------------------- refusals

def test_eval_refuses_a_datastore_of_another_model(setup, capsys):
    other_run, model, corpus = _make_run(setup["root"], setup["corpus_dir"], seed=1)
    assert _cli("eval", other_run, "--method", "knn", "--datastore", setup["flat"]) == 2
    err = capsys.readouterr().err.strip()
    assert "another model" in err and len(err.splitlines()) == 1


def test_eval_refuses_a_datastore_of_the_evaluated_split(setup, capsys):
    assert _cli("eval", setup["run"], "--split", "train", "--method", "knn+cache", "--datastore", setup["flat"]) == 2
    err = capsys.readouterr().err.strip()
    assert "split being evaluated" in err and len(err.splitlines()) == 1
    # tune too: tuning on the datastore's own split would pick settings that read the answers
    assert _cli("tune", setup["run"], "--split", "train", "--method", "knn", "--datastore", setup["flat"],
                "--out", setup["root"] / "never.json") == 2
    assert "split being evaluated" in capsys.readouterr().err
    assert not (setup["root"] / "never.json").exists()


def test_knn_without_a_datastore_is_refused(setup, capsys):
    assert _cli("eval", setup["run"], "--method", "knn") == 2
    assert "--datastore" in capsys.readouterr().err


def test_build_refuses_before_any_work_when_disk_or_ram_is_short(setup, monkeypatch, tmp_path):
    from collections import namedtuple

    Usage = namedtuple("Usage", "total used free")
    out = tmp_path / "ds"
    monkeypatch.setattr(datastore.shutil, "disk_usage", lambda p: Usage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(LmadaptError, match="not enough disk"):
        datastore.build(setup["run"], out, model=setup["model"], corpus=setup["corpus"], layout=LAYOUT,
                        log=lambda m: None)
    assert not (out / datastore.PARTS).exists()
    monkeypatch.undo()
    monkeypatch.setattr(datastore, "_mem_available", lambda: 1000)
    with pytest.raises(LmadaptError, match="not enough RAM"):
        datastore.build(setup["run"], out, model=setup["model"], corpus=setup["corpus"], layout=LAYOUT,
                        log=lambda m: None)
    assert not (out / datastore.PARTS).exists()


def test_killed_build_never_looks_complete_and_resumes_to_the_same_datastore(setup, tmp_path, capsys):
    out = tmp_path / "ds"
    logs = []
    n_parts = LAYOUT.n_parts(setup["corpus"].train.numel() - 1)
    assert n_parts >= 4
    assert datastore.build(setup["run"], out, model=setup["model"], corpus=setup["corpus"], index=PQ,
                           layout=LAYOUT, log=logs.append, interrupt_after_parts=2) is None
    assert not (out / datastore.MANIFEST).exists()
    with pytest.raises(LmadaptError, match="not a complete datastore"):
        Datastore(out)
    assert _cli("eval", setup["run"], "--method", "knn", "--datastore", out) == 2
    assert "interrupted build" in capsys.readouterr().err
    logs.clear()
    manifest = datastore.build(setup["run"], out, model=setup["model"], corpus=setup["corpus"], index=PQ,
                               layout=LAYOUT, log=logs.append)
    text = "\n".join(logs)
    assert "; resume" in text and "reusing 2 finished parts" in text
    assert not (out / datastore.PARTS).exists() and not (out / datastore.BUILD).exists()
    fresh = Datastore(setup["pq"])
    resumed = Datastore(out)
    assert np.array_equal(resumed.keys[:], fresh.keys[:]) and torch.equal(resumed.values, fresh.values)
    q = _hidden(setup["model"], setup["corpus"].valid)[:50]
    d1, i1 = resumed.search(q, 16, nprobe=4)
    d2, i2 = fresh.search(q, 16, nprobe=4)
    assert torch.equal(i1, i2) and torch.equal(d1, d2)
    assert manifest["keys"] == len(fresh)
    # An interrupted build with other settings is restarted, not mixed with the old parts.
    datastore.build(setup["run"], out, model=setup["model"], corpus=setup["corpus"], index=PQ,
                    layout=LAYOUT, log=logs.append, force=True, interrupt_after_parts=1)
    logs.clear()
    datastore.build(setup["run"], out, model=setup["model"], corpus=setup["corpus"], index="flat",
                    layout=LAYOUT, log=logs.append)
    assert "restart (settings changed)" in "\n".join(logs)
    assert Datastore(out).manifest["index"]["type"] == "flat"


# --------------------------------------------------------------------------- two processes

def test_two_process_build_equals_one_process_build(setup, tmp_path, capfd):
    # The ranks torchrun would start (test_train.py runs torchrun itself), forked from here.
    common = ["datastore", "build", str(setup["run"]), "--index", PQ, "--threads", "1", *LAYOUT_ARGS]
    assert forked_ranks(*common, "--out", str(tmp_path / "two")) == [0, 0]
    assert "over 2 processes" in capfd.readouterr().err
    two, one = Datastore(tmp_path / "two"), Datastore(setup["pq"])
    assert two.manifest["world_size"] == 2 and one.manifest["world_size"] == 1
    np.testing.assert_array_equal(two.keys[:], one.keys[:])
    assert torch.equal(two.values, one.values)
    q = _hidden(setup["model"], setup["corpus"].valid)
    d1, i1 = two.search(q, 32, nprobe=4)
    d2, i2 = one.search(q, 32, nprobe=4)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(d1, d2, atol=1e-5, rtol=1e-5)


def test_cached_searches_equal_fresh_ones(setup):
    """Tuning repeats the same queries: a smaller k is served from a cached larger one."""
    q = _hidden(setup["model"], setup["corpus"].valid)[:64]
    cached = Datastore(setup["pq"])
    for recompute in (False, True):
        big = cached.search(q, 40, nprobe=4, recompute=recompute)
        small = cached.search(q, 12, nprobe=4, recompute=recompute)
        fresh = Datastore(setup["pq"]).search(q, 12, nprobe=4, recompute=recompute)
        assert torch.equal(small[1], fresh[1]) and torch.equal(small[0], fresh[0])
        assert torch.equal(big[1][:, :12], fresh[1])
    assert cached._cache_bytes > 0
    other = cached.search(q, 12, nprobe=8)   # another nprobe is another search
    assert torch.equal(other[1], Datastore(setup["pq"]).search(q, 12, nprobe=8)[1])


# --------------------------------------------------------------------------- MbPA over the datastore

def _naive_mbpa_rows(model, hidden, nb_keys, nb_values, sq, alpha, eps=1e-3):
    from lmadapt.adapt import kernel_weights, naive_mbpa

    layer = torch.nn.Linear(hidden.size(1), model.decoder.out_features).double()
    with torch.no_grad():
        layer.weight.copy_(model.decoder.weight.double())
        layer.bias.copy_(model.decoder.bias.double())
    w = kernel_weights(sq.double(), torch.ones_like(sq, dtype=torch.bool), eps, True)
    return naive_mbpa(layer, hidden.double(), nb_keys.double(), nb_values, w, steps=1, lr=alpha)


def test_mbpa_over_the_datastore_equals_a_per_query_reference(setup):
    model, valid = setup["model"], setup["corpus"].valid[:81]
    K, alpha = 6, 0.5
    mb = MbPA(MbPAParams(k=K, alpha=alpha, memory=5000, source="datastore", datastore=str(setup["flat"])))
    r = stream_eval(model, valid, [mb], {"mbpa": 0.5}, segment_len=40)
    store = Datastore(setup["flat"])
    keys = torch.from_numpy(store.keys[:].astype(np.float64))
    hidden = _hidden(model, valid).double()
    d = torch.cdist(hidden, keys) ** 2
    sq, nn = d.topk(K, largest=False)
    ref = _naive_mbpa_rows(model, hidden, keys[nn], store.values[nn], sq, alpha)
    ref_target = ref.gather(1, valid[1:].unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(r.components["mbpa"][0].double(), ref_target, atol=2e-4, rtol=0)
    # and it really adapts: not the base model's prediction
    assert (r.components["mbpa"][0] - r.base).abs().max() > 1e-2


def test_mbpa_over_the_datastore_with_the_scaled_alpha(setup):
    """alpha 0 over the datastore: each query's step is alpha_scaled / mean ‖h_k‖² of its
    own neighbours (a per-row reference)."""
    model, valid = setup["model"], setup["corpus"].valid[:41]
    K, c = 6, 0.5
    mb = MbPA(MbPAParams(k=K, alpha=0.0, alpha_scaled=c, memory=5000, source="datastore", datastore=str(setup["flat"])))
    r = stream_eval(model, valid, [mb], {"mbpa": 0.5}, segment_len=20)
    store = Datastore(setup["flat"])
    keys = torch.from_numpy(store.keys[:].astype(np.float64))
    hidden = _hidden(model, valid).double()
    sq, nn = (torch.cdist(hidden, keys) ** 2).topk(K, largest=False)
    got = r.components["mbpa"][0].double()
    for t in (0, 7, 19, 33):
        lr = float(c / keys[nn[t]].pow(2).sum(1).mean())
        ref = _naive_mbpa_rows(model, hidden[t:t + 1], keys[nn[t:t + 1]], store.values[nn[t:t + 1]], sq[t:t + 1], lr)
        torch.testing.assert_close(got[t], ref[0, valid[t + 1]], atol=2e-4, rtol=0)
    assert (got - r.base).abs().max() > 1e-2


def test_mbpa_over_both_takes_the_nearest_of_the_union(setup, tmp_path):
    model, valid = setup["model"], setup["corpus"].valid[:121]
    # A datastore of the small test split, so that recent stream entries win some of the K places.
    small = tmp_path / "ds-test"
    datastore.build(setup["run"], small, model=model, corpus=setup["corpus"], split="test", layout=LAYOUT,
                    log=lambda m: None)
    K, alpha, N = 24, 0.5, 100
    mb = MbPA(MbPAParams(k=K, alpha=alpha, memory=N, source="both", datastore=str(small), select=False))
    r = stream_eval(model, valid, [mb], {"mbpa": 0.5}, segment_len=40)
    store = Datastore(small)
    hidden = _hidden(model, valid).double()
    ds_keys = torch.from_numpy(store.keys[:].astype(np.float64))
    targets = valid[1:]
    got = r.components["mbpa"][0]
    from_stream = 0
    for t in range(0, 120, 7):
        lo = max(0, t - N)
        keys = torch.cat([ds_keys, hidden[lo:t]])            # the stream: strictly earlier, last N
        vals = torch.cat([store.values, targets[lo:t]])
        d = ((keys - hidden[t]) ** 2).sum(1)
        sq, nn = d.topk(K, largest=False)
        from_stream += int((nn >= len(store)).sum())
        ref = _naive_mbpa_rows(model, hidden[t:t + 1], keys[nn].unsqueeze(0), vals[nn].unsqueeze(0),
                               sq.unsqueeze(0), alpha)
        assert got[t].item() == pytest.approx(ref[0, targets[t]].item(), abs=2e-4)
    assert from_stream > 0   # the union mattered


def test_mbpa_source_needs_a_datastore(setup, capsys):
    assert _cli("eval", setup["run"], "--method", "mbpa", "--mbpa-source", "datastore") == 2
    assert "--datastore" in capsys.readouterr().err
    assert _cli("eval", setup["run"], "--method", "mbpa", "--mbpa-source", "train") == 2
    assert "source must be one of stream, datastore, both" in capsys.readouterr().err


# --------------------------------------------------------------------------- Transformer ffn keys

def test_ffn_keys_of_a_transformer_are_the_last_feed_forward_inputs(setup, tmp_path):
    """`--key ffn` stores, and knn queries with, the input of the last block's feed-forward
    module (after its layer norm): checked against vectors taken with a hook written here,
    and knn's probabilities against the numpy brute force over them."""
    pytest.importorskip("transformers")
    from lmadapt import backbones

    cfg = tiny_config(setup["corpus_dir"], ["model.arch=gpt2", "model.n_layer=2", "model.n_embd=12",
                                            "model.n_head=2", "model.context=16"])
    corpus = load_corpus(cfg.data.name)
    cfg.model.vocab_size = len(corpus.vocab)
    torch.manual_seed(3)
    model = backbones.build(cfg.model).eval()
    run_dir = tmp_path / "gpt2run"
    run_dir.mkdir()
    write_run_metadata(run_dir, cfg, corpus)
    runs.save_tensors(run_dir / runs.BEST, model.state_dict())
    out = tmp_path / "ds-ffn"
    assert _cli("datastore", "build", run_dir, "--out", out, "--key", "ffn", "--index", "flat", *LAYOUT_ARGS,
                "--threads", 1) == 0
    store = Datastore(out)
    assert store.manifest["key"] == "ffn" and store.key_kind == "ffn"

    # the reference: the last block's mlp input, by a hook of this test's own (first row: no burn-in)
    seen = []
    handle = model.lm.transformer.h[-1].mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(corpus.train[:12].unsqueeze(0))
    handle.remove()
    ffn = torch.cat(seen, 1)[0]
    np.testing.assert_allclose(np.asarray(store.keys[:12], np.float32), ffn.numpy(), rtol=1e-2, atol=1e-3)
    with torch.no_grad():
        hidden, _, _ = model(corpus.train[:12].unsqueeze(0))
    assert not torch.allclose(hidden[0], ffn, atol=1e-3)  # a different vector from the output layer's input

    stream = corpus.valid[:60]
    keys = np.asarray(store.keys, np.float32)
    seen.clear()
    handle = model.lm.transformer.h[-1].mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(stream[:-1].unsqueeze(0))  # 59 positions: the KV window re-encodes, and hooks see it
    handle.remove()
    knn = KnnLM(KnnParams(k=8, temperature=2.0, datastore=str(out)))
    got = stream_eval(model, stream, [knn], {"knn": 0.5}, corpus=corpus, segment_len=16).components["knn"][0]
    # the first window (16 positions) is scored without any re-encode: queries = the hook's first call
    queries = seen[0][0].numpy()
    ref = _reference_knn_log_probs(keys, np.asarray(store.values), queries, stream[1:17].numpy(), 8, 2.0)
    np.testing.assert_allclose(got[:16].numpy(), ref, rtol=1e-4, atol=1e-4)


def test_ffn_keys_are_refused_where_they_do_not_exist(setup, tmp_path, capsys):
    assert _cli("datastore", "build", setup["run"], "--out", tmp_path / "x", "--key", "ffn") == 2
    assert "key 'ffn': the lstm backbone offers output" in capsys.readouterr().err
