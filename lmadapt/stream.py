"""THE streaming evaluation loop: one implementation, used by every method.

The evaluation split is walked in order as one stream (batch size 1, as the
papers evaluate), in segments for speed. Per segment: LSTM forward with
carried state -> the segment's (hidden, next word) pairs are written to the
shared memory -> each mixture method gives p(target) reading only positions
strictly before each row (every memory read is windowed by position, which is
why results do not depend on the segment length) -> mix with λ and score ->
each method's observe() (dynamic evaluation takes its gradient step there).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from lmadapt.memory import EpisodicMemory
from lmadapt.methods import EvalContext, Method, Segment
from lmadapt.mix import mix_log_probs
from lmadapt.model import detach_state
from lmadapt.train import progress_enabled


@dataclass
class StreamResult:
    targets: Tensor                      # (n,) scored tokens
    base: Tensor                         # (n,) log p(target) of the base model (adapted, under dyneval)
    components: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # name -> (log p, available)
    mixed: Tensor | None = None          # (n,) log p of the mixture
    seconds: float = 0.0
    peak_memory_mb: float | None = None

    @property
    def tokens(self) -> int:
        return int(self.targets.numel())


def stream_eval(model, stream: Tensor, methods: list[Method], lambdas: dict[str, float], *, corpus=None,
                device="cpu", segment_len: int = 128, memory_index: str = "auto",
                desc: str | None = None) -> StreamResult:
    device = torch.device(device)
    adapting = [m for m in methods if m.adapts_model]
    mixers = [m for m in methods if not m.adapts_model]
    if adapting:
        model = copy.deepcopy(model)  # dynamic evaluation moves the weights; keep the caller's model intact
        segment_len = adapting[0].params.segment
    model.eval()
    stream = stream.to(device)

    memory = None
    window = max((m.memory_window() for m in mixers), default=0)
    keep_logits = any(m.needs_logits for m in mixers)
    if window > 0:
        extras = {}
        if keep_logits:
            extras["logits"] = ((model.decoder.out_features,), torch.float32)
        memory = EpisodicMemory(window + segment_len, model.feature_size, device=device, extras=extras,
                                index=memory_index)
    ctx = EvalContext(model=model, corpus=corpus, memory=memory, device=device, segment_len=segment_len)
    for m in methods:
        m.start(ctx)

    n = stream.numel() - 1
    base_parts, comp_parts = [], {m.name: ([], []) for m in mixers}
    state = model.init_state(1, device)
    bar = tqdm(total=n, desc=desc, unit="tok", disable=not (desc and progress_enabled()), leave=False)
    start = time.perf_counter()
    for s in range(0, n, segment_len):
        e = min(s + segment_len, n)
        x, y = stream[s:e], stream[s + 1:e + 1]
        with torch.set_grad_enabled(bool(adapting)):
            hidden, logits, new_state = model(x.unsqueeze(0), state)
            log_probs = F.log_softmax(logits[0].float(), -1)
            base = log_probs.gather(1, y.unsqueeze(1)).squeeze(1)
        seg = Segment(positions=torch.arange(s, e, device=device), hidden=hidden[0].detach(),
                      logits=logits[0].detach().float(), log_probs=log_probs.detach(), targets=y)
        if memory is not None:
            extra = {"logits": seg.logits} if keep_logits else {}
            memory.add(seg.hidden, y, seg.positions, **extra)
        with torch.no_grad():
            for m in mixers:
                log_p, available = m.target_log_probs(seg)
                comp_parts[m.name][0].append(log_p)
                comp_parts[m.name][1].append(available)
        loss = -base.mean()
        for m in methods:
            m.observe(seg, loss)
        state = detach_state(new_state)
        base_parts.append(base.detach())
        bar.update(e - s)
    seconds = time.perf_counter() - start
    bar.close()

    result = StreamResult(targets=stream[1:n + 1].cpu(), base=torch.cat(base_parts).cpu(), seconds=seconds)
    for name, (lp, av) in comp_parts.items():
        result.components[name] = (torch.cat(lp).cpu(), torch.cat(av).cpu())
    result.mixed = mix_log_probs(result.base, result.components, lambdas)
    if device.type == "cuda":
        result.peak_memory_mb = torch.cuda.max_memory_allocated(device) / 2**20
    return result
