"""Corpora for language modelling: PTB, WikiText-2, the bundled sample, or a directory.

Every corpus is turned into three 1-D ``torch.long`` token-id streams (train, valid,
test). Word-level tokenization is the one of the standard awd-lstm-lm ``data.py``:
each line (blank ones included) gives ``line.split()`` followed by one ``<eos>``.
The vocabulary is built from the train split only.

Where a named corpus (``ptb``, ``wikitext-2``) comes from, in order:

1. an explicit directory -- the ``data_dir`` argument, else the ``LMADAPT_DATA``
   environment variable -- holding the standard file names
   (``ptb.{train,valid,test}.txt`` / ``wiki.{train,valid,test}.tokens``) directly or
   in a subfolder named after the corpus (``ptb/``, ``wikitext-2/``);
2. the Hugging Face hub through the ``datasets`` library, only when the hub answers
   a quick connection probe (or when offline mode is set, in which case ``datasets``
   may serve it from its local cache);
3. otherwise an ``LmadaptError`` that says which places were tried.
"""

from __future__ import annotations

import io
import os
import re
import threading
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from lmadapt.errors import LmadaptError

EOS = "<eos>"
UNK = "<unk>"
SPLITS = ("train", "valid", "test")
TOKENIZERS = ("word", "sentencepiece")
SAMPLE_DIR = Path(__file__).resolve().parent / "sample"
DATA_ENV = "LMADAPT_DATA"
# Seconds the hub connection probe may take before the hub is declared unreachable.
HUB_PROBE_TIMEOUT_ENV = "LMADAPT_HUB_TIMEOUT"
HUB_PROBE_TIMEOUT = 3.0

# Canonical corpus name -> accepted spellings (matched case-insensitively).
_ALIASES = {
    "ptb": ("ptb",),
    "wikitext-2": ("wikitext-2", "wt2", "wikitext2"),
    "sample": ("sample",),
}
_NAME_OF = {alias: name for name, aliases in _ALIASES.items() for alias in aliases}
# Standard file names of the named corpora, and the subfolders they may sit in.
_FILES = {
    "ptb": {s: f"ptb.{s}.txt" for s in SPLITS},
    "wikitext-2": {s: f"wiki.{s}.tokens" for s in SPLITS},
}
_SUBDIRS = {"ptb": ("ptb",), "wikitext-2": ("wikitext-2", "wikitext2", "wt2")}
_DIR_FILES = {s: f"{s}.txt" for s in SPLITS}


# --------------------------------------------------------------------------- vocabulary


