"""Where a run stands (Progress), the stop signals that end it early (StopSignals), and what
a newcomer watches (ProgressReport): the bar or a line per log step, tokens per second,
and how long the run will take (eta_line)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tqdm import tqdm

from fastgpt.config import TrainConfig

if TYPE_CHECKING:
    import torch

    from fastgpt.metrics import MFU

Log = Callable[[str], None]


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

    def evaluated(self, val_loss: float) -> bool:
        """Record the eval due at `step`; whether its val loss is the best so far."""
        improved = val_loss < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, val_loss)
        self.evals_since_best = 0 if improved else self.evals_since_best + 1
        self.eval_pending = False
        return improved

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> "Progress":
        # eval_pending is absent from checkpoints of fastgpt before it could cut an eval short
        return cls(checkpoint["step"], checkpoint["tokens_seen"], checkpoint["best_val_loss"],
                   checkpoint["evals_since_best"], checkpoint.get("eval_pending", False))


class StopSignals:
    """While active, SIGINT and SIGTERM ask the loop to stop after the current step or
    eval batch (`received` names the first; `log` says so). A second signal stops at once
    (KeyboardInterrupt)."""

    def __init__(self, log: Log):
        self.received: str | None = None
        self.log = log
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.received:  # e.g. a second Ctrl-C, or torchrun's SIGTERM after Ctrl-C
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        self.log(f"{self.received} received: stopping after this step or eval batch and "
                 f"saving a checkpoint (press Ctrl-C again to stop at once)")

    def __enter__(self) -> "StopSignals":
        with contextlib.suppress(ValueError):  # signals can only be caught in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class ProgressReport:
    """The tqdm bar (show None: only on a terminal; elsewhere a line per log step), the
    tokens per second of each log step (and its MFU, where `mfu` knows the GPU's peak), and
    once, early on, how long the run will take."""

    def __init__(self, config: TrainConfig, step: int, device: torch.device, log: Log,
                 show: bool | None, mfu: MFU | None = None):
        self.config, self.device, self.log, self.mfu = config, device, log, mfu
        self.bar = tqdm(total=config.max_steps, initial=step, unit="step", dynamic_ncols=True,
                        disable=None if show is None else not show)
        self.timer = StepTimer()
        self.tokens_per_step = config.batch_size * config.grad_accum * config.context_length
        self._eta_said = False

    def __enter__(self) -> "ProgressReport":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def stepped(self) -> None:
        self.timer.stepped()
        self.bar.update(1)

    def logged(self, step: int, loss: float, eval_s: float | None) -> dict[str, float]:
        """A log step's loss shown (eval_s: the last eval's seconds, if any); returns the
        train record's rates since the last log step: tokens_per_s, and mfu where known."""
        tokens_per_s = self.timer.window_steps * self.tokens_per_step / self.timer.take_window()
        rates = {"tokens_per_s": round(tokens_per_s, 1)}
        mfu = None if self.mfu is None else self.mfu(tokens_per_s)
        if mfu is not None:
            rates["mfu"] = round(mfu, 4)
        if self.bar.disable:  # no bar (not a terminal): a line instead
            self.log(f"step {step:>6}: loss {loss:.4f}, {tokens_per_s:,.0f} tokens/s"
                     + ("" if mfu is None else f", MFU {mfu:.1%}"))
        else:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}",
                                 **({} if mfu is None else {"MFU": f"{mfu:.1%}"}))
        step_s = self.timer.seconds_per_step()
        if step_s is not None and not self._eta_said:
            self._eta_said = True
            self.log(eta_line(step, self.config, step_s, eval_s, self.device))
        return rates


class StepTimer:
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


HOURS_ON_A_CPU_S = 3600  # a CPU run longer than this is told of `--preset cpu`


def hours_on_a_cpu(step: int, config: TrainConfig, step_s: float,
                   device: torch.device) -> str | None:
    """Before the first eval on a CPU, with step_s timed from one forward and backward:
    the eta_line when the run would take hours, else None."""
    if time_to_max_steps(step, config, step_s)[0] <= HOURS_ON_A_CPU_S:
        return None
    return ("timed by one forward and backward on this CPU: "
            + eta_line(step, config, step_s, None, device))


def time_to_max_steps(step: int, config: TrainConfig, step_s: float,
                      eval_s: float | None = None) -> tuple[float, int, float]:
    """(seconds, evals, seconds per eval) until max_steps at step_s seconds per step, evals
    included (eval_s measured, else estimated as a forward pass, a third of a step, per
    eval batch)."""
    evals = config.max_steps // config.eval_interval - step // config.eval_interval
    evals += 1 if config.max_steps % config.eval_interval else 0
    if eval_s is None:
        eval_s = 2 * config.eval_batches * step_s / (3 * config.grad_accum)
    return max(config.max_steps - step, 0) * step_s + evals * eval_s, evals, eval_s


def eta_line(step: int, config: TrainConfig, step_s: float, eval_s: float | None,
             device: torch.device) -> str:
    """One line: how long until max_steps (see time_to_max_steps); on a CPU, when that is
    hours, the hint to the small preset."""
    total, evals, eval_s = time_to_max_steps(step, config, step_s, eval_s)
    line = (f"{step_s:.3g} s/step: about {_duration(total)} to max_steps={config.max_steps} "
            f"({max(config.max_steps - step, 0)} steps and {evals} eval(s) of "
            f"~{_duration(eval_s)})")
    if device.type == "cpu" and total > HOURS_ON_A_CPU_S:
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


class ByteProgress:
    """A pass over `total` bytes (a corpus being prepared): a tqdm bar with MB/s and an ETA
    on a terminal, elsewhere a line every LINE_EVERY_S seconds. reached(n): n bytes done."""

    LINE_EVERY_S = 60.0

    def __init__(self, what: str, total: int, log: Log):
        self.what, self.total, self.log = what, total, log
        self.bar = tqdm(total=total, desc=what, unit="B", unit_scale=True, unit_divisor=1000,
                        dynamic_ncols=True, disable=None)
        self.started = self.last_line = time.perf_counter()
        self.done = 0

    def __enter__(self) -> "ByteProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def reached(self, done: int) -> None:
        self.bar.update(done - self.done)
        self.done = done
        now = time.perf_counter()
        if self.bar.disable and now - self.last_line >= self.LINE_EVERY_S:
            self.last_line = now
            rate = done / max(now - self.started, 1e-9)
            left = (self.total - done) / rate if rate > 0 else math.inf
            self.log(f"{self.what}: {done / 1e6:,.0f} of {self.total / 1e6:,.0f} MB "
                     f"({rate / 1e6:.2f} MB/s), about {_duration(left)} to go")
