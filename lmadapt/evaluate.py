"""`lmadapt eval`: load a run, run the streaming loop for the base model and the requested
combination, and report perplexities, speed and per-token log-probabilities.

The base model's row is named `base` (lmadapt.methods.BASE) whatever the backbone; the
report's `backbone` says which it is (lstm, gpt2, or a --hf-model's model type).
"""

from __future__ import annotations

import dataclasses
import resource
from pathlib import Path

import torch

from lmadapt import runs
from lmadapt.errors import LmadaptError
from lmadapt.methods import (BASE, MIXTURE_LAMBDAS, REGISTRY, Method, adapter_names, combination_name, mixture_names,
                             parse_combination)
from lmadapt.mix import check_lambdas, mix_log_probs, perplexity
from lmadapt.params import parse_value
from lmadapt.stream import StreamResult, stream_eval

TOKENS_FORMAT = "lmadapt-tokens"
# 2: the base model's column is "base" (1: "lstm"), the adapted base of a pass with a model
# adapter is the method column of the adapters alone (e.g. "dyneval"), and "pass" names the
# combination whose components are recorded. Version 1 files are read as version 2.
TOKENS_VERSION = 2
_V1_BASE = "lstm"


def coerce_param(method: str, name: str, value, default):
    """A method hyper-parameter from a flag, JSON or a grid, typed like its default and
    checked against the method's declared range: the CLI's one value parser
    (lmadapt.params.parse_value)."""
    flag = f"--{method}-{name.replace('_', '-')}"
    kind = type(default) if isinstance(default, (bool, int, float)) else str
    if value is None or isinstance(value, (list, dict)) or (isinstance(value, bool) and kind is not bool):
        raise LmadaptError(f"{flag} expects a {kind.__name__}, got {value!r}")
    return parse_value(value, kind, flag, getattr(REGISTRY[method].Params, "RANGES", {}).get(name))


def build_methods(names: list[str], params: dict[str, dict]) -> list[Method]:
    methods = []
    for name in names:
        cls = REGISTRY[name]
        defaults = cls.Params()
        given = params.get(name, {})
        unknown = set(given) - set(cls.param_names())
        if unknown:
            raise LmadaptError(f"unknown {name} setting {sorted(unknown)[0]!r}; valid: {', '.join(cls.param_names())}")
        values = {k: coerce_param(name, k, v, getattr(defaults, k)) for k, v in given.items()}
        methods.append(cls(dataclasses.replace(defaults, **values)))
    return methods


def mixture_lambdas(names: list[str], lambdas: dict[str, float]) -> dict[str, float]:
    """λ of each mixture method of `names`: the given one, else the mixture's default
    (MIXTURE_LAMBDAS), else the method's default_lambda."""
    mixers = mixture_names(names)
    own = MIXTURE_LAMBDAS.get(frozenset(mixers), {})
    out = {n: float(lambdas.get(n, own.get(n, REGISTRY[n].default_lambda))) for n in mixers}
    check_lambdas(out)
    return out


def load_for_eval(run_dir, data: str | None = None, data_dir: str | None = None, device="cpu",
                  checkpoint: str = "best"):
    """Model (the weights of `checkpoint`: lmadapt.checkpoint), corpus (encoded with the
    run's vocabulary) and config of a trained run."""
    from lmadapt.checkpoint import load_model
    from lmadapt.corpus import Vocab, load_corpus

    run_dir = runs.require_run_dir(run_dir)
    model, cfg, meta = load_model(run_dir, device, checkpoint)
    if checkpoint == "best" and (run_dir / runs.LAST).is_file() and not (run_dir / runs.RESULTS).is_file():
        runs.warn(f"{run_dir} is unfinished (no {runs.RESULTS}): evaluating its best weights so far")
    vocab = Vocab.from_dict(runs.read_json(run_dir / runs.VOCAB))
    spm = (run_dir / runs.SPM).read_bytes() if (run_dir / runs.SPM).is_file() else None
    name = data or cfg.data.name
    directory = data_dir if data_dir is not None else cfg.data.data_dir
    if spm is not None:
        corpus = load_corpus(name, directory, tokenizer="sentencepiece", vocab=vocab, spm_model=spm)
    else:
        # Build the corpus's own vocabulary and compare: the same corpus gives the same one.
        corpus = load_corpus(name, directory, tokenizer=cfg.data.tokenizer)
        if corpus.vocab != vocab:
            raise LmadaptError(f"the vocabulary of {run_dir} ({len(vocab):,} words) does not match corpus "
                               f"{name!r} ({len(corpus.vocab):,} words): was the model trained on it?")
    if len(vocab) != model.vocab_size:
        raise LmadaptError(f"{run_dir}: vocab.json has {len(vocab)} words but the model {model.vocab_size}")
    return model, corpus, cfg


