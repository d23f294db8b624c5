"""The `lmadapt` command.

Every user-facing failure is an LmadaptError: printed as one line, exit code 2,
no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from lmadapt import runs
from lmadapt.errors import LmadaptError
from lmadapt.params import NON_NEGATIVE, POSITIVE, PROBABILITY, arg, at_least, check_number, to_float


class _Parser(argparse.ArgumentParser):
    """argparse exits with code 2 on bad arguments already; keep its message to one line."""

    def error(self, message):
        self.exit(2, f"lmadapt: error: {message}\n")


DEVICES = "cpu, cuda, cuda:N, mps or auto"


def _device(name: str):
    import torch

    kind, _, index = name.partition(":")
    if name != "auto" and (kind not in ("cpu", "cuda", "mps") or (index and not index.isdigit())
                           or (kind != "cuda" and index)):
        raise LmadaptError(f"unknown --device {name!r}; use {DEVICES}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise LmadaptError("--device cuda requested but no CUDA device is available")
        if index and int(index) >= torch.cuda.device_count():
            raise LmadaptError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
        if "LOCAL_RANK" in os.environ and not index:
            return f"cuda:{os.environ['LOCAL_RANK']}"  # one GPU per torchrun process
    if kind == "mps" and not torch.backends.mps.is_available():
        raise LmadaptError("--device mps requested but MPS is not available")
    return name


def _threads(n: int) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def _existing_run_files(out: Path) -> list[str]:
    return [name for name in runs.RUN_FILES if (out / name).exists()]


_START_FILES = {runs.CONFIG, runs.VOCAB, runs.SPM, runs.METRICS}  # what a run writes before any training


def _is_aborted_start(out: Path) -> bool:
    existing = set(_existing_run_files(out))
    return bool(existing) and existing <= _START_FILES


def _clear_aborted_start(out: Path) -> bool:
    """A run directory whose training died before its first checkpoint holds only the files
    written at the start (config, vocabulary, empty metrics): nothing worth keeping. Remove
    them, so that a rerun starts cleanly instead of being refused. True if it did."""
    existing = _existing_run_files(out)
    if not _is_aborted_start(out):
        return False
    for name in existing:
        _remove(out / name)
    print(f"{out} held an aborted start (no checkpoint was written); starting over", file=sys.stderr)
    return True


class _ReplacedRun:
    """--force: the old run is moved aside, not deleted, until the new run has written its
    first checkpoint; if the new run fails before that, the old one is put back."""

    def __init__(self, out: Path):
        self.out = out
        self.backup = out / ".lmadapt-replaced"
        self.moved: list[str] = []

    def move_aside(self) -> None:
        if self.backup.exists():  # left by a crash during an earlier --force: restore it first
            self.moved = [p.name for p in self.backup.iterdir()]
            self.restore()
        self.backup.mkdir()
        for name in _existing_run_files(self.out):
            os.replace(self.out / name, self.backup / name)
            self.moved.append(name)

    def commit(self) -> None:
        if self.backup.exists():
            shutil.rmtree(self.backup)
        self.moved = []

    def restore(self) -> None:
        if not self.backup.exists():
            return
        for name in _existing_run_files(self.out):
            _remove(self.out / name)
        for name in self.moved:
            os.replace(self.backup / name, self.out / name)
        shutil.rmtree(self.backup)
        self.moved = []


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()  # hf/ (gpt2 export) is a folder


def cmd_train(args) -> int:
    from lmadapt.config import RunConfig, apply_overrides, load_recipe
    from lmadapt.corpus import Vocab, absolute_source, load_corpus
    from lmadapt.train import fit

    _threads(args.threads)
    device = _device(args.device)
    main_rank = os.environ.get("RANK", "0") == "0"

    # Everything is validated (settings, output place, corpus) before anything is written.
    if args.resume:
        if args.out is None:
            raise LmadaptError("--resume needs --out RUN_DIR")
        if args.recipe or args.data:
            raise LmadaptError("--resume continues with the run's own config.json; drop --recipe/--data")
        if args.force:
            raise LmadaptError("--resume and --force contradict each other; choose one")
        out = Path(args.out)
        apply_overrides(RunConfig(), args.set)  # a bad --set is an error even on a finished run
        if (out / runs.RESULTS).is_file():
            print(f"{out} is already finished:", json.dumps(runs.read_json(out / runs.RESULTS), indent=2))
            return 0
        if not (out / runs.CONFIG).is_file():
            raise LmadaptError(f"nothing to resume: {out / runs.CONFIG} not found")
        meta = runs.read_json(out / runs.CONFIG)
        cfg = RunConfig.from_dict(meta, source=str(out / runs.CONFIG))
        apply_overrides(cfg, args.set)
        cfg.model.validate()
        vocab = Vocab.from_dict(runs.read_json(out / runs.VOCAB))
        spm = (out / runs.SPM).read_bytes() if (out / runs.SPM).is_file() else None
        corpus = load_corpus(cfg.data.name, cfg.data.data_dir, tokenizer=cfg.data.tokenizer,
                             spm_vocab_size=cfg.data.spm_vocab_size, vocab=vocab, spm_model=spm)
        recorded = meta.get("corpus", {}).get("sha256")
        if recorded and recorded != corpus.checksums():
            changed = next(s for s in recorded if recorded[s] != corpus.checksums().get(s))
            raise LmadaptError(f"the {changed} split of corpus {cfg.data.name!r} is not the text {out} was "
                               f"trained on (its checksum differs); cannot resume")
        runs.check_writable_dir(out, "--out")
    else:
        cfg = load_recipe(args.recipe) if args.recipe else RunConfig()
        if args.data:
            cfg.data.name = args.data
        if args.data_dir:
            cfg.data.data_dir = args.data_dir
        apply_overrides(cfg, args.set)
        cfg.model.validate()
        from lmadapt import backbones

        backbones.get(cfg.model.arch).check_training(cfg)  # before loading the corpus
        cfg.data.name, cfg.data.data_dir = absolute_source(cfg.data.name, cfg.data.data_dir)
        label = Path(cfg.data.name).name or "run"
        out = Path(args.out) if args.out else Path("runs") / f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
        if out.exists() and not out.is_dir():
            raise LmadaptError(f"--out {out} exists and is not a directory")
        runs.check_writable_dir(out, "--out")
        if main_rank and not args.force and _existing_run_files(out) and not _is_aborted_start(out):
            what = "a finished run" if (out / runs.RESULTS).exists() else "an unfinished run"
            raise LmadaptError(f"{out} already holds {what}; use --resume to continue it or --force to start over")
        corpus = load_corpus(cfg.data.name, cfg.data.data_dir, tokenizer=cfg.data.tokenizer,
                             spm_vocab_size=cfg.data.spm_vocab_size)

    lock = runs.locked(out) if main_rank else contextlib.nullcontext()
    with lock:
        if main_rank:
            sizes = ", ".join(f"{s} {corpus.split(s).numel():,}" for s in ("train", "valid", "test"))
            print(f"corpus {corpus.name}: vocab {len(corpus.vocab):,}; tokens {sizes}", file=sys.stderr)
            print(f"run directory: {out}", file=sys.stderr)
        resume = args.resume
        replaced = _ReplacedRun(out)
        if main_rank and not resume:
            if args.force:
                replaced.move_aside()
            elif _existing_run_files(out):
                # Checked again under the lock: another process may have started meanwhile.
                if not _clear_aborted_start(out):
                    raise LmadaptError(f"{out} already holds a run; use --resume or --force")
        if resume and not (out / runs.LAST).is_file():
            # Died before its first checkpoint: nothing to continue; start over with its config.
            _clear_aborted_start(out)
            resume = False
        try:
            results = fit(out, cfg, corpus, device=device, resume=resume, on_checkpoint=replaced.commit)
        except BaseException:
            if replaced.moved:
                replaced.restore()
                print(f"lmadapt: the new run failed before its first checkpoint; the previous run in {out} "
                      f"was put back", file=sys.stderr)
            raise
    if results is not None:
        print(f"valid ppl {results['valid_ppl']:.2f}  test ppl {results['test_ppl']:.2f}  "
              f"train {results['train_seconds'] / 60:.1f} min at {results['tokens_per_second']:.0f} tokens/s  "
              f"({results['stopped_because']}; precision {results['precision']})")
        print(f"wrote {out / runs.RESULTS}")
    return 0


def _method_flags(parser) -> None:
    """--NAME-FIELD for every registered method's hyper-parameters, --lambda-NAME for mixtures."""
    import dataclasses

    from lmadapt.methods import MIXTURE_LAMBDAS, REGISTRY, MixtureMethod

    for name, cls in REGISTRY.items():
        group = parser.add_argument_group(f"{name} settings")
        helps = getattr(cls.Params, "HELP", {})
        for f in dataclasses.fields(cls.Params):
            default = f.default
            # A bare boolean flag (--knn-recompute) means true; it still takes an explicit value.
            switch = {"nargs": "?", "const": "true"} if isinstance(default, bool) else {}
            text = f"{helps[f.name]} (default {default})" if f.name in helps else f"default {default}"
            group.add_argument(f"--{name}-{f.name.replace('_', '-')}", dest=f"m__{name}__{f.name}", default=None,
                               metavar=type(default).__name__.upper(), help=text, **switch)
            if default is True:  # a switch that is on by default (--cache-select) also has its off form
                group.add_argument(f"--{name}-no-{f.name.replace('_', '-')}", dest=f"m__{name}__{f.name}",
                                   action="store_const", const="false",
                                   help=f"the same as --{name}-{f.name.replace('_', '-')} false")
        if issubclass(cls, MixtureMethod):
            group.add_argument(f"--lambda-{name}", dest=f"lambda__{name}", type=arg(float, PROBABILITY),
                               default=None, help=f"mixture weight in [0, 1] (default {cls.default_lambda}"
                               + "".join(f"; {lams[name]:g} in {'+'.join(n for n in REGISTRY if n in key)}"
                                         for key, lams in MIXTURE_LAMBDAS.items()
                                         if lams.get(name, cls.default_lambda) != cls.default_lambda) + ")")


