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
import dataclasses
import gc
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from fastgpt import FastGPTError, distributed, ops
from fastgpt.checkpoint import load_checkpoint, save_checkpoint
from fastgpt.config import ARCHITECTURE_FIELDS, TrainConfig
from fastgpt.data import NextTokenDataset, load_corpus, make_loader, prepare
from fastgpt.fileio import atomic_open, write_atomic
from fastgpt.model import GPT
from fastgpt.optim import AdamW, param_groups
from fastgpt.rundir import RunDir
from fastgpt.tokenizer import Tokenizer


_quiet = False  # set on the ranks other than 0 of a distributed run: only rank 0 prints


def log(message: str) -> None:
    if not _quiet:
        tqdm.write(message)  # prints above the progress bar instead of through it
        sys.stdout.flush()  # a file is block-buffered: a kill -9 must not lose the lines


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
    """While active, SIGINT and SIGTERM ask the loop to stop after the current step or
    eval batch. A second signal stops at once (KeyboardInterrupt)."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.received:  # e.g. a second Ctrl-C, or torchrun's SIGTERM after Ctrl-C
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        log(f"{self.received} received: stopping after this step or eval batch and saving a checkpoint "
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


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint (as top-level keys) and restored on
    resume, so that evals, best.pt and early stopping continue as if never interrupted."""
    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float = math.inf
    evals_since_best: int = 0
    eval_pending: bool = True  # the eval due at `step` has not run (step 0, or a stop cut it)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> "Progress":
        # eval_pending is absent from checkpoints of fastgpt before it could cut an eval short
        return cls(checkpoint["step"], checkpoint["tokens_seen"], checkpoint["best_val_loss"],
                   checkpoint["evals_since_best"], checkpoint.get("eval_pending", False))


def resume_config(runs_dir: str, name: str, overrides: dict) -> TrainConfig:
    """The config saved in runs_dir/name/last.pt with `overrides` applied on top."""
    run = RunDir(Path(runs_dir) / name)
    _check_resumable(run)
    saved = load_checkpoint(run.last, log=log)["config"]
    config = TrainConfig.from_dict({**saved, "runs_dir": runs_dir, "name": name, **overrides})
    config.validate()
    return config


def _check_resumable(run: RunDir) -> None:
    """Raise, saying how to go on, when `run` has no last.pt to resume."""
    if run.last.is_file():
        return
    if run.best.is_file():
        raise FastGPTError(f"--resume: {run.directory} has best.pt but no last.pt; to continue "
                           f"from best.pt, copy it (cp {run.best} {run.last}) and resume again")
    if run.markers():
        raise FastGPTError(f"--resume: {run.directory} has no checkpoint (its run stopped "
                           f"before writing one); delete it and start again without --resume")
    raise FastGPTError(f"--resume: there is no checkpoint at {run.last}; "
                       f"start the run without --resume")


def _check_new(run: RunDir) -> None:
    """Raise when `run` already holds a run (a new run would overwrite it)."""
    found = run.markers()
    if not found:
        return
    if "last.pt" in found:
        how = "continue it with --resume"
    elif "best.pt" in found:
        how = (f"it has best.pt but no last.pt: to continue from best.pt, copy it "
               f"(cp {run.best} {run.last}) and use --resume")
    else:
        how = "it stopped before its first checkpoint: delete the directory to start over"
    raise FastGPTError(f"{run.directory} already holds a run ({', '.join(found)}); {how}, "
                       f"or start another with --name NEW_NAME")


