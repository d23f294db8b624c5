"""`lmadapt report`: per-frequency-bucket perplexity (the MbPA paper's Fig. 8).

Target words are bucketed by their training-set frequency into buckets holding
(about) equal numbers of evaluation tokens, bucket 1 = the most frequent
words; a word type is never split across buckets. For each bucket: the
perplexity of the baseline and of the method, and the relative improvement
100·(1 − ppl_method/ppl_baseline) ± 1 sd over bootstrap resamples of the
bucket's tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmadapt import runs
from lmadapt.errors import LmadaptError
from lmadapt.methods import adapter_names, combination_name, mixture_names, parse_combination
from lmadapt.mix import mix_log_probs

BOOTSTRAP = 200


def method_log_probs(tokens: dict, method: str) -> torch.Tensor:
    """Per-token log p of a combination, rebuilt from a tokens file (lmadapt.evaluate.load_tokens).

    'base+cache' and 'cache' name the same mixture. A mixture of components recorded in
    the file's pass is rebuilt with that pass's λ, on top of the model they were computed
    with: the base model, or the adapted one when the pass had a model adapter (so from a
    dyneval+mbpa+cache pass, dyneval+cache can be rebuilt but cache alone cannot).
    """
    names = parse_combination(method)
    key = combination_name(names)
    if key in tokens["methods"]:
        return tokens["methods"][key]
    recorded = ", ".join(tokens["methods"])
    adapters = combination_name(adapter_names(names))
    pass_adapters = combination_name(adapter_names(parse_combination(tokens["pass"])))
    if adapters != pass_adapters or adapters not in tokens["methods"]:
        raise LmadaptError(f"{method!r} is not in this tokens file (recorded: {recorded}; components of "
                           f"{tokens['pass']})")
    cols = tokens["columns"]
    missing = [n for n in mixture_names(names) if n not in cols]
    if missing:
        raise LmadaptError(f"{method!r} needs the {missing[0]} column, which this tokens file lacks "
                           f"(recorded: {recorded})")
    comps = {n: (cols[n], cols[f"{n}.available"]) for n in mixture_names(names)}
    return mix_log_probs(tokens["methods"][adapters], comps, tokens["lambdas"])


def frequency_buckets(targets: torch.Tensor, train_counts: torch.Tensor, buckets: int) -> torch.Tensor:
    """Bucket id (0 = most frequent) of every token, by cumulative token count over word types."""
    if buckets < 1:
        raise LmadaptError(f"--buckets must be >= 1, got {buckets}")
    types, counts = torch.unique(targets, return_counts=True)
    if buckets > types.numel():
        # A word type is never split, so extra buckets would be empty rows with no perplexity.
        raise LmadaptError(f"--buckets {buckets} is more than the {types.numel()} distinct words scored")
    order = torch.argsort(train_counts[types], descending=True, stable=True)
    types, counts = types[order], counts[order]
    mid = torch.cumsum(counts, 0) - counts / 2  # middle of each type's token range
    type_bucket = torch.clamp((mid * buckets / targets.numel()).long(), max=buckets - 1)
    lookup = torch.full((int(train_counts.numel()),), -1, dtype=torch.long)
    lookup[types] = type_bucket
    return lookup[targets]


def bucket_report(tokens: dict, baseline: str, method: str, buckets: int = 5, seed: int = 0,
                  method_tokens: dict | None = None, method_label: str | None = None) -> dict:
    """Buckets of ``tokens``; the method's column comes from ``method_tokens`` when given.

    ``method_tokens`` is a second tokens file over the same stream, e.g. another model
    (a Hebbian-softmax run against a plain one): its targets must equal ``tokens``'.
    """
    base_lp = method_log_probs(tokens, baseline)
    if method_tokens is not None:
        if not torch.equal(method_tokens["targets"], tokens["targets"]):
            raise LmadaptError("the two tokens files score different streams (targets differ): "
                               "evaluate both runs on the same corpus and split")
        meth_lp = method_log_probs(method_tokens, method)
    else:
        meth_lp = method_log_probs(tokens, method)
    targets, counts = tokens["targets"], tokens["train_counts"]
    ids = frequency_buckets(targets, counts, buckets)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(buckets):
        sel = ids == b
        n = int(sel.sum())
        if n == 0:
            continue
        lb, lm = base_lp[sel].double(), meth_lp[sel].double()
        ppl_b, ppl_m = float(torch.exp(-lb.mean())), float(torch.exp(-lm.mean()))
        idx = torch.randint(0, n, (BOOTSTRAP, n), generator=g)
        boot = 100 * (1 - torch.exp(lb[idx].mean(1) - lm[idx].mean(1)))
        freqs = counts[targets[sel]]
        rows.append({"bucket": b + 1, "tokens": n, "word_types": int(torch.unique(targets[sel]).numel()),
                     "train_freq_min": int(freqs.min()), "train_freq_max": int(freqs.max()),
                     "ppl_baseline": ppl_b, "ppl_method": ppl_m,
                     "improvement_percent": 100 * (1 - ppl_m / ppl_b), "improvement_sd": float(boot.std())})
    overall_b = float(torch.exp(-base_lp.double().mean()))
    overall_m = float(torch.exp(-meth_lp.double().mean()))
    return {"split": tokens.get("split"), "backbone": tokens.get("backbone"), "baseline": baseline,
            "method": method_label or method, "buckets": rows,
            "overall": {"ppl_baseline": overall_b, "ppl_method": overall_m,
                        "improvement_percent": 100 * (1 - overall_m / overall_b)},
            "sd": f"standard deviation over {BOOTSTRAP} bootstrap resamples of each bucket's tokens"}


def to_markdown(rep: dict) -> str:
    lines = [f"Per-frequency-bucket perplexity on {rep['split']}: {rep['method']} vs {rep['baseline']} "
             f"(bucket 1 = most frequent target words; ± 1 sd, bootstrap)", "",
             f"| bucket | train freq | tokens | types | ppl {rep['baseline']} | ppl {rep['method']} | improvement % |",
             "|---|---|---|---|---|---|---|"]
    for r in rep["buckets"]:
        lines.append(f"| {r['bucket']} | {r['train_freq_min']}–{r['train_freq_max']} | {r['tokens']:,} | "
                     f"{r['word_types']:,} | {r['ppl_baseline']:.2f} | {r['ppl_method']:.2f} | "
                     f"{r['improvement_percent']:+.2f} ± {r['improvement_sd']:.2f} |")
    o = rep["overall"]
    lines.append(f"| all | | | | {o['ppl_baseline']:.2f} | {o['ppl_method']:.2f} | {o['improvement_percent']:+.2f} |")
    return "\n".join(lines) + "\n"


def plot_png(rep: dict, path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rep["buckets"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([r["bucket"] for r in rows], [r["improvement_percent"] for r in rows],
           yerr=[r["improvement_sd"] for r in rows], capsize=4, color="tab:blue")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("training-frequency bucket (1 = most frequent)")
    ax.set_ylabel("perplexity improvement (%)")
    ax.set_title(f"{rep['method']} vs {rep['baseline']} ({rep['split']})")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    runs.write_bytes(path, buf.getvalue())