class Vocab:
    """Token <-> id mapping. ``unk`` is the id of ``<unk>`` (or None), ``eos`` of ``<eos>``."""

    def __init__(self, itos: Sequence[str]):
        itos = list(itos)
        stoi: dict[str, int] = {}
        for i, tok in enumerate(itos):
            if not isinstance(tok, str):
                raise LmadaptError(f"vocabulary entry {i} is not a string: {tok!r}")
            if tok in stoi:
                raise LmadaptError(f"vocabulary has a duplicate entry {tok!r} (ids {stoi[tok]} and {i})")
            stoi[tok] = i
        if EOS not in stoi:
            raise LmadaptError(f"vocabulary has no {EOS} entry")
        self.itos: list[str] = itos
        self.stoi: dict[str, int] = stoi
        self.unk: int | None = stoi.get(UNK)
        self.eos: int = stoi[EOS]

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.itos == other.itos

    __hash__ = None  # type: ignore[assignment]  # mutable lists inside

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)}, unk={self.unk}, eos={self.eos})"

    @classmethod
    def build(cls, train_tokens: Iterable[str]) -> "Vocab":
        """Vocabulary of train_tokens, by descending frequency, ties broken by first occurrence.

        ``<eos>`` is appended if train_tokens never contains it.
        """
        counts = Counter(train_tokens)  # insertion order = first occurrence
        itos = [tok for tok, _ in sorted(counts.items(), key=lambda kv: -kv[1])]  # stable sort
        if EOS not in counts:
            itos.append(EOS)
        return cls(itos)

    def encode(self, tokens: Sequence[str], *, where: str = "") -> list[int]:
        """Ids of tokens; unknown ones map to ``<unk>``, or raise LmadaptError if there is none.

        ``where`` (e.g. "the valid split") only goes into the error message.
        """
        return self._encode_array(tokens, where=where).tolist()

    def _encode_array(self, tokens: Sequence[str], *, where: str = "") -> np.ndarray:
        n = len(tokens)
        if self.unk is not None:
            get, unk = self.stoi.get, self.unk
            return np.fromiter((get(t, unk) for t in tokens), dtype=np.int64, count=n)
        try:
            stoi = self.stoi
            return np.fromiter((stoi[t] for t in tokens), dtype=np.int64, count=n)
        except KeyError:
            pass
        oov: dict[str, None] = {}
        for t in tokens:
            if t not in self.stoi:
                oov[t] = None
        first = list(oov)[:5]
        more = f" and {len(oov) - len(first)} more" if len(oov) > len(first) else ""
        place = f" in {where}" if where else ""
        raise LmadaptError(
            f"{len(oov)} word(s){place} are not in the train vocabulary and the corpus has no "
            f"{UNK} token: {', '.join(repr(w) for w in first)}{more}"
        )

    def to_dict(self) -> dict:
        return {"format": "lmadapt-vocab", "version": 1, "itos": list(self.itos)}

    @classmethod
    def from_dict(cls, d: Any) -> "Vocab":
        if not isinstance(d, dict) or not isinstance(d.get("itos"), list):
            raise LmadaptError("vocabulary data is not a dict with an 'itos' list")
        if d.get("format", "lmadapt-vocab") != "lmadapt-vocab":
            raise LmadaptError(f"vocabulary data has format {d.get('format')!r}, expected 'lmadapt-vocab'")
        return cls(d["itos"])


# --------------------------------------------------------------------------- corpus


