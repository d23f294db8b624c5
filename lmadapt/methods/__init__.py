"""Method registry: adding a method is one file plus one line here."""

from __future__ import annotations

from lmadapt.errors import LmadaptError
from lmadapt.methods.base import EvalContext, Method, MixtureMethod, ModelAdapter, Segment
from lmadapt.methods.cache import NeuralCache
from lmadapt.methods.dyneval import DynamicEvaluation
from lmadapt.methods.knn import KnnLM
from lmadapt.methods.mbpa import MbPA

# Order is the canonical order of names in combinations ("dyneval+mbpa+cache").
REGISTRY: dict[str, type[Method]] = {
    DynamicEvaluation.name: DynamicEvaluation,
    KnnLM.name: KnnLM,
    MbPA.name: MbPA,
    NeuralCache.name: NeuralCache,
}
# Default λs of a mixture whose methods' own defaults do not serve it together (keyed by its
# set of mixture methods; a λ given by flag or --config still wins). mbpa+cache at the methods'
# own λs (0.15 + 0.2) fell 2.85 points behind the best mixture on one of the three recipe
# models' valid prefixes; at (0.1, 0.15) at most 1.10 (bench/defaults/results/choice-mbpasel.json).
MIXTURE_LAMBDAS: dict[frozenset, dict[str, float]] = {
    frozenset({"mbpa", "cache"}): {"mbpa": 0.1, "cache": 0.15},
}
# The base model alone, whatever its backbone (reports show which: "base (gpt2)").
BASE = "base"
# Also accepted for the base model in --method, --baseline and model_args.
BASE_ALIASES = ("lstm",)


def parse_combination(text: str) -> list[str]:
    """'mbpa+cache' -> ['mbpa', 'cache'] in canonical order; 'base' (or 'lstm') -> []."""
    names = [n.strip() for n in text.split("+")]
    if not any(names):
        raise LmadaptError("empty --method")
    if not all(names):
        raise LmadaptError(f"method {text!r} has an empty part: write names joined by single '+', e.g. mbpa+cache")
    unknown = [n for n in names if n != BASE and n not in BASE_ALIASES and n not in REGISTRY]
    if unknown:
        valid = ", ".join([BASE, *REGISTRY])
        raise LmadaptError(f"unknown method {unknown[0]!r}; valid methods: {valid} (combine with '+')")
    if len(set(names)) != len(names):
        raise LmadaptError(f"method {text!r} names a method twice")
    return [n for n in REGISTRY if n in names]


def combination_name(names: list[str]) -> str:
    return "+".join(names) if names else BASE


def mixture_names(names: list[str]) -> list[str]:
    return [n for n in names if issubclass(REGISTRY[n], MixtureMethod)]


def adapter_names(names: list[str]) -> list[str]:
    return [n for n in names if issubclass(REGISTRY[n], ModelAdapter)]


__all__ = ["REGISTRY", "MIXTURE_LAMBDAS", "BASE", "BASE_ALIASES", "Method", "MixtureMethod", "ModelAdapter", "Segment",
           "EvalContext", "parse_combination", "combination_name", "mixture_names", "adapter_names"]
