"""The training loop: guess the next token, bill the surprise with cross-entropy,
backpropagate, nudge with AdamW, repeat; judge progress on the held-out split with
`estimate_loss` every eval_interval steps (and at step 0, before any update).

Outputs in runs/NAME/: config.json, metrics.jsonl and loss.png (fastgpt/metrics.py),
last.pt (every eval, and on SIGINT/SIGTERM) and best.pt (lowest val loss so far).
`resume=True` continues from last.pt and reproduces the uninterrupted run's losses.
"""

from __future__ import annotations

import contextlib
import math
import shlex
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from fastgpt import FastGPTError, distributed, metrics, ops, tensorboard, tune
from fastgpt.checkpoint import (check_new_run, check_resumable, load_resumable,
                                restore_rng, restore_training, rng_state, save_checkpoint,
                                write_run_info)
from fastgpt.config import TrainConfig
from fastgpt.console import Console
from fastgpt.data import BatchStream, NextTokenDataset, load_run_data, make_loader
from fastgpt.model import GPT
from fastgpt.optim import AdamW, param_groups
from fastgpt.progress import Progress, ProgressReport, StopSignals, hours_on_a_cpu
from fastgpt.rundir import RunDir


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for the update that follows `step` completed steps."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.lr
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1.0 + math.cos(math.pi * progress))


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on `device` when bf16, else nothing: an autocast the caller opened
    around it stays in force (no context that switches it off)."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def estimate_loss(model: GPT, datasets: dict[str, NextTokenDataset], batch_size: int,
                  eval_batches: int, device: torch.device, seed: int,
                  bf16: bool = False, ctx: distributed.Context = distributed.SINGLE,
                  stop: Callable[[], bool] | None = None) -> dict[str, float] | None:
    """Mean next-token loss per split over up to eval_batches batches, in eval mode (no
    dropout). The batches come from a generator seeded with `seed`: every eval sees the
    same ones, so evals are comparable and consume no training randomness. In a
    distributed run the ranks share the batches out and sum their totals (and must pass
    the same `stop`). `stop()` is asked before every batch: when it says yes, the eval
    is abandoned and None returned."""
    was_training = model.training
    model.eval()
    losses = {}
    try:
        for split, dataset in datasets.items():
            loader = make_loader(dataset, batch_size, torch.Generator().manual_seed(seed),
                                 drop_last=False)
            # summed on the device in float64 and read once per split: no sync per batch
            total = torch.zeros((), dtype=torch.float64, device=device)
            count = 0
            for i, (x, y) in zip(range(eval_batches), loader):
                if stop is not None and stop():
                    return None
                if i % ctx.world_size != ctx.rank:
                    continue
                x, y = x.to(device), y.to(device)
                with autocast(device, bf16):
                    total += model.loss(x, y, reduction="sum").double()
                count += y.numel()
            sums = distributed.all_reduce_sum(ctx, torch.stack([total, total.new_tensor(count)]))
            losses[split] = (sums[0] / sums[1]).item()
    finally:
        model.train(was_training)
    return losses


