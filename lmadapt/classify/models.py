"""The classifier networks: an MLP cut into a trunk (the embedding f) and a head (the output network g).

The episodic memory stores (f(x), y) and MbPA adapts g, so where the cut falls decides the
experiment: ``embed=False`` keeps the trunk the identity and the head the whole MLP (keys
are pixels, MbPA adapts every layer: permuted MNIST); ``embed=True`` makes the hidden
layers the trunk and the last linear layer the head (keys are penultimate activations:
incremental classes, and the Hebbian curriculum, whose rule needs a linear softmax layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from lmadapt.params import at_least


@dataclass
class MLPConfig:
    in_dim: int = 784
    hidden: tuple[int, ...] = (100, 100)
    classes: int = 10
    embed: bool = False  # the hidden layers are the trunk (else the trunk is the identity)

    RANGES: ClassVar[dict] = {"in_dim": at_least(1), "hidden": at_least(1), "classes": at_least(2)}


class Classifier(nn.Module):
    def __init__(self, trunk: nn.Module, head: nn.Sequential):
        super().__init__()
        self.trunk, self.head = trunk, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x))

    def classes(self) -> int:
        return [m for m in self.head.modules() if isinstance(m, nn.Linear)][-1].out_features


def build(cfg: MLPConfig) -> Classifier:
    """A ReLU MLP in_dim -> hidden... -> classes; layers are created (and so initialised from
    torch's global generator) in input-to-output order wherever the cut falls."""
    dims = [cfg.in_dim, *cfg.hidden]
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    out = nn.Linear(dims[-1], cfg.classes)
    if cfg.embed:
        return Classifier(nn.Sequential(*layers), nn.Sequential(out))
    return Classifier(nn.Identity(), nn.Sequential(*layers, out))
