"""Causal language models from `transformers`: the backbone behind model.arch=gpt2 and --hf-model.

Context policy (the carried state). The state is the key/value cache of the
tokens in the current context window [start, seen) of the stream. A window
holds at most `context` tokens (default: the model's maximum positions). When
the next input would be the (context + 1)-th token of the window, the window
jumps forward so that it keeps the last `keep` tokens (default context // 2):

* absolute-position models (GPT-2: learned position embeddings that stop at
  n_positions) re-encode those `keep` tokens from position 0 (one extra forward
  pass of `keep` tokens every context - keep tokens);
* rotary models (Llama-style, relative positions) drop the oldest keys and
  values of every layer and go on with explicit position_ids: no re-encoding.

The jumps happen at stream positions fixed by (context, keep) alone, so every
token's prediction is a function of its position in the stream, never of how
the stream is cut into segments: the segment-length test of the LSTM holds
here too. The contexts are those of the stride method of the transformers
perplexity guide with stride = context - keep (each token sees between keep
and context - 1 earlier tokens) without its recomputation of context - stride
tokens per window (docs/backbones.md compares the two).

In training mode (arch=gpt2 under `lmadapt train`) there is no cache: each
batch row is its own context, positions from 0, as GPT-2 is usually trained.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lmadapt.backbones.base import check_key_kind, unique_parameters
from lmadapt.errors import LmadaptError

EXTRA_HINT = 'pip install "lmadapt[hf]" (transformers, safetensors, tokenizers)'


def require_transformers(what: str = "this"):
    """The transformers module, or a one-line error naming the extra to install."""
    try:
        import transformers
    except ImportError:
        raise LmadaptError(f"{what} needs the Hugging Face extra: {EXTRA_HINT}") from None
    transformers.utils.logging.disable_progress_bar()  # save/load bars would break one-line output
    return transformers


def max_positions(config) -> int | None:
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def is_rotary(config) -> bool:
    """Relative (rotary) positions: the cache may be trimmed without re-encoding."""
    for name in ("rope_parameters", "rope_scaling", "rope_theta", "rotary_dim", "rotary_pct", "rotary_emb_base"):
        if getattr(config, name, None) is not None:
            return True
    return False


@dataclass
class KVState:
    cache: Any            # transformers Cache over stream positions [start, seen); None before the first token
    start: int            # stream position of the window's oldest token
    seen: int             # tokens consumed so far: the next input's stream position
    recent: torch.Tensor  # (B, <= keep) the last tokens consumed (what a re-encode starts from)


class HFCausalLM(nn.Module):
    """A transformers causal LM (logits = lm_head(last hidden state)) as a backbone."""

    train_carries_state = False
    key_kinds = ("output", "ffn")

    def __init__(self, lm, context: int | None = None, keep: int | None = None):
        super().__init__()
        self.lm = lm
        self.rotary = is_rotary(lm.config)
        self.set_context(context, keep)
        self._key_kind = None
        self.recorded_keys = None

    def record_keys(self, kind: str | None) -> None:
        if kind is not None:
            check_key_kind(self, kind)
            if kind == "ffn":
                self._last_ffn()  # fail now, not at the first forward
        self._key_kind = None if kind == "output" else kind
        self.recorded_keys = None

    def _last_ffn(self) -> nn.Module:
        """The last decoder block's feed-forward module (GPT-2's h[-1].mlp, Llama's layers[-1].mlp):
        its input is the block's state after the second layer norm."""
        base = self.lm.base_model
        layers = getattr(base, "h", None)
        if layers is None:
            layers = getattr(base, "layers", None)
        mlp = getattr(layers[-1], "mlp", None) if layers is not None and len(layers) else None
        if not isinstance(mlp, nn.Module):
            raise LmadaptError(f"key 'ffn': no feed-forward block (mlp) found in the {self.arch} model's last layer")
        return mlp

    # ----------------------------------------------------------------- protocol

    def set_context(self, context: int | None = None, keep: int | None = None) -> None:
        """Window size (None: the model's maximum) and tokens kept when it fills (None: half)."""
        limit = max_positions(self.lm.config)
        if context is None:
            if limit is None:
                raise LmadaptError("the model's config gives no maximum length; pass --context N")
            context = limit
        if context < 2:
            raise LmadaptError(f"--context must be >= 2, got {context}")
        if limit is not None and context > limit:
            raise LmadaptError(f"--context {context} exceeds the model's maximum of {limit} positions")
        keep = context // 2 if keep is None else keep
        if not 1 <= keep < context:
            raise LmadaptError(f"--context-keep must be in [1, {context - 1}] for --context {context}, got {keep}")
        self.context, self.keep = context, keep

    @property
    def arch(self) -> str:
        return str(self.lm.config.model_type)  # gpt2 for model.arch=gpt2; llama, ... for --hf-model

    @property
    def head(self) -> nn.Linear:
        return self.lm.get_output_embeddings()

    @property
    def feature_size(self) -> int:
        return self.head.in_features

    @property
    def vocab_size(self) -> int:
        return self.head.out_features

    def output_layer(self) -> nn.Linear:
        head = self.head
        if head.bias is not None:
            return head
        # A Linear sharing lm_head's weight (so it sees dynamic evaluation's in-place updates)
        # with a zero bias for MbPA to adapt; built on "meta" so no V x d weight is allocated.
        out = nn.Linear(head.in_features, head.out_features, device="meta")
        out.weight = head.weight
        out.bias = nn.Parameter(torch.zeros(head.out_features, device=head.weight.device,
                                            dtype=head.weight.dtype), requires_grad=False)
        return out

    def adaptable_parameters(self, which: str) -> list[nn.Parameter]:
        if which == "output":
            return unique_parameters(self.head.parameters())  # with tied weights: the embedding too
        if which == "all":
            return unique_parameters(self.parameters())
        raise LmadaptError(f"dyneval adapt={which!r} names the LSTM's layers; a Transformer offers all or output")

    def init_state(self, batch_size: int, device=None) -> KVState:
        device = device or self.head.weight.device
        return KVState(None, 0, 0, torch.empty(batch_size, 0, dtype=torch.long, device=device))

    def detach_state(self, state: KVState | None) -> KVState | None:
        if state is not None and state.cache is not None:
            for layer in state.cache.layers:
                layer.keys, layer.values = layer.keys.detach(), layer.values.detach()
        return state

    def state_cat(self, states):
        return None  # training carries no state

    def state_slice(self, state, start: int, end: int):
        return None

    def forward(self, tokens: torch.Tensor, state: KVState | None = None, compute_logits: bool = True):
        B, T = tokens.shape
        if self.training:
            if T > self.context:
                raise LmadaptError(f"a training sequence of {T} tokens is longer than the context of {self.context}")
            keys: list = []
            hidden, _ = self._run(tokens, None, torch.arange(T, device=tokens.device), use_cache=False, keys=keys)
            self.recorded_keys = keys[0] if keys else None
            return hidden, self.head(hidden) if compute_logits else None, None
        if state is None:
            state = self.init_state(B, tokens.device)
        cache, start, seen, recent = state.cache, state.start, state.seen, state.recent
        parts, keys, i = [], [], 0
        while i < T:
            if seen - start == self.context:  # the window is full: jump (see the module docstring)
                cache, start = self._shift(cache, recent, seen), seen - self.keep
            n = min(T - i, self.context - (seen - start))
            x = tokens[:, i:i + n]
            # Rotary models keep stream positions (relative distances survive the trim);
            # absolute ones count from the window start.
            first = seen if self.rotary else seen - start
            hidden, cache = self._run(x, cache, torch.arange(first, first + n, device=tokens.device), keys=keys)
            parts.append(hidden)
            recent = torch.cat([recent, x], 1)[:, -self.keep:]
            seen += n
            i += n
        hidden = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        self.recorded_keys = (keys[0] if len(keys) == 1 else torch.cat(keys, 1)) if keys else None
        return hidden, self.head(hidden) if compute_logits else None, KVState(cache, start, seen, recent)

    # ----------------------------------------------------------------- internals

    def _run(self, x: torch.Tensor, cache, positions: torch.Tensor, use_cache: bool = True, keys: list | None = None):
        """keys: where the recorded key kind's vectors of `x` go (the window re-encode passes
        None: its positions were scored, and recorded, before)."""
        if use_cache and cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.lm.config)
        hook = None
        if keys is not None and self._key_kind == "ffn":
            hook = self._last_ffn().register_forward_pre_hook(lambda _module, args: keys.append(args[0]))
        try:
            out = self.lm.base_model(input_ids=x, cache=cache if use_cache else None,
                                     position_ids=positions.unsqueeze(0).expand(x.size(0), -1), use_cache=use_cache)
        finally:
            if hook is not None:
                hook.remove()
        return out.last_hidden_state, out.cache if use_cache else None

    def _shift(self, cache, recent: torch.Tensor, seen: int):
        if self.rotary:
            for layer in cache.layers:  # DynamicCache.crop drops the newest tokens; we drop the oldest
                layer.keys, layer.values = layer.keys[..., -self.keep:, :], layer.values[..., -self.keep:, :]
            return cache
        # Re-encode only rebuilds context; no gradient flows into it (as into any carried state).
        with torch.no_grad():
            _, cache = self._run(recent, None, torch.arange(self.keep, device=recent.device))
        return cache


