"""Tests of lmadapt.corpus: offline, tiny generated fixtures, a few seconds in all.

The real-data check (PTB / WikiText-2 token counts) runs only when LMADAPT_DATA is set.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest
import torch

from lmadapt import corpus as C
from lmadapt.corpus import Corpus, Vocab, load_corpus
from lmadapt.errors import LmadaptError

REAL_DATA = os.environ.get("LMADAPT_DATA")  # read before the fixture below clears it
HUB_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """No stray LMADAPT_DATA; never let a test reach for the network."""
    monkeypatch.delenv("LMADAPT_DATA", raising=False)
    for var in HUB_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(C, "hub_unavailable_reason", lambda timeout=None: "disabled in tests")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


def make_dir_corpus(root: Path, train: str, valid: str, test: str) -> Path:
    for split, text in (("train", train), ("valid", valid), ("test", test)):
        write(root / f"{split}.txt", text)
    return root


PTB_LIKE = {
    "train": " the cat sat \n the <unk> ran \n\n a cat \n",
    "valid": " the dog sat \n",  # dog is OOV -> <unk>
    "test": " a cat ran",  # no trailing newline
}


def make_named(root: Path, corpus: str, texts=PTB_LIKE) -> Path:
    names = C._FILES[corpus]
    for split in C.SPLITS:
        write(root / names[split], texts[split])
    return root


def words(c: Corpus, split: str) -> list[str]:
    return [c.vocab.itos[i] for i in c.split(split).tolist()]


# --------------------------------------------------------------------------- vocab


def test_vocab_order_frequency_then_first_occurrence():
    v = Vocab.build(["c", "a", "b", "a", "b", "<eos>", "d", "b"])
    # b:3, a:2, then c, <eos>, d (1 each) in order of first occurrence
    assert v.itos == ["b", "a", "c", "<eos>", "d"]
    assert v.stoi == {w: i for i, w in enumerate(v.itos)}
    assert v.eos == 3 and v.unk is None and len(v) == 5
    # deterministic, and an iterator works as well as a list
    assert Vocab.build(iter(["c", "a", "b", "a", "b", "<eos>", "d", "b"])).itos == v.itos


def test_vocab_adds_eos_and_finds_unk():
    v = Vocab.build(["x", "<unk>", "x"])
    assert v.itos == ["x", "<unk>", "<eos>"]
    assert v.unk == 1 and v.eos == 2


def test_vocab_encode_unknown():
    v = Vocab.build(["a", "<unk>", "<eos>"])
    assert v.encode(["a", "zz", "<eos>"]) == [0, 1, 2]
    v2 = Vocab.build(["a", "b", "<eos>"])
    with pytest.raises(LmadaptError, match=r"'q1', 'q2', 'q3', 'q4', 'q5' and 1 more"):
        v2.encode(["a", "q1", "q2", "q1", "q3", "q4", "q5", "q6"])


def test_vocab_dict_round_trip():
    v = Vocab.build("the cat <unk> the <eos> é 日本".split())
    d = json.loads(json.dumps(v.to_dict()))
    w = Vocab.from_dict(d)
    assert w == v and w.itos == v.itos and w.unk == v.unk and w.eos == v.eos and w.stoi == v.stoi
    with pytest.raises(LmadaptError):
        Vocab.from_dict({"itos": ["a", "a", "<eos>"]})  # duplicate
    with pytest.raises(LmadaptError):
        Vocab.from_dict({"itos": ["a"]})  # no <eos>
    with pytest.raises(LmadaptError):
        Vocab.from_dict(["a", "<eos>"])


# --------------------------------------------------------------------------- word-level


def test_eos_per_line_including_blank_lines(tmp_path):
    d = make_dir_corpus(tmp_path / "c", "a b\n\n   \nc\n", "a\n", "b c")
    c = load_corpus(str(d))
    assert c.name == str(d) and c.tokenizer == "word" and c.spm_model is None
    assert words(c, "train") == ["a", "b", "<eos>", "<eos>", "<eos>", "c", "<eos>"]
    assert words(c, "test") == ["b", "c", "<eos>"]  # last line without newline still ends with <eos>
    for s in C.SPLITS:
        t = c.split(s)
        assert t.dtype == torch.long and t.dim() == 1


def test_line_endings_and_utf8(tmp_path):
    unix = make_dir_corpus(tmp_path / "u", "é x\n\ny\n", "x\n", "y\n")
    dos = make_dir_corpus(tmp_path / "d", "é x\r\n\r\ny\r\n", "x\r\n", "y\r\n")
    a, b = load_corpus(str(unix)), load_corpus(str(dos))
    assert a.vocab == b.vocab
    assert torch.equal(a.train, b.train)
    assert words(a, "train") == ["é", "x", "<eos>", "<eos>", "y", "<eos>"]


def test_oov_maps_to_unk(tmp_path):
    d = make_dir_corpus(tmp_path / "c", PTB_LIKE["train"], PTB_LIKE["valid"], PTB_LIKE["test"])
    c = load_corpus(d)
    assert c.vocab.unk is not None
    assert words(c, "valid") == ["the", "<unk>", "sat", "<eos>"]
    assert "dog" not in c.vocab.stoi  # vocabulary is from train only


def test_oov_error_without_unk_convention(tmp_path):
    d = make_dir_corpus(tmp_path / "c", "a b\nb\n", "a b\n", "a zebra b yak\n")
    with pytest.raises(LmadaptError) as e:
        load_corpus(str(d))
    msg = str(e.value)
    assert "test split" in msg and "'zebra'" in msg and "'yak'" in msg and "\n" not in msg


def test_train_counts(tmp_path):
    d = make_dir_corpus(tmp_path / "c", "a b a\n\na\n", "a\n", "b\n")
    c = load_corpus(str(d))
    counts = c.train_counts()
    assert counts.shape == (len(c.vocab),) and counts.dtype == torch.long
    assert counts.tolist() == [3, 3, 1]  # a, <eos>, b
    assert int(counts.sum()) == c.train.numel()


def test_reencode_with_given_vocab(tmp_path):
    first = load_corpus(str(make_dir_corpus(tmp_path / "1", PTB_LIKE["train"], "the cat\n", "a\n")))
    other = make_dir_corpus(tmp_path / "2", "cat cat cat new words\n", "the cat dog\n", "a\n")
    c = load_corpus(str(other), vocab=first.vocab)
    assert c.vocab is first.vocab
    assert words(c, "train") == ["cat", "cat", "cat", "<unk>", "<unk>", "<eos>"]
    assert words(c, "valid") == ["the", "cat", "<unk>", "<eos>"]
    # a given vocabulary without <unk>: unseen words are an error
    no_unk = Vocab.build(["cat", "<eos>"])
    with pytest.raises(LmadaptError, match="'new'"):
        load_corpus(str(other), vocab=no_unk)


# --------------------------------------------------------------------------- bad input


def test_unknown_corpus_lists_known_names():
    with pytest.raises(LmadaptError) as e:
        load_corpus("nonesuch-corpus")
    msg = str(e.value)
    for name in ("ptb", "wikitext-2", "wt2", "wikitext2", "sample", "train.txt"):
        assert name in msg
    assert "\n" not in msg


def test_missing_and_empty_files_are_named(tmp_path):
    d = tmp_path / "c"
    write(d / "train.txt", "a\n")
    write(d / "valid.txt", "a\n")
    with pytest.raises(LmadaptError, match="test.txt"):
        load_corpus(str(d))
    write(d / "test.txt", "\n  \n")
    with pytest.raises(LmadaptError, match=r"empty.*test\.txt"):
        load_corpus(str(d))


def test_invalid_utf8_is_reported(tmp_path):
    d = make_dir_corpus(tmp_path / "c", "a\n", "a\n", "a\n")
    (d / "valid.txt").write_bytes(b"a \xff\n")
    with pytest.raises(LmadaptError, match=r"UTF-8.*valid\.txt"):
        load_corpus(str(d))


def test_unknown_split_and_tokenizer(tmp_path):
    d = make_dir_corpus(tmp_path / "c", "a\n", "a\n", "a\n")
    c = load_corpus(str(d))
    with pytest.raises(LmadaptError, match="train, valid, test"):
        c.split("dev")
    with pytest.raises(LmadaptError, match="word, sentencepiece"):
        load_corpus(str(d), tokenizer="bpe")
    with pytest.raises(LmadaptError, match="spm_model"):
        load_corpus(str(d), spm_model=b"xx")


# --------------------------------------------------------------------------- resolution


def test_named_corpus_from_data_dir(tmp_path):
    root = make_named(tmp_path / "data", "ptb")
    c = load_corpus("ptb", data_dir=str(root))
    assert c.name == "ptb"
    assert [c.train.numel(), c.valid.numel(), c.test.numel()] == [12, 4, 4]
    assert words(c, "test") == ["a", "cat", "ran", "<eos>"]


def test_named_corpus_from_subfolder_and_alias(tmp_path):
    root = tmp_path / "data"
    make_named(root / "wikitext-2", "wikitext-2")
    for alias in ("wikitext-2", "wt2", "WikiText2"):
        c = load_corpus(alias, data_dir=root)
        assert c.name == "wikitext-2" and c.train.numel() == 12


def test_lmadapt_data_env_and_precedence(tmp_path, monkeypatch):
    env_root = make_named(tmp_path / "env", "ptb")
    monkeypatch.setenv("LMADAPT_DATA", str(env_root))
    assert load_corpus("ptb").train.numel() == 12
    # data_dir wins over the environment variable
    arg_root = make_named(tmp_path / "arg", "ptb", {**PTB_LIKE, "train": "x <unk>\n"})
    assert load_corpus("ptb", data_dir=str(arg_root)).train.numel() == 3


def test_partial_named_files_name_the_missing_one(tmp_path):
    root = make_named(tmp_path / "data", "ptb")
    (root / "ptb.valid.txt").unlink()
    with pytest.raises(LmadaptError, match=r"ptb\.valid\.txt"):
        load_corpus("ptb", data_dir=str(root))


def test_not_found_lists_places_tried(tmp_path, monkeypatch):
    monkeypatch.undo()  # the real hub check, made to fail by offline mode
    monkeypatch.delenv("LMADAPT_DATA", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    empty = tmp_path / "empty"
    empty.mkdir()
    import datasets  # noqa: F401  (imported first: the timing below is the lookup, not the import,
    #                   which alone took > 10 s on a loaded 2-core machine)
    start = time.perf_counter()
    with pytest.raises(LmadaptError) as e:
        load_corpus("ptb", data_dir=str(empty))
    elapsed = time.perf_counter() - start
    msg = str(e.value)
    assert str(empty) in msg and "ptb.train.txt" in msg
    assert "Hugging Face hub" in msg and "ptb_text_only" in msg
    assert "\n" not in msg
    assert elapsed < 10
    with pytest.raises(LmadaptError, match="LMADAPT_DATA not set.*Hugging Face hub"):
        load_corpus("wikitext-2")


def test_missing_data_dir_is_an_error(tmp_path):
    with pytest.raises(LmadaptError, match="not a directory"):
        load_corpus("ptb", data_dir=str(tmp_path / "nope"))


def test_hub_check_fails_fast_offline(monkeypatch):
    monkeypatch.undo()
    for var in HUB_VARS:
        monkeypatch.delenv(var, raising=False)
    # nothing listens on port 9 of this machine: connection refused at once
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    reason = C.hub_unavailable_reason(timeout=2.0)
    assert reason is not None and "127.0.0.1:9" in reason
    assert time.perf_counter() - start < 5
    # a probe that gets no answer (a DNS lookup or a connection that hangs) gives up on time
    monkeypatch.setattr(C.urllib.request, "urlopen", lambda *a, **k: time.sleep(5))
    start = time.perf_counter()
    reason = C._probe("https://huggingface.co", 0.3)
    assert reason is not None and "no answer within 0.3s" in reason
    assert time.perf_counter() - start < 2


# --------------------------------------------------------------------------- datasets path


def _hub_from_local(monkeypatch, corpus: str, builder: str, files: dict, column: str, cache: Path):
    source = C.HubSource(
        label=f"local {builder} files",
        attempts=({"path": builder, "data_files": {k: str(v) for k, v in files.items()}, "cache_dir": str(cache)},),
        column=column,
        splits={"train": "train", "valid": "validation", "test": "test"},
    )
    monkeypatch.setitem(C._HUB_SOURCES, corpus, source)
    monkeypatch.setattr(C, "hub_unavailable_reason", lambda timeout=None: None)


TRICKY = {
    "train": " = Title = \n \n the cat <unk> sat . \n\n = = Part = = \n the  dog\tran \n",
    "valid": " \n the cat ran \n",
    "test": " a <unk> cat \n the end",
}


def test_datasets_text_loader_matches_files(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    root = make_named(tmp_path / "data", "wikitext-2", TRICKY)
    from_files = load_corpus("wikitext-2", data_dir=str(root))
    names = C._FILES["wikitext-2"]
    _hub_from_local(
        monkeypatch, "wikitext-2", "text",
        {"train": root / names["train"], "validation": root / names["valid"], "test": root / names["test"]},
        "text", tmp_path / "hf-cache",
    )
    from_hub = load_corpus("wikitext-2")
    assert from_hub.vocab == from_files.vocab
    for s in C.SPLITS:
        assert torch.equal(from_hub.split(s), from_files.split(s)), s


def test_datasets_wikitext_style_rows_match_files(tmp_path, monkeypatch):
    """Rows as Salesforce/wikitext has them: the line with its newline, "" for a blank line."""
    datasets = pytest.importorskip("datasets")
    root = make_named(tmp_path / "data", "wikitext-2", TRICKY)
    from_files = load_corpus("wikitext-2", data_dir=str(root))
    files = {}
    for ours, theirs in (("train", "train"), ("valid", "validation"), ("test", "test")):
        lines = TRICKY[ours].split("\n")
        if lines[-1] == "":
            lines.pop()
        rows = ["" if not line.strip() else line + "\n" for line in lines]
        files[theirs] = tmp_path / f"{theirs}.parquet"
        datasets.Dataset.from_dict({"text": rows}).to_parquet(str(files[theirs]))
    _hub_from_local(monkeypatch, "wikitext-2", "parquet", files, "text", tmp_path / "hf-cache")
    from_hub = load_corpus("wt2")
    assert from_hub.vocab == from_files.vocab
    for s in C.SPLITS:
        assert torch.equal(from_hub.split(s), from_files.split(s)), s


def test_rows_to_lines():
    assert C.rows_to_lines([" a b \n", "", None, "c", "d\r\n", "e\nf\n"]) == [" a b ", "", "", "c", "d", "e", "f"]


# --------------------------------------------------------------------------- sentencepiece


def _spm_corpus(root: Path) -> Path:
    rng = random.Random(0)
    vocab = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()

    def text(n):
        lines = []
        for i in range(n):
            ws = [rng.choice(vocab) for _ in range(rng.randint(0, 8))]
            if i % 7 == 3:
                ws.insert(len(ws) // 2, "<unk>")
            lines.append(" ".join(ws))
        return "\n".join(lines) + "\n"

    return make_dir_corpus(root, text(300), text(40), text(40))


def test_sentencepiece_round_trip(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    d = _spm_corpus(tmp_path / "c")
    c = load_corpus(str(d), tokenizer="sentencepiece", spm_vocab_size=40)
    assert c.tokenizer == "sentencepiece" and isinstance(c.spm_model, bytes) and c.spm_model
    assert c.vocab.itos[c.vocab.eos] == "<eos>" and c.vocab.itos[c.vocab.unk] == "<unk>"
    sp = spm.SentencePieceProcessor(model_proto=c.spm_model)
    assert sp.get_piece_size() == len(c.vocab)
    for s in C.SPLITS:
        lines = C.read_lines(d / f"{s}.txt")
        ids = c.split(s).tolist()
        assert ids.count(c.vocab.eos) == len(lines)
        # decode line by line: pieces back to the words, <unk> where the text had <unk>
        decoded, cur = [], []
        for i in ids:
            if i == c.vocab.eos:
                decoded.append(cur)
                cur = []
            else:
                cur.append(i)
        for line, pieces in zip(lines, decoded):
            segs, run = [], []
            for i in pieces + [c.vocab.unk]:
                if i == c.vocab.unk:
                    if run:
                        segs.append(sp.decode(run))
                    segs.append("<unk>")
                    run = []
                else:
                    run.append(i)
            assert " ".join(" ".join(segs[:-1]).split()) == " ".join(line.split())
    # the same model re-encodes to the same ids, and the vocab is checked against it
    again = load_corpus(str(d), tokenizer="sentencepiece", spm_model=c.spm_model, vocab=c.vocab)
    for s in C.SPLITS:
        assert torch.equal(again.split(s), c.split(s))
    with pytest.raises(LmadaptError, match="does not match"):
        load_corpus(str(d), tokenizer="sentencepiece", spm_model=c.spm_model, vocab=Vocab(["x", "<eos>"]))
    with pytest.raises(LmadaptError, match="without its spm_model"):
        load_corpus(str(d), tokenizer="sentencepiece", vocab=c.vocab)
    with pytest.raises(LmadaptError, match="not a valid sentencepiece model"):
        load_corpus(str(d), tokenizer="sentencepiece", spm_model=b"not a model")


# --------------------------------------------------------------------------- bundled sample

SAMPLE_SIZES = (129_997, 18_344, 15_637)
SAMPLE_VOCAB = 11_847


def test_sample_corpus_loads_offline():
    c = load_corpus()  # the default is the bundled sample
    assert c.name == "sample"
    assert (c.train.numel(), c.valid.numel(), c.test.numel()) == SAMPLE_SIZES
    assert len(c.vocab) == SAMPLE_VOCAB
    assert c.vocab.unk is not None and c.vocab.itos[:3] == ["the", ",", "."]
    assert int(c.train.max()) < len(c.vocab) and int(c.valid.min()) >= 0
    assert (c.valid == c.vocab.unk).any()  # valid words unseen in the sample's train -> <unk>
    assert sum(f.stat().st_size for f in C.SAMPLE_DIR.glob("*.txt")) < 1_000_000
    assert (C.SAMPLE_DIR / "ATTRIBUTION.md").is_file()


# --------------------------------------------------------------------------- real data (opt-in)

REAL = {
    "ptb": ((929_589, 73_760, 82_430), 10_000),
    "wikitext-2": ((2_088_628, 217_646, 245_569), 33_278),
}


@pytest.mark.skipif(not REAL_DATA, reason="set LMADAPT_DATA to the folder holding ptb/ and wikitext-2/")
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_corpus_counts(name, monkeypatch):
    monkeypatch.setenv("LMADAPT_DATA", REAL_DATA)
    sizes, vocab_size = REAL[name]
    c = load_corpus(name)
    assert (c.train.numel(), c.valid.numel(), c.test.numel()) == sizes
    assert len(c.vocab) == vocab_size
