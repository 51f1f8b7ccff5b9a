"""The training loop: guess the next token, bill the surprise with cross-entropy,
backpropagate, nudge with AdamW, repeat; judge progress on the held-out split with
`estimate_loss` every eval_interval steps (and at step 0, before any update).

Outputs in runs/NAME/: config.json, metrics.jsonl (one JSON record per line), loss.png,
last.pt (every eval, and on SIGINT/SIGTERM) and best.pt (lowest val loss so far).
`resume=True` continues from last.pt and reproduces the uninterrupted run's losses: the
checkpoint carries the model, optimizer, RNG states and the position in the data.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from fastgpt import FastGPTError, distributed, ops
from fastgpt.checkpoint import load_checkpoint, save_checkpoint
from fastgpt.config import ARCHITECTURE_FIELDS, TrainConfig
from fastgpt.data import NextTokenDataset, load_corpus, make_loader, prepare
from fastgpt.fileio import atomic_open, write_atomic
from fastgpt.model import GPT, next_token_loss
from fastgpt.optim import AdamW, param_groups
from fastgpt.tokenizer import Tokenizer


_quiet = False  # set on the ranks other than 0 of a distributed run: only rank 0 prints


def log(message: str) -> None:
    if not _quiet:
        tqdm.write(message)  # prints above the progress bar instead of through it


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise FastGPTError(f"device {spec!r} is not one of auto, cpu, cuda, cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FastGPTError(f"device {spec!r} asked for, but this PyTorch sees no CUDA GPU")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise FastGPTError(f"device {spec!r} asked for, but there are only "
                           f"{torch.cuda.device_count()} CUDA GPUs")
    return device


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for the update that follows `step` completed steps."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.lr
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1.0 + math.cos(math.pi * progress))


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


@torch.no_grad()
def estimate_loss(model: GPT, datasets: dict[str, NextTokenDataset], batch_size: int,
                  eval_batches: int, device: torch.device, seed: int,
                  bf16: bool = False, ctx: distributed.Context = distributed.SINGLE
                  ) -> dict[str, float]:
    """Mean next-token loss per split over up to eval_batches batches, in eval mode (no
    dropout). The batches come from a generator seeded with `seed`: every eval sees the
    same ones, so evals are comparable and consume no training randomness. In a
    distributed run the ranks share the batches out and sum their totals."""
    was_training = model.training
    model.eval()
    losses = {}
    for split, dataset in datasets.items():
        loader = make_loader(dataset, batch_size, torch.Generator().manual_seed(seed),
                             drop_last=False)
        total, count = 0.0, 0
        for i, (x, y) in zip(range(eval_batches), loader):
            if i % ctx.world_size != ctx.rank:
                continue
            x, y = x.to(device), y.to(device)
            with autocast(device, bf16):
                total += model.loss(x, y, reduction="sum").item()
            count += y.numel()
        sums = distributed.all_reduce_sum(
            ctx, torch.tensor([total, count], dtype=torch.float64, device=device))
        losses[split] = (sums[0] / sums[1]).item()
    model.train(was_training)
    return losses


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator,
               device: torch.device, grad_accum: int = 1, bf16: bool = False) -> torch.Tensor:
    """One optimizer step: grad_accum micro-batches (x, y) from `batches`, each forward
    (loss / grad_accum) and backward, then optimizer.step() (which clips, for fastgpt's
    AdamW with max_grad_norm) and zero_grad. `model` is a GPT or a DistributedDataParallel
    around one (which then averages the gradients over the ranks on the last micro-batch
    only). Returns the step's loss, a float32 scalar on `device`: reading it waits for the
    device, so the loop reads it only when it logs."""
    step_loss = torch.zeros((), device=device)
    for i in range(grad_accum):
        x, y = next(batches)
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        last = i == grad_accum - 1
        with (model.no_sync() if hasattr(model, "no_sync") and not last
              else contextlib.nullcontext()):
            with autocast(device, bf16):
                loss = next_token_loss(model(x), y) / grad_accum
            loss.backward()
        step_loss += loss.detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss


class BatchStream:
    """Endless shuffled training batches, epoch after epoch, that can be saved and resumed.

    Its position is (epoch, batches taken in that epoch) plus the generator's state at the
    epoch's start: resuming replays that epoch's shuffle and skips the batches already taken.
    """

    def __init__(self, dataset: NextTokenDataset, batch_size: int, seed: int, pin_memory: bool):
        self.generator = torch.Generator().manual_seed(seed)
        self.loader = make_loader(dataset, batch_size, self.generator, pin_memory=pin_memory)
        self.epoch, self.batch = 0, 0
        self._epoch_start = self.generator.get_state()
        self._iterator: Iterator | None = None

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._iterator is None:
            self._epoch_start = self.generator.get_state()
            self._iterator = iter(self.loader)
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.epoch, self.batch, self._iterator = self.epoch + 1, 0, None
            return next(self)
        self.batch += 1
        return batch

    # How the order is drawn (data.ShuffledBatches); before it, a torch DataLoader drew it.
    SAMPLER = "randperm-1"

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "generator": self._epoch_start,
                "sampler": self.SAMPLER}

    def load_state_dict(self, state: dict) -> None:
        if state.get("sampler") != self.SAMPLER:
            log("this checkpoint's data order was drawn by an older fastgpt: the batches "
                "after the resume differ from those the uninterrupted run would have seen")
        self.generator.set_state(state["generator"])
        self.epoch, self.batch, self._iterator = state["epoch"], 0, None
        for _ in range(state["batch"]):
            next(self)


class StopSignals:
    """While active, SIGINT and SIGTERM ask the loop to stop after the current step.
    A second signal stops at once (KeyboardInterrupt)."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.received:  # e.g. a second Ctrl-C, or torchrun's SIGTERM after Ctrl-C
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        log(f"{self.received} received: finishing this step and saving a checkpoint "
            f"(press Ctrl-C again to stop at once)")

    def __enter__(self) -> "StopSignals":
        with contextlib.suppress(ValueError):  # signals can only be caught in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class NonFiniteLoss(FastGPTError):
    pass


