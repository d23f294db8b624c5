"""Training: truncated BPTT with carried state, checkpoints that resume exactly, DDP.

`fit()` trains and writes a run directory; `evaluate()` is the plain batched
perplexity used for validation and for the final figures in results.json.
The test-time adaptation methods live in the streaming evaluator instead.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._pytree import tree_map
from tqdm import tqdm

from lmadapt import backbones, runs
from lmadapt.checkpoint import FORMAT_VERSION
from lmadapt.config import RunConfig
from lmadapt.corpus import batchify
from lmadapt.errors import LmadaptError
from lmadapt.hebbian import HebbianSoftmax
from lmadapt.model import count_parameters
from lmadapt.runs import progress_enabled


class TrainingDiverged(LmadaptError):
    pass


# --------------------------------------------------------------------------- helpers

def autocast(device: torch.device, amp: str):
    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def amp_problem(model: torch.nn.Module, device: torch.device, amp: str) -> str | None:
    """None if `amp` works for this model on this device, else why not (one line).

    Tried, not looked up: whether a bf16 LSTM runs depends on the oneDNN kernels this CPU
    offers (AVX512-BF16 / AMX), and the failure only shows when the primitive is built. One
    tiny training-mode forward and backward finds out; the RNG state is restored after it so
    the probe does not change the run.
    """
    if amp == "none":
        return None
    was_training = model.training
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            model.train()
            tokens = torch.zeros(2, 3, dtype=torch.long, device=device)
            with autocast(device, amp):
                _, logits, _ = model(tokens, model.init_state(2, device))
            logits.float().sum().backward()
    except RuntimeError as exc:
        return str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return None


def precision_name(amp: str) -> str:
    return "bf16 autocast" if amp == "bf16" else "float32"


@torch.no_grad()
def evaluate(model, data: torch.Tensor, batch_size: int, bptt: int, device, amp: str = "none",
             desc: str | None = None) -> tuple[float, int]:
    """Sum of negative log-likelihoods (nats) and number of predicted tokens over a stream.

    With batch_size 1 every token but the first is scored; larger batches
    split the stream into columns (a few tokens fewer are scored).
    """
    was_training = model.training
    model.eval()
    columns = batchify(data, batch_size).to(device)
    state = model.init_state(batch_size, device)
    total, count = 0.0, 0
    starts = range(0, columns.size(1) - 1, bptt)
    bar = tqdm(starts, desc=desc, disable=not (desc and progress_enabled()), unit="chunk", leave=False)
    for i in bar:
        seq = min(bptt, columns.size(1) - 1 - i)
        x, y = columns[:, i:i + seq], columns[:, i + 1:i + 1 + seq]
        with autocast(torch.device(device), amp):
            _, logits, state = model(x, state)
        total += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    return total, count


def _ppl(nll_sum: float, count: int) -> float:
    return math.exp(nll_sum / max(count, 1))


def _make_optimizer(cfg, params, asgd: bool):
    t = cfg.train
    if asgd:
        return torch.optim.ASGD(params, lr=t.lr, t0=0, lambd=0.0, weight_decay=t.weight_decay)
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, weight_decay=t.weight_decay)
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)


def _budget_done(cfg, prog: Progress, total_steps: int) -> float:
    """Fraction of the training budget used: steps, or wall-clock time if that runs out first."""
    done = prog.global_step / max(total_steps, 1)
    if cfg.train.max_minutes > 0:
        done = max(done, prog.train_seconds / (60 * cfg.train.max_minutes))
    return min(done, 1.0)


def _lr_factor(cfg, prog: Progress, total_steps: int) -> float:
    """Learning-rate multiplier from the schedule; all its state lives in `prog`."""
    t = cfg.train
    factor = prog.lr_scale
    if t.lr_schedule == "cosine":
        factor *= 0.5 * (1 + math.cos(math.pi * _budget_done(cfg, prog, total_steps)))
    if t.warmup_steps > 0:
        factor *= min(1.0, (prog.global_step + 1) / t.warmup_steps)
    return factor


def unigram_log_q(counts: torch.Tensor, power: float = 0.75) -> torch.Tensor:
    q = counts.double().clamp(min=1).pow(power)
    return (q / q.sum()).log().float()


def sampled_softmax_loss(hidden: torch.Tensor, targets: torch.Tensor, decoder: torch.nn.Linear,
                         num_samples: int, log_q: torch.Tensor) -> torch.Tensor:
    """Sampled softmax (Jean et al. 2015) with negatives shared across the batch.

    S candidates are drawn with replacement from q. The target keeps its exact
    logit; each sampled logit is corrected by -log(S q(w)), so the sum of their
    exponentials is an importance-sampling estimate of the rest of the
    normaliser (Bengio & Senecal 2008). A sampled candidate equal to a row's
    target is masked out, since the target is already counted exactly.
    Training only: evaluation always uses the full softmax.
    """
    h = hidden.reshape(-1, hidden.size(-1))
    y = targets.reshape(-1)
    cand = torch.multinomial(log_q.exp(), num_samples, replacement=True)
    weight, bias = decoder.weight, decoder.bias
    correction = math.log(num_samples)
    true_logit = (h * weight[y]).sum(-1) + bias[y]
    sampled = h @ weight[cand].T + bias[cand] - (log_q[cand] + correction)
    sampled = sampled.masked_fill(cand.unsqueeze(0) == y.unsqueeze(1), float("-inf"))
    logits = torch.cat([true_logit.unsqueeze(1), sampled], 1).float()
    return F.cross_entropy(logits, torch.zeros_like(y))


@contextlib.contextmanager
def averaged_weights(optimizer):
    """Under NT-ASGD, evaluate and save the averaged parameters (Polyak averaging)."""
    if not isinstance(optimizer, torch.optim.ASGD):
        yield
        return
    saved = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "ax" in state:
                saved.append((p, p.data.clone()))
                p.data.copy_(state["ax"])
    try:
        yield
    finally:
        for p, data in saved:
            p.data.copy_(data)


# --------------------------------------------------------------------------- distributed

class Dist:
    """World info; a no-op shell when not launched by torchrun."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.enabled = self.world > 1
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """True on every rank if any rank says so (keeps stop decisions in lockstep)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def all_reduce(self, t: torch.Tensor) -> None:
        dist.all_reduce(t)

    def gather(self, obj):
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def close(self):
        if self.enabled and dist.is_initialized():
            # A DistributedDataParallel wrapper sits in a reference cycle and holds the process
            # group: left to the interpreter's final collection, gloo's threads are torn down
            # during shutdown and the process can abort after a finished run. Callers drop
            # their wrapper first; collecting here frees it while the group is still whole.
            gc.collect()
            dist.destroy_process_group()


# --------------------------------------------------------------------------- fit

@dataclass
class Progress:
    """The trainer's state besides weights, optimizer, carried state and RNG: everything the
    schedule, early stopping and resumption read. Saved in last.pt as a plain dict."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_valid: float = float("inf")      # best validation loss so far (nats per token)
    bad_validations: int = 0              # validations since the last improvement
    lr_scale: float = 1.0                 # plateau decays so far
    asgd: bool = False                    # switched to averaged SGD (NT-ASGD)
    valid_history: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    tokens_seen: int = 0
    stopped_because: str | None = None


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def write_run_metadata(run_dir: Path, cfg: RunConfig, corpus, amp_requested: str | None = None) -> None:
    meta = {"format_version": FORMAT_VERSION, **cfg.to_dict()}
    meta["precision"] = {"requested": amp_requested or cfg.train.amp, "used": precision_name(cfg.train.amp)}
    meta["corpus"] = {
        "name": corpus.name,
        "tokenizer": corpus.tokenizer,
        "vocab_size": len(corpus.vocab),
        "tokens": {s: int(corpus.split(s).numel()) for s in ("train", "valid", "test")},
        "sha256": corpus.checksums(),
    }
    runs.write_json(run_dir / runs.VOCAB, corpus.vocab.to_dict())
    if corpus.spm_model is not None:
        runs.write_bytes(run_dir / runs.SPM, corpus.spm_model)
    runs.write_json(run_dir / runs.CONFIG, meta)


