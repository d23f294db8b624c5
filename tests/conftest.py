"""Shared fixtures: a tiny generated corpus (no ../shared needed) and tiny run configs."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


def write_markov_corpus(root: Path, seed: int = 0, words: int = 40, lines=(300, 40, 40)) -> Path:
    """A small learnable corpus: each word strongly predicts the next one.

    Valid/test use only train words, plus an <unk> convention so OOVs are legal.
    """
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(words)] + ["<unk>"]
    successor = {w: rng.sample(vocab, 3) for w in vocab}
    root.mkdir(parents=True, exist_ok=True)
    for split, n_lines in zip(("train", "valid", "test"), lines):
        out = []
        for _ in range(n_lines):
            w = rng.choice(vocab)
            line = [w]
            for _ in range(rng.randint(4, 12)):
                w = rng.choice(successor[w])
                line.append(w)
            out.append(" ".join(line))
        (root / f"{split}.txt").write_text("\n".join(out) + "\n")
    return root


def tiny_lm(vocab: int = 30, seed: int = 0):
    """A 1-layer 12-unit LSTM LM in eval mode, for the streaming-evaluation tests."""
    from lmadapt.model import LMConfig, LSTMLM

    torch.manual_seed(seed)
    model = LSTMLM(LMConfig(vocab_size=vocab, emb_size=12, hidden_size=12, num_layers=1)).eval()
    with torch.no_grad():  # a peakier softmax than the tiny init gives
        model.decoder.weight.mul_(8)
    return model


def motif_stream(n: int, vocab: int = 30, seed: int = 1) -> torch.Tensor:
    """A token stream that repeats a 23-token motif 70 % of the time, noise otherwise.

    Repeats make cache/MbPA/dyneval matter; noise keeps it from being trivial.
    """
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(0, vocab, (23,), generator=g)
    noise = torch.randint(0, vocab, (n,), generator=g)
    return torch.where(torch.rand(n, generator=g) < 0.7, motif.repeat(n // 23 + 1)[:n], noise)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny-tensor tests on one thread (more only adds contention)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_corpus_dir(tmp_path) -> Path:
    return write_markov_corpus(tmp_path / "corpus")


TINY_SETTINGS = [
    "model.emb_size=24", "model.hidden_size=24", "model.num_layers=2",
    "model.dropout_input=0.2", "model.dropout_hidden=0.2", "model.dropout_output=0.2",
    "model.dropout_embedding=0.1", "model.weight_drop=0.2",
    "train.batch_size=4", "train.bptt=8", "train.epochs=2", "train.lr=0.03",
    "train.checkpoint_interval=3", "train.eval_interval=10", "train.eval_batch_size=2",
    "train.lr_schedule=constant", "train.early_stop_patience=0",
]


def tiny_config(corpus_dir: Path, extra: list[str] = ()):
    from lmadapt.config import RunConfig, apply_overrides

    cfg = RunConfig()
    cfg.data.name = str(corpus_dir)
    apply_overrides(cfg, TINY_SETTINGS + list(extra))
    return cfg
