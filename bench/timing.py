"""What every benchmark here shares: median timings after warm-up (CUDA events on a GPU,
a wall clock on a CPU), the JSON result file, and the loss tolerance of the training
benchmarks."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

# How far a variant's val loss may end from the reference's (relative) in bench_train.py
# and quality.py: "learns as well" is within 1%.
LOSS_TOLERANCE = 0.01


def time_ms(step: Callable[[], object], cuda: bool) -> float:
    """Milliseconds of one `step()`: CUDA events around it on a GPU, a clock on a CPU."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3


def median_ms(step: Callable[[], object], reps: int, warmup: int, cuda: bool) -> float:
    """Median milliseconds of `step()` over `reps` runs after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    return statistics.median(time_ms(step, cuda) for _ in range(reps))


def write_result(path: str | None, benchmark: str, device: str, reps: int, rows: list) -> None:
    """Write the rows with the card and versions to `path` (nothing if path is None)."""
    if not path:
        return
    result = {"benchmark": benchmark, "device": device, "torch": torch.__version__,
              "cuda": torch.version.cuda, "reps": reps, "rows": rows}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