class ForwardAndLoss(torch.nn.Module):
    """(x, y) -> the mean next-token loss of `gpt` on a micro-batch: the forward and the
    loss in one module, which is what DDP wraps and what torch.compile compiles."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.gpt.loss(x, y)


def training_module(model: GPT, compile: bool = False,
                    ctx: distributed.Context = distributed.SINGLE,
                    device: torch.device | None = None) -> torch.nn.Module:
    """What train_step runs: ForwardAndLoss(model), inside DistributedDataParallel in a
    distributed run, and with compile the whole of it through torch.compile (the forward
    and the loss one graph, their backward compiled with it; under DDP, graphs split at
    the gradient buckets so that the all-reduce still overlaps the backward). The
    parameters stay `model`'s: its state_dict has no `_orig_mod.` or `module.` prefix."""
    module: torch.nn.Module = ForwardAndLoss(model)
    if ctx.enabled:
        module = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(module) if compile else module


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator,
               device: torch.device, grad_accum: int = 1, bf16: bool = False) -> torch.Tensor:
    """One optimizer step: grad_accum micro-batches (x, y) from `batches`, each forward
    and loss (model(x, y) / grad_accum) and backward, then optimizer.step() (which clips,
    for fastgpt's AdamW with max_grad_norm) and zero_grad. `model` is a training_module:
    (x, y) -> loss, compiled or not, in DistributedDataParallel or not (which then averages
    the gradients over the ranks on the last micro-batch only). Returns the step's loss, a
    float32 scalar on `device`: reading it waits for the device, so the loop reads it only
    when it logs. Nothing in the step itself waits for the device."""
    losses = []
    for i in range(grad_accum):
        x, y = next(batches)
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        last = i == grad_accum - 1
        with (model.no_sync() if hasattr(model, "no_sync") and not last
              else contextlib.nullcontext()):
            with autocast(device, bf16):
                loss = model(x, y)
                if grad_accum > 1:
                    loss = loss / grad_accum
            loss.backward()
        losses.append(loss.detach())
    step_loss = losses[0] if grad_accum == 1 else torch.stack(losses).sum()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss


class NonFiniteLoss(FastGPTError):
    pass


def resume_config(runs_dir: str, name: str, overrides: dict) -> TrainConfig:
    """The config saved in runs_dir/name/last.pt with `overrides` applied on top."""
    saved = load_resumable(RunDir(Path(runs_dir) / name), Console().log)["config"]
    config = TrainConfig.from_dict({**saved, "runs_dir": runs_dir, "name": name, **overrides})
    config.validate()
    return config


def train(config: TrainConfig, resume: bool = False, progress: bool | None = None) -> dict:
    """Train per `config`; with resume=True continue runs_dir/name/last.pt.

    Returns a summary: step, train_loss, val_loss, best_val_loss, run_dir, stopped
    ("max_steps", "early_stop" or the signal's name). progress=None shows the tqdm bar only
    on a terminal (elsewhere a line per log_interval). SIGINT/SIGTERM are caught from the
    start and stop the run after the current step or eval batch, saving last.pt.

    Under torchrun every process calls this and trains its share of each batch with
    DistributedDataParallel (see fastgpt/distributed.py); only rank 0 prints, writes and
    holds the run directory's lock.
    """
    config.validate()
    previous_backend = ops.set_backend(config.backend or None)
    ctx, device, console = distributed.SINGLE, None, Console()
    run = RunDir(Path(config.runs_dir) / config.name)
    try:
        if distributed.launched():
            ctx, device = distributed.setup(config.device, config.dist_timeout)
            console.quiet = not ctx.is_main
        else:
            device = distributed.pick_device(config.device)
        if resume:  # before the lock creates the directory
            check_resumable(run)
        tensorboard.require(config.tensorboard and ctx.is_main)
        with StopSignals(console.log) as signals:
            if ctx.is_main:
                run.lock()
            summary = _Training(config, run, resume, signals, ctx, device, console).run(progress)
        if ctx.enabled:  # not after most errors: the barrier would wait for the others
            distributed.teardown(ctx, device)
        return summary
    except NonFiniteLoss as exc:  # every rank saw the same all-reduced loss and stops here
        if ctx.enabled:
            distributed.teardown(ctx, device, dropping=exc)
        raise
    except RuntimeError as exc:
        distributed.raise_collective_failure(ctx, exc)  # as one line, if that is what it is
        raise
    finally:
        run.unlock()
        ops.set_backend(previous_backend)


