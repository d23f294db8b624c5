"""The LSTM backbone: lmadapt.model.LSTMLM, weights in model.pt."""

from __future__ import annotations

from pathlib import Path

from lmadapt.model import LMConfig, LSTMLM


def build(config: LMConfig) -> LSTMLM:
    return LSTMLM(config)


def check_training(cfg) -> None:
    """Every training option applies to the LSTM."""


def export(run_dir: Path, model: LSTMLM, corpus) -> None:
    """Nothing beyond model.pt: the LSTM has no outside format."""