def _entry(result: StreamResult, log_probs) -> dict:
    return {"ppl": perplexity(log_probs), "tokens_per_second": result.tokens / max(result.seconds, 1e-9),
            "seconds": result.seconds}


def tokens_record(split: str, baseline: StreamResult, corpus, lambdas: dict[str, float],
                  backbone: str | None = None) -> dict:
    """A per-token record (the --save-tokens format) holding the base model's column.

    methods: combination -> log p(target) of each token; columns: each mixture component
    of the pass named by "pass" (log p and availability), mixed with the λ in "lambdas"
    on top of methods[the pass's model adapters alone] ("base" when it has none)."""
    return {"format": TOKENS_FORMAT, "version": TOKENS_VERSION, "split": split, "backbone": backbone,
            "pass": BASE, "targets": baseline.targets, "train_counts": corpus.train_counts(), "columns": {},
            "lambdas": lambdas, "methods": {BASE: baseline.base}}


def evaluate_run(model, corpus, split: str, method: str, params: dict[str, dict] | None = None,
                 lambdas: dict[str, float] | None = None, *, device="cpu", segment_len: int | None = None,
                 memory_index: str = "auto", baseline: StreamResult | None = None,
                 cache_dir=None, limit: int | None = None) -> tuple[dict, dict]:
    """Returns (report, tokens): the JSON report and the per-token record. `limit`: score
    only the split's first `limit` targets."""
    names = parse_combination(method)
    methods = build_methods(names, params or {})
    lam = mixture_lambdas(names, lambdas or {})
    stream = corpus.split(split)
    if limit is not None:
        stream = stream[:limit + 1]
    if baseline is None:
        baseline = stream_eval(model, stream, [], {}, corpus=corpus, device=device, segment_len=segment_len,
                               desc=f"{split} {BASE}")
    combo = combination_name(names)
    backbone = model.arch
    report = {"split": split, "tokens": baseline.tokens, "backbone": backbone,
              "methods": {BASE: _entry(baseline, baseline.base)}}
    tokens = tokens_record(split, baseline, corpus, lam, backbone)
    if names:
        result = stream_eval(model, stream, methods, lam, corpus=corpus, device=device, segment_len=segment_len,
                             memory_index=memory_index, desc=f"{split} {combo}", cache_dir=cache_dir)
        entry = _entry(result, result.mixed)
        entry["delta_vs_base_percent"] = 100 * (entry["ppl"] / report["methods"][BASE]["ppl"] - 1)
        entry["params"] = {m.name: dataclasses.asdict(m.params) for m in methods}
        entry["lambdas"] = lam
        summaries = {m.name: s for m in methods if (s := m.summary())}
        if summaries:  # e.g. the window and θ the cache's online selection settled on
            entry["summary"] = summaries
        report["methods"][combo] = entry
        tokens["pass"] = combo
        tokens["methods"][combo] = result.mixed
        adapters = adapter_names(names)
        if adapters:  # the adapted model's own predictions: the adapters alone (mixtures never move the model)
            tokens["methods"][combination_name(adapters)] = result.base
        for name, (log_p, available) in result.components.items():
            tokens["columns"][name] = log_p
            tokens["columns"][f"{name}.available"] = available
        # Every smaller mixture is free from the same pass (same λ), e.g. base+cache beside mbpa+cache.
        mixers = [n for n in names if n in lam]
        derived = {}
        for drop in mixers:
            keep = {n: result.components[n] for n in mixers if n != drop}
            if keep and len(mixers) > 1:
                sub = [n for n in names if n != drop]
                derived[combination_name(sub)] = perplexity(mix_log_probs(result.base, keep, lam))
        if derived:
            report["mixtures_from_same_pass"] = derived
    units = (getattr(corpus, "units", None) or {}).get(split)
    if units and limit is None:  # per word and per byte: comparable across tokenizers (lmadapt.text)
        from lmadapt.text import unit_figures

        report["units"] = units
        report["methods"][BASE].update(unit_figures(baseline.base, units))
        if names:
            report["methods"][combo].update(unit_figures(result.mixed, units))
    if getattr(corpus, "oov_rate", None) is not None:
        report["oov_rate"] = corpus.oov_rate
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return report, tokens