class _Training:
    """One call of train(): the setup phases in __init__, then run() (the loop)."""

    def __init__(self, config: TrainConfig, run: RunDir, resume: bool, signals: StopSignals,
                 ctx: distributed.Context, device: torch.device, console: Console):
        self.config, self.run_dir, self.signals, self.ctx = config, run, signals, ctx
        self.console, self.log = console, console.log
        if not resume:
            check_new_run(run)  # refuse to overwrite a run
        checkpoint = load_resumable(run, self.log, config) if resume else None
        if ctx.is_main:  # it holds the lock: no live process is writing these
            count, freed = run.remove_stale_temporaries()
            if count:
                self.log(f"removed {count} temporary file(s) ({freed / 1e6:.1f} MB) that an "
                         f"interrupted run left in {run.directory}")
        torch.manual_seed(config.seed)
        self.device = device
        self.run_data = load_run_data(self.config, self.ctx, self.device, checkpoint,
                                      self.run_dir.last, self.log)
        self.corpus, self.data = self.run_data.corpus, self.run_data.prepared
        self.tokenizer, self.datasets = self.data.tokenizer, self.run_data.datasets
        self._build()
        self.backends = tune.backends_for_run(config, checkpoint, device,  # before any trace
                                              self.shares.micro_batch, self.log, ctx)
        self.progress = Progress()
        if checkpoint:
            self._restore(checkpoint)
        elif ctx.is_main:
            run.directory.mkdir(parents=True, exist_ok=True)
        self.board = tensorboard.Board(run.directory if config.tensorboard and ctx.is_main
                                       else None, self.progress.step if checkpoint else None)
        self._describe()

    # --- setup -----------------------------------------------------------------------

    def _build(self) -> None:
        """The model (and DDP around it), AdamW, and the stream of training batches."""
        config, ctx, device = self.config, self.ctx, self.device
        self.model = GPT(**config.model_kwargs()).to(device)
        if ctx.rank > 0:  # rank 0 continues the seed's stream, as one process would
            torch.manual_seed(config.seed + ctx.rank)  # the others draw their own dropout masks
        self.trained = training_module(self.model, config.compile, ctx, device)
        self.optimizer = AdamW(
            param_groups(self.model, config.weight_decay, config.weight_decay_all),
            lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
            max_grad_norm=config.grad_clip or None)
        self.batches = BatchStream(self.datasets["train"], config.batch_size, config.seed,
                                   pin_memory=device.type == "cuda")
        self.shares = distributed.Shares(self.batches, config.batch_size, config.grad_accum, ctx)

    def _restore(self, checkpoint: dict) -> None:
        """Model, optimizer state, data position, RNG and progress from `checkpoint`."""
        config, ctx = self.config, self.ctx
        restore_training(checkpoint, self.run_dir.last, self.model, self.optimizer, config)
        self.batches.load_state_dict(checkpoint["data_position"], self.log)
        self.progress = Progress.from_checkpoint(checkpoint)
        step = self.progress.step
        restore_rng(checkpoint["rng"], ctx, self.device,
                    config.seed + ctx.rank + 1_000_003 * step, self.log)
        if ctx.is_main:
            metrics.truncate(self.run_dir.metrics, step)
        self.log(f"resuming {self.run_dir.directory} at step {step}")

    def _describe(self) -> None:
        """config.json, and what is about to train on what."""
        config, ctx, corpus, device = self.config, self.ctx, self.corpus, self.device
        n_params = self.model.num_parameters()
        self.mfu = metrics.MFU.for_run(config, n_params, device, ctx.world_size)
        if ctx.is_main:
            write_run_info(self.run_dir.config, config, corpus, self.tokenizer,
                           parameters=n_params, device=str(device), world_size=ctx.world_size,
                           backends=self.backends)
        if ctx.enabled:
            self.log(f"data parallel over {ctx.world_size} ranks "
                     f"({distributed.backend_for(device)}): each takes {self.shares.accum} "
                     f"micro-batch(es) of {self.shares.micro_batch} sequences per step")
        self.log(f"{n_params:,} parameters on {device}; corpus {corpus.name} "
                 f"(sha256 {corpus.sha256[:12]}…), {self.data.meta['n_train']:,} train / "
                 f"{self.data.meta['n_val']:,} val tokens; untrained loss should be near "
                 f"ln({config.vocab_size}) = {math.log(config.vocab_size):.4f}")

    # --- checkpoints and evals ---------------------------------------------------------

    def checkpoint_state(self) -> dict:
        return {
            **self.progress.state_dict(), "config": self.config.to_dict(),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "tokenizer": self.tokenizer.to_json(),
            "corpus": {"name": self.corpus.name, "sha256": self.corpus.sha256},
            "rng": rng_state(self.ctx, self.device),
            "data_position": self.batches.state_dict(), "backends": self.backends,
        }

    def save(self, improved: bool = False) -> None:
        """last.pt (and best.pt when the val loss improved). Called on every rank: the state
        gathers the ranks' RNG states; rank 0 writes."""
        state = self.checkpoint_state()
        if self.ctx.is_main:
            if improved:  # best.pt first: a kill between the two leaves it newer, never staler
                save_checkpoint(self.run_dir.best, state)
            save_checkpoint(self.run_dir.last, state)

    def stop_requested(self) -> bool:
        """Whether a signal reached any rank (every rank must ask, at the same point)."""
        return distributed.any_rank(self.ctx, self.signals.received is not None)

    def evaluate(self) -> dict[str, float] | None:
        """The eval due at this step: losses, metrics, plot, checkpoints. None when a stop
        request cut it short (nothing recorded; the eval stays pending in last.pt)."""
        config, progress, run = self.config, self.progress, self.run_dir
        started = time.perf_counter()
        losses = estimate_loss(self.model, self.datasets, config.batch_size,
                               config.eval_batches, self.device, seed=config.seed + 1,
                               bf16=config.bf16, ctx=self.ctx, stop=self.stop_requested)
        if losses is None:
            return None
        self.last_eval_s = time.perf_counter() - started
        if not all(math.isfinite(v) for v in losses.values()):
            raise NonFiniteLoss(f"eval loss is not finite at step {progress.step} ({losses}); "
                                f"stopped. " + _last_good(run.last))
        improved = progress.evaluated(losses["val"])
        if self.ctx.is_main:
            self.board.add(metrics.append(run.metrics, {
                "kind": "eval", "step": progress.step, "train_loss": losses["train"],
                "val_loss": losses["val"], "lr": lr_at(max(progress.step - 1, 0), config),
                "tokens_seen": progress.tokens_seen,
                "elapsed_s": round(time.perf_counter() - self.start_time, 3)}, sync=True))
            if not metrics.plot_losses(run.metrics, run.plot, config.vocab_size):
                self.console.once("matplotlib is not installed: loss.png is not drawn "
                                  "(pip install matplotlib)")
        self.save(improved)
        self.log(f"step {progress.step:>6}: train {losses['train']:.4f}, val {losses['val']:.4f}"
                 + (" (best)" if improved else ""))
        return losses

    # --- the loop ----------------------------------------------------------------------

    def run(self, show_bar: bool | None) -> dict:
        config, ctx, progress = self.config, self.ctx, self.progress
        self.start_time = time.perf_counter()
        self.last_eval_s: float | None = None
        losses: dict[str, float] = {}
        stopped = None
        if self.device.type == "cpu" and progress.step < config.max_steps:
            self._say_if_hours_on_a_cpu()
        if progress.eval_pending:  # step 0's, or one that a stop cut short before the resume
            self.log(f"step {progress.step:>6}: estimating the loss on {config.eval_batches} "
                     f"batches of each split")
            losses = self.evaluate()
            if losses is None:
                stopped = self._stop()
        elif progress.step >= config.max_steps:
            self.log(f"{self.run_dir.directory} already reached max_steps={config.max_steps}; "
                     f"pass a larger --max_steps with --resume to train further")
        with (ProgressReport(config, progress.step, self.device, self.log,
                             show_bar if ctx.is_main else False, self.mfu) as report,
              contextlib.closing(self.board)):  # closed however the loop ends
            while stopped is None and progress.step < config.max_steps:
                lr = lr_at(progress.step, config)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                step_started = time.perf_counter()
                step_loss = train_step(self.trained, self.optimizer, self.shares, self.device,
                                       self.shares.accum, config.bf16)
                if config.compile and report.timer.steps == 0:
                    self.log(f"torch.compile: the first step, which compiles the forward, loss "
                             f"and backward, took {time.perf_counter() - step_started:.1f} s")
                progress.step += 1
                progress.tokens_seen += report.tokens_per_step
                progress.eval_pending = (progress.step % config.eval_interval == 0
                                         or progress.step == config.max_steps)
                report.stepped()

                log_now = progress.step % config.log_interval == 0 or progress.step == config.max_steps
                stop_requested = self.stop_requested()
                if log_now or stop_requested:  # not every step: reading waits for the GPU
                    norm = self.optimizer.grad_norm  # where clipping: read in the same wait
                    value, *norm = torch.stack([distributed.all_reduce_sum(ctx, step_loss.float())]
                                               + ([norm] if norm is not None else [])).tolist()
                    value /= ctx.world_size
                    if not math.isfinite(value):
                        raise NonFiniteLoss(f"training loss is {value} at step {progress.step}; "
                                            f"stopped. " + _last_good(self.run_dir.last))
                if log_now:
                    rates = report.logged(progress.step, value, self.last_eval_s)
                    if ctx.is_main:
                        self.board.add(metrics.append(self.run_dir.metrics, {
                            "kind": "train", "step": progress.step, "loss": value, "lr": lr,
                            **rates, **({"grad_norm": norm[0]} if norm else {})}))
                if stop_requested:
                    stopped = self._stop()
                elif progress.eval_pending:
                    eval_started = time.perf_counter()
                    losses = self.evaluate()
                    report.timer.paused(time.perf_counter() - eval_started)  # training only
                    if losses is None:
                        stopped = self._stop()
                    elif config.patience and progress.evals_since_best >= config.patience:
                        stopped = "early_stop"
                        self.log(f"early stop: val loss has not improved for {config.patience} evals")

        stopped = stopped or "max_steps"
        summary = {"step": progress.step, "train_loss": losses.get("train") if losses else None,
                   "val_loss": losses.get("val") if losses else None,
                   "best_val_loss": progress.best_val_loss,
                   "run_dir": str(self.run_dir.directory), "stopped": stopped}
        if stopped in ("max_steps", "early_stop") and losses:
            self.log(f"done at step {progress.step}: train {losses['train']:.4f}, val "
                     f"{losses['val']:.4f} (ln {config.vocab_size} = "
                     f"{math.log(config.vocab_size):.4f}), best val "
                     f"{progress.best_val_loss:.4f}; {time.perf_counter() - self.start_time:.0f} "
                     f"s; outputs in {self.run_dir.directory}/")
            runs_dir = ("" if config.runs_dir == TrainConfig.runs_dir
                        else f" --runs_dir {shlex.quote(config.runs_dir)}")
            self.log(f"next: fastgpt sample --run {shlex.quote(config.name)}{runs_dir}")
        return summary

    def _say_if_hours_on_a_cpu(self) -> None:
        """Before the first eval on a CPU (a GPU-sized model's takes minutes there), time one
        forward and backward of a micro-batch; when the run would take hours, say so. In
        eval mode, RNG state put back, gradients dropped: as if it had not been timed."""
        x = torch.zeros(self.shares.micro_batch, self.config.context_length, dtype=torch.long)
        self.model.eval()
        with torch.random.fork_rng(devices=[]):
            started = time.perf_counter()
            with autocast(self.device, self.config.bf16):
                loss = self.model.loss(x, x)
            loss.backward()
            step_s = (time.perf_counter() - started) * self.shares.accum
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        if line := hours_on_a_cpu(self.progress.step, self.config, step_s, self.device):
            self.log(line)

    def _stop(self) -> str:
        """Save last.pt for a stop request (an eval due now stays pending) and say so."""
        stopped = self.signals.received or "a signal to another rank"
        self.save()
        self.log(f"stopped by {stopped} at step {self.progress.step}; checkpoint saved to "
                 f"{self.run_dir.last}. Resume with: fastgpt train --name {self.config.name} "
                 f"--runs_dir {self.config.runs_dir} --resume")
        return stopped


def _last_good(last_path: Path) -> str:
    if last_path.exists():
        return f"The last good checkpoint is {last_path}."
    return "No checkpoint had been written yet."


