"""The two kinds of test-time adaptation method, and what the streaming loop hands them.

The streaming loop (lmadapt.stream.stream_eval) calls, per kind:

* MixtureMethod: gives log p(target) of every scored position; the loop mixes it with
  the base model by λ (its `default_lambda` unless one is given).
    memory_window(), memory_extras()  before the stream: the shared memory it reads
    preferred_segment_len()           before the stream: a speed hint for the segment length
    start(ctx)                        once
    target_log_probs(seg)             per segment, once the segment's pairs are in the memory
* ModelAdapter: changes the base model itself (dynamic evaluation); not mixed, no λ.
    segment_len()                     the loop's segment length: one update per segment
    start(ctx)                        once, on the loop's own copy of the model
    update(seg, loss)                 per segment, after it was scored; `loss` keeps its graph
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
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
    keys: dict = field(default_factory=dict)  # key kind -> (L, d) kNN query vectors other than hidden


@dataclass
class EvalContext:
    """What methods may need at start(): the model, the corpus (e.g. training data
    for dynamic evaluation's gradient statistics), the shared memory, the device."""

    model: torch.nn.Module
    corpus: Any
    memory: Any                 # lmadapt.memory.EpisodicMemory shared by the mixture methods (None: none reads one)
    device: torch.device
    segment_len: int
    cache_dir: Any = None       # where a method may cache what it derives from the run (the run directory)


class Method:
    """What both kinds share: a name, hyper-parameters and their tuning grid.

    `Params` is a dataclass of the method's hyper-parameters: the CLI makes a
    flag `--NAME-FIELD` of each field and `lmadapt tune` sweeps `grid`.
    """

    name: ClassVar[str]
    Params: ClassVar[type]
    grid: ClassVar[dict[str, list]] = {}
    # Named settings (`--preset NAME`): params, plus "lambda" for a mixture method. "paper"
    # is the setting of the method's source paper or reference code.
    PRESETS: ClassVar[dict[str, dict]] = {}
    # Grid axes whose default value `tune` tries only in the default setting, not crossed with
    # the other axes (the cache's `select`, itself a search over windows and θs).
    DEFAULT_POINT_AXES: ClassVar[frozenset] = frozenset()

    def __init__(self, params=None):
        self.params = params if params is not None else self.Params()

    @classmethod
    def grid_for(cls, fixed: dict) -> dict[str, list]:
        """The grid `lmadapt tune` sweeps given the settings held fixed (default: `grid`)."""
        return cls.grid

    @classmethod
    def param_names(cls) -> list[str]:
        return [f.name for f in fields(cls.Params)]

    @classmethod
    def settings_from_file(cls, params: dict) -> dict:
        """A `--config` file's params for this method, completed the way the version that wrote
        them ran them where a later version added a setting whose default changes the result
        (default: as written; missing settings take today's defaults)."""
        return params

    def start(self, ctx: EvalContext) -> None:
        """Called once before the stream."""

    def summary(self) -> dict:
        """What the method settled on over the stream, for the report (after it; {}: nothing);
        its "text", if any, is printed under the table."""
        return {}


class MixtureMethod(Method):
    """Gives p(target) from what it has seen of the stream (or a datastore); mixed with the
    base model by λ. It never changes the model."""

    default_lambda: ClassVar[float]   # λ when neither a flag nor a --config gives one
    # The key of this method's column in StreamResult.components; None: its name. `tune`
    # labels the settings of one method it runs side by side in a single pass.
    column: str | None = None

    def key_kind(self) -> str:
        """Which vectors this method queries with (asked after start()): "output" (the
        segment's `hidden`) or a kind the backbone records (Backbone.record_keys), then
        found in `Segment.keys`."""
        return "output"

    def memory_window(self) -> int:
        """How many past positions this method reads from the shared memory (0: none)."""
        return 0

    def memory_extras(self) -> dict[str, torch.dtype]:
        """Per-entry vectors the shared memory must keep, by name and storage dtype: any of
        "logits", "log_probs", "probs" (lmadapt.stream.EXTRAS), recorded when each position
        is scored."""
        return {}

    def preferred_segment_len(self) -> int | None:
        """Positions per stream segment this method runs fastest at (None: no preference).
        Only a speed hint: results never depend on the segment length. The loop uses the
        largest preference when its caller gives no length and no model adapter runs."""
        return None

    def target_log_probs(self, seg: Segment) -> tuple[Tensor, Tensor]:
        """(log p_method(targets), available) for the segment, using only memory
        of positions strictly before each row. `available` False means the method
        has nothing to say (e.g. an empty memory): its lambda mass goes back to
        the base model for that token."""
        raise NotImplementedError


class ModelAdapter(Method):
    """Changes the base model's weights as the stream goes (dynamic evaluation): every
    mixture method then reads the adapted model."""

    def segment_len(self) -> int:
        """Positions per update. The loop's segments are this long, so that update() sees
        exactly one update's worth of stream; it overrides the caller's segment length."""
        raise NotImplementedError

    def update(self, seg: Segment, loss: Tensor) -> None:
        """Called after the segment was scored; loss is the model's mean NLL on it, with its graph."""
        raise NotImplementedError
