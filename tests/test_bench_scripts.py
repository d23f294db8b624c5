"""The bench diagnostics whose figures the README reports (bench/ is not a package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from conftest import motif_stream, tiny_lm
from lmadapt.report import frequency_buckets


def _load(name: str):
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bucket_mass_matches_report_buckets_and_a_direct_sum(one_thread):
    bm = _load("bucket_mass")
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
