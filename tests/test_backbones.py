"""Backbones: the Transformer (transformers GPT-2 / Llama) under every method, its KV window,
arch=gpt2 training and export, --hf-model, --text, and the missing-extra error.
Tiny random models and a tokenizer built here: nothing is downloaded."""

from __future__ import annotations

import builtins
import copy
import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from lmadapt import runs  # noqa: E402
from lmadapt.adapt import naive_mbpa  # noqa: E402
from lmadapt.backbones.hf import HFCausalLM  # noqa: E402
from lmadapt.cli import main  # noqa: E402
from lmadapt.corpus import load_corpus  # noqa: E402
from lmadapt.methods.cache import CacheParams, NeuralCache  # noqa: E402
from lmadapt.methods.dyneval import DynamicEvaluation, DynEvalParams  # noqa: E402
from lmadapt.methods.mbpa import MbPA, MbPAParams  # noqa: E402
from lmadapt.stream import stream_eval  # noqa: E402
from lmadapt.train import fit  # noqa: E402

from conftest import TrainSplit as _Corpus  # noqa: E402
from conftest import BUILDERS, CONTEXT, KEEP, tiny_gpt2, tiny_llama  # noqa: E402,F401
from conftest import mbpa_reference_neighbours, motif_stream, tiny_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_kv_window_results_do_not_depend_on_segment_length(arch):
    model, stream = BUILDERS[arch](), motif_stream(130)
    assert model.rotary == (arch == "llama")
    methods = lambda: [MbPA(MbPAParams(memory=60, k=8, alpha=0.5, steps=2, beta=0.1)),  # noqa: E731
                       NeuralCache(CacheParams(window=40, theta=0.5))]
    lambdas = {"mbpa": 0.2, "cache": 0.2}
    results = [stream_eval(model, stream, methods(), lambdas, segment_len=L) for L in (1, 7, 128)]
    ref = results[0]
    for r in results[1:]:
        torch.testing.assert_close(r.base, ref.base, atol=1e-5, rtol=0)
        torch.testing.assert_close(r.mixed, ref.mixed, atol=1e-5, rtol=0)
    if arch == "gpt2":
        # Re-encoding: token t is predicted from exactly stream[start(t) : t + 1], positions from 0,
        # where the window start jumps by context - keep each time it fills.
        step = CONTEXT - KEEP
        with torch.no_grad():
            for t in (0, 9, CONTEXT - 1, CONTEXT, CONTEXT + step - 1, CONTEXT + step, 77, 128):
                start = 0 if t < CONTEXT else step * ((t - CONTEXT) // step + 1)
                logits = model.lm(stream[start:t + 1].unsqueeze(0)).logits[0, -1]
                expected = F.log_softmax(logits, -1)[stream[t + 1]]
                torch.testing.assert_close(ref.base[t], expected, atol=1e-5, rtol=0)
    else:
        # Trimming keeps keys computed with more context: not the re-encoded scores, but the
        # first window (nothing trimmed yet) is a plain forward pass.
        with torch.no_grad():
            logits = model.lm(stream[:CONTEXT].unsqueeze(0)).logits[0]
        expected = F.log_softmax(logits, -1).gather(1, stream[1:CONTEXT + 1].unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(ref.base[:CONTEXT], expected, atol=1e-5, rtol=0)


def test_every_method_and_the_full_mixture_run_on_gpt2():
    model, stream = tiny_gpt2(), motif_stream(200)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    corpus = _Corpus(motif_stream(120, seed=5))
    plain = stream_eval(model, stream, [], {})
    for methods, lambdas in (([NeuralCache(CacheParams(window=50))], {"cache": 0.3}),
                             ([MbPA(MbPAParams(memory=50, k=8, alpha=0.5))], {"mbpa": 0.3}),
                             ([DynamicEvaluation(DynEvalParams(lr=1e-3, decay=0.0, stat_batch=4))], {}),
                             ([DynamicEvaluation(DynEvalParams(lr=1e-3, decay=0.002, stat_batch=4)),
                               MbPA(MbPAParams(memory=50, k=8, alpha=0.5)), NeuralCache(CacheParams(window=50))],
                              {"mbpa": 0.2, "cache": 0.2})):
        r = stream_eval(model, stream, methods, lambdas, corpus=corpus)
        assert torch.isfinite(r.mixed).all()
        # the stream repeats a motif: every method must help the random model on it
        assert r.mixed.mean() > plain.base.mean() + 0.05, [m.name for m in methods]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # dyneval works on a copy; MbPA never writes


def test_mbpa_on_gpt2_matches_the_naive_reference_and_leaves_the_tied_embedding():
    model, stream = tiny_gpt2(), motif_stream(90)
    assert model.lm.lm_head.weight is model.lm.transformer.wte.weight
    params = MbPAParams(memory=30, k=6, alpha=0.4, steps=3, beta=0.05, eps=1e-3, normalise=False, select=False)
    r = stream_eval(model, stream, [MbPA(params)], {"mbpa": 0.5}, segment_len=16)
    with torch.no_grad():
        hidden, _, _ = model(stream[:-1].unsqueeze(0))
    hidden, targets, log_p = hidden[0], stream[1:], r.components["mbpa"][0]
    head = torch.nn.Linear(16, 30).double()
    with torch.no_grad():  # GPT-2's lm_head has no bias: MbPA adapts a zero one
        head.weight.copy_(model.lm.lm_head.weight)
        head.bias.zero_()
    for t in (10, 31, 55, 88):
        keys, vals, w = mbpa_reference_neighbours(hidden, targets, t, params)
        ref = naive_mbpa(copy.deepcopy(head), hidden[t:t + 1].double(), keys.unsqueeze(0),
                         vals.unsqueeze(0), w.unsqueeze(0), steps=params.steps, lr=params.alpha, beta=params.beta)
        torch.testing.assert_close(log_p[t].double(), ref[0, targets[t]], atol=1e-4, rtol=0)


@pytest.mark.parametrize("adapt", ["all", "output"])
def test_dyneval_on_gpt2_matches_a_plain_autograd_loop(adapt):
    model, stream, lr = tiny_gpt2(), motif_stream(61), 0.05
    got = stream_eval(model, stream, [DynamicEvaluation(DynEvalParams(lr=lr, decay=0.0, variant="sgd",
                                                                      adapt=adapt, segment=5))], {})
    ref_model = copy.deepcopy(model)
    lm = ref_model.lm
    # Tied: the output weight is the embedding, one tensor that gets both gradients.
    chosen = list(lm.parameters()) if adapt == "all" else [lm.lm_head.weight]
    state, out = ref_model.init_state(1), []
    for s in range(0, stream.numel() - 1, 5):
        x, y = stream[s:s + 5], stream[s + 1:s + 6]
        x = x[:y.numel()]
        _, logits, state = ref_model(x.unsqueeze(0), state)
        log_p = F.log_softmax(logits[0], -1).gather(1, y.unsqueeze(1)).squeeze(1)
        grads = torch.autograd.grad(-log_p.mean(), chosen)
        with torch.no_grad():
            for p, g in zip(chosen, grads):
                p.sub_(lr * g)
        state = ref_model.detach_state(state)
        out.append(log_p.detach())
    ref = torch.cat(out)
    plain = stream_eval(model, stream, [], {})
    assert (ref - plain.base).abs().max() > 1e-2
    torch.testing.assert_close(got.base, ref, atol=1e-5, rtol=0)


def test_dyneval_lstm_group_is_refused_on_a_transformer():
    with pytest.raises(Exception, match="all or output"):
        stream_eval(tiny_gpt2(), motif_stream(20), [DynamicEvaluation(DynEvalParams(variant="sgd", adapt="lstm"))], {})


GPT2_SETTINGS = ["model.arch=gpt2", "model.n_layer=1", "model.n_embd=16", "model.n_head=2", "model.context=16",
                 "model.dropout=0.1", "train.lr=0.01"]


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    from conftest import write_markov_corpus

    root = tmp_path_factory.mktemp("gpt2run")
    corpus_dir = write_markov_corpus(root / "corpus", lines=(150, 30, 30))
    cfg = tiny_config(corpus_dir, GPT2_SETTINGS + ["train.eval_interval=0", "train.epochs=3",
                                                   "train.checkpoint_interval=1000"])
    results = fit(root / "run", cfg, load_corpus(cfg.data.name))
    return root, corpus_dir, cfg, results


def test_gpt2_run_learns_records_arch_and_loads_with_plain_transformers(gpt2_run):
    root, _, cfg, results = gpt2_run
    run = root / "run"
    meta = json.loads((run / runs.CONFIG).read_text())
    assert meta["model"]["arch"] == "gpt2"
    assert results["valid_ppl"] < 25  # uniform over the 41 words would be ~41
    assert (run / "hf" / "model.safetensors").is_file()
    lm = transformers.AutoModelForCausalLM.from_pretrained(run / "hf", local_files_only=True).eval()
    from lmadapt.checkpoint import load_model

    model, _, _ = load_model(run)
    x = torch.randint(0, meta["model"]["vocab_size"], (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(lm(x).logits, model(x)[1], atol=1e-5, rtol=0)
    tok = transformers.AutoTokenizer.from_pretrained(run / "hf", local_files_only=True)
    corpus = load_corpus(cfg.data.name)
    text = "\n".join((cfg.data.name and open(f"{cfg.data.name}/valid.txt").read()).splitlines()) + "\n"
    assert tok(text)["input_ids"] == corpus.valid.tolist()


def test_hf_model_dir_gives_the_run_dirs_perplexity(gpt2_run, tmp_path, capsys):
    root, corpus_dir, _, _ = gpt2_run
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["eval", str(root / "run"), "--split", "test", "--json", str(a)]) == 0
    assert main(["eval", "--hf-model", str(root / "run" / "hf"), "--data", str(corpus_dir), "--split", "test",
                 "--json", str(b)]) == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra["tokens"] == rb["tokens"]
    assert ra["methods"]["base"]["ppl"] == pytest.approx(rb["methods"]["base"]["ppl"], rel=1e-6)
    words = len((corpus_dir / "test.txt").read_text().split())
    assert ra["units"]["words"] == words
    e = ra["methods"]["base"]
    # tokens = words + one <eos> per line, so per-word perplexity is the larger
    assert e["word_ppl"] > e["ppl"] and e["bits_per_byte"] > 0


def test_gpt2_resume_after_kill_ends_with_identical_weights(tmp_path):
    from conftest import write_markov_corpus

    corpus_dir = write_markov_corpus(tmp_path / "corpus", lines=(80, 20, 20))
    corpus = load_corpus(str(corpus_dir))
    fit(tmp_path / "straight", tiny_config(corpus_dir, GPT2_SETTINGS), corpus)
    killed = tmp_path / "killed"
    assert fit(killed, tiny_config(corpus_dir, GPT2_SETTINGS), corpus, interrupt_after_steps=13) is None
    fit(killed, tiny_config(corpus_dir, GPT2_SETTINGS), corpus, resume=True)
    a = torch.load(tmp_path / "straight" / runs.BEST, weights_only=True)
    b = torch.load(killed / runs.BEST, weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("setting, message", [
    ("model.softmax=hebbian", "LSTM option"),
    ("train.sampled_softmax=10", "LSTM option"),
    ("train.bptt=40", "longer than model.context"),
    ("model.n_head=3", "not divisible"),
])
def test_gpt2_refuses_lstm_only_options(setting, message, tmp_path, capsys):
    from conftest import write_markov_corpus

    corpus_dir = write_markov_corpus(tmp_path / "corpus", lines=(20, 5, 5))
    args = ["train", "--data", str(corpus_dir), "--out", str(tmp_path / "r")]
    for s in GPT2_SETTINGS + ["train.bptt=8", setting]:
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_text_file_with_oov_words_on_a_word_level_run(gpt2_run, tmp_path, capsys):
    root, _, _, _ = gpt2_run
    doc = tmp_path / "doc.txt"
    doc.write_text("w1 w2 w3 zebra\nw4 w5 qq w6\n")  # 2 of 8 words unknown
    out = tmp_path / "t.json"
    assert main(["eval", str(root / "run"), "--text", str(doc), "--method", "cache", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "25.0% of the words" in captured.err and "out-of-vocabulary words: 25.00%" in captured.out
    rep = json.loads(out.read_text())
    assert rep["oov_rate"] == pytest.approx(0.25) and rep["tokens"] == 9  # 8 words + 2 <eos> - 1
    assert rep["units"] == {"words": 8, "bytes": len(doc.read_bytes())}
    # the same text through the exported tokenizer and --hf-model scores the same
    out2 = tmp_path / "h.json"
    assert main(["eval", "--hf-model", str(root / "run" / "hf"), "--text", str(doc), "--json", str(out2)]) == 0
    assert json.loads(out2.read_text())["methods"]["base"]["ppl"] == pytest.approx(rep["methods"]["base"]["ppl"])


def test_hf_model_with_a_bpe_tokenizer_and_context_flag(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    lines = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"] * 5
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    model = tiny_llama(vocab=fast.vocab_size + 4, context=32)
    d = tmp_path / "llama"
    model.lm.save_pretrained(d)
    fast.save_pretrained(d)
    doc = tmp_path / "doc.txt"
    doc.write_text("\n".join(lines[:6]) + "\n")
    out = tmp_path / "r.json"
    assert main(["eval", "--hf-model", str(d), "--text", str(doc), "--context", "8", "--method", "mbpa+cache",
                 "--mbpa-memory", "20", "--mbpa-k", "4", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["tokens"] == len(fast(doc.read_text())["input_ids"]) - 1
    assert rep["units"]["bytes"] == len(doc.read_bytes())
    assert main(["eval", "--hf-model", str(d), "--text", str(doc), "--context", "64"]) == 2
    assert "exceeds the model's maximum of 32" in capsys.readouterr().err


def test_hf_model_dir_errors_are_one_line(tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("a b\n")
    model = tiny_gpt2()
    d = tmp_path / "m"
    model.lm.save_pretrained(d)
    capsys.readouterr()
    cases = [(tmp_path / "nowhere", "no such directory"), (tmp_path, "config.json not found"),
             (d, "no tokenizer")]
    for path, message in cases:
        assert main(["eval", "--hf-model", str(path), "--text", str(doc)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert main(["eval", "--text", str(doc)]) == 2
    assert "either a run directory or --hf-model" in capsys.readouterr().err


def test_missing_hf_extra_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    from conftest import write_markov_corpus

    corpus_dir = write_markov_corpus(tmp_path / "corpus", lines=(20, 5, 5))
    d = tmp_path / "m"
    d.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (d / name).write_text("{}")
    doc = tmp_path / "doc.txt"
    doc.write_text("a b\n")
    for args in (["eval", "--hf-model", str(d), "--text", str(doc)],
                 ["train", "--data", str(corpus_dir), "--out", str(tmp_path / "r"), "--set", "model.arch=gpt2"]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert 'pip install "lmadapt[hf]"' in err and len(err.splitlines()) == 1, err


def test_text_on_a_sentencepiece_run_equals_the_same_text_as_a_corpus_split(tmp_path, capsys):
    from conftest import write_markov_corpus

    corpus_dir = write_markov_corpus(tmp_path / "corpus", lines=(60, 10, 10))
    cfg = tiny_config(corpus_dir, ["data.tokenizer=sentencepiece", "data.spm_vocab_size=30", "train.epochs=1"])
    fit(tmp_path / "run", cfg, load_corpus(cfg.data.name, tokenizer="sentencepiece", spm_vocab_size=30))
    doc = tmp_path / "doc.txt"
    doc.write_text("w1 w2 w3 zebra w4\nw5 <unk> w6\n")
    # the old way: a corpus directory holding a copy of the training split and the text as test
    fake = tmp_path / "fake"
    fake.mkdir()
    for split in ("train", "valid"):
        (fake / f"{split}.txt").write_text((corpus_dir / f"{split}.txt").read_text())
    (fake / "test.txt").write_text(doc.read_text())
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["eval", str(tmp_path / "run"), "--text", str(doc), "--method", "cache", "--json", str(a)]) == 0
    assert main(["eval", str(tmp_path / "run"), "--data", str(fake), "--split", "test", "--method", "cache",
                 "--json", str(b)]) == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra["tokens"] == rb["tokens"] > 9  # "zebra" is several pieces
    for name in ("base", "cache"):
        assert ra["methods"][name]["ppl"] == pytest.approx(rb["methods"][name]["ppl"], rel=1e-6)
    assert ra["units"] == rb["units"]


def test_tune_on_an_hf_model_and_a_text(tmp_path):
    lines = [" ".join(f"w{(i * 7 + j) % 13}" for j in range(9)) for i in range(12)]
    from lmadapt.backbones.gpt2 import word_tokenizer
    from lmadapt.corpus import Vocab, word_tokens

    vocab = Vocab.build(word_tokens(lines))
    model = tiny_gpt2(vocab=len(vocab))
    d = tmp_path / "m"
    model.lm.save_pretrained(d)
    word_tokenizer(vocab).save_pretrained(d)
    doc = tmp_path / "doc.txt"
    doc.write_text("\n".join(lines) + "\n")
    out = tmp_path / "best.json"
    assert main(["tune", "--hf-model", str(d), "--text", str(doc), "--method", "cache", "--grid",
                 "cache.window=5,20", "--grid", "cache.theta=0.3", "--grid", "lambda=0.1,0.5", "--out", str(out)]) == 0
    best = json.loads(out.read_text())
    assert best["split"] == "text" and best["params"]["cache"]["window"] in (5, 20)
    assert best["ppl"] < best["base_ppl"]  # the text repeats: the cache must help


@pytest.mark.slow
def test_gpt2_ddp_two_processes_gloo_match_one_process(tmp_path):
    from conftest import forked_ranks, train_args, write_markov_corpus

    corpus_dir = write_markov_corpus(tmp_path / "corpus", lines=(60, 10, 10))
    settings = [a for s in GPT2_SETTINGS + ["model.dropout=0"] for a in ("--set", s)]
    # One process first: the ranks, forked after it, inherit what its first run imported.
    assert main(train_args(corpus_dir, tmp_path / "single", *settings)) == 0
    assert forked_ranks(*train_args(corpus_dir, tmp_path / "ddp", *settings)) == [0, 0]
    a = torch.load(tmp_path / "ddp" / runs.BEST, weights_only=True)
    b = torch.load(tmp_path / "single" / runs.BEST, weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=2e-4)
    assert (tmp_path / "ddp" / "hf" / "model.safetensors").is_file()


def test_force_removes_a_previous_hf_export(tmp_path, capsys):
    from conftest import write_markov_corpus

    corpus_dir = write_markov_corpus(tmp_path / "corpus", lines=(20, 5, 5))
    out = tmp_path / "r"
    (out / "hf").mkdir(parents=True)
    (out / "hf" / "model.safetensors").write_text("stale")
    args = ["train", "--data", str(corpus_dir), "--out", str(out), "--set", "train.max_steps=1"]
    assert main(args) == 2 and "already holds" in capsys.readouterr().err
    assert main(args + ["--set", "model.emb_size=8", "--set", "model.hidden_size=8", "--force"]) == 0
    assert not (out / "hf").exists()  # an LSTM run: nothing exported, the stale export is gone


def test_text_needs_no_training_corpus_unless_a_method_does(gpt2_run, tmp_path, capsys):
    root, corpus_dir, _, _ = gpt2_run
    run = tmp_path / "run"
    import shutil

    shutil.copytree(root / "run", run)
    meta = json.loads((run / runs.CONFIG).read_text())
    meta["data"]["name"] = str(tmp_path / "gone")  # the training corpus is no longer there
    (run / runs.CONFIG).write_text(json.dumps(meta))
    doc = tmp_path / "doc.txt"
    doc.write_text((corpus_dir / "test.txt").read_text())
    assert main(["eval", str(run), "--text", str(doc), "--method", "mbpa+cache"]) == 0
    assert "no training-split frequencies" in capsys.readouterr().err
    assert main(["eval", str(run), "--text", str(doc), "--method", "dyneval"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("lmadapt: error: the training split (for dyneval") and "unknown corpus" in last


def test_hf_tokenizer_that_cannot_encode_the_text_is_a_one_line_error(tmp_path, capsys):
    from lmadapt.backbones.gpt2 import word_tokenizer
    from lmadapt.corpus import Vocab

    vocab = Vocab(["a", "b", "<eos>"])  # no <unk>: an unknown word cannot be encoded
    d = tmp_path / "m"
    tiny_gpt2(vocab=3).lm.save_pretrained(d)
    word_tokenizer(vocab).save_pretrained(d)
    capsys.readouterr()
    doc = tmp_path / "doc.txt"
    doc.write_text("a b zz\n")
    assert main(["eval", "--hf-model", str(d), "--text", str(doc)]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot encode the text" in err and len(err.splitlines()) == 1