def _read_settings(path: str) -> dict:
    """A --config file: {"method": str, "params": {method: {name: value}}, "lambdas": {method: number}}."""
    config = runs.read_json(Path(path))
    if not isinstance(config, dict):
        raise LmadaptError(f"--config {path} must hold a JSON object (method, params, lambdas), "
                           f"not a {type(config).__name__}")
    if not isinstance(config.get("method", ""), str):
        raise LmadaptError(f"--config {path}: 'method' must be a string such as \"mbpa+cache\"")
    params = config.get("params", {})
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise LmadaptError(f"--config {path}: 'params' must map method names to objects of settings")
    lambdas = config.get("lambdas", {})
    if not isinstance(lambdas, dict):
        raise LmadaptError(f"--config {path}: 'lambdas' must map method names to numbers")
    for name, value in lambdas.items():
        check_number(f"--config lambdas.{name}", to_float(value, f"--config lambdas.{name}"), PROBABILITY)
    return config


def _method_settings(args, config: dict) -> tuple[str, dict, dict]:
    """Method, per-method params and lambdas: --config file first, explicit flags over it."""
    from lmadapt.methods import BASE, REGISTRY

    if args.method is not None and not args.method.strip():
        raise LmadaptError("empty --method")
    method = args.method or config.get("method") or BASE
    params = {k: dict(v) for k, v in config.get("params", {}).items()}
    lambdas = {k: float(v) for k, v in config.get("lambdas", {}).items()}
    preset = getattr(args, "preset", None)
    if preset:
        if config:
            raise LmadaptError("--preset and --config both give settings: use one of them")
        params, lambdas = preset_settings(preset, method)
    for name in [*params, *lambdas]:
        if name not in REGISTRY:
            raise LmadaptError(f"--config names unknown method {name!r}; valid: {', '.join(REGISTRY)}")
    if not preset:
        params = {name: REGISTRY[name].settings_from_file(p) for name, p in params.items()}
    for key, value in vars(args).items():
        if value is None:
            continue
        if key.startswith("m__"):
            _, name, field = key.split("__")
            params.setdefault(name, {})[field] = value
        elif key.startswith("lambda__"):
            lambdas[key.split("__")[1]] = value
        else:
            continue
        # A flag for a method that is not being run would be silently ignored: refuse it.
        name = key.split("__")[1]
        if method.strip() and name not in [n.strip() for n in method.split("+")]:
            flag = "--" + key.replace("m__", "", 1).replace("__", "-").replace("_", "-")
            raise LmadaptError(f"{flag} is set but {name} is not part of --method {method}")
    if getattr(args, "datastore", None):
        params.setdefault("knn", {})["datastore"] = args.datastore
        params.setdefault("mbpa", {})["datastore"] = args.datastore
    return method, params, lambdas