def train(config: TrainConfig, resume: bool = False, progress: bool | None = None) -> dict:
    """Train per `config`; with resume=True continue runs_dir/name/last.pt.

    Returns a summary: step, train_loss, val_loss, best_val_loss, run_dir, stopped
    ("max_steps", "early_stop" or the signal's name). progress=None shows the tqdm bar only
    on a terminal (elsewhere a line per log_interval). SIGINT/SIGTERM are caught from the
    start and stop the run after the current step or eval batch, saving last.pt.

    Under torchrun (WORLD_SIZE > 1) every process calls this: it joins the process group,
    trains its share of each batch with DistributedDataParallel, and leaves the group at
    the end; only rank 0 prints and writes (see fastgpt/distributed.py), and holds the run
    directory's lock.
    """
    global _quiet
    config.validate()
    previous_backend = ops.set_backend(config.backend or None)
    ctx, device = distributed.SINGLE, None
    run = RunDir(Path(config.runs_dir) / config.name)
    try:
        if distributed.launched():
            ctx, device = distributed.setup(config.device, config.dist_timeout)
            _quiet = not ctx.is_main
        with StopSignals() as signals:
            if ctx.is_main:
                run.lock()
            summary = _Training(config, run, resume, signals, ctx, device).run(progress)
        if ctx.enabled:  # not after most errors: the barrier would wait for the others
            distributed.teardown(ctx, device)
        return summary
    except NonFiniteLoss as exc:  # every rank saw the same all-reduced loss and stops here
        if ctx.enabled:
            # The traceback's frames hold the run's DDP model, which holds the group: drop
            # them (and the cycles they sit in) so that leaving the group frees it.
            exc.with_traceback(None)
            gc.collect()
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
        run.unlock()
        _quiet = False
        ops.set_backend(previous_backend)


