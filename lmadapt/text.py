"""What `lmadapt eval` scores: a run's corpus split, any text file, or either through a
Hugging Face model's own tokenizer.

Token streams come with the size of the text in words and UTF-8 bytes, so that a
perplexity per word and bits per byte compare across tokenizers (the units of
lm-evaluation-harness's wikitext task: words are whitespace-separated strings, bytes
the UTF-8 encoding; newlines are not words). The first token of a stream is never
scored (it has no context), so these figures leave out that one token's loss.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch

from lmadapt import runs
from lmadapt.errors import LmadaptError

OOV_WARNING = 0.05  # warn when more than this fraction of a text's words are out of the vocabulary


def read_text(path) -> str:
    """A text file as lmadapt reads corpora (UTF-8, universal newlines), ending in a newline."""
    from lmadapt.corpus import read_lines

    return "\n".join(read_lines(path)) + "\n"


def text_units(text: str) -> dict:
    return {"words": len(text.split()), "bytes": len(text.encode("utf-8"))}


def unit_figures(log_probs: torch.Tensor, units: dict) -> dict:
    """Per-word perplexity, byte perplexity and bits per byte of a scored stream."""
    nll = -float(log_probs.double().sum())
    out = {}
    if units.get("words"):
        out["word_ppl"] = math.exp(nll / units["words"])
    if units.get("bytes"):
        out["byte_ppl"] = math.exp(nll / units["bytes"])
        out["bits_per_byte"] = nll / units["bytes"] / math.log(2)
    return out


@dataclass
class TextCorpus:
    """The corpus interface evaluate/stream use (split(), train, train_counts()) over
    streams encoded here; `train` (dyneval's statistics) is encoded only when read."""

    name: str
    vocab_size: int
    streams: dict[str, torch.Tensor]
    units: dict[str, dict]
    train_source: Callable[[], torch.Tensor] | None = field(default=None, repr=False)
    oov_rate: float | None = None
    encoder: Callable[[str], torch.Tensor] | None = field(default=None, repr=False)  # text -> ids
    texts: dict[str, str] = field(default_factory=dict, repr=False)  # each stream's text, when it has one

    def split(self, name: str) -> torch.Tensor:
        if name not in self.streams:
            raise LmadaptError(f"nothing to score under {name!r}; have {', '.join(self.streams)}")
        return self.streams[name]

    @cached_property
    def train(self) -> torch.Tensor:
        if self.train_source is None:
            return torch.empty(0, dtype=torch.long)
        try:
            return self.train_source()
        except LmadaptError as exc:
            raise LmadaptError(f"the training split (for dyneval's statistics, frequency buckets): {exc}") from None

    def train_counts(self) -> torch.Tensor:
        """Training-split frequencies (report's buckets); zeros, with a warning, without training data."""
        try:
            train = self.train
        except LmadaptError as exc:
            print(f"lmadapt: warning: no training-split frequencies in the tokens record ({exc})", file=sys.stderr)
            train = torch.empty(0, dtype=torch.long)
        return torch.bincount(train, minlength=self.vocab_size)


def hold_out_prefix(corpus: TextCorpus, split: str, tokens: int) -> tuple[TextCorpus, dict]:
    """`corpus` with `split` cut after the fewest whole lines whose ids cover its first
    `tokens` + 1 (what tuning read): the scored stream starts on the next line, so no
    token that tuning saw, nor the rest of its line, is scored."""
    text = corpus.texts.get(split)
    if text is None or corpus.encoder is None:
        raise LmadaptError(f"cannot hold out a prefix of {split!r}: its text is not kept")
    lines = text.splitlines(keepends=True)
    lo, hi = 1, len(lines)
    while lo < hi:  # the smallest line count covering the tuned ids (encoding is monotone in lines)
        mid = (lo + hi) // 2
        if corpus.encoder("".join(lines[:mid])).numel() >= tokens + 1:
            hi = mid
        else:
            lo = mid + 1
    rest = "".join(lines[lo:])
    ids = corpus.encoder(rest) if rest.strip() else torch.empty(0, dtype=torch.long)
    if ids.numel() < 2:
        raise LmadaptError(f"tuning used the first {tokens:,} tokens of {corpus.name} and nothing is left to "
                           f"score: give a longer text or a smaller --tune-minutes")
    held = {"split": split, "lines": lo, "of_lines": len(lines), "scored_tokens": int(ids.numel()) - 1}
    return replace(corpus, streams={**corpus.streams, split: ids}, units={**corpus.units, split: text_units(rest)},
                   texts={**corpus.texts, split: rest}), held


def _split_lines(data: str, data_dir, split: str) -> list[str]:
    from lmadapt.corpus import _resolve

    return _resolve(data, data_dir)[1][split]


def _word_encode(vocab, text: str, where: str) -> tuple[torch.Tensor, float]:
    from lmadapt.corpus import word_tokens

    ids = torch.from_numpy(vocab._encode_array(word_tokens(text.splitlines()), where=where))
    words = text.split()  # the rate is over words: the <eos> of every line is never out of vocabulary
    unknown = sum(1 for w in words if w not in vocab.stoi)
    return ids, unknown / max(len(words), 1)


def run_text_corpus(run_dir, cfg, text_path, data=None, data_dir=None) -> TextCorpus:
    """A text file encoded with a run's vocabulary (OOV words -> <unk>) or sentencepiece model.
    The run's training corpus is read only if a method asks for training data (dyneval)."""
    from lmadapt.corpus import Vocab, _spm_encode, _spm_processor, load_corpus

    run_dir = Path(run_dir)
    vocab = Vocab.from_dict(runs.read_json(run_dir / runs.VOCAB))
    text = read_text(text_path)
    spm = (run_dir / runs.SPM).read_bytes() if (run_dir / runs.SPM).is_file() else None
    oov = None
    if spm is not None:
        sp = _spm_processor(spm)

        def encoder(t: str) -> torch.Tensor:
            return torch.from_numpy(_spm_encode(sp, t.splitlines(), vocab.unk, vocab.eos))
        ids = encoder(text)
    else:
        def encoder(t: str) -> torch.Tensor:
            return _word_encode(vocab, t, f"{text_path}")[0]
        ids, oov = _word_encode(vocab, text, f"{text_path}")
        if oov > OOV_WARNING:
            print(f"lmadapt: warning: {100 * oov:.1f}% of the words of {text_path} are not in the run's "
                  f"vocabulary (scored as <unk>)", file=sys.stderr)

    def train():
        corpus = load_corpus(data or cfg.data.name, data_dir if data_dir is not None else cfg.data.data_dir,
                             tokenizer=cfg.data.tokenizer, vocab=vocab, spm_model=spm)
        return corpus.train

    return TextCorpus(name=str(text_path), vocab_size=len(vocab), streams={"text": ids},
                      units={"text": text_units(text)}, train_source=train, oov_rate=oov, encoder=encoder,
                      texts={"text": text})


def hf_corpus(tokenizer, vocab_size: int, *, text_path=None, data=None, data_dir=None, split="valid",
              extra_splits: tuple = ()) -> TextCorpus:
    """A text file, or a corpus split rebuilt as text (lines + newlines), through an HF tokenizer;
    `extra_splits`: further splits of the corpus to encode (e.g. valid, for --tune)."""
    def encode(text: str) -> torch.Tensor:
        try:
            ids = tokenizer(text, verbose=False)["input_ids"]
        except Exception as exc:  # tokenizers raises a bare Exception, e.g. for a word without <unk>
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise LmadaptError(f"the model's tokenizer cannot encode the text: {first}") from None
        return torch.tensor(ids, dtype=torch.long)

    if text_path is not None:
        text, name, key = read_text(text_path), str(text_path), "text"
        train = (lambda: encode("\n".join(_split_lines(data, data_dir, "train")) + "\n")) if data else None
    else:
        if data is None:
            raise LmadaptError("--hf-model needs --text FILE or --data CORPUS to score")
        text, name, key = "\n".join(_split_lines(data, data_dir, split)) + "\n", str(data), split
        train = lambda: encode("\n".join(_split_lines(data, data_dir, "train")) + "\n")  # noqa: E731
    ids = encode(text)
    if ids.numel() < 2:
        raise LmadaptError(f"{name}: fewer than 2 tokens to score")
    if int(ids.max()) >= vocab_size:
        raise LmadaptError(f"the tokenizer gives id {int(ids.max())} but the model has {vocab_size} outputs")
    streams, units, texts = {key: ids}, {key: text_units(text)}, {key: text}
    for extra in extra_splits:
        if text_path is None and extra != key:
            texts[extra] = "\n".join(_split_lines(data, data_dir, extra)) + "\n"
            streams[extra], units[extra] = encode(texts[extra]), text_units(texts[extra])
    return TextCorpus(name=name, vocab_size=vocab_size, streams=streams, units=units, train_source=train,
                      encoder=encode, texts=texts)


def load_eval_inputs(run_dir=None, *, hf_model=None, text=None, data=None, data_dir=None, split="valid",
                     context=None, keep=None, device="cpu", checkpoint=None, extra_splits: tuple = ()):
    """(model, corpus, split) for `lmadapt eval`: a run directory (the weights of `checkpoint`,
    lmadapt.checkpoint; None: best) or --hf-model, a corpus or --text; `extra_splits`: further
    splits an HF tokenizer encodes (valid, for --tune)."""
    if (run_dir is None) == (hf_model is None):
        raise LmadaptError("give either a run directory or --hf-model DIR")
    if hf_model is not None and checkpoint is not None:
        raise LmadaptError("--checkpoint chooses the weights of a run directory; --hf-model DIR has its own")
    if hf_model is not None:
        from lmadapt.backbones.hf import load_pretrained

        model, tokenizer = load_pretrained(hf_model, context=context, keep=keep, device=device)
        corpus = hf_corpus(tokenizer, model.vocab_size, text_path=text, data=data, data_dir=data_dir, split=split,
                           extra_splits=extra_splits)
        return model, corpus, "text" if text is not None else split

    from lmadapt.checkpoint import load_model
    from lmadapt.evaluate import load_for_eval

    checkpoint = checkpoint or "best"
    if text is not None:
        model, cfg, _ = load_model(runs.require_run_dir(run_dir), device, checkpoint)
        corpus = run_text_corpus(run_dir, cfg, text, data, data_dir)
        if corpus.vocab_size != model.vocab_size:
            raise LmadaptError(f"{run_dir}: vocab.json has {corpus.vocab_size} words but the model {model.vocab_size}")
        split = "text"
    else:
        model, corpus, cfg = load_for_eval(run_dir, data, data_dir, device, checkpoint)
        corpus.units = {split: text_units("\n".join(_split_lines(data or cfg.data.name, data_dir if data_dir is not None
                                                                  else cfg.data.data_dir, split)) + "\n")}
    if context is not None or keep is not None:
        if not hasattr(model, "set_context"):
            raise LmadaptError("--context and --context-keep apply to Transformer backbones; this run is an LSTM")
        model.set_context(context if context is not None else model.context, keep)
    return model, corpus, split
