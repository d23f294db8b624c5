"""Backbone registry: adding a backbone is one file plus one line here.

A backbone module gives build(LMConfig) -> a model following
lmadapt.backbones.base.Backbone, check_training(RunConfig) (one-line errors for
training options it does not support) and export(run_dir, model, corpus)
(anything written beside model.pt at the end of training).
"""

from __future__ import annotations

import importlib

from lmadapt.errors import LmadaptError

# arch name -> module (imported on use: the gpt2 backbone needs the optional transformers)
ARCHS = {
    "lstm": "lmadapt.backbones.lstm",
    "gpt2": "lmadapt.backbones.gpt2",
}


def get(arch: str):
    if arch not in ARCHS:
        raise LmadaptError(f"unknown model.arch {arch!r}; known: {', '.join(ARCHS)}")
    return importlib.import_module(ARCHS[arch])


def build(config):
    """The model of a model config (LMConfig), untrained."""
    return get(config.arch).build(config)