@dataclass
class Corpus:
    name: str
    vocab: Vocab
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    tokenizer: str = "word"
    spm_model: bytes | None = field(default=None, repr=False)

    def split(self, name: str) -> torch.Tensor:
        if name not in SPLITS:
            raise LmadaptError(f"unknown split {name!r}: expected one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def train_counts(self) -> torch.Tensor:
        """Frequency of each id in the train split, shape (len(vocab),)."""
        return torch.bincount(self.train, minlength=len(self.vocab))

    def checksums(self) -> dict[str, str]:
        """SHA-256 of each split's token ids: identifies the text a run saw, wherever its
        files live (recorded in config.json; --resume refuses a corpus that changed)."""
        import hashlib

        return {s: hashlib.sha256(self.split(s).to(torch.int64).numpy().tobytes()).hexdigest() for s in SPLITS}


def batchify(data: torch.Tensor, batch_size: int) -> torch.Tensor:
    """1-D stream -> (batch_size, n) columns of contiguous text; the ragged tail is dropped."""
    n = data.numel() // batch_size
    if n < 2:
        raise LmadaptError(f"corpus split of {data.numel()} tokens is too short for batch size {batch_size}")
    return data[: n * batch_size].view(batch_size, n)


# --------------------------------------------------------------------------- reading text


def read_lines(path: str | os.PathLike) -> list[str]:
    """Lines of a UTF-8 text file, split as Python file iteration does (\\n, \\r\\n, \\r).

    A trailing newline does not start an extra line; a missing one still ends the last line.
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig", newline=None) as f:  # utf-8, tolerating a BOM
            text = f.read()
    except FileNotFoundError:
        raise LmadaptError(f"corpus file not found: {path}") from None
    except IsADirectoryError:
        raise LmadaptError(f"corpus file is a directory: {path}") from None
    except UnicodeDecodeError as e:
        raise LmadaptError(f"corpus file is not valid UTF-8: {path} (byte {e.start})") from None
    except OSError as e:
        raise LmadaptError(f"cannot read corpus file {path}: {e.strerror or e}") from None
    if not text.strip():
        raise LmadaptError(f"corpus file is empty: {path}")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


_NEWLINE = re.compile(r"\r\n|\r|\n")


def rows_to_lines(rows: Iterable[str | None]) -> list[str]:
    """Text rows of a Hugging Face dataset -> the lines of the file it was made from.

    One row is one line: Salesforce/wikitext keeps each line's trailing newline
    (``" = Valkyria Chronicles III = \\n"``) and has an empty row per blank line;
    ptb_text_only and ``load_dataset("text")`` rows have no newline. A row holding
    further newlines is split into several lines.
    """
    lines: list[str] = []
    for row in rows:
        row = row or ""
        if row.endswith("\r\n"):
            row = row[:-2]
        elif row.endswith(("\n", "\r")):
            row = row[:-1]
        if "\n" in row or "\r" in row:
            lines.extend(_NEWLINE.split(row))
        else:
            lines.append(row)
    return lines


def word_tokens(lines: Sequence[str]) -> list[str]:
    """``line.split() + ['<eos>']`` for every line, concatenated."""
    if not lines:
        return []
    sep = f" {EOS} "
    return (sep.join(lines) + sep).split()


# --------------------------------------------------------------------------- sources


def _lines_from_files(files: dict[str, Path]) -> dict[str, list[str]]:
    return {s: read_lines(files[s]) for s in SPLITS}


def _find_in_dir(root: Path, corpus: str) -> tuple[dict[str, Path] | None, str]:
    """Standard files of corpus in root or a corpus-named subfolder -> (files, what was looked at)."""
    names = _FILES[corpus]
    candidates = [root] + [root / sub for sub in _SUBDIRS[corpus]]
    for folder in candidates:
        files = {s: folder / names[s] for s in SPLITS}
        present = [s for s in SPLITS if files[s].is_file()]
        if present and len(present) < len(SPLITS):
            missing = next(files[s] for s in SPLITS if s not in present)
            what = "is a directory, not a file" if missing.is_dir() else "not found"
            raise LmadaptError(f"corpus file {what}: {missing} (the other {corpus} files are in {folder})")
        if present:
            return files, str(folder)
    looked = f"{root} and {root / _SUBDIRS[corpus][0]}/ (no {names['train']})"
    return None, looked


@dataclass(frozen=True)
class HubSource:
    """How to get one corpus from the hub: load_dataset attempts (kwargs), tried in order."""

    label: str
    attempts: tuple[dict, ...]
    column: str
    splits: dict[str, str]  # our split name -> hub split name


_HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
_HUB_SOURCES: dict[str, HubSource] = {
    "wikitext-2": HubSource(
        label="Salesforce/wikitext (wikitext-2-v1)",
        attempts=({"path": "Salesforce/wikitext", "name": "wikitext-2-v1"},),
        column="text",
        splits=_HUB_SPLITS,
    ),
    "ptb": HubSource(
        label="ptb-text-only/ptb_text_only",
        attempts=(
            {"path": "ptb-text-only/ptb_text_only", "name": "penn_treebank"},
            # The main branch may still hold only a loading script, which datasets>=4
            # refuses; the hub's automatic parquet export has the same rows.
            {
                "path": "ptb-text-only/ptb_text_only",
                "revision": "refs/convert/parquet",
                "data_files": {h: f"penn_treebank/{h}/*.parquet" for h in _HUB_SPLITS.values()},
            },
        ),
        column="sentence",
        splits=_HUB_SPLITS,
    ),
}

_TRUE = {"1", "ON", "YES", "TRUE"}
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def _probe(url: str, timeout: float) -> str | None:
    """None if url answers an HTTP HEAD request (any status) within timeout seconds, else why not.

    Uses urllib, so HTTP(S)_PROXY settings apply as they do for the hub client; runs in a
    daemon thread so that a hanging DNS lookup cannot stall the caller.
    """
    result: list[str | None] = []

    def attempt() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
                pass
            result.append(None)
        except urllib.error.HTTPError:
            result.append(None)  # the server answered
        except Exception as e:  # noqa: BLE001  (URLError, TLS errors, timeouts, ...)
            why = getattr(e, "reason", None) or e
            result.append(f"cannot reach {url} ({_one_line(why) if isinstance(why, BaseException) else why})")

    t = threading.Thread(target=attempt, daemon=True, name="lmadapt-hub-probe")
    t.start()
    t.join(timeout)
    return result[0] if result else f"cannot reach {url} (no answer within {timeout:g}s)"


def _hub_offline_var() -> str | None:
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().upper() in _TRUE:
            return var
    return None


def hub_unavailable_reason(timeout: float | None = None) -> str | None:
    """Why the hub cannot be used right now, or None to go ahead (fast: a few seconds at most).

    None also when offline mode is set and ``datasets`` honours it (it then only reads
    its local cache and fails at once if the corpus is not there).
    """
    try:
        import datasets  # noqa: F401  (imported lazily: it is slow to import)
        import datasets.config
    except ImportError:
        return "the datasets library is not installed"
    var = _hub_offline_var()
    if var is not None:
        if getattr(datasets.config, "HF_HUB_OFFLINE", False):
            return None  # datasets is in offline mode: cache only, no network
        return f"{var} is set"
    if timeout is None:
        try:
            timeout = float(os.environ.get(HUB_PROBE_TIMEOUT_ENV, HUB_PROBE_TIMEOUT))
        except ValueError:
            timeout = HUB_PROBE_TIMEOUT
    endpoint = os.environ.get("HF_ENDPOINT") or getattr(datasets.config, "HF_ENDPOINT", "") or "https://huggingface.co"
    return _probe(endpoint.rstrip("/") + "/", timeout)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _lines_from_hub(corpus: str) -> tuple[dict[str, list[str]] | None, str]:
    """Splits of corpus from the hub -> (lines per split or None, what happened)."""
    source = _HUB_SOURCES[corpus]
    place = f"the Hugging Face hub ({source.label})"
    reason = hub_unavailable_reason()
    if reason is not None:
        return None, f"{place}: skipped, {reason}"
    import datasets

    errors = []
    for kwargs in source.attempts:
        try:
            dd = datasets.load_dataset(**kwargs)
            out = {}
            for ours, theirs in source.splits.items():
                rows = dd[theirs].with_format(None)[source.column]
                out[ours] = rows_to_lines(rows)
                if not any(line.split() for line in out[ours]):
                    raise LmadaptError(f"split {theirs!r} has no text")
            return out, place
        except Exception as e:  # noqa: BLE001  (any failure: record it, try the next way)
            errors.append(f"{type(e).__name__}: {_one_line(e)}")
    return None, f"{place}: {'; then '.join(errors)}"


def _named_lines(corpus: str, data_dir: str | os.PathLike | None) -> dict[str, list[str]]:
    tried = []
    if data_dir is not None:
        root, origin = Path(data_dir).expanduser(), "data_dir"
    elif os.environ.get(DATA_ENV):
        root, origin = Path(os.environ[DATA_ENV]).expanduser(), f"${DATA_ENV}"
    else:
        root, origin = None, None
        tried.append(f"no directory (data_dir not given, ${DATA_ENV} not set)")
    if root is not None:
        if not root.is_dir():
            raise LmadaptError(f"{origin} is not a directory: {root}")
        files, looked = _find_in_dir(root, corpus)
        if files is not None:
            return _lines_from_files(files)
        tried.append(f"{origin} {looked}")
    lines, looked = _lines_from_hub(corpus)
    if lines is not None:
        return lines
    tried.append(looked)
    raise LmadaptError(f"corpus {corpus!r} not found; tried: " + "; ".join(tried))


def absolute_source(data: str, data_dir: str | None) -> tuple[str, str | None]:
    """(data, data_dir) with every path made absolute (names such as 'ptb' stay names), so a
    run's config.json works from any working directory."""
    if _NAME_OF.get(str(data).strip().lower()) is None and Path(data).expanduser().exists():
        data = str(Path(data).expanduser().resolve())
    if data_dir:
        data_dir = str(Path(data_dir).expanduser().resolve())
    return data, data_dir


def _resolve(data: str | os.PathLike, data_dir: str | os.PathLike | None) -> tuple[str, dict[str, list[str]]]:
    """Corpus name and the lines of each split."""
    try:
        text = os.fspath(data)
    except TypeError:
        raise LmadaptError(f"data must be a corpus name or a directory path, got {type(data).__name__}") from None
    name = _NAME_OF.get(text.strip().lower())
    if name == "sample":
        return name, _lines_from_files({s: SAMPLE_DIR / _DIR_FILES[s] for s in SPLITS})
    if name is not None:
        return name, _named_lines(name, data_dir)
    path = Path(text)
    if path.is_dir():
        missing = [path / f for f in _DIR_FILES.values() if not (path / f).is_file()]
        if missing:
            what = "is a directory, not a file" if missing[0].is_dir() else "not found"
            raise LmadaptError(
                f"corpus file {what}: {missing[0]} (a corpus directory holds train.txt, valid.txt, test.txt)"
            )
        return text, _lines_from_files({s: path / _DIR_FILES[s] for s in SPLITS})
    known = ", ".join(f"{n} (or {', '.join(a[1:])})" if len(a) > 1 else n for n, a in _ALIASES.items())
    raise LmadaptError(
        f"unknown corpus {text!r}: expected one of {known}, or a directory holding train.txt, valid.txt, test.txt"
    )


# --------------------------------------------------------------------------- sentencepiece


def _spm():
    try:
        import sentencepiece
    except ImportError:
        raise LmadaptError("tokenizer 'sentencepiece' needs the sentencepiece package (pip install sentencepiece)") from None
    return sentencepiece


def _strip_unk(line: str) -> str:
    return " ".join(w for w in line.split() if w != UNK)


def train_sentencepiece(train_lines: Sequence[str], vocab_size: int, **options: Any) -> bytes:
    """Serialized sentencepiece model trained on train_lines (in memory, no files).

    ``<unk>`` is the model's unknown piece (id 0) and ``<eos>`` a user-defined symbol
    (id 1); there is no bos/eos/pad of sentencepiece's own. Literal ``<unk>`` words in
    the text are left out of training (they are mapped to the unknown id when encoding).
    """
    spm = _spm()
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 3:
        raise LmadaptError(f"spm_vocab_size must be an integer >= 3, got {vocab_size!r}")
    sentences = [s for s in (_strip_unk(line) for line in train_lines) if s]
    if not sentences:
        raise LmadaptError("cannot train sentencepiece: the train split has no text")
    settings = dict(
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="unigram",
        unk_id=0,
        unk_piece=UNK,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        user_defined_symbols=[EOS],
        input_sentence_size=2_000_000,
        shuffle_input_sentence=True,
        num_threads=max(1, min(os.cpu_count() or 1, 8)),
        minloglevel=2,
    )
    settings.update(options)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buf, **settings)
    except (RuntimeError, ValueError) as e:
        raise LmadaptError(f"sentencepiece training failed: {_one_line(e)}") from None
    return buf.getvalue()


