"""kNN-LM benchmarks: datastore builds, speed ratios to plain evaluation, tuned test perplexities.

Every figure is measured here and written as JSON under bench/knn/results/ (or --results):

  build   `lmadapt datastore build` for a flat and an IVF-PQ index, each as its own process:
          wall time, the manifest's stage times, bytes on disk, peak RSS (os.wait4).
  speed   plain evaluation vs knn in one process on a prefix of the test split: tokens/s and
          their ratio, for IVF-PQ at several nprobe (faiss distances and --knn-recompute) and
          for the flat index on a shorter prefix, plus the flat-vs-IVF-PQ neighbour overlap
          and perplexity.
  tune    `lmadapt tune --method knn+mbpa+cache` on valid (every smaller mixture comes from the
          same stored columns), then `lmadapt eval --config` on test for each mixture with its
          own tuned settings, and dyneval+knn+cache: dyneval at its defaults under the tuned
          knn+cache settings and weights (dyneval's λ sweep is not part of the mixer pass).
          --tune-tokens / --test-tokens score prefixes; --jobs N runs N processes at a time
          (builds and test evaluations), each with --threads threads.
  mbpa    MbPA drawing its neighbours from the test stream, the datastore or both, on a test
          prefix (a comparison of sources, not a tuned result).
  dyneval `lmadapt tune --method dyneval+knn+cache` on valid: the mixture tuned as a whole
          (dyneval's settings and knn/cache's from --grid, all three λ jointly), then
          `lmadapt eval --config` on test[:--dyneval-tokens] (0: all of it).

  python bench/knn/run.py RUN --stages build,speed,tune --tag ptb [--threads 1] [--jobs 2]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

MIXTURES = ["knn", "cache", "knn+cache", "mbpa+cache", "knn+mbpa+cache"]
DYNEVAL_MIXTURE = "dyneval+knn+cache"   # its knn and cache settings come from the tuned knn+cache


def _env():
    # children find lmadapt as this process does (the installed package, or an inherited PYTHONPATH)
    return dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))


def _run_measured(cmd: list[str], log: Path) -> dict:
    """Run a child process; wall time and its own peak RSS (wait4 gives one child's rusage)."""
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=_env(), stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({code}); see {log}")
    return {"wall_seconds": time.perf_counter() - t, "peak_rss_mb": usage.ru_maxrss / 1024, "cpu_seconds":
            usage.ru_utime + usage.ru_stime}


def _run_all(jobs: list[tuple[list[str], Path]], n: int) -> list[dict]:
    """_run_measured over (cmd, log) pairs, n at a time (os.wait4 waits on each child's own pid)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, n)) as pool:
        return list(pool.map(lambda job: _run_measured(*job), jobs))


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def stage_build(args, out: Path) -> dict:
    rows, jobs = {}, []
    builds = tuple((label, {"flat": "flat", "ivfpq": args.ivfpq}[label]) for label in args.indexes.split(","))
    for label, index in builds:
        ds = Path(args.datastores) / f"{args.tag}-{label}"
        jobs.append(([sys.executable, "-m", "lmadapt", "datastore", "build", args.run, "--out", str(ds), "--index",
                      index, "--threads", str(args.threads), "--force"], out / f"build-{args.tag}-{label}.log"))
    measured = _run_all(jobs, args.jobs)
    for (label, _), (cmd, _), m in zip(builds, jobs, measured):
        ds = Path(args.datastores) / f"{args.tag}-{label}"
        manifest = json.loads((ds / "manifest.json").read_text())
        rows[label] = {"command": " ".join(["lmadapt", *cmd[3:]]), **m, "concurrent_jobs": args.jobs,
                       "disk_bytes": _du(ds),
                       "keys": manifest["keys"], "dim": manifest["dim"], "index": manifest["index"],
                       "stage_seconds": manifest["seconds"],
                       "bytes_per_key": _du(ds) / manifest["keys"]}
        print(label, json.dumps(rows[label]), flush=True)
    return rows


def stage_speed(args, out: Path) -> dict:
    import numpy as np
    import torch

    from lmadapt.datastore import open_datastore, Datastore
    from lmadapt.evaluate import load_for_eval
    from lmadapt.methods.knn import KnnLM, KnnParams
    from lmadapt.mix import perplexity
    from lmadapt.stream import stream_eval

    torch.set_num_threads(args.threads)
    model, corpus, _ = load_for_eval(args.run, device="cpu")
    test = corpus.split("test")
    pq_dir, flat_dir = Path(args.datastores) / f"{args.tag}-ivfpq", Path(args.datastores) / f"{args.tag}-flat"
    rows = []

    def measure(stream, label, methods, lam):
        r = stream_eval(model, stream, methods, lam)
        row = {"label": label, "tokens": r.tokens, "seconds": r.seconds, "tokens_per_second": r.tokens / r.seconds,
               "ppl": perplexity(r.mixed)}
        print(json.dumps(row), flush=True)
        rows.append(row)
        return r, row

    for n_tok in (args.speed_tokens, args.flat_tokens):
        if n_tok <= 0:
            continue
        stream = test[:n_tok + 1]
        configs = [("ivfpq", pq_dir, nprobe, rec) for nprobe in args.nprobe for rec in (False, True)]
        if n_tok == args.flat_tokens:
            configs.append(("flat", flat_dir, 0, False))
        for kind, ds, nprobe, rec in configs:
            # Plain evaluation right before each knn pass: the cores are shared, so a ratio is
            # only fair between passes run close together.
            _, plain = measure(stream, f"lstm ({n_tok} tokens)", [], {})
            open_datastore(ds, threads=args.threads).cache_budget = 0   # every pass must search
            p = KnnParams(k=args.k, temperature=args.temperature, nprobe=max(nprobe, 1), recompute=rec,
                          datastore=str(ds))
            _, row = measure(stream, f"knn {kind} nprobe={nprobe} recompute={rec} ({n_tok} tokens)",
                             [KnnLM(p)], {"knn": args.lam})
            row.update(kind=kind, nprobe=nprobe, recompute=rec, k=args.k, ratio_to_plain=
                       row["tokens_per_second"] / plain["tokens_per_second"])

    if args.flat_tokens <= 0:   # no flat pass: nothing to compare the IVF-PQ neighbours with
        return {"k": args.k, "temperature": args.temperature, "lambda": args.lam, "threads": args.threads,
                "rows": rows}
    # Neighbour overlap of IVF-PQ with the exact search, on the flat prefix.
    with torch.no_grad():
        hidden, _, _ = model(test[:args.flat_tokens].unsqueeze(0))
    q = hidden[0]
    flat, pq = Datastore(flat_dir), Datastore(pq_dir)
    _, exact_ids = flat.search(q, args.k)
    overlap = {}
    for nprobe in args.nprobe:
        _, ids = pq.search(q, args.k, nprobe=nprobe)
        inter = [len(np.intersect1d(a, b)) / args.k for a, b in zip(exact_ids.numpy(), ids.numpy())]
        overlap[str(nprobe)] = float(np.mean(inter))
    return {"k": args.k, "temperature": args.temperature, "lambda": args.lam, "threads": args.threads,
            "rows": rows, "topk_overlap_with_flat": overlap}


def _eval_cmd(args, name: str, out: Path, ds: Path) -> list[str]:
    """The test evaluation of one mixture at the setting stage_tune wrote to config-TAG-NAME.json."""
    cmd = [sys.executable, "-m", "lmadapt", "eval", args.run, "--split", "test",
           "--config", str(out / f"config-{args.tag}-{name}.json"),
           "--json", str(out / f"test-{args.tag}-{name}.json"), "--threads", str(args.threads), "--overwrite"]
    if "knn" in name:
        cmd += ["--datastore", str(ds)]
    tokens = args.dyneval_tokens if name == DYNEVAL_MIXTURE else args.test_tokens
    return cmd + (["--tokens", str(tokens)] if tokens else [])


def _tune(args, method: str, ds: Path, best_path: Path, log: Path) -> tuple[list[str], dict]:
    """`lmadapt tune --method METHOD` on valid[:--tune-tokens] with --grid, written to best_path;
    with --reuse an existing result is kept (an interrupted run's; its time not re-measured)."""
    cmd = [sys.executable, "-m", "lmadapt", "tune", args.run, "--method", method, "--split", "valid",
           "--datastore", str(ds), "--out", str(best_path), "--threads", str(args.threads),
           "--knn-nprobe", str(args.tune_nprobe), *sum((["--grid", g] for g in args.grid), [])]
    if args.tune_tokens:
        cmd += ["--tokens", str(args.tune_tokens)]
    if args.reuse and best_path.exists():
        return cmd, {"reused": True}
    return cmd, _run_measured(cmd, log)


def stage_tune(args, out: Path) -> dict:
    ds = Path(args.datastores) / f"{args.tag}-ivfpq"
    best_path = out / f"tune-{args.tag}-knn+mbpa+cache.json"
    cmd, tune_m = _tune(args, "knn+mbpa+cache", ds, best_path, out / f"tune-{args.tag}.log")
    best = json.loads(best_path.read_text())
    table, jobs, names, reused = {}, [], [], {}
    for name in [DYNEVAL_MIXTURE, *MIXTURES]:   # the slowest first, so that --jobs overlaps it with the rest
        sub = best["subsets"].get("knn+cache" if name == DYNEVAL_MIXTURE else name)
        if sub is None:
            table[name] = {"note": "no setting of the grid used this mixture (lambda 0 chosen)"}
            continue
        config = {"method": name, "params": sub["params"], "lambdas": sub["lambdas"]}
        if name == DYNEVAL_MIXTURE:
            if args.no_dyneval:
                continue
            config["params"] = {**sub["params"], "dyneval": {"max_batches": args.dyneval_max_batches}}
        cfg = out / f"config-{args.tag}-{name}.json"
        test_json = out / f"test-{args.tag}-{name}.json"
        if args.reuse and test_json.exists() and cfg.exists() and json.loads(cfg.read_text()) == config:
            reused[name] = {"reused": True}  # same setting, already evaluated by an interrupted run
            continue
        cfg.write_text(json.dumps(config))
        jobs.append((_eval_cmd(args, name, out, ds), out / f"test-{args.tag}-{name}.log"))
        names.append(name)
    measured = list(zip(names, _run_all(jobs, args.jobs)))
    for name, m in [*reused.items(), *measured]:
        rep = json.loads((out / f"test-{args.tag}-{name}.json").read_text())
        if m.get("reused"):
            m = {"wall_seconds": None, "peak_rss_mb": rep.get("peak_rss_mb"), "reused": True}
        sub = best["subsets"]["knn+cache" if name == DYNEVAL_MIXTURE else name]
        entry = rep["methods"][name]
        table[name] = {"test_tokens": rep["tokens"], "valid_ppl": None if name == DYNEVAL_MIXTURE else sub["ppl"],
                       "test_ppl": entry["ppl"],
                       "test_lstm_ppl": rep["methods"]["base"]["ppl"],
                       "delta_vs_lstm_percent": entry["delta_vs_base_percent"],
                       "tokens_per_second": entry["tokens_per_second"],
                       "lstm_tokens_per_second": rep["methods"]["base"]["tokens_per_second"],
                       "params": entry.get("params", sub["params"]), "lambdas": entry.get("lambdas", sub["lambdas"]),
                       "peak_rss_mb": m["peak_rss_mb"], "wall_seconds": m["wall_seconds"],
                       "command": " ".join(["lmadapt", *_eval_cmd(args, name, out, ds)[3:]]),
                       **({"reused": True} if m.get("reused") else {})}
        print(name, json.dumps(table[name]), flush=True)
    return {"tune_command": " ".join(["lmadapt", *cmd[3:]]), "tune": tune_m, "valid_lstm_ppl": best["base_ppl"],
            "tune_tokens": best.get("tokens"), "concurrent_jobs": args.jobs,
            "lambda_grid": best["lambda_grid"], "grid": best["grid"], "table": table}


def stage_dyneval(args, out: Path) -> dict:
    """dyneval+knn+cache tuned as a whole on valid[:--tune-tokens] (dyneval's settings by --grid
    dyneval.*, those of knn and cache by --grid too, every λ jointly in tune's sweep over stored
    columns), then evaluated on test[:--dyneval-tokens] (0: all of test) with what it chose."""
    ds = Path(args.datastores) / f"{args.tag}-ivfpq"
    tuned = out / f"tune-{args.tag}-{DYNEVAL_MIXTURE}.json"
    cmd, tune_m = _tune(args, DYNEVAL_MIXTURE, ds, tuned, out / f"tune-{args.tag}-{DYNEVAL_MIXTURE}.log")
    best = json.loads(tuned.read_text())
    test_json = out / f"test-{args.tag}-{DYNEVAL_MIXTURE}-tuned.json"
    ev = [sys.executable, "-m", "lmadapt", "eval", args.run, "--split", "test", "--config", str(tuned),
          "--datastore", str(ds), "--json", str(test_json), "--threads", str(args.threads), "--overwrite"]
    if args.dyneval_tokens:
        ev += ["--tokens", str(args.dyneval_tokens)]
    eval_m = _run_measured(ev, out / f"test-{args.tag}-{DYNEVAL_MIXTURE}-tuned.log")
    rep = json.loads(test_json.read_text())
    entry = rep["methods"][DYNEVAL_MIXTURE]
    return {"tune_command": " ".join(["lmadapt", *cmd[3:]]), "tune": tune_m, "valid_tokens": best["tokens"],
            "valid_lstm_ppl": best["base_ppl"], "valid_ppl": best["ppl"], "valid_subsets":
            {k: v["ppl"] for k, v in best["subsets"].items()}, "grid": best["grid"],
            "lambda_grid": best["lambda_grid"], "params": best["params"], "lambdas": best["lambdas"],
            "eval_command": " ".join(["lmadapt", *ev[3:]]), "eval": eval_m, "test_tokens": rep["tokens"],
            "test_lstm_ppl": rep["methods"]["base"]["ppl"], "test_ppl": entry["ppl"],
            "delta_vs_lstm_percent": entry["delta_vs_base_percent"],
            "tokens_per_second": entry["tokens_per_second"],
            "lstm_tokens_per_second": rep["methods"]["base"]["tokens_per_second"],
            "mixtures_from_same_pass": rep.get("mixtures_from_same_pass", {})}


def stage_mbpa(args, out: Path) -> dict:
    """MbPA over the stream vs over the datastore vs both, same K and alpha, on a test prefix."""
    import torch

    from lmadapt.evaluate import load_for_eval
    from lmadapt.methods.mbpa import MbPA, MbPAParams
    from lmadapt.mix import perplexity
    from lmadapt.stream import stream_eval

    torch.set_num_threads(args.threads)
    model, corpus, _ = load_for_eval(args.run, device="cpu")
    stream = corpus.split("test")[:args.mbpa_tokens + 1]
    ds = str(Path(args.datastores) / f"{args.tag}-ivfpq")
    plain = stream_eval(model, stream, [], {})
    rows = [{"label": "lstm", "ppl": perplexity(plain.base), "tokens_per_second": plain.tokens / plain.seconds}]
    for source in ("stream", "datastore", "both"):
        for alpha in args.mbpa_alpha:
            p = MbPAParams(memory=5000, k=args.mbpa_k, alpha=alpha, source=source, datastore=ds, select=False)
            for lam in args.mbpa_lambda:
                r = stream_eval(model, stream, [MbPA(p)], {"mbpa": lam})
                row = {"label": f"mbpa source={source}", "source": source, "k": args.mbpa_k, "alpha": alpha,
                       "lambda": lam, "ppl": perplexity(r.mixed), "tokens_per_second": r.tokens / r.seconds,
                       "ratio_to_plain": (r.tokens / r.seconds) / rows[0]["tokens_per_second"]}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return {"tokens": args.mbpa_tokens, "note": "chosen on this same test prefix: a comparison of sources, "
            "not a tuned result", "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--tag", required=True, help="names the datastores and result files, e.g. ptb")
    ap.add_argument("--stages", default="build,speed,tune")
    ap.add_argument("--datastores", default="/work/runs/datastores")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=1, help="processes at a time in build and tune's test evaluations")
    ap.add_argument("--tune-tokens", type=int, default=0, help="tune on valid[:N] (0: all of valid)")
    ap.add_argument("--test-tokens", type=int, default=0, help="evaluate test[:N] (0: all of test)")
    ap.add_argument("--dyneval-tokens", type=int, default=0, help="test[:N] for dyneval+knn+cache (0: all)")
    ap.add_argument("--dyneval-max-batches", type=int, default=0,
                    help="dyneval's statistics batches (0: the whole training split, its default)")
    ap.add_argument("--no-dyneval", action="store_true", help="skip the dyneval+knn+cache row")
    ap.add_argument("--reuse", action="store_true", help="tune stage: keep the tune result and the test "
                    "evaluations an interrupted run already wrote for the same setting (not re-timed)")
    ap.add_argument("--indexes", default="flat,ivfpq", choices=["flat,ivfpq", "ivfpq", "flat"],
                    help="which datastores the build stage builds (tune uses the IVF-PQ one)")
    ap.add_argument("--ivfpq", default="auto", help="--index of the IVF-PQ build (auto picks IVF-PQ when large)")
    ap.add_argument("--speed-tokens", type=int, default=20000)
    ap.add_argument("--flat-tokens", type=int, default=2000)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lam", type=float, default=0.25)
    ap.add_argument("--tune-nprobe", type=int, default=8)
    ap.add_argument("--grid", action="append", default=[], help="passed to lmadapt tune")
    ap.add_argument("--mbpa-tokens", type=int, default=3000)
    ap.add_argument("--mbpa-k", type=int, default=32)
    ap.add_argument("--mbpa-alpha", type=float, nargs="+", default=[0.1, 0.5])
    ap.add_argument("--mbpa-lambda", type=float, nargs="+", default=[0.1])
    args = ap.parse_args()
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    from lmadapt import runs

    for stage in args.stages.split(","):
        fn = {"build": stage_build, "speed": stage_speed, "tune": stage_tune, "mbpa": stage_mbpa,
              "dyneval": stage_dyneval}[stage]
        t = time.perf_counter()
        result = fn(args, out)
        result = {"stage": stage, "run": args.run, "argv": sys.argv, "seconds": time.perf_counter() - t,
                  "peak_rss_mb_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **(
                      result if isinstance(result, dict) and "rows" in result or stage != "build" else
                      {"builds": result})}
        runs.write_json(out / f"{stage}-{args.tag}.json", result)
        print(f"wrote {out / f'{stage}-{args.tag}.json'}", flush=True)


if __name__ == "__main__":
    main()