def fit(run_dir: str | Path, cfg: RunConfig, corpus, device: str | torch.device = "cpu", resume: bool = False,
        interrupt_after_steps: int | None = None, on_checkpoint=None) -> dict | None:
    """Train, keep the best weights, write results.json; returns the results (None on non-main ranks).

    `interrupt_after_steps` stops abruptly after that many steps in this call,
    without a final checkpoint: the test suite's stand-in for a killed process.
    `on_checkpoint()` is called on the main rank after each resumable checkpoint is
    written (`lmadapt train --force` drops the run it replaces at the first one).
    """
    from lmadapt.heap import reuse_freed_memory

    with reuse_freed_memory():  # logits of batch x bptt x vocabulary at every step: see lmadapt/heap.py
        return _fit(run_dir, cfg, corpus, device, resume, interrupt_after_steps, on_checkpoint)


def _fit(run_dir, cfg: RunConfig, corpus, device, resume: bool, interrupt_after_steps, on_checkpoint) -> dict | None:
    run_dir = Path(run_dir)
    device = torch.device(device)
    t = cfg.train
    ddp = Dist(device)
    if t.batch_size % ddp.world:
        raise LmadaptError(f"train.batch_size {t.batch_size} is not divisible by the {ddp.world} processes")
    torch.manual_seed(t.seed + ddp.rank)
    torch.use_deterministic_algorithms(True, warn_only=True)
    cfg.model.vocab_size = len(corpus.vocab)
    backbones.get(cfg.model.arch).check_training(cfg)

    model = backbones.build(cfg.model).to(device)
    amp_requested = t.amp
    problem = amp_problem(model, device, t.amp)
    if problem is not None:
        # Fall back rather than die at the first step; config.json and results.json record
        # the precision actually used, so figures are never silently mixed.
        if ddp.main:
            print(f"lmadapt: warning: train.amp={t.amp} does not work on this {device.type} ({problem}); "
                  f"training in float32", file=sys.stderr)
        t.amp = "none"
    train_model = model
    if ddp.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    # Each rank trains on its own slice of the batch columns: the global batch
    # is the same whatever the number of processes.
    columns = batchify(corpus.train, t.batch_size)
    local = t.batch_size // ddp.world
    columns = columns[ddp.rank * local:(ddp.rank + 1) * local].to(device)
    steps_per_epoch = math.ceil((columns.size(1) - 1) / t.bptt)
    log_q = unigram_log_q(corpus.train_counts()).to(device) if t.sampled_softmax > 0 else None
    total_steps = steps_per_epoch * t.epochs
    if t.max_steps > 0:
        total_steps = min(total_steps, t.max_steps)

    prog = Progress()
    # A backbone that does not carry state in training starts every batch afresh (None).
    state = model.init_state(local, device) if model.train_carries_state else None
    optimizer = _make_optimizer(cfg, model.parameters(), asgd=False)
    hebbian = None
    if cfg.model.softmax == "hebbian":
        try:
            hebbian = HebbianSoftmax(cfg.model.vocab_size, t.hebbian_gamma, t.hebbian_T, device)
        except ValueError as exc:
            raise LmadaptError(f"train.{exc}") from None

    if resume:
        ckpt = runs.load_tensors(run_dir / runs.LAST, map_location=device)
        try:
            model.load_state_dict(ckpt["model"])
            prog = Progress(**ckpt["progress"])
            if prog.asgd:
                optimizer = _make_optimizer(cfg, model.parameters(), asgd=True)
            optimizer.load_state_dict(ckpt["optimizer"])
            if model.train_carries_state:
                state = model.state_slice(ckpt["state"], ddp.rank * local, (ddp.rank + 1) * local)
            rng = ckpt["rng"]
            _set_rng_state(rng[ddp.rank] if ddp.rank < len(rng) else rng[0], device)
            if hebbian is not None:
                hebbian.load_state_dict(ckpt["hebbian"])
        except (KeyError, RuntimeError, ValueError, IndexError, TypeError) as exc:
            raise LmadaptError(f"checkpoint {run_dir / runs.LAST} does not match this run: "
                               f"{str(exc).splitlines()[0][:200]}") from None
        # Drop metrics written after the checkpoint we resume from.
        rows = [r for r in runs.read_jsonl(run_dir / runs.METRICS) if r["step"] <= prog.global_step]
        if ddp.main:
            runs.write_bytes(run_dir / runs.METRICS, "".join(json.dumps(r) + "\n" for r in rows).encode())
    elif ddp.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_metadata(run_dir, cfg, corpus, amp_requested)
        runs.write_bytes(run_dir / runs.METRICS, b"")

    if ddp.main:
        print(f"model: {count_parameters(model):,} parameters; {steps_per_epoch} steps/epoch "
              f"of {t.batch_size}x{t.bptt} tokens; device {device}", file=sys.stderr)

    def checkpoint():
        # Every rank contributes its carried state and RNG; rank 0 writes one file.
        states = ddp.gather(tree_map(lambda v: v.cpu() if isinstance(v, torch.Tensor) else v, state))
        rngs = ddp.gather(_rng_state(device))
        if ddp.main:
            full = model.state_cat(states) if model.train_carries_state else None
            runs.save_tensors(run_dir / runs.LAST, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "progress": asdict(prog), "state": full, "rng": rngs,
                **({"hebbian": hebbian.state_dict()} if hebbian is not None else {})})
            if on_checkpoint is not None:
                on_checkpoint()

    def validate() -> bool:
        """Validation, best-weights keeping, schedule, NT-ASGD switch. Returns True to stop."""
        nonlocal optimizer
        with averaged_weights(optimizer):
            nll, n = evaluate(model, corpus.valid, t.eval_batch_size, t.bptt, device, t.amp)
            valid_loss = nll / n
            improved = valid_loss < prog.best_valid
            if improved and ddp.main:
                runs.save_tensors(run_dir / runs.BEST, model.state_dict())
        if improved:
            prog.best_valid = valid_loss
            prog.bad_validations = 0
        else:
            prog.bad_validations += 1
            if t.lr_schedule == "plateau" and prog.bad_validations > t.lr_patience:
                prog.lr_scale *= t.lr_decay
        history = prog.valid_history
        if (t.optimizer == "sgd" and t.nt_asgd and not prog.asgd and len(history) > t.nonmono
                and valid_loss > min(history[:-t.nonmono])):
            prog.asgd = True
            optimizer = _make_optimizer(cfg, model.parameters(), asgd=True)
            if ddp.main:
                print("switching to averaged SGD (NT-ASGD)", file=sys.stderr)
        history.append(valid_loss)
        row = {"epoch": prog.epoch, "step": prog.global_step, "valid_loss": valid_loss,
               "valid_ppl": math.exp(valid_loss), "lr": t.lr * _lr_factor(cfg, prog, total_steps),
               "train_seconds": round(prog.train_seconds, 2), "tokens_seen": prog.tokens_seen}
        if ddp.main:
            runs.append_jsonl(run_dir / runs.METRICS, row)
            print(f"epoch {prog.epoch + prog.step_in_epoch / steps_per_epoch:.2f} step {prog.global_step}: valid ppl {row['valid_ppl']:.2f}"
                  f"{' (best)' if improved else ''}  [{row['train_seconds']:.0f}s]", file=sys.stderr)
        return t.early_stop_patience > 0 and prog.bad_validations >= t.early_stop_patience

    steps_this_call = 0
    stop = prog.stopped_because is not None
    while not stop and prog.epoch < t.epochs:
        train_model.train()
        bar = tqdm(total=steps_per_epoch, initial=prog.step_in_epoch, desc=f"epoch {prog.epoch + 1}",
                   disable=not (ddp.main and progress_enabled()), unit="step", leave=False)
        running, running_n, tick, tick_tokens = 0.0, 0, time.perf_counter(), 0
        while prog.step_in_epoch < steps_per_epoch:
            step_start = time.perf_counter()
            i = prog.step_in_epoch * t.bptt
            seq = min(t.bptt, columns.size(1) - 1 - i)
            x, y = columns[:, i:i + seq], columns[:, i + 1:i + 1 + seq]
            for group in optimizer.param_groups:
                group["lr"] = t.lr * _lr_factor(cfg, prog, total_steps)
            state = model.detach_state(state) if model.train_carries_state else None
            sampled = t.sampled_softmax > 0 and _budget_done(cfg, prog, total_steps) < t.sampled_softmax_until
            with autocast(device, t.amp):
                hidden, logits, state = train_model(x, state, compute_logits=not sampled)
                if sampled:
                    loss = sampled_softmax_loss(hidden, y, model.output_layer(), t.sampled_softmax, log_q)
            if not sampled:
                loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"training loss became non-finite at epoch {prog.epoch + 1} step {prog.global_step + 1}; "
                    f"stopped, the last good checkpoint is kept in {run_dir}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if t.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip)
            optimizer.step()
            if hebbian is not None:  # after the gradient step, as the method prescribes
                hebbian.update(model.output_layer().weight, hidden, y, all_reduce=ddp.all_reduce if ddp.enabled else None)

            prog.step_in_epoch += 1
            prog.global_step += 1
            prog.tokens_seen += y.numel() * ddp.world
            prog.train_seconds += time.perf_counter() - step_start
            steps_this_call += 1
            running += loss.item()
            running_n += 1
            tick_tokens += y.numel() * ddp.world
            if running_n % t.log_interval == 0:
                now = time.perf_counter()
                bar.set_postfix(loss=f"{running / running_n:.3f}", tok_s=f"{tick_tokens / (now - tick):.0f}",
                                lr=f"{optimizer.param_groups[0]['lr']:.2g}")
                bar.update(t.log_interval)
                running, running_n, tick, tick_tokens = 0.0, 0, now, 0

            if interrupt_after_steps is not None and steps_this_call >= interrupt_after_steps:
                bar.close()
                del train_model  # see Dist.close
                ddp.close()
                return None  # simulated kill: no checkpoint beyond the last periodic one

            out_of_time = t.max_minutes > 0 and prog.train_seconds >= 60 * t.max_minutes
            out_of_steps = t.max_steps > 0 and prog.global_step >= t.max_steps
            out_of_time = ddp.any(out_of_time)
            end_of_epoch = prog.step_in_epoch >= steps_per_epoch
            if end_of_epoch:
                prog.epoch += 1
                prog.step_in_epoch = 0
            if out_of_time or out_of_steps or end_of_epoch or (t.eval_interval and prog.global_step % t.eval_interval == 0):
                if validate():
                    prog.stopped_because = "early stopping"
                if out_of_time:
                    prog.stopped_because = "time budget"
                elif out_of_steps:
                    prog.stopped_because = "step budget"
                checkpoint()
                if prog.stopped_because:
                    stop = True
                    break
            elif prog.global_step % t.checkpoint_interval == 0:
                checkpoint()
            if end_of_epoch:
                break
        bar.close()
    if prog.stopped_because is None:
        prog.stopped_because = "epochs"
        checkpoint()

    results = None
    if ddp.main:
        results = final_results(run_dir, cfg, corpus, model, prog, device)
    ddp.barrier()
    del train_model  # see Dist.close
    ddp.close()
    return results