def _spm_processor(model: bytes):
    spm = _spm()
    if not isinstance(model, (bytes, bytearray)) or not model:
        raise LmadaptError("spm_model must be the non-empty bytes of a serialized sentencepiece model")
    try:
        sp = spm.SentencePieceProcessor(model_proto=bytes(model))
    except (RuntimeError, ValueError, TypeError, OSError) as e:
        raise LmadaptError(f"spm_model is not a valid sentencepiece model: {_one_line(e)}") from None
    eos = sp.piece_to_id(EOS)
    if sp.id_to_piece(eos) != EOS or sp.unk_id() < 0 or sp.id_to_piece(sp.unk_id()) != UNK:
        raise LmadaptError(f"spm_model has no {EOS} symbol or its unknown piece is not {UNK}")
    return sp


def _spm_encode(sp, lines: Sequence[str], unk: int, eos: int) -> np.ndarray:
    """Ids of lines: each line's pieces then ``<eos>``; a literal ``<unk>`` word -> unk."""
    segments: list[str] = []
    plan: list[int] = []  # >= 0: a fixed id; -1: the next encoded segment
    for line in lines:
        words = line.split()
        if UNK in words:
            run: list[str] = []
            for w in words + [UNK]:
                if w == UNK:
                    if run:
                        segments.append(" ".join(run))
                        plan.append(-1)
                        run = []
                    plan.append(unk)
                else:
                    run.append(w)
            plan.pop()  # the sentinel UNK added above
        elif words:
            segments.append(" ".join(words))
            plan.append(-1)
        plan.append(eos)
    encoded = iter(sp.encode(segments, out_type=int)) if segments else iter(())
    out: list[int] = []
    for step in plan:
        if step == -1:
            out.extend(next(encoded))
        else:
            out.append(step)
    return np.asarray(out, dtype=np.int64)


