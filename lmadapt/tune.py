"""`lmadapt tune`: grid search on a validation split.

Mixture components are independent of each other given the base model, so every
setting of every mixture method runs side by side in one streaming pass (each a
labelled column of per-token target log-probabilities, all reading the one shared
memory), and the joint choice of settings and λ is then a sweep over stored
columns that never touches the model again. Dynamic evaluation changes the base
model, so when it is part of the combination its grid is searched first (one pass
per setting), and that one mixture pass then runs on top of the best
dynamic-evaluation setting: the adapted model's forward, backward and update are
paid once for all mixture settings instead of once per setting.

With `search="halving"` the dynamic-evaluation grid is searched by successive halving
(Jamieson & Talwalkar 2016): every setting on a short prefix, the best third on a
prefix three times longer, and so on until the last few run on the whole prefix. A
grid of 36 settings then costs 6 passes' worth of tokens instead of 36, which is what
lets `eval --tune` search it within minutes; the exhaustive grid stays the default of
`lmadapt tune`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time

import torch

from tqdm import tqdm

from lmadapt.errors import LmadaptError
from lmadapt.evaluate import build_methods, coerce_param
from lmadapt.methods import REGISTRY, MixtureMethod, adapter_names, combination_name, mixture_names, parse_combination
from lmadapt.mix import perplexity
from lmadapt.params import PROBABILITY, numbers
from lmadapt.runs import progress_enabled
from lmadapt.stream import stream_eval

# The MbPA paper's App. B λ grid, widened to 0.3: the defaults (cache 0.2, 0.15 inside mbpa+cache) must
# be on it, so that tuning is never worse than them on the prefix it tunes on, and on
# WikiText-2 the cache's best λ was 0.3. λ is swept over stored columns (no model pass).
DEFAULT_LAMBDA_GRID = [0.0, 0.05, 0.1, 0.15, 0.2, 0.3]


def parse_grid(items: list[str], names: list[str]) -> tuple[dict[str, dict[str, list]], list[float] | None]:
    """--grid mbpa.alpha=0.1,0.5 --grid lambda=0,0.1,0.2 -> per-method overrides, λ grid."""
    grids: dict[str, dict[str, list]] = {}
    lambda_grid = None
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise LmadaptError(f"--grid expects METHOD.PARAM=v1,v2,... or lambda=v1,v2,..., got {item!r}")
        parts = [v.strip() for v in values.split(",") if v.strip()]
        if key == "lambda":
            lambda_grid = sorted(set(numbers(values, "--grid lambda", float, PROBABILITY)))
            continue
        method, _, param = key.partition(".")
        if method not in names:
            raise LmadaptError(f"--grid {key}: {method!r} is not part of the method being tuned ({'+'.join(names)})")
        cls = REGISTRY[method]
        if param not in cls.param_names():
            raise LmadaptError(f"--grid {key}: unknown {method} setting; valid: {', '.join(cls.param_names())}")
        default = getattr(cls.Params(), param)
        grids.setdefault(method, {})[param] = [coerce_param(method, param, v, default) for v in parts]
    return grids, lambda_grid


def _settings(name: str, fixed: dict, grid_override: dict) -> list[dict]:
    """All settings of one method: its default grid (with overrides), minus invalid ones."""
    cls = REGISTRY[name]
    grid = {**cls.grid_for(fixed), **grid_override}
    grid = {k: v for k, v in grid.items() if k not in fixed or k in grid_override}
    keys = sorted(grid)
    combos = [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]
    # An axis tried at its default only in the default setting (Method.DEFAULT_POINT_AXES),
    # and only where that setting lies inside a grid the caller narrowed (--grid cache.window=500
    # asks for no window-5000 setting).
    point = [k for k in cls.DEFAULT_POINT_AXES if k in grid and k not in grid_override and k not in fixed]
    defaults = {k: getattr(cls.Params(), k) for k in keys}
    if point and all(defaults[k] in grid_override[k] for k in keys if k in grid_override):
        combos.append(defaults)
    out = []
    for combo in combos:
        setting = {**fixed, **combo}
        if setting in out:
            continue
        try:
            build_methods([name], {name: setting})
        except LmadaptError:
            continue  # e.g. K > N
        out.append(setting)
    if not out:
        raise LmadaptError(f"the {name} grid has no valid setting")
    return out


ETA = 3            # successive halving keeps the best 1/ETA of a rung, on an ETA times longer prefix
MIN_RUNG_TOKENS = 50  # no rung decides on fewer tokens than this (or the whole prefix, if shorter)
SEARCHES = ("grid", "halving")


def halving_rungs(n_settings: int, tokens: int) -> list[tuple[int, int]]:
    """[(settings run, prefix tokens)] per rung of successive halving over `n_settings` on a
    `tokens`-token prefix: the last rung holds at most ETA settings on the whole prefix."""
    sizes = [n_settings]
    while sizes[-1] > ETA:
        sizes.append(math.ceil(sizes[-1] / ETA))
    last = len(sizes) - 1
    return [(n, max(min(tokens, MIN_RUNG_TOKENS), tokens // ETA ** (last - i))) for i, n in enumerate(sizes)]


def tune(model, corpus, method: str, *, split: str = "valid", params: dict | None = None,
         grid_overrides: dict | None = None, lambda_grid: list[float] | None = None, device="cpu",
         segment_len: int | None = None, max_passes: int = 200, tokens: int | None = None,
         cache_dir=None, search: str = "grid", deadline: float | None = None) -> dict:
    """Grid search on `split` (its first `tokens` + 1 ids when given); `search` is how the
    model adapters' (dyneval's) settings are searched: every one on the whole prefix
    ("grid") or by successive halving ("halving", see halving_rungs). `deadline` (a
    time.perf_counter() value): the mixer pass stops there, once MIN_TUNE_TOKENS are
    scored, and the mixers' settings and λ are chosen on the tokens it scored (the result's
    `mixer_tokens`; `tokens` stays what the search read)."""
    if search not in SEARCHES:
        raise LmadaptError(f"search must be one of {', '.join(SEARCHES)}, got {search!r}")
    names = parse_combination(method)
    if not names:
        raise LmadaptError("nothing to tune for the base model alone: name a method, e.g. --method cache")
    params = params or {}
    grid_overrides = grid_overrides or {}
    lambda_grid = lambda_grid if lambda_grid is not None else DEFAULT_LAMBDA_GRID
    stream = corpus.split(split)
    if tokens is not None:
        stream = stream[:tokens + 1]
    mixers = mixture_names(names)
    adapters = adapter_names(names)
    plan = {n: _settings(n, params.get(n, {}), grid_overrides.get(n, {})) for n in names}
    n_tokens = stream.numel() - 1
    rungs = {n: halving_rungs(len(plan[n]), n_tokens) if search == "halving" else [(len(plan[n]), n_tokens)]
             for n in adapters}
    passes = count_passes(names, plan, rungs)
    if passes > max_passes:
        sizes = ", ".join(f"{n}: {len(v)}" for n, v in plan.items())
        raise LmadaptError(f"the grid needs {passes} passes over {split} ({sizes}); narrow it with --grid "
                           f"or raise --max-passes")
    bar = tqdm(total=passes, desc="tune", unit="pass", disable=not progress_enabled())

    def run(methods, stop=None, prefix=None):
        part = stream if prefix is None else stream[:prefix + 1]
        result = stream_eval(model, part, methods, {m.name: 0.0 for m in methods if isinstance(m, MixtureMethod)},
                             corpus=corpus, device=device, segment_len=segment_len, cache_dir=cache_dir, stop=stop)
        bar.update(1)
        return result

    plain = run([])
    base_ppl = perplexity(plain.base)
    trials = []
    chosen: dict[str, dict] = {}
    base = plain.base
    for name in adapters:
        survivors = plan[name]
        for i, (_, prefix) in enumerate(rungs[name]):
            ranked = []
            for setting in survivors:
                r = run(build_methods([name], {name: setting}), stop=diverging(plain.base[:prefix]), prefix=prefix)
                trial = {"params": {name: setting}, "ppl": None, "tokens": prefix}
                if search == "grid":
                    del trial["tokens"]
                trials.append(trial)
                if r.stopped:  # diverged: not a candidate (the other settings are still searched)
                    trial["stopped_after_tokens"] = r.tokens
                    continue
                trial["ppl"] = perplexity(r.base)
                ranked.append((trial["ppl"], len(ranked), setting, r.base))
            if not ranked:
                raise LmadaptError(f"every {name} setting of the grid diverged on {split}; give a smaller rate with --grid")
            ranked.sort(key=lambda t: t[:2])
            keep = rungs[name][i + 1][0] if i + 1 < len(rungs[name]) else 1
            survivors = [t[2] for t in ranked[:keep]]
        _, _, chosen[name], base = ranked[0]  # the last rung ran on the whole prefix
    # Every mixer setting, side by side in one pass on top of the chosen base model.
    columns: dict[str, list[tuple[dict, tuple]]] = {name: [] for name in mixers}
    cut = None  # tokens the mixer pass scored when the deadline stopped it
    if mixers:
        labelled = mixer_pass(mixers, plan)
        # Memories fill as the pass goes, so a pass costs more per token than its price on a
        # short probe (tune_in_budget): the deadline keeps the search inside the budget.
        r = run(build_methods(adapters, chosen) + [m for _, _, m in labelled],
                stop=None if deadline is None else before_deadline(deadline))
        for name, setting, m in labelled:
            columns[name].append((setting, r.components[m.column]))
        base = r.base if adapters else base[:r.tokens]
        if r.stopped:
            cut = r.tokens
            base_ppl = perplexity(plain.base[:cut])
    bar.close()

    # Joint sweep over settings and λ: only stored columns, no model. λ = 0 switches a
    # component off, so the same sweep also gives the best of every smaller mixture
    # (e.g. base+cache and base+mbpa beside mbpa+cache), recorded in `subsets`.
    best = (perplexity(base), {}, {n: 0.0 for n in mixers})
    subsets: dict[str, tuple] = {}
    for setting, lam, ppl in joint_sweep(base, columns, mixers, lambda_grid):
        if ppl < best[0]:
            best = (ppl, setting, lam)
        active = adapters + [n for n in mixers if lam[n] > 0]
        key = combination_name(active)
        if key not in subsets or ppl < subsets[key][0]:
            subsets[key] = (ppl, {n: setting[n] for n in mixers if lam[n] > 0}, {n: lam[n] for n in mixers if lam[n] > 0})
        trials.append({"params": setting, "lambdas": lam, "ppl": ppl})

    def full_params(chosen_mixers: dict, active: list[str]) -> dict:
        merged = {**chosen, **chosen_mixers}
        return {n: dataclasses.asdict(build_methods([n], {n: merged.get(n, {})})[0].params) for n in active}

    full = full_params(best[1], names)
    trials.sort(key=lambda t: (t["ppl"] is None, t["ppl"] or 0.0))  # dropped (diverged) settings last
    subset_report = {}
    for key, (ppl, setting, lam) in subsets.items():
        active = parse_combination(key)
        subset_report[key] = {"method": key, "params": full_params(setting, active), "lambdas": lam, "ppl": ppl}
    return {
        "method": combination_name(names),
        "params": full,
        "lambdas": best[2],
        "split": split,
        "tokens": len(stream) - 1,
        **({"mixer_tokens": cut} if cut is not None else {}),  # the deadline cut the mixer pass here
        "ppl": best[0],
        "backbone": model.arch,
        "base_ppl": base_ppl,
        "delta_vs_base_percent": 100 * (best[0] / base_ppl - 1),
        "passes": passes,
        "search": search,
        **({"rungs": {n: [list(r) for r in rungs[n]] for n in adapters}} if search == "halving" else {}),
        "lambda_grid": lambda_grid,
        "grid": {n: {k: sorted({s[k] for s in plan[n]}, key=str) for k in plan[n][0]} for n in names},
        "top": trials[:20],
        "subsets": subset_report,
    }


def before_deadline(deadline: float):
    """stream_eval's `stop` for the mixer pass: True once MIN_TUNE_TOKENS are scored and the
    next segment, if it costs what the last one did, would end past `deadline`. With every
    setting side by side one segment can take seconds (MbPA's 37 settings on a WikiText-2
    model: about 10 s for 512 tokens), so stopping only once the deadline has passed ran
    that much over it."""
    last = [time.perf_counter()]

    def stop(scored, _) -> bool:
        now = time.perf_counter()
        step, last[0] = now - last[0], now
        return scored >= MIN_TUNE_TOKENS and now + step > deadline

    return stop


def joint_sweep(base, columns: dict, mixers: list[str], lambda_grid: list[float]):
    """(setting of each mixer, λ of each, perplexity) for every pick of one stored column per
    mixer and every λ tuple of the grid with Σλ ≤ 1 whose perplexity is finite.

    All λ tuples of one pick at once, in probability space (float64): p = (1 − Σ λ_i a_i) p_base
    + Σ λ_i a_i p_i, the mixture lmadapt.mix forms in log space (equal up to rounding; every term
    is non-negative, so none cancels). The full grids of mbpa+cache give 592 picks times 36
    λ tuples: on 15k tokens one log-space mixture each took 5.4 s, this 2.7 s (one run)."""
    lams = [t for t in itertools.product(lambda_grid, repeat=len(mixers)) if sum(t) <= 1.0 + 1e-9]
    if not lams:
        return
    lam = torch.tensor(lams, dtype=torch.float64)                  # (tuples, mixers)
    p_base = base.double().exp().unsqueeze(1)                      # (n, 1)
    # per mixer and pick: a_i p_i and a_i, (n,) each
    parts = {n: [(setting, (log_p.double().exp() * avail, avail.double())) for setting, (log_p, avail) in columns[n]]
             for n in mixers}
    for picks in itertools.product(*(parts[n] for n in mixers)):
        mixed = torch.zeros(p_base.shape[0], len(lams), dtype=torch.float64)
        taken = torch.zeros_like(mixed)
        for i, (_, (p, a)) in enumerate(picks):
            mixed.addmm_(p.unsqueeze(1), lam[:, i:i + 1].T)
            taken.addmm_(a.unsqueeze(1), lam[:, i:i + 1].T)
        mixed.addcmul_(p_base, (1.0 - taken).clamp(min=0.0))
        ppl = torch.exp(-mixed.log().mean(0)).tolist()
        setting = {n: pick[0] for n, pick in zip(mixers, picks)}
        for t, value in zip(lams, ppl):
            if math.isfinite(value):
                yield setting, dict(zip(mixers, t)), value


# A model-adapter pass is dropped once its perplexity so far is DIVERGED times the plain
# model's on the same tokens, after DIVERGED_AFTER of the prefix (or at once if not finite):
# on a Transformer most of the reference's dyneval rates diverge, and their full passes were
# most of the time of a dyneval grid. A setting twice as bad as no adaptation over a
# quarter of the prefix would have to beat the plain model by 1.5x on the rest to win.
DIVERGED, DIVERGED_AFTER = 2.0, 0.25


def diverging(plain):
    """stream_eval's `stop` for an adapter pass: True once it has diverged (see DIVERGED)."""
    plain_sum = plain.double().cumsum(0)
    threshold = math.log(DIVERGED)
    after = max(1, int(DIVERGED_AFTER * plain.numel()))
    total = [0.0]

    def stop(scored: int, seg_log_probs) -> bool:
        total[0] += float(seg_log_probs.double().sum())
        if not math.isfinite(total[0]):
            return True
        return scored >= after and float(plain_sum[scored - 1]) - total[0] > threshold * scored

    return stop