def resume_config(runs_dir: str, name: str, overrides: dict) -> TrainConfig:
    """The config saved in runs_dir/name/last.pt with `overrides` applied on top."""
    path = Path(runs_dir) / name / "last.pt"
    if not path.is_file():
        raise FastGPTError(f"--resume: there is no checkpoint at {path}; "
                           f"start the run without --resume")
    saved = load_checkpoint(path)["config"]
    config = TrainConfig.from_dict({**saved, "runs_dir": runs_dir, "name": name, **overrides})
    config.validate()
    return config


def train(config: TrainConfig, resume: bool = False, progress: bool | None = None) -> dict:
    """Train per `config`; with resume=True continue runs_dir/name/last.pt.

    Returns a summary: step, train_loss, val_loss, best_val_loss, run_dir, stopped
    ("max_steps", "early_stop" or the signal's name). progress=None shows the tqdm bar only
    on a terminal. SIGINT/SIGTERM are caught from the start: during preparation they take
    effect after the first step.

    Under torchrun (WORLD_SIZE > 1) every process calls this: it joins the process group,
    trains its share of each batch with DistributedDataParallel, and leaves the group at
    the end; only rank 0 prints and writes (see fastgpt/distributed.py).
    """
    global _quiet
    config.validate()
    previous_backend = ops.set_backend(config.backend or None)
    ctx, device = distributed.SINGLE, None
    try:
        if distributed.launched():
            ctx, device = distributed.setup(config.device, config.dist_timeout)
            _quiet = not ctx.is_main
        with StopSignals() as signals:
            summary = _train(config, resume, progress, signals, ctx, device)
        if ctx.enabled:  # not after most errors: the barrier would wait for the others
            distributed.teardown(ctx, device)
        return summary
    except NonFiniteLoss:  # every rank saw the same all-reduced loss and stops here
        if ctx.enabled:
            distributed.teardown(ctx, device)
        raise
    except RuntimeError as exc:  # NCCL's DistBackendError, gloo's plain RuntimeError
        text = str(exc).strip()
        if not (ctx.enabled and (isinstance(exc, torch.distributed.DistError)
                                 or "gloo" in text.lower() or "nccl" in text.lower())):
            raise
        first = text.splitlines()[0][:300] if text else type(exc).__name__
        raise FastGPTError(f"rank {ctx.rank}: a collective with the other ranks failed "
                           f"({first}); another rank has probably stopped: see its output") from None
    finally:
        _quiet = False
        ops.set_backend(previous_backend)