# --------------------------------------------------------------------------- entry point


def load_corpus(
    data: str = "sample",
    data_dir: str | None = None,
    *,
    tokenizer: str = "word",
    spm_vocab_size: int = 8000,
    vocab: Vocab | None = None,
    spm_model: bytes | None = None,
) -> Corpus:
    """Load a corpus as token-id streams.

    data: ``ptb``, ``wikitext-2`` (``wt2``, ``wikitext2``), ``sample`` (bundled, offline),
    or a directory holding ``train.txt``, ``valid.txt``, ``test.txt``.
    data_dir: where to look for ptb / wikitext-2 files (else ``$LMADAPT_DATA``, else the hub).
    tokenizer: ``word`` (whitespace words + ``<eos>`` per line) or ``sentencepiece``
    (a model with about spm_vocab_size pieces trained on the train split).
    vocab / spm_model: re-encode with an existing run's vocabulary / sentencepiece model
    instead of building new ones.
    """
    if tokenizer not in TOKENIZERS:
        raise LmadaptError(f"unknown tokenizer {tokenizer!r}: expected one of {', '.join(TOKENIZERS)}")
    if vocab is not None and not isinstance(vocab, Vocab):
        raise LmadaptError(f"vocab must be a Vocab, got {type(vocab).__name__}")
    if spm_model is not None and tokenizer != "sentencepiece":
        raise LmadaptError("spm_model was given but tokenizer is 'word'; pass tokenizer='sentencepiece'")
    name, lines = _resolve(data, data_dir)

    if tokenizer == "word":
        train_tokens = word_tokens(lines["train"])
        if vocab is None:
            vocab = Vocab.build(train_tokens)
        ids = {
            s: vocab._encode_array(train_tokens if s == "train" else word_tokens(lines[s]), where=f"the {s} split")
            for s in SPLITS
        }
    else:
        if spm_model is None and vocab is not None:
            raise LmadaptError("a vocab was given for tokenizer 'sentencepiece' without its spm_model")
        if spm_model is None:
            spm_model = train_sentencepiece(lines["train"], spm_vocab_size)
        sp = _spm_processor(spm_model)
        spm_vocab = Vocab([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
        if vocab is not None and vocab != spm_vocab:
            raise LmadaptError("the given vocab does not match the pieces of the given spm_model")
        vocab = spm_vocab
        ids = {s: _spm_encode(sp, lines[s], vocab.unk, vocab.eos) for s in SPLITS}

    tensors = {s: torch.from_numpy(ids[s]) for s in SPLITS}
    return Corpus(
        name=name,
        vocab=vocab,
        train=tensors["train"],
        valid=tensors["valid"],
        test=tensors["test"],
        tokenizer=tokenizer,
        spm_model=bytes(spm_model) if spm_model is not None else None,
    )


__all__ = [
    "absolute_source",
    "Corpus",
    "Vocab",
    "load_corpus",
    "read_lines",
    "rows_to_lines",
    "word_tokens",
    "train_sentencepiece",
    "hub_unavailable_reason",
    "EOS",
    "UNK",
    "SPLITS",
    "TOKENIZERS",
]