def final_results(run_dir: Path, cfg: RunConfig, corpus, model, prog: Progress, device) -> dict:
    """Reload the best weights and score valid and test at the final batch size."""
    t = cfg.train
    model.load_state_dict(runs.load_tensors(run_dir / runs.BEST, map_location=device))
    backbones.get(cfg.model.arch).export(run_dir, model, corpus)  # e.g. gpt2: hf/ for transformers
    start = time.perf_counter()
    out = {}
    for split in ("valid", "test"):
        nll, n = evaluate(model, corpus.split(split), t.final_batch_size, t.bptt, device, t.amp, desc=split)
        out[f"{split}_ppl"] = _ppl(nll, n)
        out[f"{split}_tokens_scored"] = n
    results = {
        "valid_ppl": out["valid_ppl"],
        "test_ppl": out["test_ppl"],
        "train_seconds": prog.train_seconds,
        "tokens_per_second": prog.tokens_seen / max(prog.train_seconds, 1e-9),
        "epochs_completed": prog.epoch + prog.step_in_epoch / max(1, math.ceil(
            (corpus.train.numel() // t.batch_size - 1) / t.bptt)),
        "steps": prog.global_step,
        "stopped_because": prog.stopped_because,
        "best_valid_ppl_in_training": math.exp(prog.best_valid),
        "parameters": count_parameters(model),
        "valid_tokens_scored": out["valid_tokens_scored"],
        "test_tokens_scored": out["test_tokens_scored"],
        "final_eval_batch_size": t.final_batch_size,
        "final_eval_seconds": time.perf_counter() - start,
        "device": str(device),
        "precision": precision_name(t.amp),
        "torch_threads": torch.get_num_threads(),
    }
    runs.write_json(run_dir / runs.RESULTS, results)
    return results