def _train(config: TrainConfig, resume: bool, progress: bool | None, signals: StopSignals,
           ctx: distributed.Context, device: torch.device | None) -> dict:
    run_dir = Path(config.runs_dir) / config.name
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    metrics_path = run_dir / "metrics.jsonl"
    checkpoint = None
    if resume:
        checkpoint = load_checkpoint(last_path)
        for field in ARCHITECTURE_FIELDS + ("weight_decay_all",):
            if checkpoint["config"][field] != getattr(config, field):
                raise FastGPTError(
                    f"{last_path} was trained with {field}={checkpoint['config'][field]}; "
                    f"it cannot resume with {field}={getattr(config, field)}")
    elif last_path.exists():
        raise FastGPTError(f"{run_dir} already holds a run; continue it with --resume, "
                           f"or start another with --name NEW_NAME")

    torch.manual_seed(config.seed)
    device = device or pick_device(config.device)
    if not ctx.is_main:  # rank 0 downloads, tokenizes and caches first; the others read
        distributed.barrier(ctx, device)
    corpus_spec = config.corpus
    if checkpoint and corpus_spec == "auto":
        corpus_spec = checkpoint["corpus"]["name"]  # what "auto" chose when the run began
    corpus = load_corpus(corpus_spec, log=log)
    tokenizer = Tokenizer.from_json(checkpoint["tokenizer"]) if checkpoint else None
    if checkpoint and corpus.sha256 != checkpoint["corpus"]["sha256"]:
        raise FastGPTError(f"the corpus has changed since {last_path} was written "
                           f"(sha256 {corpus.sha256[:12]}… now, "
                           f"{checkpoint['corpus']['sha256'][:12]}… then); cannot resume")
    data = prepare(corpus, config.vocab_size, config.data_dir or None, tokenizer, log=log)
    if ctx.is_main:
        distributed.barrier(ctx, device)
    tokenizer = data.tokenizer
    mine = (corpus.sha256, tokenizer.sha256, len(data.train_ids))
    if any(tuple(theirs) != mine for theirs in distributed.all_gather(ctx, mine)):
        raise FastGPTError("the ranks do not see the same corpus and tokens: runs_dir and "
                           "the token cache (FASTGPT_CACHE or --data_dir) must be on a "
                           "filesystem that every machine shares")
    datasets = {"train": NextTokenDataset(data.train_ids, config.context_length, "train"),
                "val": NextTokenDataset(data.val_ids, config.context_length, "val")}
    if len(datasets["train"]) < config.batch_size:
        raise FastGPTError(f"the train split has {len(datasets['train'])} windows, fewer than "
                           f"batch_size={config.batch_size}: use a larger corpus or a smaller batch")

    model = GPT(**config.model_kwargs()).to(device)
    if ctx.rank > 0:  # rank 0 continues the seed's stream, as one process would
        torch.manual_seed(config.seed + ctx.rank)  # the others draw their own dropout masks
    trained = model  # what the step runs: the GPT, or DDP around it
    if ctx.enabled:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = AdamW(param_groups(model, config.weight_decay, config.weight_decay_all),
                      lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                      max_grad_norm=config.grad_clip or None)
    batches = BatchStream(datasets["train"], config.batch_size, config.seed,
                          pin_memory=device.type == "cuda")
    shares = distributed.Shares(batches, config.batch_size, config.grad_accum, ctx)
    step, tokens_seen, best_val, evals_since_best = 0, 0, math.inf, 0
    if checkpoint:
        try:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            reason = str(exc).strip().splitlines()[0][:200]
            raise FastGPTError(f"{last_path} does not fit this run ({reason})") from None
        # The state is the checkpoint's; the hyperparameters are this run's config (which
        # may override them on resume).
        for group, decay in zip(optimizer.param_groups, param_groups(
                model, config.weight_decay, config.weight_decay_all)):
            group.update(betas=(config.beta1, config.beta2), eps=config.eps,
                         weight_decay=decay["weight_decay"])
        batches.load_state_dict(checkpoint["data_position"])
        step, tokens_seen = checkpoint["step"], checkpoint["tokens_seen"]
        _restore_rng(checkpoint["rng"], ctx, device, config.seed + ctx.rank + 1_000_003 * step)
        best_val, evals_since_best = checkpoint["best_val_loss"], checkpoint["evals_since_best"]
        if ctx.is_main:
            _truncate_metrics(metrics_path, step)
        log(f"resuming {run_dir} at step {step}")
    elif ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path.unlink(missing_ok=True)  # left by a run that never wrote a checkpoint
    n_params = model.num_parameters()
    run_info = {"config": config.to_dict(), "corpus": corpus.name, "corpus_sha256": corpus.sha256,
                "tokenizer_sha256": tokenizer.sha256, "parameters": n_params,
                "device": str(device), "world_size": ctx.world_size, "torch": torch.__version__}
    if ctx.is_main:
        write_atomic(run_dir / "config.json", (json.dumps(run_info, indent=2) + "\n").encode())
    if ctx.enabled:
        log(f"data parallel over {ctx.world_size} ranks ({distributed.backend_for(device)}): each takes "
            f"{shares.accum} micro-batch(es) of {shares.micro_batch} sequences per step")
    log(f"{n_params:,} parameters on {device}; corpus {corpus.name} "
        f"(sha256 {corpus.sha256[:12]}…), {data.meta['n_train']:,} train / "
        f"{data.meta['n_val']:,} val tokens; untrained loss should be near "
        f"ln({config.vocab_size}) = {math.log(config.vocab_size):.4f}")

    def checkpoint_state() -> dict:
        return {
            "step": step, "config": config.to_dict(), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "tokenizer": tokenizer.to_json(),
            "corpus": {"name": corpus.name, "sha256": corpus.sha256},
            "rng": _rng_state(ctx, device),
            "data_position": batches.state_dict(), "best_val_loss": best_val,
            "evals_since_best": evals_since_best, "tokens_seen": tokens_seen,
        }

    def evaluate() -> dict[str, float]:
        nonlocal best_val, evals_since_best
        losses = estimate_loss(model, datasets, config.batch_size, config.eval_batches, device,
                               seed=config.seed + 1, bf16=config.bf16, ctx=ctx)
        if not all(math.isfinite(v) for v in losses.values()):
            raise NonFiniteLoss(f"eval loss is not finite at step {step} ({losses}); stopped. "
                                + _last_good(last_path))
        improved = losses["val"] < best_val
        best_val = min(best_val, losses["val"])
        evals_since_best = 0 if improved else evals_since_best + 1
        state = checkpoint_state()  # on every rank: it gathers the ranks' RNG states
        if ctx.is_main:
            _append_metrics(metrics_path, {
                "kind": "eval", "step": step, "train_loss": losses["train"],
                "val_loss": losses["val"], "lr": lr_at(max(step - 1, 0), config),
                "tokens_seen": tokens_seen,
                "elapsed_s": round(time.perf_counter() - start_time, 3)}, sync=True)
            plot_losses(metrics_path, run_dir / "loss.png", config.vocab_size)
            save_checkpoint(last_path, state)
            if improved:
                save_checkpoint(best_path, state)
        log(f"step {step:>6}: train {losses['train']:.4f}, val {losses['val']:.4f}"
            + (" (best)" if improved else ""))
        return losses

    start_time = time.perf_counter()
    losses: dict[str, float] = {}
    stopped = "max_steps"
    if checkpoint is None:
        losses = evaluate()
    elif step >= config.max_steps:
        log(f"{run_dir} already reached max_steps={config.max_steps}; "
            f"pass a larger --max_steps with --resume to train further")
    tokens_per_step = config.batch_size * config.grad_accum * config.context_length
    bar = tqdm(total=config.max_steps, initial=step, unit="step", dynamic_ncols=True,
               disable=(None if progress is None else not progress) if ctx.is_main else True)
    window_start, window_steps = time.perf_counter(), 0
    with bar:
        while step < config.max_steps:
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = train_step(trained, optimizer, shares, device, shares.accum,
                                   config.bf16)
            step += 1
            tokens_seen += tokens_per_step
            window_steps += 1
            bar.update(1)

            log_now = step % config.log_interval == 0 or step == config.max_steps
            # A signal to any rank stops them all after this step (a host-side flag).
            stop_requested = distributed.any_rank(ctx, signals.received is not None)
            if log_now or stop_requested:  # not every step: .item() waits for the GPU
                value = distributed.all_reduce_sum(ctx, step_loss.float()).item() / ctx.world_size
                if not math.isfinite(value):
                    raise NonFiniteLoss(f"training loss is {value} at step {step}; stopped. "
                                        + _last_good(last_path))
            if log_now and ctx.is_main:
                elapsed = time.perf_counter() - window_start
                tokens_per_s = window_steps * tokens_per_step / max(elapsed, 1e-9)
                window_start, window_steps = time.perf_counter(), 0
                _append_metrics(metrics_path, {"kind": "train", "step": step, "loss": value,
                                               "lr": lr, "tokens_per_s": round(tokens_per_s, 1)})
                bar.set_postfix(loss=f"{value:.4f}", tok_s=f"{tokens_per_s:,.0f}")
            if step % config.eval_interval == 0 or step == config.max_steps:
                losses = evaluate()
                window_start = time.perf_counter()  # tokens/s counts training time only
                if config.patience and evals_since_best >= config.patience:
                    stopped = "early_stop"
                    log(f"early stop: val loss has not improved for {config.patience} evals")
                    break
            if stop_requested:
                stopped = signals.received or "a signal to another rank"
                if step % config.eval_interval and step != config.max_steps:
                    state = checkpoint_state()
                    if ctx.is_main:
                        save_checkpoint(last_path, state)
                log(f"stopped by {stopped} at step {step}; checkpoint saved to "
                    f"{last_path}. Resume with: fastgpt train --name {config.name} "
                    f"--runs_dir {config.runs_dir} --resume")
                break

    summary = {"step": step, "train_loss": losses.get("train"), "val_loss": losses.get("val"),
               "best_val_loss": best_val, "run_dir": str(run_dir), "stopped": stopped}
    if stopped in ("max_steps", "early_stop") and losses:
        log(f"done at step {step}: train {losses['train']:.4f}, val {losses['val']:.4f} "
            f"(ln {config.vocab_size} = {math.log(config.vocab_size):.4f}), best val "
            f"{best_val:.4f}; {time.perf_counter() - start_time:.0f} s; outputs in {run_dir}/")
    return summary


