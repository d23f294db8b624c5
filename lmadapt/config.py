"""Run configuration: data / model / train sections, recipes (TOML) and --set overrides."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

from lmadapt.errors import LmadaptError
from lmadapt.model import LMConfig
from lmadapt.params import NON_NEGATIVE, POSITIVE, PROBABILITY, Range, at_least, between, check_number
from lmadapt.params import parse_value, to_float


@dataclass
class DataConfig:
    name: str = "sample"            # corpus name (ptb, wikitext-2, sample) or a directory of train/valid/test.txt
    data_dir: str | None = None     # where named corpora live (else $LMADAPT_DATA, else the hub)
    tokenizer: str = "word"         # word | sentencepiece
    spm_vocab_size: int = 8000

    RANGES: ClassVar[dict[str, Range]] = {"spm_vocab_size": at_least(3)}


@dataclass
class TrainConfig:
    seed: int = 1111
    batch_size: int = 32            # global batch (split across DDP ranks)
    bptt: int = 35
    epochs: int = 3
    max_minutes: float = 0.0        # wall-clock training budget; 0 = none. Stops after the current step.
    max_steps: int = 0              # optimiser-step budget (the schedule anneals to it); 0 = epochs decide.
                                    # Unlike max_minutes it does not depend on machine load, so it gives
                                    # "same budget" comparisons between runs made under different loads.
    optimizer: str = "adam"         # adam | adamw | sgd
    lr: float = 3e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    clip: float = 0.25              # max global gradient norm; 0 = off
    lr_schedule: str = "cosine"     # constant | plateau | cosine
    lr_decay: float = 0.5           # plateau: multiply lr by this when validation stalls
    lr_patience: int = 0            # plateau: validations without improvement before decaying
    warmup_steps: int = 0
    nt_asgd: bool = False           # SGD only: switch to averaged SGD when validation stops improving
    nonmono: int = 5                # NT-ASGD trigger window (validations)
    early_stop_patience: int = 3    # stop after this many validations without improvement; 0 = never
    eval_interval: int = 0          # steps between validations (0 = once per epoch)
    eval_batch_size: int = 10       # validation during training
    final_batch_size: int = 1       # final valid/test perplexity (batch 1, as the papers evaluate)
    checkpoint_interval: int = 200  # steps between resumable checkpoints (and at each validation)
    sampled_softmax: int = 0        # >0: train with this many sampled negatives (unigram^0.75, logQ-corrected)
    sampled_softmax_until: float = 0.8  # fraction of the budget after which the full softmax takes over
    amp: str = "none"               # none | bf16: autocast the matmuls (large speed-up on CPUs with AVX512-BF16)
    hebbian_gamma: float = 0.01     # Hebbian softmax: minimum mixing rate
    hebbian_T: int = 500            # Hebbian softmax: classes seen this often stop being mixed
    log_interval: int = 20          # steps between progress-bar updates

    RANGES: ClassVar[dict[str, Range]] = {
        "batch_size": at_least(1), "bptt": at_least(1), "epochs": at_least(1), "max_minutes": NON_NEGATIVE,
        "max_steps": NON_NEGATIVE, "lr": POSITIVE, "weight_decay": NON_NEGATIVE,
        "betas": between(0, 1, hi_open=True), "clip": NON_NEGATIVE, "lr_decay": between(0, 1, lo_open=True),
        "lr_patience": NON_NEGATIVE, "warmup_steps": NON_NEGATIVE, "nonmono": at_least(1),
        "early_stop_patience": NON_NEGATIVE, "eval_interval": NON_NEGATIVE, "eval_batch_size": at_least(1),
        "final_batch_size": at_least(1), "checkpoint_interval": at_least(1), "sampled_softmax": NON_NEGATIVE,
        "sampled_softmax_until": PROBABILITY, "hebbian_gamma": PROBABILITY, "hebbian_T": at_least(1),
        "log_interval": at_least(1),
    }


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: LMConfig = field(default_factory=LMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "RunConfig":
        if not isinstance(d, dict):
            raise LmadaptError(f"{source} must hold a JSON object with data/model/train sections, "
                               f"not a {type(d).__name__}")
        cfg = cls()
        for section, values in d.items():
            if section not in SECTIONS:
                continue  # extra metadata (e.g. corpus statistics) lives beside the sections
            if not isinstance(values, dict):
                raise LmadaptError(f"{source}: section {section!r} must be an object, not a {type(values).__name__}")
            for key, value in values.items():
                set_value(cfg, f"{section}.{key}", value)
        return cfg


SECTIONS = ("data", "model", "train")
_OPTIONS = {
    "train.optimizer": ("adam", "adamw", "sgd"),
    "train.lr_schedule": ("constant", "plateau", "cosine"),
    "train.amp": ("none", "bf16"),
    "data.tokenizer": ("word", "sentencepiece"),
    "model.softmax": ("full", "hebbian"),
}


def _field_type(obj, key: str):
    for f in dataclasses.fields(obj):
        if f.name == key:
            return f.type
    return None


def _coerce(value: Any, type_name: str, full_key: str) -> Any:
    """Turn a TOML/JSON value or a --set string into the field's type."""
    t = str(type_name)
    if isinstance(value, str) and value.strip().lower() in ("none", "null") and "None" in t:
        return None
    if value is None and "None" in t:
        return None
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if t.startswith(name):  # the CLI's one value parser (ranges are checked with RANGES later)
            if isinstance(value, bool) and kind is not bool:
                _wrong(full_key, t, value)
            return parse_value(value, kind, full_key)
    if t.startswith("tuple"):
        if isinstance(value, str):
            try:
                value = json.loads(value.strip())
            except json.JSONDecodeError:
                _wrong(full_key, t, value)
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            _wrong(full_key, "pair of numbers such as [0.9, 0.999]", value)
        return tuple(to_float(v, full_key) for v in value)
    if t.startswith("str"):
        if not isinstance(value, str):
            _wrong(full_key, t, value)
        return value
    return value