class _Training:
    """One call of train(): the setup phases in __init__, then run() (the loop)."""

    def __init__(self, config: TrainConfig, run: RunDir, resume: bool, signals: StopSignals,
                 ctx: distributed.Context, device: torch.device | None):
        self.config, self.run_dir, self.signals, self.ctx = config, run, signals, ctx
        checkpoint = self._open_run(resume)
        torch.manual_seed(config.seed)
        self.device = device or pick_device(config.device)
        self._load_data(checkpoint)
        self._build()
        self.progress = Progress()
        if checkpoint:
            self._restore(checkpoint)
        elif ctx.is_main:
            run.directory.mkdir(parents=True, exist_ok=True)
        self._describe()

    # --- setup -----------------------------------------------------------------------

    def _open_run(self, resume: bool) -> dict | None:
        """Refuse to overwrite a run, or load the one to resume; clear a killed run's
        temporaries. Returns the checkpoint to resume, or None."""
        run, config = self.run_dir, self.config
        checkpoint = None
        if resume:
            _check_resumable(run)
            checkpoint = load_checkpoint(run.last, log=log)
            for field in ARCHITECTURE_FIELDS + ("weight_decay_all",):
                if checkpoint["config"][field] != getattr(config, field):
                    raise FastGPTError(
                        f"{run.last} was trained with {field}={checkpoint['config'][field]}; "
                        f"it cannot resume with {field}={getattr(config, field)}")
        else:
            _check_new(run)
        if self.ctx.is_main:  # it holds the lock: no live process is writing these
            count, freed = run.remove_stale_temporaries()
            if count:
                log(f"removed {count} temporary file(s) ({freed / 1e6:.1f} MB) that an "
                    f"interrupted run left in {run.directory}")
        return checkpoint

    def _load_data(self, checkpoint: dict | None) -> None:
        """The corpus, its tokens (prepared once: rank 0 first) and the two splits."""
        config, ctx, device = self.config, self.ctx, self.device
        if not ctx.is_main:  # rank 0 downloads, tokenizes and caches first; the others read
            distributed.barrier(ctx, device)
        corpus_spec = config.corpus
        if checkpoint and corpus_spec == "auto":
            corpus_spec = checkpoint["corpus"]["name"]  # what "auto" chose when the run began
        corpus = load_corpus(corpus_spec, log=log)
        tokenizer = Tokenizer.from_json(checkpoint["tokenizer"]) if checkpoint else None
        if checkpoint and corpus.sha256 != checkpoint["corpus"]["sha256"]:
            raise FastGPTError(f"the corpus has changed since {self.run_dir.last} was written "
                               f"(sha256 {corpus.sha256[:12]}… now, "
                               f"{checkpoint['corpus']['sha256'][:12]}… then); cannot resume")
        data = prepare(corpus, config.vocab_size, config.data_dir or None, tokenizer, log=log)
        if ctx.is_main:
            distributed.barrier(ctx, device)
        mine = (corpus.sha256, data.tokenizer.sha256, len(data.train_ids))
        if any(tuple(theirs) != mine for theirs in distributed.all_gather(ctx, mine)):
            raise FastGPTError("the ranks do not see the same corpus and tokens: runs_dir and "
                               "the token cache (FASTGPT_CACHE or --data_dir) must be on a "
                               "filesystem that every machine shares")
        self.corpus, self.data, self.tokenizer = corpus, data, data.tokenizer
        self.datasets = {
            "train": NextTokenDataset(data.train_ids, config.context_length, "train"),
            "val": NextTokenDataset(data.val_ids, config.context_length, "val")}
        if len(self.datasets["train"]) < config.batch_size:
            raise FastGPTError(f"the train split has {len(self.datasets['train'])} windows, "
                               f"fewer than batch_size={config.batch_size}: use a larger "
                               f"corpus or a smaller batch")

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
        config, model, optimizer, ctx = self.config, self.model, self.optimizer, self.ctx
        try:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            reason = str(exc).strip().splitlines()[0][:200]
            raise FastGPTError(f"{self.run_dir.last} does not fit this run ({reason})") from None
        # The state is the checkpoint's; the hyperparameters are this run's config (which
        # may override them on resume).
        for group, decay in zip(optimizer.param_groups, param_groups(
                model, config.weight_decay, config.weight_decay_all)):
            group.update(betas=(config.beta1, config.beta2), eps=config.eps,
                         weight_decay=decay["weight_decay"])
        self.batches.load_state_dict(checkpoint["data_position"])
        self.progress = Progress.from_checkpoint(checkpoint)
        step = self.progress.step
        _restore_rng(checkpoint["rng"], ctx, self.device,
                     config.seed + ctx.rank + 1_000_003 * step)
        if ctx.is_main:
            _truncate_metrics(self.run_dir.metrics, step)
        log(f"resuming {self.run_dir.directory} at step {step}")

    def _describe(self) -> None:
        """config.json, and what is about to train on what."""
        config, ctx, corpus, device = self.config, self.ctx, self.corpus, self.device
        n_params = self.model.num_parameters()
        run_info = {"config": config.to_dict(), "corpus": corpus.name,
                    "corpus_sha256": corpus.sha256, "tokenizer_sha256": self.tokenizer.sha256,
                    "parameters": n_params, "device": str(device),
                    "world_size": ctx.world_size, "torch": torch.__version__}
        if ctx.is_main:
            write_atomic(self.run_dir.config, (json.dumps(run_info, indent=2) + "\n").encode())
        if ctx.enabled:
            log(f"data parallel over {ctx.world_size} ranks ({distributed.backend_for(device)}): "
                f"each takes {self.shares.accum} micro-batch(es) of {self.shares.micro_batch} "
                f"sequences per step")
        log(f"{n_params:,} parameters on {device}; corpus {corpus.name} "
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
            "rng": _rng_state(self.ctx, self.device),
            "data_position": self.batches.state_dict(),
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
        improved = losses["val"] < progress.best_val_loss
        progress.best_val_loss = min(progress.best_val_loss, losses["val"])
        progress.evals_since_best = 0 if improved else progress.evals_since_best + 1
        progress.eval_pending = False
        if self.ctx.is_main:
            _append_metrics(run.metrics, {
                "kind": "eval", "step": progress.step, "train_loss": losses["train"],
                "val_loss": losses["val"], "lr": lr_at(max(progress.step - 1, 0), config),
                "tokens_seen": progress.tokens_seen,
                "elapsed_s": round(time.perf_counter() - self.start_time, 3)}, sync=True)
            plot_losses(run.metrics, run.plot, config.vocab_size)
        self.save(improved)
        log(f"step {progress.step:>6}: train {losses['train']:.4f}, val {losses['val']:.4f}"
            + (" (best)" if improved else ""))
        return losses

    # --- the loop ----------------------------------------------------------------------

    def run(self, show_bar: bool | None) -> dict:
        config, ctx, progress = self.config, self.ctx, self.progress
        self.start_time = time.perf_counter()
        self.last_eval_s: float | None = None
        losses: dict[str, float] = {}
        stopped = None
        if progress.eval_pending:  # step 0's, or one that a stop cut short before the resume
            log(f"step {progress.step:>6}: estimating the loss on {config.eval_batches} "
                f"batches of each split")
            losses = self.evaluate()
            if losses is None:
                stopped = self._stop()
        elif progress.step >= config.max_steps:
            log(f"{self.run_dir.directory} already reached max_steps={config.max_steps}; "
                f"pass a larger --max_steps with --resume to train further")
        tokens_per_step = config.batch_size * config.grad_accum * config.context_length
        bar = tqdm(total=config.max_steps, initial=progress.step, unit="step", dynamic_ncols=True,
                   disable=(None if show_bar is None else not show_bar) if ctx.is_main else True)
        timer = _StepTimer()
        with bar:
            while stopped is None and progress.step < config.max_steps:
                lr = lr_at(progress.step, config)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                step_started = time.perf_counter()
                step_loss = train_step(self.trained, self.optimizer, self.shares, self.device,
                                       self.shares.accum, config.bf16)
                if config.compile and timer.steps == 0:
                    log(f"torch.compile: the first step, which compiles the forward, loss "
                        f"and backward, took {time.perf_counter() - step_started:.1f} s")
                progress.step += 1
                progress.tokens_seen += tokens_per_step
                progress.eval_pending = (progress.step % config.eval_interval == 0
                                         or progress.step == config.max_steps)
                timer.stepped()
                bar.update(1)

                log_now = progress.step % config.log_interval == 0 or progress.step == config.max_steps
                stop_requested = self.stop_requested()
                if log_now or stop_requested:  # not every step: .item() waits for the GPU
                    value = distributed.all_reduce_sum(ctx, step_loss.float()).item() / ctx.world_size
                    if not math.isfinite(value):
                        raise NonFiniteLoss(f"training loss is {value} at step {progress.step}; "
                                            f"stopped. " + _last_good(self.run_dir.last))
                if log_now:
                    self._log_train(value, lr, timer, bar, tokens_per_step)
                if stop_requested:
                    stopped = self._stop()
                elif progress.eval_pending:
                    eval_started = time.perf_counter()
                    losses = self.evaluate()
                    timer.paused(time.perf_counter() - eval_started)  # tokens/s: training only
                    if losses is None:
                        stopped = self._stop()
                    elif config.patience and progress.evals_since_best >= config.patience:
                        stopped = "early_stop"
                        log(f"early stop: val loss has not improved for {config.patience} evals")

        stopped = stopped or "max_steps"
        summary = {"step": progress.step, "train_loss": losses.get("train") if losses else None,
                   "val_loss": losses.get("val") if losses else None,
                   "best_val_loss": progress.best_val_loss,
                   "run_dir": str(self.run_dir.directory), "stopped": stopped}
        if stopped in ("max_steps", "early_stop") and losses:
            log(f"done at step {progress.step}: train {losses['train']:.4f}, val "
                f"{losses['val']:.4f} (ln {config.vocab_size} = "
                f"{math.log(config.vocab_size):.4f}), best val {progress.best_val_loss:.4f}; "
                f"{time.perf_counter() - self.start_time:.0f} s; outputs in {self.run_dir.directory}/")
        return summary

    def _stop(self) -> str:
        """Save last.pt for a stop request (an eval due now stays pending) and say so."""
        stopped = self.signals.received or "a signal to another rank"
        self.save()
        config = self.config
        log(f"stopped by {stopped} at step {self.progress.step}; checkpoint saved to "
            f"{self.run_dir.last}. Resume with: fastgpt train --name {config.name} "
            f"--runs_dir {config.runs_dir} --resume")
        return stopped

    def _log_train(self, loss: float, lr: float, timer: "_StepTimer", bar: tqdm,
                   tokens_per_step: int) -> None:
        """The train record of a log step, the progress line or bar, and once, early on,
        how long the run will take."""
        config, progress = self.config, self.progress
        tokens_per_s = timer.window_steps * tokens_per_step / timer.take_window()
        if self.ctx.is_main:
            _append_metrics(self.run_dir.metrics, {
                "kind": "train", "step": progress.step, "loss": loss, "lr": lr,
                "tokens_per_s": round(tokens_per_s, 1)})
        if bar.disable:  # no bar (not a terminal): a line instead
            log(f"step {progress.step:>6}: loss {loss:.4f}, {tokens_per_s:,.0f} tokens/s")
        else:
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
        step_s = timer.seconds_per_step()
        if step_s is not None and not getattr(self, "_eta_said", False):
            self._eta_said = True
            log(eta_line(progress.step, config, step_s, self.last_eval_s, self.device))


class _StepTimer:
    """Seconds per training step, evals excluded: the first step of a process (warm-up)
    is not timed. Measured at log steps, where .item() has waited for the device."""

    def __init__(self):
        self.steps = 0  # steps since the process started training
        self.timed_from: float | None = None
        self.timed_steps, self.timed_s = 0, 0.0
        self.window_start, self.window_steps = time.perf_counter(), 0

    def stepped(self) -> None:
        now = time.perf_counter()
        self.steps += 1
        self.window_steps += 1
        if self.steps == 1:
            self.timed_from = now
        else:
            self.timed_steps += 1

    def paused(self, seconds: float) -> None:
        """An eval took `seconds`: not training time."""
        self.window_start += seconds
        if self.timed_from is not None:
            self.timed_from += seconds

    def take_window(self) -> float:
        """Seconds since the last log step (training only); starts the next window."""
        now = time.perf_counter()
        elapsed = max(now - self.window_start, 1e-9)
        self.window_start, self.window_steps = now, 0
        return elapsed

    def seconds_per_step(self) -> float | None:
        """After at least two timed steps; else None."""
        if self.timed_steps < 2:
            return None
        return (time.perf_counter() - self.timed_from) / self.timed_steps


def eta_line(step: int, config: TrainConfig, step_s: float, eval_s: float | None,
             device: torch.device) -> str:
    """One line: how long until max_steps at step_s seconds per step, evals included (eval_s
    measured, else estimated as a forward pass, a third of a step, per eval batch); on a
    CPU, when that is hours, the hint to the small preset."""
    remaining = max(config.max_steps - step, 0)
    evals = config.max_steps // config.eval_interval - step // config.eval_interval
    evals += 1 if config.max_steps % config.eval_interval else 0
    if eval_s is None:
        eval_s = 2 * config.eval_batches * step_s / (3 * config.grad_accum)
    total = remaining * step_s + evals * eval_s
    line = (f"{step_s:.3g} s/step: about {_duration(total)} to max_steps={config.max_steps} "
            f"({remaining} steps and {evals} eval(s) of ~{_duration(eval_s)})")
    if device.type == "cpu" and total > 3600:
        line += ("; on a CPU this model trains for hours: `--preset cpu` trains a smaller "
                 "one in minutes")
    return line


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 120:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"


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