def _rng_state(ctx: distributed.Context, device: torch.device) -> dict:
    """This process's RNG states ("torch", "cuda"). In a distributed run: rank 0's at the
    top level (what a single process resumes with) and every rank's under "ranks"."""
    cuda = None
    if device.type == "cuda":
        cuda = [torch.cuda.get_rng_state(device)] if ctx.enabled else torch.cuda.get_rng_state_all()
    mine = {"torch": torch.get_rng_state(), "cuda": cuda}
    if not ctx.enabled:
        return mine
    ranks = distributed.all_gather(ctx, mine)
    return {**ranks[0], "ranks": ranks}


def _restore_rng(rng: dict, ctx: distributed.Context, device: torch.device,
                 fresh_seed: int) -> None:
    """Each rank takes back its own RNG state when the checkpoint has one for it (same
    number of ranks); else rank 0 takes the top-level state and the others `fresh_seed`."""
    ranks = rng.get("ranks")
    same_ranks = ranks is not None and len(ranks) == ctx.world_size
    saved_by = len(ranks) if ranks else 1
    if ctx.enabled and saved_by != ctx.world_size:
        log(f"the checkpoint was written by {saved_by} process(es), this run has "
            f"{ctx.world_size}: ranks other than 0 draw fresh dropout randomness")
    mine = ranks[ctx.rank] if ctx.enabled and same_ranks else rng if ctx.is_main else None
    if mine is None:
        torch.manual_seed(fresh_seed)
        return
    torch.set_rng_state(mine["torch"])
    if device.type == "cuda" and mine["cuda"] is not None:
        if ctx.enabled:
            torch.cuda.set_rng_state(mine["cuda"][0], device)
        else:
            torch.cuda.set_rng_state_all(mine["cuda"])