def preset_settings(preset: str, method: str) -> tuple[dict, dict]:
    """A named preset's params and λ for each method of `method` that has it."""
    from lmadapt.methods import REGISTRY, parse_combination

    names = parse_combination(method)
    known = sorted({p for cls in REGISTRY.values() for p in cls.PRESETS})
    if preset not in known:
        raise LmadaptError(f"unknown --preset {preset!r}; known presets: {', '.join(known) or 'none'}")
    params, lambdas = {}, {}
    for name in names:
        values = dict(REGISTRY[name].PRESETS.get(preset, {}))
        if "lambda" in values:
            lambdas[name] = float(values.pop("lambda"))
        if values:
            params[name] = values
    return params, lambdas


def _outputs_lock(paths: list[Path | None]):
    """Outputs written into a run directory take that run's lock (one writer at a time)."""
    folders = {p.parent.resolve() for p in paths if p is not None and runs.is_run_dir(p.parent)}
    stack = contextlib.ExitStack()
    for folder in sorted(folders):
        stack.enter_context(runs.locked(folder))
    return stack


def _check_datastore(run_dir, names: list[str], params: dict, model, corpus, split: str,
                     checkpoint: str | None = None) -> None:
    """Before the long pass: kNN needs a datastore of this model, built from another split."""
    from lmadapt.datastore import open_datastore

    paths = []
    if "knn" in names:
        path = params.get("knn", {}).get("datastore")
        if not path:
            raise LmadaptError("--method knn needs --datastore DIR (build one with `lmadapt datastore build`)")
        paths.append(path)
    mbpa = params.get("mbpa", {})
    if "mbpa" in names and mbpa.get("source", "stream") != "stream" and mbpa.get("datastore"):
        paths.append(mbpa["datastore"])
    if paths and checkpoint not in (None, "best"):
        # Its keys are the hidden states of model.pt's weights: other weights would search them with other ones.
        raise LmadaptError(f"a datastore holds the hidden states of the run's best weights ({runs.BEST}); "
                           f"it cannot serve --checkpoint {checkpoint}")
    for path in paths:
        open_datastore(path).check_for_eval(run_dir, corpus.split(split), split, model)



