"""A trained model from a run directory: its config.json, then the weights of one checkpoint.

Which weights (`checkpoint`):

* "best": model.pt, the weights of the best validation (what results.json reports);
* "last": the model in last.pt, where training stopped (or now stands, for a run still
  training); under NT-ASGD its averaged weights, which are what training validates;
* a path: a file of either kind (a model.pt state dict or a last.pt training checkpoint),
  e.g. a copy kept from another point of training. Its weights must fit the run's config.

Evaluation loads models through here, never through the trainer (lmadapt.train).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmadapt import backbones, runs
from lmadapt.config import RunConfig
from lmadapt.errors import LmadaptError

FORMAT_VERSION = 2  # config.json layout: 2 adds format_version, precision and corpus checksums
NAMED = ("best", "last")


def read_config(run_dir: Path) -> tuple[RunConfig, dict]:
    """The run's config and the raw config.json (refused if written by a newer layout)."""
    path = Path(run_dir) / runs.CONFIG
    meta = runs.read_json(path)
    version = meta.get("format_version", 1) if isinstance(meta, dict) else 1
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise LmadaptError(f"{path} has format_version {version!r}; this lmadapt reads versions up to "
                           f"{FORMAT_VERSION}: upgrade lmadapt")
    return RunConfig.from_dict(meta, source=str(path)), meta


def checkpoint_file(run_dir: Path, checkpoint: str = "best") -> Path:
    """The file `checkpoint` names for this run (see the module docstring)."""
    run_dir = Path(run_dir)
    if checkpoint == "best":
        return run_dir / runs.BEST
    if checkpoint == "last":
        if not (run_dir / runs.LAST).is_file():
            raise LmadaptError(f"{run_dir} has no {runs.LAST} (its training kept no resumable checkpoint); "
                               f"use --checkpoint best")
        return run_dir / runs.LAST
    path = Path(checkpoint)
    if not path.is_file():
        raise LmadaptError(f"--checkpoint {checkpoint}: no such file (give best, last or a checkpoint file)")
    return path


def _is_training_checkpoint(data) -> bool:
    return isinstance(data, dict) and isinstance(data.get("model"), dict) and isinstance(data.get("progress"), dict)


def _is_state_dict(data) -> bool:
    return isinstance(data, dict) and bool(data) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items())


def _average_asgd(model: torch.nn.Module, optimizer: dict) -> None:
    """Put NT-ASGD's averaged weights into the model, as training does for validation and
    model.pt (lmadapt.train.averaged_weights). The optimizer was built on model.parameters(),
    so its parameter indices follow that order."""
    ids = [i for group in optimizer["param_groups"] for i in group["params"]]
    params = list(model.parameters())
    if len(ids) != len(params):
        raise LmadaptError(f"the optimizer state holds {len(ids)} parameters, the model {len(params)}")
    with torch.no_grad():
        for p, i in zip(params, ids):
            ax = optimizer["state"].get(i, {}).get("ax")
            if ax is not None:
                p.copy_(ax)


def load_model(run_dir: str | Path, device="cpu", checkpoint: str = "best") -> tuple[torch.nn.Module, RunConfig, dict]:
    """A trained model in eval mode (the weights of `checkpoint`), its config and the raw config.json."""
    run_dir = runs.require_run_dir(run_dir)
    cfg, meta = read_config(run_dir)
    path = checkpoint_file(run_dir, checkpoint)
    data = runs.load_tensors(path, map_location=device)
    model = backbones.build(cfg.model)
    if _is_training_checkpoint(data):
        weights, asgd = data["model"], bool(data["progress"].get("asgd"))
    elif _is_state_dict(data):
        weights, asgd = data, False
    else:
        raise LmadaptError(f"{path} holds no model weights (neither a model.pt state dict nor a last.pt "
                           f"training checkpoint)")
    try:
        model.load_state_dict(weights)
        if asgd:
            _average_asgd(model, data["optimizer"])
    except (RuntimeError, KeyError, TypeError, AttributeError) as exc:
        raise LmadaptError(f"{path} does not match {run_dir / runs.CONFIG}: {str(exc).splitlines()[0][:200]}") from None
    return model.to(device).eval(), cfg, meta