def _last_good(last_path: Path) -> str:
    if last_path.exists():
        return f"The last good checkpoint is {last_path}."
    return "No checkpoint had been written yet."


def _append_metrics(path: Path, record: dict, sync: bool = False) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        if sync:  # before a checkpoint: the metrics it covers reach the disk first
            f.flush()
            os.fsync(f.fileno())


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (a crash mid-write) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the records a crashed run wrote after its last checkpoint: the resumed run
    writes them again."""
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept).encode())


def plot_losses(metrics_path: Path, png_path: Path, vocab_size: int) -> None:
    """Train and val loss against step, with the untrained model's ln(vocab_size). Without
    matplotlib (e.g. a bare GPU machine) the run goes on without the plot, saying so once."""
    try:
        import matplotlib
    except ImportError:
        if not getattr(plot_losses, "warned", False):
            log("matplotlib is not installed: loss.png is not drawn (pip install matplotlib)")
            plot_losses.warned = True
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in read_metrics(metrics_path) if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    steps = [r["step"] for r in evals]
    ax.plot(steps, [r["train_loss"] for r in evals], marker=".", label="train")
    ax.plot(steps, [r["val_loss"] for r in evals], marker=".", label="val")
    ax.axhline(math.log(vocab_size), color="grey", linestyle="--",
               label=f"ln({vocab_size}) = {math.log(vocab_size):.3f} (uniform guess)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title(f"{png_path.parent.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_open(png_path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