def cmd_eval(args) -> int:
    from lmadapt.evaluate import build_methods, evaluate_run, format_table, mixture_lambdas, save_tokens
    from lmadapt.methods import parse_combination

    _threads(args.threads)
    config = _read_settings(args.config) if args.config else {}
    method, params, lambdas = _method_settings(args, config)
    names = parse_combination(method)  # fail on a bad name before loading anything
    # Build and validate the methods (ranges, λ, K vs N, ...) and the outputs before the long pass.
    build_methods(names, params)
    mixture_lambdas(names, lambdas)
    if args.tune:
        if not names:
            raise LmadaptError("--tune needs a --method to tune (e.g. mbpa+cache)")
        if args.split == "valid" and not args.text:
            raise LmadaptError("--tune tunes on the valid split, so it cannot also score it: use --split test")
    json_out = runs.check_output(args.json, "--json", overwrite=args.overwrite)
    tokens_out = runs.check_output(args.save_tokens, "--save-tokens", overwrite=args.overwrite)
    if json_out is not None and tokens_out is not None and json_out.resolve() == tokens_out.resolve():
        raise LmadaptError("--json and --save-tokens name the same file")
    device = _device(args.device)
    from lmadapt.text import load_eval_inputs

    with _outputs_lock([json_out, tokens_out]):
        model, corpus, split = load_eval_inputs(args.run_dir, hf_model=args.hf_model, text=args.text,
                                                data=args.data, data_dir=args.data_dir, split=args.split,
                                                context=args.context, keep=args.context_keep, device=device,
                                                checkpoint=args.checkpoint,
                                                extra_splits=("valid",) if args.tune and not args.text else ())
        _check_datastore(args.run_dir, names, params, model, corpus, split, args.checkpoint)
        settings = _settings_record(args, names)
        if args.tune:
            params, lambdas, corpus = _tune_for_eval(args, model, corpus, split, method, params, device, settings)
        report, tokens = evaluate_run(model, corpus, split, method, params, lambdas, device=device,
                                      segment_len=args.segment, cache_dir=args.run_dir, limit=args.tokens)
        report["run_dir"] = str(args.run_dir or args.hf_model)
        if args.run_dir:
            report["checkpoint"] = args.checkpoint or "best"
        if names:
            from lmadapt.methods import combination_name

            entry = report["methods"][combination_name(names)]
            entry["settings"] = settings["source"]
            # Top-level method/params/lambdas: the report is itself a valid --config file.
            report.update(method=combination_name(names), params=entry["params"], lambdas=entry["lambdas"],
                          settings=settings)
        if args.text:
            report["text"] = str(args.text)
        print(format_table(report))
        if names:
            print(f"settings: {settings['source']}")
            _warn_if_worse(report, combination_name(names))
        rescue = Path(args.run_dir) if args.run_dir else None
        if json_out is not None:
            runs.save_output(json_out, lambda p: runs.write_json(p, report), rescue_dir=rescue)
        if tokens_out is not None:
            runs.save_output(tokens_out, lambda p: save_tokens(p, tokens), rescue_dir=rescue)
    return 0


def _warn_if_worse(report: dict, combo: str) -> None:
    """A gradient method whose step is too large for the model makes it worse, not better (on
    the GPT-2 recipe model dyneval's reference rate multiplied perplexity tenfold): say so."""
    from lmadapt.methods import BASE

    entry, base = report["methods"][combo], report["methods"][BASE]["ppl"]
    if "dyneval" in combo.split("+") and entry["ppl"] > base * 1.001:  # beyond rounding
        runs.warn(f"{combo} made perplexity worse than the base model ({entry['ppl']:.2f} vs {base:.2f}): "
                  "its learning rate is too large for this model; try --tune or a smaller --dyneval-lr "
                  "(docs/dyneval.md)")


