"""`lmadapt eval`: load a run, run the streaming loop for `lstm` and the requested
combination, and report perplexities, speed and per-token log-probabilities."""

from __future__ import annotations

import dataclasses
import resource
from pathlib import Path

import torch

from lmadapt import runs
from lmadapt.errors import LmadaptError
from lmadapt.methods import BASE, REGISTRY, Method, combination_name, parse_combination
from lmadapt.mix import check_lambdas, mix_log_probs, perplexity
from lmadapt.params import check_number, to_float, to_int
from lmadapt.stream import StreamResult, stream_eval

DEFAULT_LAMBDAS = {"cache": 0.15, "mbpa": 0.1,  # the MbPA paper's best PTB setting (App. B)
                   "knn": 0.25}  # kNN-LM's WikiText-103 setting
TOKENS_FORMAT = "lmadapt-tokens"


def coerce_param(method: str, name: str, value, default):
    """A method hyper-parameter from a flag, JSON or a grid, typed like its default and
    checked against the method's declared range (lmadapt.params)."""
    flag = f"--{method}-{name.replace('_', '-')}"
    if isinstance(default, bool):
        text = str(value).strip().lower()
        if value is True or text in ("true", "1", "yes"):
            return True
        if value is False or text in ("false", "0", "no"):
            return False
        raise LmadaptError(f"{flag} expects true or false, got {value!r}")
    if isinstance(value, (bool, list, dict)) or value is None:
        raise LmadaptError(f"{flag} expects a {type(default).__name__}, got {value!r}")
    if isinstance(default, (int, float)):
        value = to_int(value, flag) if isinstance(default, int) else to_float(value, flag)
        return check_number(flag, value, getattr(REGISTRY[method].Params, "RANGES", {}).get(name))
    return str(value)


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
    out = {n: float(lambdas.get(n, DEFAULT_LAMBDAS.get(n, 0.1))) for n in names if not REGISTRY[n].adapts_model}
    check_lambdas(out)
    return out


def load_for_eval(run_dir, data: str | None = None, data_dir: str | None = None, device="cpu"):
    """Model, corpus (encoded with the run's vocabulary) and config of a trained run."""
    from lmadapt.corpus import Vocab, load_corpus
    from lmadapt.train import load_model

    run_dir = runs.require_run_dir(run_dir)
    model, cfg, meta = load_model(run_dir, device)
    if (run_dir / runs.LAST).is_file() and not (run_dir / runs.RESULTS).is_file():  # training stopped or running
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


def tokens_record(split: str, baseline: StreamResult, corpus, lambdas: dict[str, float]) -> dict:
    """An empty per-token record (the --save-tokens format) holding the base model's column."""
    return {"format": TOKENS_FORMAT, "version": 1, "split": split, "targets": baseline.targets,
            "train_counts": corpus.train_counts(), "columns": {BASE: baseline.base}, "lambdas": lambdas,
            "methods": {BASE: baseline.base}}


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
                               desc=f"{split} lstm")
    combo = combination_name(names)
    report = {"split": split, "tokens": baseline.tokens, "methods": {BASE: _entry(baseline, baseline.base)}}
    tokens = tokens_record(split, baseline, corpus, lam)
    if names:
        result = stream_eval(model, stream, methods, lam, corpus=corpus, device=device, segment_len=segment_len,
                             memory_index=memory_index, desc=f"{split} {combo}", cache_dir=cache_dir)
        entry = _entry(result, result.mixed)
        entry["delta_vs_lstm_percent"] = 100 * (entry["ppl"] / report["methods"][BASE]["ppl"] - 1)
        entry["params"] = {m.name: dataclasses.asdict(m.params) for m in methods}
        entry["lambdas"] = lam
        report["methods"][combo] = entry
        tokens["methods"][combo] = result.mixed
        tokens["columns"]["base"] = result.base  # differs from lstm under dynamic evaluation
        for name, (log_p, available) in result.components.items():
            tokens["columns"][name] = log_p
            tokens["columns"][f"{name}.available"] = available
        # Every smaller mixture is free from the same pass (same λ), e.g. lstm+cache beside mbpa+cache.
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
    rows = [("method", "ppl", "Δ vs lstm", "tokens/s")]
    units = "units" in report
    if units:
        rows[0] += ("word ppl", "bits/byte")
    base = report["methods"][BASE]["ppl"]
    for name, e in report["methods"].items():
        delta = "—" if name == BASE else f"{100 * (e['ppl'] / base - 1):+.1f}%"
        rows.append((name, f"{e['ppl']:.2f}", delta, f"{e['tokens_per_second']:.0f}"))
        if units:
            rows[-1] += (f"{e['word_ppl']:.2f}", f"{e['bits_per_byte']:.4f}")
    for name, ppl in report.get("mixtures_from_same_pass", {}).items():
        rows.append((f"({name})", f"{ppl:.2f}", f"{100 * (ppl / base - 1):+.1f}%", "") + ("", "") * units)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.append(f"{report['split']}: {report['tokens']:,} tokens scored; peak RSS {report['peak_rss_mb']:.0f} MB")
    if "oov_rate" in report:
        lines.append(f"out-of-vocabulary words: {100 * report['oov_rate']:.2f}% (scored as <unk>)")
    return "\n".join(lines)


def save_tokens(path: Path, tokens: dict) -> None:
    runs.save_tensors(path, tokens)


def load_tokens(path) -> dict:
    data = runs.load_tensors(path)
    if not isinstance(data, dict) or data.get("format") != TOKENS_FORMAT:
        raise LmadaptError(f"{path} is not an lmadapt tokens file (written by `lmadapt eval --save-tokens`)")
    kinds = {"targets": torch.Tensor, "train_counts": torch.Tensor, "columns": dict, "methods": dict, "lambdas": dict}
    for key, kind in kinds.items():
        if not isinstance(data.get(key), kind):
            raise LmadaptError(f"{path} is a damaged lmadapt tokens file: {key!r} is missing or of the wrong type")
    n = data["targets"].numel()
    for name, column in [*data["columns"].items(), *data["methods"].items()]:
        if not isinstance(column, torch.Tensor) or column.numel() != n:
            raise LmadaptError(f"{path} is a damaged lmadapt tokens file: column {name!r} does not hold {n} values")
    return data