def _wrong(full_key: str, expected: str, value: Any):
    raise LmadaptError(f"{full_key} expects a {expected}, got {value!r}")


def set_value(cfg: RunConfig, key: str, value: Any) -> None:
    section, _, name = key.partition(".")
    if section not in SECTIONS or not name:
        raise LmadaptError(f"unknown setting {key!r}: keys look like data.NAME, model.NAME or train.NAME")
    obj = getattr(cfg, section)
    type_name = _field_type(obj, name)
    if type_name is None:
        known = ", ".join(f.name for f in dataclasses.fields(obj))
        raise LmadaptError(f"unknown setting {key!r}; {section} settings are: {known}")
    value = _coerce(value, type_name, key)
    for v in value if isinstance(value, tuple) else (value,):
        check_number(key, v, getattr(type(obj), "RANGES", {}).get(name))
    if key in _OPTIONS and value not in _OPTIONS[key]:
        raise LmadaptError(f"{key} must be one of {', '.join(_OPTIONS[key])}, got {value!r}")
    setattr(obj, name, value)


def apply_overrides(cfg: RunConfig, pairs: list[str]) -> None:
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise LmadaptError(f"--set expects key=value, got {pair!r}")
        set_value(cfg, key.strip(), value)


def recipe_names() -> list[str]:
    names = set()
    for folder in _recipe_folders():
        names.update(p.stem for p in folder.glob("*.toml"))
    return sorted(names)


def _recipe_folders() -> list[Path]:
    folders = []
    try:  # installed wheels carry the recipes as package data (lmadapt/recipes)
        folders.append(Path(str(resources.files("lmadapt") / "recipes")))
    except (ModuleNotFoundError, TypeError):
        pass
    folders.append(Path(__file__).resolve().parent.parent / "recipes")  # source checkout
    return [f for f in folders if f.is_dir()]


def load_recipe(name_or_file: str) -> RunConfig:
    """A recipe is a TOML file with [data], [model], [train] tables; given by path or by name."""
    path = Path(name_or_file)
    if not (path.suffix == ".toml" and path.is_file()):
        candidates = [folder / f"{name_or_file}.toml" for folder in _recipe_folders()]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise LmadaptError(
                f"unknown recipe {name_or_file!r}; known recipes: {', '.join(recipe_names()) or 'none'}"
            )
        path = found[0]
    try:
        table = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise LmadaptError(f"cannot parse recipe {path}: {exc}") from None
    cfg = RunConfig()
    for section, values in table.items():
        if section not in SECTIONS or not isinstance(values, dict):
            raise LmadaptError(f"recipe {path}: unknown table [{section}] (expected data, model, train)")
        for key, value in values.items():
            set_value(cfg, f"{section}.{key}", value)
    return cfg
