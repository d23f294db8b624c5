"""lmadapt as an lm-evaluation-harness model: `--model lmadapt`.

Importing this module registers the model `lmadapt` with lm-eval's registry (lm-eval
does not discover plugins: `lmadapt harness ...` imports it, then runs lm-eval's CLI).
Every document a task hands over goes through THE streaming loop (lmadapt.stream):

* ``loglikelihood_rolling``: the stream is [prefix token] + the document's tokens, every
  document token is scored (what lm-eval's own hf model scores);
* ``loglikelihood``: context + continuation (the prefix token only when the context is
  empty, as lm-eval's hf model does), the continuation's tokens are scored; ``is_greedy``
  is the base model's (adapted, under dyneval) greedy choice: the mixtures give only the
  target's probability, not a whole distribution;
* ``generate_until``: unsupported (a one-line error).

Adaptation scope (``scope=``, recorded in the results' config through get_model_info):

* ``document`` (default): one streaming pass per document with fresh methods, so the
  memories are empty and dynamic evaluation's weights are the trained ones at each start;
* ``stream``: the documents in the harness's order concatenated into one stream, one
  pass: memories and adapted weights carry across documents (as the papers evaluate a
  corpus). The prediction of a document's prefix token is never scored.

Context policy (``context=``, also recorded):

* ``windows`` (default): lm-eval's hf model's policy. Each document is cut into windows
  of ``max_length`` inputs (the first starting at the prefix token); the backbone's state
  starts afresh at every window, and a last window shorter than ``max_length`` re-reads
  the inputs before it up to ``max_length`` (lm_eval.utils.get_rolling_token_windows with
  context_len=1). With method=none this gives lm-eval's own numbers.
* ``carry``: the backbone's own policy, its state carried through the stream (an LSTM's
  (h, c); a Transformer's sliding key/value window, lmadapt.backbones.hf); in stream scope
  it carries across documents too.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lmadapt.errors import LmadaptError

EXTRA_HINT = 'pip install "lmadapt[harness]" (lm-eval[hf])'


def require_lm_eval():
    try:
        import lm_eval
        import lm_eval.api.model  # noqa: F401
        import lm_eval.api.registry  # noqa: F401
        import lm_eval.models  # noqa: F401  (the stock models: registering ours first would hide them)
    except ImportError:
        raise LmadaptError(f"lm-evaluation-harness is not installed: {EXTRA_HINT}") from None
    return lm_eval


require_lm_eval()

from lm_eval.api.model import LM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402

MODEL_NAME = "lmadapt"
TASK_DIR = Path(__file__).resolve().parent / "tasks"
SCOPES = ("document", "stream")
CONTEXTS = ("windows", "carry")
LM_EVAL_DEFAULT_MAX_LENGTH = 2048  # lm-eval's HFLM._DEFAULT_MAX_LENGTH, for models without a maximum
IGNORED = ("batch_size", "max_batch_size")  # lm-eval's own settings: the stream has batch size 1


# --------------------------------------------------------------------------- context policy


@dataclass
class WindowState:
    inner: Any            # the backbone's state in the current window
    pos: int              # stream position of the next input
    recent: torch.Tensor  # (B, <= max_length) the last inputs (what a short last window re-reads)
    plain: bool = False   # plain windows of max_length from position 0 (no documents)


class WindowedContext(nn.Module):
    """A backbone whose context is lm-eval's rolling windows (see the module docstring).

    `regions` are (first input position, number of inputs) of each document in the stream;
    positions between regions (a document's last token, predicting the next prefix) run
    from a fresh state; positions after the last region are cut in plain windows.

    States of batch size > 1, and the first `plain_states` states from init_state, ignore the
    regions (plain windows from position 0): they serve passes over other text made before
    the stream's own pass at batch size 1 (dynamic evaluation's gradient statistics over
    training text), which must not depend on where the documents of the stream begin.
    """

    train_carries_state = False

    def __init__(self, inner, length: int, regions: list[tuple[int, int]], plain_states: int = 0):
        super().__init__()
        self.inner = inner
        self.length = length
        self.regions = list(regions)
        self.starts = [s for s, _ in self.regions]
        self.end = self.regions[-1][0] + self.regions[-1][1] if self.regions else 0
        self.plain_states = plain_states

    @property
    def arch(self) -> str:
        return self.inner.arch

    @property
    def feature_size(self) -> int:
        return self.inner.feature_size

    @property
    def vocab_size(self) -> int:
        return self.inner.vocab_size

    def output_layer(self):
        return self.inner.output_layer()

    def adaptable_parameters(self, which: str):
        return self.inner.adaptable_parameters(which)

    @property
    def statistics_context(self) -> str:
        """What a pass over other text (dyneval's statistics) depends on beyond the weights:
        its plain windows' length. Part of the statistics' cache key."""
        return f"windows={self.length}"

    def init_state(self, batch_size: int, device=None) -> WindowState:
        device = device if device is not None else next(self.inner.parameters()).device
        counted = self.plain_states > 0
        self.plain_states -= counted
        plain = counted or batch_size > 1  # the scored stream runs at batch size 1
        return WindowState(None, 0, torch.empty(batch_size, 0, dtype=torch.long, device=device), plain)

    def detach_state(self, state: WindowState) -> WindowState:
        if state is not None and state.inner is not None:
            state.inner = self.inner.detach_state(state.inner)
        return state

    def _region(self, pos: int, plain: bool = False):
        if plain:
            return 0, math.inf
        if pos >= self.end:
            return self.end, math.inf
        i = bisect.bisect_right(self.starts, pos) - 1
        if i >= 0 and pos < self.starts[i] + self.regions[i][1]:
            return self.regions[i]
        return None

    def forward(self, tokens: torch.Tensor, state: WindowState | None = None, compute_logits: bool = True):
        B, T = tokens.shape
        if state is None:
            state = self.init_state(B, tokens.device)
        inner, pos, recent, L = state.inner, state.pos, state.recent, self.length
        hiddens, logits_parts, i = [], [], 0
        while i < T:
            region = self._region(pos, state.plain)
            if region is None:  # between documents: one input from a fresh state
                inner, n = self.inner.init_state(B, tokens.device), 1
            else:
                start, size = region
                r = pos - start
                if r % L == 0:  # a window starts here
                    inner = self.inner.init_state(B, tokens.device)
                    if r > 0 and size - r < L:  # the last, short window re-reads inputs up to L
                        warm = recent[:, recent.size(1) - (L - (size - r)):]
                        with torch.no_grad():
                            _, _, inner = self.inner(warm, inner, compute_logits=False)
                        inner = self.inner.detach_state(inner)
                n = int(min(T - i, L - r % L, start + size - pos))
            x = tokens[:, i:i + n]
            hidden, logits, inner = self.inner(x, inner, compute_logits)
            hiddens.append(hidden)
            logits_parts.append(logits)
            recent = torch.cat([recent, x], 1)[:, -L:]
            pos += n
            i += n
        hidden = torch.cat(hiddens, 1)
        logits = torch.cat(logits_parts, 1) if compute_logits else None
        return hidden, logits, WindowState(inner, pos, recent, state.plain)


# --------------------------------------------------------------------------- model arguments


def _method_spec(kwargs: dict) -> tuple[str, dict, dict]:
    """(combination, params, lambdas) from model_args: method=..., config=FILE (a `lmadapt
    tune` JSON), lambda_NAME=..., NAME_FIELD=... (e.g. cache_theta=0.3, dyneval_lr=2e-4)."""
    from lmadapt.evaluate import build_methods, mixture_lambdas
    from lmadapt.methods import BASE, REGISTRY, parse_combination

    config: dict = {}
    if "config" in kwargs:
        path = Path(str(kwargs.pop("config")))
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise LmadaptError(f"model_args config={path}: cannot read a JSON object: {exc}") from None
        if not isinstance(config, dict):
            raise LmadaptError(f"model_args config={path} must hold a JSON object (method, params, lambdas)")
    method = kwargs.pop("method", None)
    method = config.get("method", BASE) if method is None or method == "" else method
    method = str(method).strip()
    if method.lower() == "none":  # lm-eval's argument parser turns method=none into None
        method = BASE
    names = parse_combination(method)
    params = {k: REGISTRY[k].settings_from_file(dict(v)) if k in REGISTRY else dict(v)
              for k, v in config.get("params", {}).items()}
    lambdas = {k: float(v) for k, v in config.get("lambdas", {}).items()}
    for key in list(kwargs):
        head, _, field = key.partition("_")
        if head == "lambda" and field in REGISTRY:
            lambdas[field] = kwargs.pop(key)
        elif head in REGISTRY and field:
            params.setdefault(head, {})[field] = kwargs.pop(key)
        else:
            continue
        name = field if head == "lambda" else head
        if name not in names:
            raise LmadaptError(f"model_args {key} is set but {name} is not part of method={method}")
    # one-line errors for bad settings before any loading; every setting, given or default, is
    # what the results record (a default that changes later leaves the figure reproducible)
    params = {m.name: dataclasses.asdict(m.params) for m in build_methods(names, params)}
    return method, params, mixture_lambdas(names, lambdas)


@dataclass
class Encoder:
    """Text -> token ids for a backbone, and the prefix token put before a document."""

    encode: Any
    prefix: int
    kind: str


def _hf_encoder(tokenizer) -> Encoder:
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix is None:
        raise LmadaptError("the model's tokenizer has neither a BOS nor an EOS token to start documents with")

    def encode(text: str) -> list[int]:
        try:
            return list(tokenizer.encode(text, add_special_tokens=False))
        except Exception as exc:  # tokenizers raises a bare Exception
            raise LmadaptError(f"the model's tokenizer cannot encode the text: {str(exc).strip()[:200]}") from None

    return Encoder(encode, int(prefix), type(tokenizer).__name__)


def _run_encoder(run_dir: Path) -> Encoder:
    """A run's own tokenization: its word vocabulary (as the hf/ export's tokenizer) or its
    sentencepiece model; documents start with <eos>."""
    from lmadapt import runs
    from lmadapt.corpus import Vocab, _spm_encode, _spm_processor

    vocab = Vocab.from_dict(runs.read_json(run_dir / runs.VOCAB))
    if (run_dir / runs.SPM).is_file():
        sp = _spm_processor((run_dir / runs.SPM).read_bytes())
        return Encoder(lambda text: _spm_encode(sp, text.splitlines(), vocab.unk, vocab.eos).tolist(),
                       int(vocab.eos), "sentencepiece")
    from lmadapt.backbones.gpt2 import word_tokenizer

    enc = _hf_encoder(word_tokenizer(vocab))
    return Encoder(enc.encode, int(vocab.eos), "word")


# --------------------------------------------------------------------------- the model


@register_model(MODEL_NAME)
class LmadaptLM(LM):
    """model_args: run=RUN_DIR or hf_model=DIR; method=none|cache|mbpa|dyneval|A+B...;
    lambda_NAME, NAME_FIELD (method settings), config=FILE (a `lmadapt tune` result);
    scope=document|stream; context=windows|carry; max_length=N (window, or the
    Transformer's context under carry); context_keep=N (carry); data=, data_dir= (the
    training corpus dyneval's statistics read); device=, threads=, segment=."""

    def __init__(self, run=None, hf_model=None, method=None, scope="document", context="windows",
                 max_length=None, context_keep=None, data=None, data_dir=None, device="cpu", threads=None,
                 segment=None, **kwargs):
        super().__init__()
        for name in IGNORED:
            kwargs.pop(name, None)
        kwargs["method"] = method
        self.method, self.params, self.lambdas = _method_spec(kwargs)
        if kwargs:
            raise LmadaptError(f"unknown lmadapt model_args {', '.join(sorted(kwargs))}; see "
                               "`lmadapt harness --help` and docs/harness.md")
        if scope not in SCOPES:
            raise LmadaptError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        if context not in CONTEXTS:
            raise LmadaptError(f"context must be one of {', '.join(CONTEXTS)}, got {context!r}")
        if (run is None) == (hf_model is None):
            raise LmadaptError("model_args need either run=RUN_DIR or hf_model=DIR")
        self.scope, self.context_policy, self.segment = scope, context, segment
        if threads:
            torch.set_num_threads(int(threads))
        self.device_name = str(device or "cpu")
        if self.device_name.startswith("cuda") and not torch.cuda.is_available():
            raise LmadaptError(f"device={self.device_name} requested but no CUDA device is available")
        self.source = str(run if run is not None else hf_model)
        # Where methods cache what they derive from the run (dynamic evaluation's gradient
        # statistics, tens of minutes on a large training split), as `lmadapt eval` does.
        self.cache_dir = Path(run) if run is not None else None
        self.model, self.encoder, self.corpus = self._load(run, hf_model, data, data_dir)
        self.max_length = self._set_context(max_length, context_keep)
        self.seconds = 0.0

    # ----------------------------------------------------------------- loading

    def _load(self, run, hf_model, data, data_dir):
        from lmadapt.text import TextCorpus, _split_lines

        if hf_model is not None:
            from lmadapt.backbones.hf import load_pretrained

            model, tokenizer = load_pretrained(hf_model, device=self.device_name)
            encoder = _hf_encoder(tokenizer)
            train = None
            if data:
                def train():
                    lines = _split_lines(data, data_dir, "train")
                    return torch.tensor(encoder.encode("\n".join(lines) + "\n"), dtype=torch.long)
        else:
            from lmadapt import runs
            from lmadapt.checkpoint import load_model
            from lmadapt.corpus import Vocab, load_corpus

            run_dir = runs.require_run_dir(run)
            model, cfg, _ = load_model(run_dir, self.device_name)
            encoder = _run_encoder(run_dir)

            def train():
                vocab = Vocab.from_dict(runs.read_json(run_dir / runs.VOCAB))
                spm = (run_dir / runs.SPM).read_bytes() if (run_dir / runs.SPM).is_file() else None
                return load_corpus(data or cfg.data.name, data_dir if data_dir is not None else cfg.data.data_dir,
                                   tokenizer=cfg.data.tokenizer, vocab=vocab, spm_model=spm).train
        corpus = TextCorpus(name=self.source, vocab_size=model.vocab_size, streams={}, units={}, train_source=train)
        return model, encoder, corpus

    def _set_context(self, max_length, keep) -> int:
        transformer = hasattr(self.model, "set_context")
        if max_length is not None and int(max_length) < 1:
            raise LmadaptError(f"max_length must be >= 1, got {max_length}")
        if not transformer:
            if keep is not None:
                raise LmadaptError("context_keep applies to Transformer backbones; this run is an LSTM")
            if self.context_policy == "carry" and max_length is not None:
                raise LmadaptError("max_length with context=carry applies to Transformers; an LSTM carries its state")
            return int(max_length) if max_length is not None else LM_EVAL_DEFAULT_MAX_LENGTH
        if self.context_policy == "windows":
            if keep is not None:
                raise LmadaptError("context_keep applies to context=carry")
            length = int(max_length) if max_length is not None else self.model.context
            self.model.set_context(max(length, 2))  # a window never fills the backbone's own
            return length
        self.model.set_context(int(max_length) if max_length is not None else None,
                               int(keep) if keep is not None else None)
        return self.model.context

    # ----------------------------------------------------------------- lm-eval interface

    def get_model_info(self) -> dict:
        """Recorded in the results' config by lm_eval.simple_evaluate."""
        return {"lmadapt": {"source": self.source, "method": self.method, "params": self.params,
                            "lambdas": self.lambdas, "scope": self.scope, "context": self.context_policy,
                            "max_length": self.max_length, "tokenizer": self.encoder.kind,
                            "prefix_token_id": self.encoder.prefix, "stream_seconds": round(self.seconds, 3)}}

    @property
    def tokenizer_name(self) -> str:
        return f"lmadapt:{self.encoder.kind}"

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pieces = []
        for req in requests:
            (text,) = req.args
            tokens = [self.encoder.prefix] + self.encoder.encode(text)
            pieces.append((tokens, 1))
        return [ll for ll, _ in self.score_pieces(pieces)]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pieces = []
        for req in requests:
            context, continuation = req.args
            if context:
                # trailing spaces of the context belong to the continuation (as lm-eval's hf model does)
                n_spaces = len(context) - len(context.rstrip())
                if n_spaces:
                    continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
                whole = self.encoder.encode(context + continuation)
                ctx = self.encoder.encode(context)
                tokens, first = whole, len(ctx)
            else:
                tokens, first = [self.encoder.prefix] + self.encoder.encode(continuation), 1
            if first < 1:  # a context that encodes to nothing: start with the prefix token
                tokens, first = [self.encoder.prefix] + tokens, first + 1
            if self.context_policy == "windows" and len(tokens) > self.max_length + 1:
                # lm-eval's hf model scores a request in one window: the last max_length inputs
                # (context cut from the left), so a continuation never straddles two windows
                cut = len(tokens) - (self.max_length + 1)
                tokens, first = tokens[cut:], max(first - cut, 1)
            pieces.append((tokens, first))
        return self.score_pieces(pieces)

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise LmadaptError("the lmadapt model scores text (loglikelihood, loglikelihood_rolling); "
                           "generation tasks are not supported")

    # ----------------------------------------------------------------- scoring

    def _methods(self):
        from lmadapt.evaluate import build_methods
        from lmadapt.methods import parse_combination

        return build_methods(parse_combination(self.method), self.params)

    def _stream(self, tokens: list[int], regions: list[tuple[int, int]]):
        """(mixed log p, base greedy hits) of every target of one stream, through stream_eval."""
        from lmadapt.methods import ModelAdapter
        from lmadapt.stream import stream_eval

        model = self.model
        methods = self._methods()
        cache_dir = self.cache_dir
        if self.context_policy == "windows":
            # Dynamic evaluation's RMS statistics pass over training text in start(); states of
            # batch size > 1 (its default batch of 100) are plain windows, so the statistics are
            # computed once and kept in memory for every later stream. At a statistics batch of
            # 1 they cannot be told from the stream's own state by size: count them instead, and
            # forget the kept statistics so that the counted pass really runs (slow, per stream).
            before = sum(1 for m in methods if isinstance(m, ModelAdapter) and getattr(m.params, "variant", None) == "rms"
                         and getattr(m.params, "stat_batch", 0) == 1)
            if before:
                from lmadapt.methods import dyneval

                dyneval._RECENT.clear()
                cache_dir = None  # nor read them from the run directory: the pass must run
            model = WindowedContext(self.model, self.max_length, regions, plain_states=before)
        stream = torch.tensor(tokens, dtype=torch.long)
        greedy = _Sink(stream.numel() - 1, self.device_name)
        recorder = _GreedyRecorder(model, greedy)
        start = time.perf_counter()
        result = stream_eval(recorder, stream, methods, self.lambdas, corpus=self.corpus,
                             device=self.device_name, segment_len=self.segment, cache_dir=cache_dir)
        self.seconds += time.perf_counter() - start
        hits = greedy.choices().cpu() == stream[1:]
        return result.mixed.double(), hits

    def score_pieces(self, pieces: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """pieces: (tokens, first scored index); token j >= first is scored from tokens[:j]."""
        out: list[tuple[float, bool] | None] = [None] * len(pieces)
        if self.scope == "document":
            for k, (tokens, first) in enumerate(pieces):
                if len(tokens) < 2 or first >= len(tokens):
                    out[k] = (0.0, True)
                    continue
                log_p, hits = self._stream(tokens, [(0, len(tokens) - 1)])
                out[k] = (float(log_p[first - 1:].sum()), bool(hits[first - 1:].all()))
            return out
        stream, regions, offsets = [], [], []
        for tokens, _ in pieces:
            offsets.append(len(stream))
            regions.append((len(stream), max(len(tokens) - 1, 0)))
            stream.extend(tokens)
        regions = [r for r in regions if r[1] > 0]
        if len(stream) < 2:
            return [(0.0, True)] * len(pieces)
        log_p, hits = self._stream(stream, regions)
        for k, (tokens, first) in enumerate(pieces):
            a, b = offsets[k] + first - 1, offsets[k] + len(tokens) - 1
            out[k] = (float(log_p[a:b].sum()), bool(hits[a:b].all()))
        return out


class _Sink:
    """The base model's greedy choice at each position of one stream, written into a tensor
    allocated once (as stream_eval's outputs are: a small tensor kept per segment lands in
    the holes the freed (L x V) logits leave on glibc's heap, and the RSS then grows by about
    V floats per token, 22 GB over the WikiText-2 test set in stream scope). stream_eval's
    deep copy of the model (under dyneval) shares it, not copies it."""

    def __init__(self, n: int, device):
        self.buf = torch.empty(n, dtype=torch.long, device=device)
        self.pos = 0

    def clear(self) -> None:
        self.pos = 0

    def append(self, choices: torch.Tensor) -> None:
        k = min(choices.numel(), self.buf.numel() - self.pos)
        self.buf[self.pos:self.pos + k] = choices[:k]
        self.pos += k

    def choices(self) -> torch.Tensor:
        return self.buf[:self.pos]

    def __deepcopy__(self, memo):
        return self


class _GreedyRecorder(nn.Module):
    """Passes a backbone through, keeping the argmax of its logits at each position (the
    base model's greedy choice, for loglikelihood's is_greedy)."""

    train_carries_state = False

    def __init__(self, inner, sink: "_Sink"):
        super().__init__()
        self.inner = inner
        self.sink = sink

    arch = property(lambda self: self.inner.arch)
    feature_size = property(lambda self: self.inner.feature_size)
    vocab_size = property(lambda self: self.inner.vocab_size)

    def output_layer(self):
        return self.inner.output_layer()

    def adaptable_parameters(self, which):
        return self.inner.adaptable_parameters(which)

    statistics_context = property(lambda self: getattr(self.inner, "statistics_context", ""))

    def init_state(self, batch_size, device=None):
        self.sink.clear()  # the stream's own pass starts (dyneval's statistics pass came before)
        return self.inner.init_state(batch_size, device)

    def detach_state(self, state):
        return self.inner.detach_state(state)

    def forward(self, tokens, state=None, compute_logits=True):
        hidden, logits, state = self.inner(tokens, state, compute_logits)
        # Only the scored stream (batch size 1) is recorded. Passes over other text at a larger
        # batch (dyneval's statistics) are not: they were cleared anyway, and tens of thousands
        # of small tensors kept alive among that pass's large freed blocks fragmented the heap
        # it keeps (lmadapt.heap), so its resident memory grew by ~3 MB a step.
        if logits is not None and tokens.size(0) == 1:
            self.sink.append(logits.detach()[0].argmax(-1))
        return hidden, logits, state


def settings_summary(lm: LmadaptLM) -> str:
    info = lm.get_model_info()["lmadapt"]
    return ", ".join(f"{k}={v}" for k, v in info.items() if k not in ("params",))


__all__ = ["LmadaptLM", "WindowedContext", "MODEL_NAME", "TASK_DIR", "SCOPES", "CONTEXTS", "require_lm_eval"]