def _settings_record(args, names: list[str]) -> dict:
    """Where the evaluated settings came from: defaults, --config, flags (or --tune, below)."""
    flags = sorted(k for k, v in vars(args).items() if v is not None and k.startswith(("m__", "lambda__")))
    if not names:
        return {"source": "none"}
    preset = getattr(args, "preset", None)
    source = "+".join([*([f"preset {preset}"] if preset else []), *(["config"] if args.config else []),
                       *(["flags"] if flags else [])]) or "defaults"
    return {"source": source, **({"config": str(args.config)} if args.config else {}),
            **({"preset": preset} if preset else {})}


def _tune_for_eval(args, model, corpus, split, method, params, device, settings) -> tuple[dict, dict, object]:
    """--tune: settings and λ from a grid search on a valid prefix sized to --tune-minutes. A
    --text has no valid split: tuning takes a leading part of it (at most half), and the
    lines it read are then left out of the scored stream. Returns (params, λ, corpus)."""
    from lmadapt.text import hold_out_prefix
    from lmadapt.tune import tune_in_budget

    on_text = split == "text"
    tune_split = "text" if on_text else "valid"
    cap = (corpus.split("text").numel() - 1) // 2 if on_text else None
    scored = corpus.split(split).numel() - 1  # (with --text, the held-out part is not scored: an upper bound)
    if args.tokens is not None:
        scored = min(scored, args.tokens)
    result = tune_in_budget(model, corpus, method, minutes=args.tune_minutes, split=tune_split, params=params,
                            device=device, segment_len=args.segment, cache_dir=args.run_dir, max_tokens=cap,
                            eval_tokens=scored)
    if "fallback" in result:
        runs.warn(f"{result['fallback']}; evaluating with the settings from {settings['source']}")
        settings.update(source=f"{settings['source']} (tuning fell back)", tune_fallback=result["fallback"])
        return params, {}, corpus
    on = result["tuned_on"]
    how = ", successive halving" if on.get("search") == "halving" else ""
    if "mixer_tokens" in on:
        how += f"; the budget ran out in the mixture pass: its settings and λ from the first {on['mixer_tokens']:,}"
    print(f"tuned on {tune_split}[:{on['tokens']:,}] of {on['of']:,} tokens ({on['passes']} passes{how}, "
          f"{on['seconds']:.0f} s): params {json.dumps(result['params'])}  lambdas {json.dumps(result['lambdas'])}",
          file=sys.stderr)
    if on_text:
        corpus, held = hold_out_prefix(corpus, "text", on["tokens"])
        on = {**on, "held_out_lines": held["lines"], "of_lines": held["of_lines"], "excluded_from_score": True}
        print(f"the first {held['lines']:,} of {held['of_lines']:,} lines of {args.text} were used for tuning "
              f"and are not scored", file=sys.stderr)
    settings.update(source="tune", tuned_on=on, tune_valid_ppl=result["ppl"], tune_base_ppl=result["base_ppl"])
    return result["params"], result["lambdas"], corpus


def cmd_tune(args) -> int:
    from lmadapt.methods import parse_combination
    from lmadapt.tune import parse_grid, tune

    _threads(args.threads)
    names = parse_combination(args.method)
    method, params, _ = _method_settings(args, {})
    grids, lambda_grid = parse_grid(args.grid, names)
    out = runs.check_output(args.out, "--out", overwrite=args.overwrite)
    device = _device(args.device)
    from lmadapt.text import load_eval_inputs

    with _outputs_lock([out]):
        model, corpus, split = load_eval_inputs(args.run_dir, hf_model=args.hf_model, text=args.text,
                                                data=args.data, data_dir=args.data_dir, split=args.split,
                                                context=args.context, keep=args.context_keep, device=device,
                                                checkpoint=args.checkpoint)
        _check_datastore(args.run_dir, names, params, model, corpus, split, args.checkpoint)
        best = tune(model, corpus, method, split=split, params=params, grid_overrides=grids,
                    lambda_grid=lambda_grid, device=device, segment_len=args.segment, max_passes=args.max_passes,
                    tokens=args.tokens, cache_dir=args.run_dir, search=args.search)
        best["run_dir"] = str(args.run_dir or args.hf_model)
        if args.run_dir:
            best["checkpoint"] = args.checkpoint or "best"
        print(f"{best['method']} on {best['split']}[:{best['tokens']}]: ppl {best['ppl']:.2f} (base ({best['backbone']}): "
              f"{best['base_ppl']:.2f}, {best['delta_vs_base_percent']:+.1f}%) after {best['passes']} passes")
        print(f"params {json.dumps(best['params'])}  lambdas {json.dumps(best['lambdas'])}")
        runs.save_output(out, lambda p: runs.write_json(p, best),
                         rescue_dir=Path(args.run_dir) if args.run_dir else None)
    print(f"wrote {out}")
    return 0


