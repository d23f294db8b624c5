"""The backbone protocol: what the streaming loop, the methods and the trainer may use.

A backbone is a torch.nn.Module with the members below; nothing outside a
backbone's own module looks inside it (its layers, its output module or the
structure of its state). The state is opaque: callers get one from
init_state(), pass it to forward(), and pass forward()'s new state on
(forward may consume the state it was given).
"""

from __future__ import annotations

from typing import Any, Iterable, Protocol

import torch


class Backbone(Protocol):
    train_carries_state: bool  # True: training carries the state across batches (truncated BPTT)
    arch: str                  # the architecture's name, shown beside the base model in reports

    @property
    def feature_size(self) -> int:
        """Size of `hidden`, the output layer's input (the memory key size)."""

    @property
    def vocab_size(self) -> int:
        """Number of output classes (rows of the output layer)."""

    def init_state(self, batch_size: int, device=None) -> Any:
        """The state before the first token of `batch_size` streams."""

    def forward(self, tokens: torch.Tensor, state: Any = None, compute_logits: bool = True):
        """tokens (B, T) -> hidden (B, T, feature_size), logits (B, T, V) (or None), new state.

        logits = output_layer()(hidden) exactly: memories keyed by hidden see what the
        output layer sees. In eval mode each position's output depends only on the
        stream so far and the backbone's context policy, not on how it is cut into
        calls (the segment-length test).
        """

    def detach_state(self, state: Any) -> Any:
        """The state cut from the autograd graph (between training batches or dyneval segments)."""

    def output_layer(self) -> torch.nn.Linear:
        """The output layer as a Linear (weight (V, d), bias (V,)), sharing the backbone's
        weight: what MbPA adapts locally. A backbone without an output bias gives a zero one."""

    def adaptable_parameters(self, which: str) -> list[torch.nn.Parameter]:
        """The parameters dynamic evaluation may move: "all", "output" or a backbone-specific
        group; each parameter once (tied weights)."""

    key_kinds: tuple[str, ...]  # kNN-LM key kinds it offers: "output" (= hidden), and e.g. "ffn"

    def record_keys(self, kind: str | None) -> None:
        """From now on each forward leaves `recorded_keys` (B, T, d): the vectors of key kind
        `kind` for the positions it was given ("ffn": the input of the last feed-forward block,
        after its layer norm, which kNN-LM found the best key); None stops recording.
        "output" needs no recording (the keys are `hidden`)."""

    def state_cat(self, states: list[Any]) -> Any:
        """Per-rank training states -> one (for checkpoints; only if train_carries_state)."""

    def state_slice(self, state: Any, start: int, end: int) -> Any:
        """Batch rows start:end of a checkpointed training state."""


def check_key_kind(model, kind: str) -> None:
    from lmadapt.errors import LmadaptError

    kinds = tuple(getattr(model, "key_kinds", ("output",)))
    if kind not in kinds:
        raise LmadaptError(f"key {kind!r}: the {getattr(model, 'arch', 'model')} backbone offers {', '.join(kinds)}")


def unique_parameters(params: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """Parameters in order, each once (a tied weight appears twice in a module's list)."""
    out, seen = [], set()
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out