def format_table(report: dict) -> str:
    rows = [("method", "ppl", f"Δ vs {BASE}", "tokens/s")]
    units = "units" in report
    if units:
        rows[0] += ("word ppl", "bits/byte")
    base = report["methods"][BASE]["ppl"]
    for name, e in report["methods"].items():
        delta = "—" if name == BASE else f"{100 * (e['ppl'] / base - 1):+.1f}%"
        label = f"{BASE} ({report['backbone']})" if name == BASE and report.get("backbone") else name
        rows.append((label, f"{e['ppl']:.2f}", delta, f"{e['tokens_per_second']:.0f}"))
        if units:
            rows[-1] += (f"{e['word_ppl']:.2f}", f"{e['bits_per_byte']:.4f}")
    for name, ppl in report.get("mixtures_from_same_pass", {}).items():
        rows.append((f"({name})", f"{ppl:.2f}", f"{100 * (ppl / base - 1):+.1f}%", "") + ("", "") * units)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.append(f"{report['split']}: {report['tokens']:,} tokens scored; peak RSS {report['peak_rss_mb']:.0f} MB")
    for e in report["methods"].values():
        for method, summary in e.get("summary", {}).items():
            if "text" in summary:
                lines.append(f"{method}: {summary['text']}")
    if "oov_rate" in report:
        lines.append(f"out-of-vocabulary words: {100 * report['oov_rate']:.2f}% (scored as <unk>)")
    return "\n".join(lines)


def save_tokens(path: Path, tokens: dict) -> None:
    runs.save_tensors(path, tokens)


def _upgrade_v1(data: dict) -> None:
    """A version 1 record read as version 2: its base column was "lstm", and its "base" column
    held the pass's base (the adapted model's under a model adapter)."""
    columns, methods = dict(data["columns"]), dict(data["methods"])
    plain = methods.pop(_V1_BASE)
    pass_base = columns.pop(BASE, plain)
    columns.pop(_V1_BASE, None)
    methods = {BASE: plain, **methods}
    # One pass per file: the largest combination recorded (bench/table2.py adds its sub-mixtures).
    combos = [parse_combination(k) for k in methods if k != BASE]
    names = max(combos, key=len, default=[])
    adapters = adapter_names(names)
    if adapters:
        methods.setdefault(combination_name(adapters), pass_base)
    data.update(version=TOKENS_VERSION, backbone=None, columns=columns, methods=methods)
    data["pass"] = combination_name(names)


def load_tokens(path) -> dict:
    data = runs.load_tensors(path)
    if not isinstance(data, dict) or data.get("format") != TOKENS_FORMAT:
        raise LmadaptError(f"{path} is not an lmadapt tokens file (written by `lmadapt eval --save-tokens`)")
    if data.get("version") not in (1, TOKENS_VERSION):
        raise LmadaptError(f"{path} is an lmadapt tokens file of version {data.get('version')!r}; this lmadapt "
                           f"reads versions 1 to {TOKENS_VERSION}")
    kinds = {"targets": torch.Tensor, "train_counts": torch.Tensor, "columns": dict, "methods": dict, "lambdas": dict}
    if data["version"] == TOKENS_VERSION:
        kinds["pass"] = str
    for key, kind in kinds.items():
        if not isinstance(data.get(key), kind):
            raise LmadaptError(f"{path} is a damaged lmadapt tokens file: {key!r} is missing or of the wrong type")
    if data["version"] == 1:
        if _V1_BASE not in data["methods"]:
            raise LmadaptError(f"{path} is a damaged lmadapt tokens file: no {_V1_BASE!r} column")
        _upgrade_v1(data)
    elif BASE not in data["methods"]:
        raise LmadaptError(f"{path} is a damaged lmadapt tokens file: no {BASE!r} column")
    n = data["targets"].numel()
    for name, column in [*data["columns"].items(), *data["methods"].items()]:
        if not isinstance(column, torch.Tensor) or column.numel() != n:
            raise LmadaptError(f"{path} is a damaged lmadapt tokens file: column {name!r} does not hold {n} values")
    return data