def cmd_report(args) -> int:
    from lmadapt.evaluate import load_tokens
    from lmadapt.report import bucket_report, plot_png, to_markdown

    outs = []
    if args.out:
        out = Path(args.out)
        outs = [runs.check_output(p, "--out", overwrite=args.overwrite)
                for p in (out, out.with_suffix(".json"), out.with_suffix(".png"))]
        if len({p.resolve() for p in outs}) < 3:
            raise LmadaptError(f"--out {out} must not end in .json or .png: those are written beside it")
    tokens = load_tokens(Path(args.tokens_file))
    other, label = None, None
    if args.method_tokens:
        other = load_tokens(Path(args.method_tokens))
        label = f"{args.method} [{Path(args.method_tokens).name}]"
    rep = bucket_report(tokens, args.baseline, args.method, args.buckets, method_tokens=other, method_label=label)
    markdown = to_markdown(rep)
    print(markdown, end="")
    if outs:
        md, js, png = outs
        rescue = Path(args.tokens_file).parent
        with _outputs_lock(outs):
            runs.save_output(md, lambda p: runs.write_bytes(p, markdown.encode()), rescue_dir=rescue)
            runs.save_output(js, lambda p: runs.write_json(p, rep), rescue_dir=rescue)
            runs.save_output(png, lambda p: plot_png(rep, p), rescue_dir=rescue)
        print(f"wrote {md}, {js}, {png}")
    return 0


def cmd_datastore_build(args) -> int:
    from lmadapt import datastore
    from lmadapt.evaluate import load_for_eval

    _threads(args.threads)
    device = _device(args.device)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise LmadaptError(f"--out {args.out} exists and is not a directory")
    runs.check_writable_dir(Path(args.out), "--out")
    model, corpus, _ = load_for_eval(args.run_dir, args.data, args.data_dir, device)
    from lmadapt.backbones.base import check_key_kind

    check_key_kind(model, args.key)  # before any work
    # One writer per datastore directory (rank 0 under torchrun writes it).
    lock = runs.locked(args.out, "datastore") if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()
    with lock:
        manifest = datastore.build(args.run_dir, args.out, model=model, corpus=corpus, split=args.split,
                                   index=args.index, device=device, force=args.force, log=datastore.log_stderr,
                                   layout=datastore.Layout(args.row, args.warmup, args.rows_per_part), key=args.key)
    if manifest is not None:
        sec = manifest["seconds"]
        total = sum(manifest["bytes"].values())
        print(f"datastore {args.out}: {manifest['keys']:,} keys, index {manifest['index']['type']}, "
              f"{total / 1e6:.1f} MB; embed {sec.get('embed', 0):.1f} s, train {sec['train']:.1f} s, "
              f"add {sec['add']:.1f} s")
    return 0


def cmd_harness(args) -> int:
    """lm-eval's CLI with the `lmadapt` model registered and lmadapt's task files included."""
    import tempfile

    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise LmadaptError('`lmadapt harness` needs lm-evaluation-harness: pip install "lmadapt[harness]"') from None
    rest = list(args.harness_args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if rest[:1] == ["run"]:
        rest = rest[1:]
    if args.task_file is not None:
        if not Path(args.task_file).is_file():
            raise LmadaptError(f"--task-file {args.task_file}: no such file")
        rest += ["--metadata", json.dumps({"task_file": str(Path(args.task_file).resolve())})]
    import lmadapt.harness as harness

    if "--include_path" not in rest:
        rest += ["--include_path", str(harness.TASK_DIR)]
    if not any(a == "--device" or a.startswith("--device=") for a in rest):
        # lm-eval's CLI defaults to cuda:0, which fails on a machine without CUDA; its own hf
        # model falls back to the CPU there, and so does ours.
        import torch

        rest += ["--device", "cuda:0" if torch.cuda.is_available() else "cpu"]
    with contextlib.ExitStack() as stack:
        # Hub caches (datasets, models) go where the user said (HF_HOME / HF_DATASETS_CACHE), else
        # to --cache-dir, else to a temporary folder removed at the end: never silently into ~/.cache.
        if not (os.environ.get("HF_HOME") or os.environ.get("HF_DATASETS_CACHE")):
            cache = args.cache_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="lmadapt-harness-"))
            os.environ["HF_HOME"] = str(cache)
            os.environ["HF_DATASETS_CACHE"] = str(Path(cache) / "datasets")
        from lm_eval._cli import HarnessCLI
        from lm_eval.utils import setup_logging

        setup_logging()
        saved = sys.argv
        sys.argv = ["lm-eval", "run", *rest]
        try:
            cli = HarnessCLI()
            cli.execute(cli.parse_args())
        finally:
            sys.argv = saved
    return 0