def count_passes(names: list[str], plan: dict[str, list[dict]], rungs: dict | None = None) -> int:
    """Streaming passes of a grid: the plain model, one per model-adapter setting (per rung
    with successive halving), and one for all mixture settings together."""
    adapters = sum(sum(n for n, _ in rungs[a]) if rungs else len(plan[a]) for a in adapter_names(names))
    return 1 + adapters + (1 if mixture_names(names) else 0)


def mixer_pass(mixers: list[str], plan: dict[str, list[dict]]) -> list[tuple[str, dict, MixtureMethod]]:
    """(name, setting, method) for every setting of every mixer, each method labelled with
    its own column so that all run in one stream_eval pass."""
    out = []
    for name in mixers:
        for i, setting in enumerate(plan[name]):
            m = build_methods([name], {name: setting})[0]
            m.column = f"{name}#{i}"
            out.append((name, setting, m))
    return out


# At most this share of --tune-minutes is kept for the evaluation's own cost (tune_in_budget):
# a long evaluation of a slow method must not leave the tuning nothing.
RESERVE_SHARE = 0.25
# The steady-state pricing pass (over the longest memory window) may take at most this share.
STEADY_SHARE = 0.05
MIN_TUNE_TOKENS = 200  # below this a grid search on a prefix says more about noise than settings


