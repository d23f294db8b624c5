"""The protocol every adaptation method follows, and what the streaming loop hands it."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor


@dataclass
class Segment:
    """One stretch of the evaluation stream (batch size 1).

    Row i predicts targets[i] = stream[positions[i] + 1] from the input at
    positions[i]; memories store (hidden[i], targets[i]) keyed by positions[i].
    """

    positions: Tensor   # (L,) absolute stream positions of the inputs
    hidden: Tensor      # (L, d) softmax-layer inputs (detached)
    logits: Tensor      # (L, V) base-model logits (float32, detached)
    log_probs: Tensor   # (L, V) base-model log-softmax
    targets: Tensor     # (L,) next words


@dataclass
class EvalContext:
    """What methods may need at start(): the model, the corpus (e.g. training data
    for dynamic evaluation's gradient statistics), the shared memory, the device."""

    model: torch.nn.Module
    corpus: Any
    memory: Any                 # lmadapt.memory.EpisodicMemory shared by all memory-based methods
    device: torch.device
    segment_len: int
    cache_dir: Any = None       # where a method may cache what it derives from the run (the run directory)


class Method:
    """A test-time adaptation method the streaming loop calls.

    `Params` is a dataclass of the method's hyper-parameters: the CLI makes a
    flag `--NAME-FIELD` of each field and `lmadapt tune` sweeps `grid`.
    Mixture methods return p(target) and are mixed with the base model by
    lambda; methods with `adapts_model` change the base model itself (dynamic
    evaluation) and have no lambda.
    """

    name: ClassVar[str]
    Params: ClassVar[type]
    grid: ClassVar[dict[str, list]] = {}
    # Named settings (`--preset NAME`): params, plus "lambda" for a mixture method. "paper"
    # is the setting of the method's source paper or reference code.
    PRESETS: ClassVar[dict[str, dict]] = {}
    needs_grad: ClassVar[bool] = False      # the loop keeps the forward graph for observe()
    adapts_model: ClassVar[bool] = False    # changes the base model instead of being mixed in
    needs_logits: ClassVar[bool] = False    # the shared memory must keep each entry's base logits

    def __init__(self, params=None):
        self.params = params if params is not None else self.Params()

    @classmethod
    def grid_for(cls, fixed: dict) -> dict[str, list]:
        """The grid `lmadapt tune` sweeps given the settings held fixed (default: `grid`)."""
        return cls.grid

    def memory_window(self) -> int:
        """How many past positions this method reads from the shared memory (0: none)."""
        return 0

    def memory_extras(self) -> dict[str, torch.dtype]:
        """Per-entry vectors the shared memory must keep, by name and storage dtype: any of
        "logits", "log_probs", "probs" (lmadapt.stream.EXTRAS), recorded when each position
        is scored. Default: the base logits when `needs_logits`."""
        return {"logits": torch.float32} if self.needs_logits else {}

    def preferred_segment_len(self) -> int | None:
        """Positions per stream segment this method runs fastest at (None: no preference).
        Only a speed hint: results never depend on the segment length. The loop uses the
        largest preference when its caller gives no length and no method adapts the model."""
        return None

    def start(self, ctx: EvalContext) -> None:
        """Called once before the stream."""

    def target_log_probs(self, seg: Segment) -> tuple[Tensor, Tensor]:
        """(log p_method(targets), available) for the segment, using only memory
        of positions strictly before each row. `available` False means the method
        has nothing to say (e.g. an empty memory): its lambda mass goes back to
        the base model for that token."""
        raise NotImplementedError

    def observe(self, seg: Segment, loss: Tensor | None) -> None:
        """Called after the segment was scored (loss: the base model's mean NLL on
        it, with its graph when needs_grad)."""

    @classmethod
    def param_names(cls) -> list[str]:
        return [f.name for f in fields(cls.Params)]
