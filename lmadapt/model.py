"""LSTM language model.

forward() returns the softmax-layer inputs ("hidden": the keys that the cache
and MbPA memories store) together with the logits, so every adaptation method
sees exactly the vector the output layer sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from lmadapt.params import at_least, between

State = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LMConfig:
    # Defaults are the quick-start model (the bundled sample in ~2 minutes on 2 cores).
    vocab_size: int = 10000         # set from the corpus at training time
    emb_size: int = 200
    hidden_size: int = 200          # LSTM size of every layer
    num_layers: int = 2
    # Dropout, following Merity et al. (AWD-LSTM) and Melis et al. (2017):
    dropout_embedding: float = 0.05  # drop whole word types from the embedding matrix
    dropout_input: float = 0.2      # on the embeddings fed to the first LSTM layer
    dropout_hidden: float = 0.2     # between LSTM layers
    dropout_output: float = 0.2     # on the last layer's output, before the softmax
    variational: bool = True        # one mask per sequence ("locked" dropout) instead of per step
    weight_drop: float = 0.1        # DropConnect on the hidden-to-hidden LSTM weights
    tie_weights: bool = True        # softmax weight = embedding (projection added if sizes differ)
    softmax: str = "full"           # output layer kind ("full"; "hebbian" is a training-time option)
    # Backbone (lmadapt.backbones): "lstm" uses the fields above, "gpt2" the ones below
    # (a transformers GPT-2 built from them; dropout is its embd/resid/attn dropout).
    arch: str = "lstm"
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    context: int = 128              # GPT-2 positions (n_positions): the longest context it sees
    dropout: float = 0.1

    # Valid ranges (lmadapt.params): checked when a value is set and again by validate().
    RANGES: ClassVar[dict] = {
        "vocab_size": at_least(1), "emb_size": at_least(1), "hidden_size": at_least(1), "num_layers": at_least(1),
        **{name: between(0, 1, hi_open=True) for name in
           ("dropout_embedding", "dropout_input", "dropout_hidden", "dropout_output", "weight_drop", "dropout")},
        "n_layer": at_least(1), "n_embd": at_least(1), "n_head": at_least(1), "context": at_least(1),
    }

    def validate(self) -> None:
        from lmadapt.errors import LmadaptError
        from lmadapt.params import check_fields

        check_fields(self, "model.")
        from lmadapt.backbones import ARCHS

        if self.arch not in ARCHS:
            raise LmadaptError(f"model.arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.softmax not in ("full", "hebbian"):
            raise LmadaptError(f"model.softmax must be 'full' or 'hebbian', got {self.softmax!r}")


def sequence_dropout(x: torch.Tensor, p: float, training: bool, variational: bool) -> torch.Tensor:
    """Dropout on (B, T, D). Variational: the same mask for every time step of a sequence."""
    if not training or p == 0.0:
        return x
    if not variational:
        return F.dropout(x, p, training=True)
    mask = x.new_empty(x.size(0), 1, x.size(2)).bernoulli_(1 - p) / (1 - p)
    return x * mask


class LSTMLM(nn.Module):
    """The LSTM backbone (lmadapt.backbones.base.Backbone): the state is one (h, c) pair per layer."""

    train_carries_state = True      # truncated BPTT carries the state across training batches
    arch = "lstm"
    key_kinds = ("output",)         # kNN keys: the output layer's input only

    def record_keys(self, kind: str | None) -> None:
        if kind not in (None, "output"):
            from lmadapt.backbones.base import check_key_kind

            check_key_kind(self, kind)

    def __init__(self, config: LMConfig):
        super().__init__()
        config.validate()
        self.config = config
        c = config
        self.embedding = nn.Embedding(c.vocab_size, c.emb_size)
        # One nn.LSTM per layer: dropout between layers and DropConnect need the layer boundary.
        self.layers = nn.ModuleList(
            nn.LSTM(c.emb_size if i == 0 else c.hidden_size, c.hidden_size, batch_first=True)
            for i in range(c.num_layers)
        )
        out_size = c.hidden_size
        self.projection = None
        if c.tie_weights and c.hidden_size != c.emb_size:
            # Tying needs softmax inputs of the embedding size.
            self.projection = nn.Linear(c.hidden_size, c.emb_size)
            out_size = c.emb_size
        self.decoder = nn.Linear(out_size, c.vocab_size)
        if c.tie_weights:
            self.decoder.weight = self.embedding.weight
        # Eval-mode embedding gradients as sparse rows (dynamic evaluation sets it): at
        # batch 1 a dense one is a V x emb zero matrix plus, when tied, a dense add into
        # the softmax gradient, which measured half the forward+backward of an L=5 segment.
        self.sparse_embedding_grad = False
        self.reset_parameters()

    @property
    def feature_size(self) -> int:
        """Size of the softmax-layer input (the memory key size)."""
        return self.decoder.in_features

    @property
    def vocab_size(self) -> int:
        return self.decoder.out_features

    def output_layer(self) -> nn.Linear:
        """The softmax layer (weight, bias) that MbPA adapts and hidden feeds."""
        return self.decoder

    def adaptable_parameters(self, which: str) -> list[nn.Parameter]:
        """What dynamic evaluation may move: "all", "output" (the softmax layer) or "lstm"."""
        from lmadapt.backbones.base import unique_parameters

        if which == "output":
            return unique_parameters(self.decoder.parameters())
        if which == "lstm":
            return unique_parameters(self.layers.parameters())
        return unique_parameters(self.parameters())

    @staticmethod
    def detach_state(state: State) -> State:
        return detach_state(state)

    @staticmethod
    def state_cat(states: list[State]) -> State:
        """Per-rank states -> one state over the whole batch (for checkpoints)."""
        return [(torch.cat([s[i][0] for s in states], 1), torch.cat([s[i][1] for s in states], 1))
                for i in range(len(states[0]))]

    @staticmethod
    def state_slice(state: State, start: int, end: int) -> State:
        """Rows start:end of the batch (one DDP rank's share of a checkpointed state)."""
        return [(h[:, start:end], c[:, start:end]) for h, c in state]

    def reset_parameters(self) -> None:
        init = 0.1
        nn.init.uniform_(self.embedding.weight, -init, init)
        nn.init.zeros_(self.decoder.bias)
        if not self.config.tie_weights:
            nn.init.uniform_(self.decoder.weight, -init, init)

    def init_state(self, batch_size: int, device=None) -> State:
        device = device or self.embedding.weight.device
        h = self.config.hidden_size
        return [
            (torch.zeros(1, batch_size, h, device=device), torch.zeros(1, batch_size, h, device=device))
            for _ in self.layers
        ]

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        weight = self.embedding.weight
        p = self.config.dropout_embedding
        if self.training and p > 0:
            # Drop whole word types (Gal & Ghahramani): the same word is dropped everywhere in the batch.
            keep = weight.new_empty(weight.size(0), 1).bernoulli_(1 - p) / (1 - p)
            weight = weight * keep
            return F.embedding(tokens, weight)
        return F.embedding(tokens, weight, sparse=self.sparse_embedding_grad)

    def _run_layer(self, i: int, x: torch.Tensor, state):
        layer = self.layers[i]
        p = self.config.weight_drop
        if self.training and p > 0:
            # DropConnect on W_hh: run the layer with a dropped copy of that one weight.
            params = dict(layer.named_parameters())
            params["weight_hh_l0"] = F.dropout(params["weight_hh_l0"], p, training=True)
            return functional_call(layer, params, (x, state))
        return layer(x, state)

    def forward(self, tokens: torch.Tensor, state: State | None = None, compute_logits: bool = True):
        """tokens (B, T) -> hidden (B, T, feature_size), logits (B, T, V), new state.

        `hidden` is the exact input of the softmax layer (after output dropout
        in training, unchanged in eval mode). With compute_logits=False the
        logits are None (a sampled-softmax loss scores only a few rows of the
        output layer).
        """
        c = self.config
        if state is None:
            state = self.init_state(tokens.size(0), tokens.device)
        x = sequence_dropout(self._embed(tokens), c.dropout_input, self.training, c.variational)
        new_state = []
        for i in range(len(self.layers)):
            if i > 0:
                x = sequence_dropout(x, c.dropout_hidden, self.training, c.variational)
            x, s = self._run_layer(i, x, state[i])
            new_state.append(s)
        if self.projection is not None:
            x = self.projection(x)
        hidden = sequence_dropout(x, c.dropout_output, self.training, c.variational)
        return hidden, self.decoder(hidden) if compute_logits else None, new_state


def detach_state(state: State) -> State:
    return [(h.detach(), c.detach()) for h, c in state]


def count_parameters(model: nn.Module) -> int:
    # Tied weights are one Parameter object, so .parameters() counts them once.
    return sum(p.numel() for p in model.parameters())