def grid_with_defaults(names: list[str], params: dict) -> dict[str, dict[str, list]]:
    """Each method's grid with its default (or given) value added to every axis, so the
    search can always fall back on the setting it would otherwise have used."""
    out = {}
    for name in names:
        cls = REGISTRY[name]
        base = build_methods([name], {name: params.get(name, {})})[0].params
        # (an axis of DEFAULT_POINT_AXES keeps its default in the default setting: _settings)
        out[name] = {k: sorted({*values, getattr(base, k)}, key=str) for k, values in cls.grid_for(params.get(name, {})).items()
                     if k not in params.get(name, {}) and k not in cls.DEFAULT_POINT_AXES}
    return out


def tune_in_budget(model, corpus, method: str, *, minutes: float, split: str = "valid", params: dict | None = None,
                   device="cpu", segment_len: int | None = None, probe_tokens: int = 400, cache_dir=None,
                   max_tokens: int | None = None, eval_tokens: int | None = None) -> dict:
    """`lmadapt eval --tune`: the full `tune` grid on the longest prefix of `split` that fits
    in `minutes`. A pass is priced by timing the requested combination at its current
    settings on a short prefix (an upper bound: a tuning pass runs at most that much);
    the prefix is then cut so that every grid pass fits (and to `max_tokens`). A
    model-adapter grid larger than ETA settings is searched by successive halving (its
    rungs priced as they will run). `eval_tokens`: the evaluation that follows will score
    that many tokens; the budget then also covers its time beyond a plain pass (priced at the
    current settings, at most RESERVE_SHARE of the budget), so that tuning and evaluating take
    the budget plus about one plain evaluation, and a second one's worth is left for loading
    the valid split and a last segment's overrun. Returns tune()'s result with a
    `tuned_on` record, or {"fallback": reason} when not even a minimal prefix fits."""
    names = parse_combination(method)
    params = params or {}
    grids = grid_with_defaults(names, params)
    plan = {n: _settings(n, params.get(n, {}), grids.get(n, {})) for n in names}
    adapters, mixers = adapter_names(names), mixture_names(names)
    search = "halving" if any(len(plan[n]) > ETA for n in adapters) else "grid"
    stream = corpus.split(split)
    whole = available = stream.numel() - 1
    if max_tokens is not None:
        available = min(available, max_tokens)
    probe = min(probe_tokens, available)

    def price(methods) -> float:
        """Seconds per token of one pass of `methods`, timed on the probe prefix."""
        t0 = time.perf_counter()
        stream_eval(model, stream[:probe + 1], methods, {}, corpus=corpus, device=device,
                    segment_len=segment_len, cache_dir=cache_dir)
        return (time.perf_counter() - t0) / max(probe, 1)

    def steady_price(methods, fill: int, cap: float) -> float:
        """Seconds per token of `methods` after `fill` tokens (their memories full), timed on
        the segments that end after it, in one pass over fill + probe tokens. A pass that
        reaches `cap` seconds stops there (a slow combination such as dyneval+cache must not
        spend the budget on pricing); short of `fill`, its price is its last segment's."""
        if fill <= 0:
            return price(methods)
        marks = [(0, time.perf_counter())]   # (tokens scored, when): the loop asks `stop` per segment

        def clock(scored, _):
            marks.append((scored, time.perf_counter()))
            return marks[-1][1] - marks[0][1] > cap

        result = stream_eval(model, stream[:fill + probe + 1], methods, {}, corpus=corpus, device=device,
                             segment_len=segment_len, cache_dir=cache_dir, stop=clock)
        if not result.stopped:
            marks.append((result.tokens, time.perf_counter()))
        n0, t0 = max((m for m in marks[:-1] if m[0] <= fill), key=lambda m: m[0])
        return (marks[-1][1] - t0) / max(marks[-1][0] - n0, 1)

    # One-time costs first (dyneval's gradient statistics, a datastore's index). The evaluation
    # pays them anyway (and reuses them: the statistics are cached per run), so they are not
    # tuning's: the budget starts after them. Left inside it, a cold statistics pass over the
    # training split (6 minutes for the PTB LSTM at one thread) would leave no budget at all.
    t0 = time.perf_counter()
    stream_eval(model, stream[:min(2, available) + 1], build_methods(names, params), {}, corpus=corpus,
                device=device, segment_len=segment_len, cache_dir=cache_dir)
    one_time = time.perf_counter() - t0
    start = time.perf_counter()
    # The plain pass and each adapter pass cost at most the adapters at their current
    # settings (a pass dropped as diverging costs less); the mixture pass, all settings
    # together, is timed itself.
    adapter_cost = price(build_methods(adapters, params))
    mixer_cost = price(build_methods(adapters, params) + [m for _, _, m in mixer_pass(mixers, plan)]) if mixers else 0.0
    reserve = 0.0
    if eval_tokens:
        # The evaluation's cost beyond a plain pass (MbPA on the PTB recipe LSTM runs at a
        # quarter of the plain model's speed), left out of the tuning's share of the budget.
        # Priced once the memories are full: MbPA's cost grows with its memory, and on the
        # short probe it came out at half of what the evaluation then took.
        methods = build_methods(names, params)
        fill = min(max((m.memory_window() for m in methods if isinstance(m, MixtureMethod)), default=0),
                   eval_tokens, available - probe)
        extra = steady_price(methods, fill, STEADY_SHARE * 60 * minutes) - price([])
        reserve = min(max(extra, 0.0) * eval_tokens, RESERVE_SHARE * 60 * minutes)

    def rungs(n: int) -> dict:
        return {a: halving_rungs(len(plan[a]), n) if search == "halving" else [(len(plan[a]), n)] for a in adapters}

    def cost(n: int) -> float:
        """Seconds of the whole search on an n-token prefix."""
        adapter_tokens = n + sum(k * prefix for a in adapters for k, prefix in rungs(n)[a])
        return adapter_cost * adapter_tokens + mixer_cost * n

    left = 60 * minutes - reserve - (time.perf_counter() - start)
    lo, hi = 0, available  # the longest prefix whose search fits in what is left (cost grows with n)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= left else (lo, mid - 1)
    tokens = lo
    passes = count_passes(names, plan, rungs(max(tokens, MIN_TUNE_TOKENS)))
    if tokens < MIN_TUNE_TOKENS:
        need = cost(MIN_TUNE_TOKENS) / 60
        return {"fallback": f"--tune-minutes {minutes:g} is too short for the {passes}-pass search even on "
                            f"{MIN_TUNE_TOKENS} {split} tokens (about {need:.1f} min needed)"}
    best = tune(model, corpus, method, split=split, params=params, grid_overrides=grids, device=device,
                segment_len=segment_len, max_passes=max(passes, 1), tokens=tokens, cache_dir=cache_dir,
                search=search, deadline=start + 60 * minutes - reserve)
    best["tuned_on"] = {"split": split, "tokens": tokens, "of": whole, "passes": passes, "search": search,
                        **({"mixer_tokens": best["mixer_tokens"]} if "mixer_tokens" in best else {}),
                        "minutes_budget": minutes, "seconds": round(time.perf_counter() - start, 1),
                        **({"reserved_seconds": round(reserve, 1)} if eval_tokens else {}),
                        "one_time_seconds": round(one_time, 1)}
    return best


__all__ = ["tune", "tune_in_budget", "parse_grid"]
