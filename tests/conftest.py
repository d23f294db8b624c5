"""Shared fixtures and helpers: a tiny generated corpus (no ../shared needed), tiny run
configs, one finished tiny run for the tests that only read a run, and the CLI helpers
(in-process `lmadapt`, its one-line errors, a two-process torchrun)."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

# The models here are tiny: a second intra-op thread only spins and waits (on a loaded
# 2-core machine it multiplied the suite's CPU time several-fold).
torch.set_num_threads(1)


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


# Tiny Transformer backbones: a KV window of CONTEXT positions that keeps KEEP when it fills.
CONTEXT, KEEP = 16, 5


def tiny_gpt2(vocab=30, seed=0, context=CONTEXT, keep=KEEP):
    """A 2-layer 16-wide transformers GPT-2 behind lmadapt's HF backbone (needs the [hf] extra)."""
    import transformers

    from lmadapt.backbones.hf import HFCausalLM

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=context, n_embd=16, n_layer=2, n_head=2,
                                  bos_token_id=None, eos_token_id=None)
    lm = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # a peakier softmax than the 0.02-std init gives
        lm.transformer.wte.weight.mul_(15)
    return HFCausalLM(lm, context=context, keep=keep).eval()


def tiny_llama(vocab=30, seed=0, context=CONTEXT, keep=KEEP):
    """A 2-layer Llama-style model (rotary positions, grouped KV heads), as tiny_gpt2."""
    import transformers

    from lmadapt.backbones.hf import HFCausalLM

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=context,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None)
    lm = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        lm.lm_head.weight.mul_(15)
    return HFCausalLM(lm, context=context, keep=keep).eval()


BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def mbpa_reference_neighbours(hidden, targets, t: int, params):
    """Brute-force MbPA neighbours of position t in a stream memory of the last
    params.memory positions: (keys (K, d), values (K,), kernel weights (K,)), float64."""
    from lmadapt.adapt import kernel_weights

    lo = max(0, t - params.memory)
    keys, vals = hidden[lo:t].double(), targets[lo:t]
    d2 = ((keys - hidden[t].double()) ** 2).sum(1)
    sq, idx = d2.topk(min(params.k, t - lo), largest=False)
    w = kernel_weights(sq, torch.ones_like(sq, dtype=torch.bool), params.eps, params.normalise)
    return keys[idx], vals[idx], w


def motif_stream(n: int, vocab: int = 30, seed: int = 1) -> torch.Tensor:
    """A token stream that repeats a 23-token motif 70 % of the time, noise otherwise.

    Repeats make cache/MbPA/dyneval matter; noise keeps it from being trivial.
    """
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(0, vocab, (23,), generator=g)
    noise = torch.randint(0, vocab, (n,), generator=g)
    return torch.where(torch.rand(n, generator=g) < 0.7, motif.repeat(n // 23 + 1)[:n], noise)


class TrainSplit:
    """A stand-in corpus that holds only a training stream: what dyneval's statistics and a
    knn datastore read from a corpus."""

    name = "motif"

    def __init__(self, train: torch.Tensor):
        self.train = train

    def split(self, name):
        assert name == "train", f"read the {name} split"
        return self.train


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny-tensor tests on one thread, whatever an in-process `--threads` set."""
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


def train_args(corpus_dir, out, *extra) -> list:
    """`lmadapt train` arguments for a one-epoch TINY_SETTINGS run; `extra` goes last (a later
    --set wins)."""
    args = ["train", "--data", corpus_dir, "--out", out, "--threads", 1]
    for s in TINY_SETTINGS + ["train.epochs=1"]:
        args += ["--set", s]
    return [str(a) for a in [*args, *extra]]


def cli(*args) -> int:
    """`lmadapt ARGS` in this process (exit status)."""
    from lmadapt.cli import main

    return main([str(a) for a in args])


def one_line_error(capsys) -> str:
    """The captured error: one `lmadapt: error:` line and no traceback."""
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in captured.err + captured.out
    assert err.startswith("lmadapt: error:") and len(err.splitlines()) == 1, err
    return err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m lmadapt ARGS` on CPU (gloo), one thread per process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "lmadapt", *[str(a) for a in args]]
    return subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=timeout)


def _cli_and_exit(env: dict, argv: list) -> None:
    os.environ.update(env)
    code = 1
    try:
        result = cli(*argv)
        code = 0 if result is None else result  # as sys.exit(main()) in lmadapt/__main__.py
    except BaseException:  # noqa: BLE001  (shown in the test's captured output)
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # not pytest's exit handlers: this is a copy of the test process


def forked_cli(*argv, env: dict | None = None):
    """`lmadapt ARGV` in a forked copy of this process, started: another process (its own PID,
    locks and signals) without a fresh interpreter importing torch. Exit status in .exitcode."""
    import multiprocessing

    proc = multiprocessing.get_context("fork").Process(target=_cli_and_exit, args=(env or {}, list(argv)))
    proc.start()
    return proc


def forked_ranks(*argv, world: int = 2, timeout: int = 300) -> list:
    """`lmadapt ARGV` as the `world` ranks of one gloo group, in forked copies of this process,
    with the environment torchrun gives its workers. Returns the exit codes.
    test_train.py keeps a real torchrun."""
    port = free_port()
    procs = [forked_cli(*argv, env=dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                                        LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for rank in range(world)]
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> SimpleNamespace:
    """One finished one-epoch TINY_SETTINGS run (root/corpus, root/run), trained once for every
    test that reads a run without changing it; a test that writes into a run copies it first
    (copy_run). Checkpoints only at validations: the periodic ones would only cost time here."""
    from lmadapt.corpus import load_corpus
    from lmadapt.train import fit

    root = tmp_path_factory.mktemp("tiny-run")
    corpus_dir = write_markov_corpus(root / "corpus", lines=(200, 60, 40))
    cfg = tiny_config(corpus_dir, ["train.epochs=1", "train.checkpoint_interval=1000"])
    results = fit(root / "run", cfg, load_corpus(cfg.data.name))
    return SimpleNamespace(root=root, corpus=corpus_dir, run=root / "run", results=results)


def copy_run(run: Path, dest: Path) -> Path:
    """A private copy of a run directory (its config still names the original corpus)."""
    return Path(shutil.copytree(run, dest))