# --------------------------------------------------------------------------- loading

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_dir(path: str | os.PathLike, need_tokenizer: bool = True) -> Path:
    """A local save_pretrained directory, or a one-line error saying what is missing."""
    d = Path(path)
    if not d.is_dir():
        raise LmadaptError(f"--hf-model {path}: no such directory (lmadapt loads models only from a local "
                           "directory written by save_pretrained; it never downloads)")
    if not (d / "config.json").is_file():
        raise LmadaptError(f"--hf-model {path}: config.json not found (not a save_pretrained directory)")
    if not any((d / f).is_file() for f in WEIGHT_FILES):
        raise LmadaptError(f"--hf-model {path}: no weights ({', '.join(WEIGHT_FILES)} all missing)")
    if need_tokenizer and not any((d / f).is_file() for f in TOKENIZER_FILES):
        raise LmadaptError(f"--hf-model {path}: no tokenizer ({', '.join(TOKENIZER_FILES)} all missing); "
                           "save one with tokenizer.save_pretrained(DIR)")
    return d


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def load_pretrained(path, *, context: int | None = None, keep: int | None = None, device="cpu"):
    """(HFCausalLM in eval mode, tokenizer) from a local directory, strictly offline."""
    d = check_model_dir(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces beside local_files_only
    transformers = require_transformers("--hf-model")
    try:
        lm = transformers.AutoModelForCausalLM.from_pretrained(d, local_files_only=True, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(d, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise LmadaptError(f"--hf-model {path}: cannot load: {_one_line(exc)}") from None
    model = HFCausalLM(lm, context, keep).to(device).eval()
    check_head(model)
    return model, tokenizer


@torch.no_grad()
def check_head(model: HFCausalLM) -> None:
    """Refuse models whose logits are not lm_head(last hidden state) (e.g. soft-capped or scaled):
    memories keyed by the hidden state must see what the output layer sees."""
    n = min(4, model.context)  # within one window: the streamed pass is then a plain forward pass
    x = torch.arange(n, device=model.head.weight.device).unsqueeze(0) % model.vocab_size
    reference = model.lm(input_ids=x).logits
    _, logits, _ = model(x)
    if not torch.allclose(reference, logits, rtol=1e-4, atol=1e-4):
        raise LmadaptError(f"{type(model.lm).__name__}: its logits are not lm_head(last hidden state); "
                           "lmadapt's methods need that form")
