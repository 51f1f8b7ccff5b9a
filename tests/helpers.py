"""Shared test helpers: a tiny config that trains in a second on a CPU."""

import os
import sys
from pathlib import Path

import pytest
import torch

from fastgpt.checkpoint import load_checkpoint
from fastgpt.config import TrainConfig, make_config
from fastgpt.metrics import read_metrics

def gpu(test):
    """A test that needs a CUDA GPU: skipped without one, marked `gpu` (bench/gpu_check.sh
    --full runs every one; its quick stage those also marked `gpu_quick`)."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    return pytest.mark.gpu(skip(test))


quick = pytest.mark.gpu_quick


def require_or_skip(reason: str) -> None:
    """For a test that cannot run because a kernel toolchain is missing here (Triton, the
    CUDA headers, nvcc): a skip on a developer's machine, a failure where
    FASTGPT_REQUIRE_KERNELS=1 (CI, which has them all: there a missing one is a broken
    environment, and skipping would quietly test less). Not for a missing GPU: GPU tests
    skip everywhere without one."""
    if os.environ.get("FASTGPT_REQUIRE_KERNELS") == "1":
        pytest.fail(f"{reason} (FASTGPT_REQUIRE_KERNELS=1: this run must have every kernel "
                    f"toolchain)", pytrace=False)
    pytest.skip(reason)


TINY = dict(context_length=16, d_model=32, num_heads=2, num_layers=2, dropout=0.1,
            batch_size=8, lr=3e-3, max_steps=6, eval_interval=3, eval_batches=2,
            log_interval=1, vocab_size=512)


def tiny_config(runs_dir: Path, corpus: Path, **overrides) -> TrainConfig:
    """dropout stays on, so resume tests also prove the RNG state is restored."""
    return make_config("cpu", {"corpus": str(corpus), "runs_dir": str(runs_dir), "name": "tiny",
                               **TINY, **overrides})


def tiny_cli_args(runs_dir: Path, corpus: Path, **overrides) -> list[str]:
    values = {"corpus": str(corpus), "runs_dir": str(runs_dir), "name": "tiny", **TINY, **overrides}
    args = ["--preset", "cpu"]
    for field, value in values.items():
        args += [f"--{field}", str(value)]
    return args


TIMINGS = ("elapsed_s", "tokens_per_s", "mfu")  # the only fields two runs may differ in


def every_record(run_dir: Path) -> list[dict]:
    """metrics.jsonl, every field of every record but the wall-clock ones."""
    return [{k: v for k, v in r.items() if k not in TIMINGS}
            for r in read_metrics(run_dir / "metrics.jsonl")]


PROGRESS = ("step", "best_val_loss", "evals_since_best", "tokens_seen", "eval_pending")
LOSSES = ("loss", "train_loss", "val_loss", "best_val_loss")


def assert_same_run(resumed: Path, whole: Path, loss_rtol: float = 0.0) -> None:
    """A resumed run is the uninterrupted one: every metrics field, last.pt's and best.pt's
    progress (step, best val loss, evals since best, tokens seen) and weights, all exactly.
    With loss_rtol > 0 (runs whose sums go in another order, e.g. over another number of
    ranks) the losses agree within it and the weights are not compared; the rest is exact."""
    def compare(got: dict, expected: dict, where) -> None:
        if loss_rtol == 0:
            assert got == expected, where
            return
        assert got.keys() == expected.keys(), where
        for key in got:
            if key in LOSSES:
                assert got[key] == pytest.approx(expected[key], rel=loss_rtol), (where, key)
            else:
                assert got[key] == expected[key], (where, key)

    mine, want = every_record(resumed), every_record(whole)
    assert len(mine) == len(want)
    for got, expected in zip(mine, want):
        compare(got, expected, ("metrics.jsonl", expected))
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(resumed / name), load_checkpoint(whole / name)
        compare({k: a.get(k) for k in PROGRESS}, {k: b.get(k) for k in PROGRESS}, name)
        if loss_rtol == 0:
            assert a["model"].keys() == b["model"].keys()
            assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), name


FASTGPT_SOURCES = str(Path(__file__).resolve().parent.parent / "fastgpt")
HOST_READS = {"item", "__bool__", "tolist", "__float__", "__int__", "__index__", "numpy"}


class HostReads(torch.overrides.TorchFunctionMode):
    """Records every read of a tensor's value into Python (.item(), bool(t), float(t),
    .tolist(), ...) made by fastgpt's own code while active: on a GPU each is a device sync.
    Tensors in `allowed` (host-side bookkeeping, e.g. the optimizer's CPU step counts) are
    not recorded; reads made by other code (Triton's interpreter, torch) are not either."""

    def __init__(self, allowed=()):
        super().__init__()
        self.allowed = {id(t) for t in allowed}
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS and args and id(args[0]) not in self.allowed:
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(FASTGPT_SOURCES):
                self.reads.append(f"{name} at {caller.f_code.co_filename}:{caller.f_lineno}")
        return func(*args, **(kwargs or {}))


class Lines(list):
    """A `log` callable that collects the lines."""

    def __call__(self, line: str) -> None:
        assert isinstance(line, str)
        self.append(line)

    def mentions(self, word: str) -> bool:
        return any(word in line for line in self)