THREADS = arg(int, NON_NEGATIVE)


def _source_flags(p) -> None:
    """What eval and tune score: a run or --hf-model, a corpus split or --text (lmadapt.text)."""
    p.add_argument("run_dir", nargs="?", help="run directory (or give --hf-model)")
    p.add_argument("--hf-model", metavar="DIR", help="a causal LM saved with save_pretrained (local files only)")
    p.add_argument("--text", metavar="FILE", help="score this plain-text file instead of a corpus split")
    p.add_argument("--context", type=arg(int, at_least(1)),
                   help="Transformer context window in tokens (default: the model's maximum)")
    p.add_argument("--context-keep", type=arg(int, at_least(1)),
                   help="tokens kept when the window fills (default: half the window)")
    p.add_argument("--checkpoint", metavar="best|last|PATH",
                   help="the run's weights: best (model.pt, default), last (last.pt: where training stopped) "
                        "or a checkpoint file of this run's model")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lmadapt", description="Dynamic test-time adaptation of language models (LSTM, GPT-2, any local transformers causal LM).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a language model (model.arch=lstm or gpt2) into a run directory")
    p.add_argument("--recipe", help="recipe name (see recipes/) or a .toml file")
    p.add_argument("--data", help="corpus name (ptb, wikitext-2, sample) or a directory with train/valid/test.txt")
    p.add_argument("--data-dir", help="directory holding named corpora (default: $LMADAPT_DATA, then the hub)")
    p.add_argument("--out", help="run directory (default: runs/NAME-TIMESTAMP)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set train.lr=0.001 --set model.hidden_size=650")
    p.add_argument("--device", default="auto", help=f"{DEVICES} (default auto)")
    p.add_argument("--threads", type=THREADS, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--force", action="store_true",
                   help="start over in --out, replacing the run there once the new one has its first checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run with test-time adaptation methods (streaming, batch size 1)")
    _source_flags(p)
    p.add_argument("--data", help="corpus (default: the one the run was trained on)")
    p.add_argument("--data-dir", help="directory holding named corpora")
    p.add_argument("--split", default="valid", choices=["valid", "test", "train"])
    p.add_argument("--method", help="base (the model alone; also: lstm), cache, mbpa, knn, dyneval or a '+' "
                                    "combination such as mbpa+cache")
    p.add_argument("--config", help="JSON with method, params and lambdas (e.g. from `lmadapt tune`)")
    p.add_argument("--preset", help="named settings instead of the defaults: paper (each method's source paper)")
    p.add_argument("--tokens", type=arg(int, at_least(1)), default=None,
                   help="score only the first N tokens of the split (per-word and per-byte figures are then omitted)")
    p.add_argument("--segment", type=arg(int, at_least(1)), default=None,
                   help="positions per segment (speed only; default: the methods' preference, else 128)")
    p.add_argument("--json", help="write the report as JSON here")
    p.add_argument("--save-tokens", help="write per-token log-probabilities of every method here (.pt)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json/--save-tokens file")
    p.add_argument("--tune", action="store_true",
                   help="first tune the methods' settings and λ on a valid prefix that fits --tune-minutes")
    p.add_argument("--tune-minutes", type=arg(float, POSITIVE), default=3.0,
                   help="tuning budget; it also covers the evaluation's time beyond a plain pass, up to a "
                        "quarter of it (default 3)")
    p.add_argument("--device", default="auto", help=DEVICES)
    p.add_argument("--threads", type=THREADS, default=0)
    p.add_argument("--datastore", help="kNN-LM datastore directory (`lmadapt datastore build`)")
    _method_flags(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("tune", help="grid-search a method's settings and mixture weights on a split")
    _source_flags(p)
    p.add_argument("--method", required=True)
    p.add_argument("--split", default="valid", choices=["valid", "test", "train"])
    p.add_argument("--out", required=True, help="best settings as JSON (use with `lmadapt eval --config`)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--grid", action="append", default=[], metavar="METHOD.PARAM=v1,v2",
                   help="replace one grid axis (default: the paper's App. B grid); lambda=v1,v2 for the weights")
    p.add_argument("--max-passes", type=arg(int, at_least(1)), default=200, help="refuse grids needing more streaming passes")
    p.add_argument("--tokens", type=arg(int, at_least(1)), default=None,
                   help="tune on the first N tokens of the split only (a prefix: faster, noisier)")
    p.add_argument("--search", choices=["grid", "halving"], default="grid",
                   help="dyneval's settings: every one on the whole split (grid, default) or successive halving "
                        "(all on a short prefix, the best third on a 3x longer one, ...; far fewer tokens)")
    p.add_argument("--data")
    p.add_argument("--data-dir")
    p.add_argument("--segment", type=arg(int, at_least(1)), default=None)
    p.add_argument("--device", default="auto", help=DEVICES)
    p.add_argument("--threads", type=THREADS, default=0)
    p.add_argument("--datastore", help="kNN-LM datastore directory (`lmadapt datastore build`)")
    _method_flags(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("report", help="per-frequency-bucket perplexity from an eval --save-tokens file")
    p.add_argument("tokens_file")
    p.add_argument("--baseline", default="base+cache")
    p.add_argument("--method", default="mbpa+cache")
    p.add_argument("--buckets", type=arg(int, at_least(1)), default=5)
    p.add_argument("--method-tokens", help="take --method from this second tokens file (another run, same split)")
    p.add_argument("--out", help="Markdown file; .json and .png are written beside it")
    p.add_argument("--overwrite", action="store_true", help="replace existing --out files")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("datastore", help="kNN-LM datastores of a run's hidden states")
    dsub = p.add_subparsers(dest="datastore_command", required=True, parser_class=_Parser)
    p = dsub.add_parser("build", help="embed a split into a datastore (keys, values, faiss index); "
                                      "runs sharded under torchrun")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="datastore directory")
    p.add_argument("--split", default="train", choices=["train", "valid", "test"])
    p.add_argument("--index", default="auto", help="auto (default), flat or ivfpq:NLIST,M")
    p.add_argument("--key", default="output", choices=["output", "ffn"],
                   help="key vectors: output (the output layer's input, default) or ffn (a Transformer's last "
                        "feed-forward input after its layer norm, kNN-LM's best key)")
    p.add_argument("--data", help="corpus (default: the one the run was trained on)")
    p.add_argument("--data-dir", help="directory holding named corpora")
    p.add_argument("--force", action="store_true", help="rebuild from scratch, replacing what is in --out")
    p.add_argument("--row", type=arg(int, at_least(1)), default=2048, help="positions per independently embedded row")
    p.add_argument("--warmup", type=arg(int, NON_NEGATIVE), default=256, help="burn-in positions before each row")
    p.add_argument("--rows-per-part", type=arg(int, at_least(1)), default=32,
                   help="rows batched into one part (the unit of resumption and sharding)")
    p.add_argument("--device", default="auto", help=DEVICES)
    p.add_argument("--threads", type=THREADS, default=0)
    p.set_defaults(func=cmd_datastore_build)

    p = sub.add_parser("harness", help="lm-evaluation-harness with --model lmadapt (arguments go to `lm-eval run`)",
                       description="Runs `lm-eval run ARGS` with the lmadapt model registered and lmadapt's tasks "
                                   "(lmadapt_wikitext_local, lmadapt_wikitext_local_tokenized) included. Model args: "
                                   "run=RUN or hf_model=DIR, method=none|cache|mbpa|dyneval|A+B, scope=document|stream, "
                                   "context=windows|carry, max_length=N, lambda_NAME=x, NAME_FIELD=x (docs/harness.md).")
    p.add_argument("--task-file", metavar="PATH", help="the text file the lmadapt_wikitext_local tasks read")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="Hugging Face caches when HF_HOME is unset (default: a temporary folder)")
    p.add_argument("harness_args", nargs="*", metavar="LM_EVAL_ARGS", help="arguments of `lm-eval run`")
    p.set_defaults(func=cmd_harness)

    from lmadapt.classify.cli import add_parser as add_classify

    add_classify(sub)
    return parser


def _harness_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """`harness` arguments: lmadapt's own options (and --help) vs those passed to lm-eval as they are."""
    own, rest, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("--task-file", "--cache-dir") and i + 1 < len(argv):
            own += argv[i:i + 2]
            i += 2
            continue
        if a.startswith(("--task-file=", "--cache-dir=")) or (a in ("-h", "--help") and not rest):
            own.append(a)
        else:
            rest.append(a)
        i += 1
    return own, rest


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passed: list[str] = []
    if argv[:1] == ["harness"]:  # lm-eval's options are not ours to parse
        own, passed = _harness_argv(argv[1:])
        argv = ["harness", *own]
    try:
        args = build_parser().parse_args(argv)
        if passed:
            args.harness_args = passed
    except SystemExit as exc:  # argparse has printed its one-line error (or --help)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except LmadaptError as exc:
        print(f"lmadapt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmadapt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
