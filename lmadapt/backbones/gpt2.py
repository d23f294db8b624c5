"""model.arch=gpt2: a transformers GPT-2 built from the run's model config and trained here.

The run directory keeps model.pt (the state dict, for resume and lmadapt) and, at
the end of training, hf/: the best weights written by save_pretrained (safetensors)
with a tokenizer for word-level runs, so that
AutoModelForCausalLM.from_pretrained(run_dir / "hf") and `lmadapt eval --hf-model
run_dir/hf` load it without lmadapt's metadata.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from lmadapt.backbones.hf import HFCausalLM, require_transformers
from lmadapt.errors import LmadaptError

HF_DIR = "hf"


def check_config(config) -> None:
    for name in ("n_layer", "n_embd", "n_head", "context"):
        if getattr(config, name) < 1:
            raise LmadaptError(f"model.{name} must be >= 1, got {getattr(config, name)}")
    if config.n_embd % config.n_head:
        raise LmadaptError(f"model.n_embd {config.n_embd} is not divisible by model.n_head {config.n_head}")
    if not 0.0 <= config.dropout < 1.0:
        raise LmadaptError(f"model.dropout must be in [0, 1), got {config.dropout}")


def build(config) -> HFCausalLM:
    transformers = require_transformers("model.arch=gpt2")
    check_config(config)
    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.context, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=config.dropout, embd_pdrop=config.dropout,
        attn_pdrop=config.dropout, tie_word_embeddings=config.tie_weights,
        bos_token_id=None, eos_token_id=None)  # lmadapt's vocabularies have no GPT-2 ids
    return HFCausalLM(transformers.GPT2LMHeadModel(hf_config), context=config.context)


def check_training(cfg) -> None:
    """One-line errors for the LSTM-only training options."""
    require_transformers("model.arch=gpt2")
    check_config(cfg.model)
    m, t = cfg.model, cfg.train
    if m.softmax != "full":
        raise LmadaptError(f"model.softmax={m.softmax!r} is an LSTM option; model.arch=gpt2 needs 'full'")
    if t.sampled_softmax > 0:
        raise LmadaptError("train.sampled_softmax is an LSTM option; set it to 0 with model.arch=gpt2")
    if t.nt_asgd:
        raise LmadaptError("train.nt_asgd is an LSTM option; use adam or adamw with model.arch=gpt2")
    if t.bptt > m.context:
        raise LmadaptError(f"train.bptt {t.bptt} is longer than model.context {m.context} (GPT-2's positions)")


def word_tokenizer(vocab):
    """A transformers tokenizer reproducing lmadapt's word-level encoding: whitespace words,
    <eos> for every newline, <unk> for unknown words."""
    require_transformers("a word-level tokenizer")
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lmadapt.corpus import EOS, UNK

    unk = UNK if vocab.unk is not None else None
    tok = Tokenizer(models.WordLevel(vocab=dict(vocab.stoi), unk_token=unk))
    tok.normalizer = normalizers.Replace("\n", f" {EOS} ")
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, eos_token=EOS)


def export(run_dir: Path, model: HFCausalLM, corpus) -> None:
    """Write run_dir/hf (save_pretrained, safetensors) atomically: into a temporary folder, then renamed."""
    run_dir = Path(run_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".hf.", dir=run_dir))
    try:
        model.lm.save_pretrained(tmp, safe_serialization=True)
        if corpus.tokenizer == "word":  # sentencepiece runs: the model only (no transformers tokenizer yet)
            word_tokenizer(corpus.vocab).save_pretrained(tmp)
        target = run_dir / HF_DIR
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
