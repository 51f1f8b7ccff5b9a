"""What every benchmark here measures with: median timings after warm-up (CUDA events on a
GPU, a wall clock on a CPU), peak memory, and the loss tolerance of the training
benchmarks. (The loop, the table and the result file: bench/harness.py.)"""

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


def cuda_median_ms_and_peak(step: Callable[[], object], reps: int, warmup: int
                            ) -> tuple[float, int]:
    """(median ms of `step()` by CUDA events, peak bytes it allocates beyond what is
    allocated before it). A first untimed call allocates and compiles: it is kept out of
    the peak."""
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ms = median_ms(step, reps, warmup, cuda=True)
    return ms, torch.cuda.max_memory_allocated() - base


def cpu_memory(step: Callable[[], object]) -> tuple[int, int]:
    """(peak bytes allocated beyond what existed before, largest single allocation) of one
    `step()` on the CPU: every allocation and free that torch makes (inside custom ops and
    Triton's interpreter launches too; not NumPy's own arrays), in order, from the memory
    events of torch.profiler's trace."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    changes = sorted((e["args"]["Ev Idx"], e["args"]["Bytes"]) for e in events
                     if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0)
    now = peak = largest = 0
    for _, change in changes:
        now += change
        peak, largest = max(peak, now), max(largest, change)
    return peak, largest
