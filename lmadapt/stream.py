"""THE streaming evaluation loop: one implementation, used by every method.

The evaluation split is walked in order as one stream (batch size 1, as the
papers evaluate), in segments for speed. Per segment: the backbone's forward with
carried state (lmadapt.backbones: the LSTM's (h, c), a Transformer's key/value window)
-> the segment's (hidden, next word) pairs are written to the shared memory -> each
mixture method (lmadapt.methods.MixtureMethod) gives p(target) reading only positions
strictly before each row (every memory read is windowed by position, which is why
results do not depend on the segment length) -> mix with λ and score -> each model
adapter (lmadapt.methods.ModelAdapter: dynamic evaluation) takes its update.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from lmadapt.backbones.base import check_key_kind
from lmadapt.errors import LmadaptError
from lmadapt.memory import COLUMN_BLOCKED, EpisodicMemory
from lmadapt.methods import EvalContext, Method, MixtureMethod, ModelAdapter, Segment
from lmadapt.mix import mix_log_probs
from lmadapt.runs import progress_enabled


@dataclass
class StreamResult:
    targets: Tensor                      # (n,) scored tokens
    base: Tensor                         # (n,) log p(target) of the base model (adapted, under dyneval)
    components: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # name -> (log p, available)
    mixed: Tensor | None = None          # (n,) log p of the mixture
    seconds: float = 0.0
    peak_memory_mb: float | None = None
    stopped: bool = False                # `stop` ended the stream early: only its first tokens were scored

    @property
    def tokens(self) -> int:
        return int(self.targets.numel())


DEFAULT_SEGMENT = 128

# Per-entry quantities a method may ask the shared memory to keep (MixtureMethod.memory_extras),
# each a (V,) vector per position, taken from the segment when the position is scored.
EXTRAS = {
    "logits": lambda seg: seg.logits,
    "log_probs": lambda seg: seg.log_probs,
    "probs": lambda seg: seg.log_probs.exp(),
}
# Storage layout of an extra in the memory (default: entry-major).  The probabilities are
# read by MbPA's T = 1 gather one block of columns of all entries at a time.
LAYOUT = {"probs": COLUMN_BLOCKED}


def _requested_extras(methods: list[MixtureMethod]) -> dict[str, torch.dtype]:
    wanted: dict[str, torch.dtype] = {}
    for m in methods:
        for name, dt in m.memory_extras().items():
            if name not in EXTRAS:
                raise ValueError(f"{m.name} asks the memory for unknown extra {name!r}; known: {sorted(EXTRAS)}")
            # two methods asking for the same extra share it, at the wider precision
            if name not in wanted or torch.finfo(dt).bits > torch.finfo(wanted[name]).bits:
                wanted[name] = dt
    return wanted


def make_memory(model, methods: list[MixtureMethod], segment_len: int, device, memory_index: str = "auto",
                stream_len: int | None = None):
    """The memory shared by the mixture methods (None when none reads one): the largest
    window any of them reads plus one segment, with every extra they ask for. A window
    longer than the stream is cut to it: it could never fill, and would only allocate."""
    window = max((m.memory_window() for m in methods), default=0)
    if stream_len is not None:
        window = min(window, stream_len)
    if window <= 0:
        return None
    V = model.vocab_size
    extras = {name: ((V,), dt, LAYOUT.get(name)) for name, dt in _requested_extras(methods).items()}
    return EpisodicMemory(window + segment_len, model.feature_size, device=device, extras=extras, index=memory_index)


def memory_extras_of(methods: list[MixtureMethod]):
    """seg -> the extras to store for its positions (see EXTRAS)."""
    names = list(_requested_extras(methods))
    return lambda seg: {name: EXTRAS[name](seg) for name in names}


def stream_eval(model, stream: Tensor, methods: list[Method], lambdas: dict[str, float], *, corpus=None,
                device="cpu", segment_len: int | None = None, memory_index: str = "auto",
                desc: str | None = None, cache_dir=None, stop=None) -> StreamResult:
    """Score `stream` with the base model and `methods`. `segment_len` is a speed knob only
    (None: the largest of the mixture methods' preferred lengths, else DEFAULT_SEGMENT); a
    model adapter fixes it to its own. `cache_dir`: where methods may cache what they
    derive from the model (dyneval's gradient statistics); None caches nothing. `stop`:
    called after each segment with (tokens scored so far, the segment's base log p); when
    it returns True the stream ends there and the result holds the tokens scored (tune
    drops a diverging setting this way)."""
    device = torch.device(device)
    adapters = [m for m in methods if isinstance(m, ModelAdapter)]
    mixers = [m for m in methods if isinstance(m, MixtureMethod)]
    if len(adapters) + len(mixers) != len(methods):
        raise TypeError("every method is a MixtureMethod or a ModelAdapter (lmadapt.methods.base)")
    if segment_len is None:
        segment_len = max((n for m in mixers if (n := m.preferred_segment_len())), default=DEFAULT_SEGMENT)
    if adapters:
        lengths = {m.segment_len() for m in adapters}
        if len(lengths) > 1:
            names = ", ".join(f"{m.name} {m.segment_len()}" for m in adapters)
            raise LmadaptError(f"the model adapters update at different segment lengths ({names}); give them one")
        segment_len = lengths.pop()
        model = copy.deepcopy(model)  # adapters move the weights; keep the caller's model intact
    segment_len = max(1, min(segment_len, stream.numel() - 1))  # a longer segment would only allocate
    model.eval()
    stream = stream.to(device)

    memory = make_memory(model, mixers, segment_len, device, memory_index, stream_len=stream.numel())
    extras_of = memory_extras_of(mixers)
    ctx = EvalContext(model=model, corpus=corpus, memory=memory, device=device, segment_len=segment_len,
                      cache_dir=cache_dir)
    for m in methods:
        m.start(ctx)
    # Query vectors other than `hidden` (kNN keys of another kind) come from the backbone.
    kinds = sorted({m.key_kind() for m in mixers} - {"output"})
    if len(kinds) > 1:
        raise LmadaptError(f"the methods query with different key kinds ({', '.join(kinds)}); use one")
    key_kind = kinds[0] if kinds else None
    if key_kind is not None:
        check_key_kind(model, key_kind)
        model.record_keys(key_kind)

    n = stream.numel() - 1
    # Outputs are written into tensors allocated once: small per-segment tensors kept to the
    # end landed in the holes the freed (L x V) temporaries leave on glibc's heap, so every
    # segment's temporaries needed fresh heap and the RSS grew by ~V floats per token (1 GB
    # per 8k tokens at V=33k; ~30 GB for the WikiText-2 test set).
    base_out = torch.empty(n, device=device)
    columns = [m.column or m.name for m in mixers]
    if len(set(columns)) < len(columns):
        raise ValueError(f"two mixture methods share a column name: {columns}; label them (MixtureMethod.column)")
    comp_out = {c: (torch.empty(n, device=device), torch.empty(n, dtype=torch.bool, device=device))
                for c in columns}
    state = model.init_state(1, device)
    bar = tqdm(total=n, desc=desc, unit="tok", disable=not (desc and progress_enabled()), leave=False)
    start = time.perf_counter()
    for s in range(0, n, segment_len):
        e = min(s + segment_len, n)
        x, y = stream[s:e], stream[s + 1:e + 1]
        with torch.set_grad_enabled(bool(adapters)):
            hidden, logits, new_state = model(x.unsqueeze(0), state)
            log_probs = F.log_softmax(logits[0].float(), -1)
            base = log_probs.gather(1, y.unsqueeze(1)).squeeze(1)
        seg = Segment(positions=torch.arange(s, e, device=device), hidden=hidden[0].detach(),
                      logits=logits[0].detach().float(), log_probs=log_probs.detach(), targets=y,
                      keys={key_kind: model.recorded_keys[0].detach()} if key_kind else {})
        if memory is not None:
            memory.add(seg.hidden, y, seg.positions, **extras_of(seg))
        with torch.no_grad():
            for m, c in zip(mixers, columns):
                log_p, available = m.target_log_probs(seg)
                comp_out[c][0][s:e] = log_p
                comp_out[c][1][s:e] = available
        if adapters:
            loss = -base.mean()
            for m in adapters:
                m.update(seg, loss)
        state = model.detach_state(new_state)
        base_out[s:e] = base.detach()
        bar.update(e - s)
        if stop is not None and e < n and stop(e, base_out[s:e]):
            n, stopped = e, True
            break
    else:
        stopped = False
    seconds = time.perf_counter() - start
    bar.close()
    if key_kind is not None:
        model.record_keys(None)

    result = StreamResult(targets=stream[1:n + 1].cpu(), base=base_out[:n].cpu(), seconds=seconds, stopped=stopped)
    for name, (lp, av) in comp_out.items():
        result.components[name] = (lp[:n].cpu(), av[:n].cpu())
    result.mixed = mix_log_probs(result.base, result.components, lambdas)
    if device.type == "cuda":
        result.peak_memory_mb = torch.cuda.max_memory_allocated(device) / 2**20
    return result
