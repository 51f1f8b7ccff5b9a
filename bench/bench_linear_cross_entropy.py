"""Forward+backward time and peak memory of the loss from the hidden states: fastgpt's fused
linear + cross-entropy against torch's linear + F.cross_entropy.

    python bench/bench_linear_cross_entropy.py [--out results.json] [--reps 10]
        [--rows 4096 8192 16384] [--vocabs 512 50257 128256]

bf16, d = 768 (GPT-2 small's width), with lm_head's bias. Columns, each the median of
--reps timed runs after warm-up (CUDA events on a GPU), and the peak memory allocated
beyond the inputs (hidden, weight, bias, targets; the gradients are in it, the same for
every variant):
  v1        fastgpt.ops.linear_cross_entropy(backend="fused"): version 1, chunked (the
            rows in chunks, the Triton cross-entropy kernel on each chunk's logits)
  v2        version 2, no logits in global memory (linear_cross_entropy_v2.LinearCrossEntropyV2:
            logit tiles on chip, the backward recomputes them and skips negligible tiles;
            the JSON counts the skips). The op ships v2 only if it beats v1 here: peak
            memory lower at equal or better time
  eager     F.cross_entropy(F.linear(hidden, weight, bias), targets)
  compiled  torch.compile of the same
  liger     Liger-Kernel's fused linear cross-entropy, where it is installed (it is not a
            dependency)
The issue's targets (H100, N = 8192, V = 50,257): v1's peak at most 1/4 of eager's, its
time at most 1.1x compiled's; the table says whether each row meets them.

Without a GPU: one small case on the CPU (N = 1024, d = 64, V = 8192, the Triton kernel
through its interpreter; v1 and eager) that checks the memory claim from torch.profiler's allocation
events (bench/timing.py cpu_memory): v1's peak at most 1/4 of eager's, and no allocation
as large as the logits. Exits 1 if it does not hold.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before fastgpt's kernels are imported
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source tree
from fastgpt import ops  # noqa: E402
from fastgpt.ops.experimental import linear_cross_entropy_v2  # noqa: E402
from harness import (  # noqa: E402  (bench/harness.py)
    Column, Table, benchmark_parser, card_of, run_benchmarks)
from timing import cpu_memory, cuda_median_ms_and_peak, median_ms  # noqa: E402  (bench/timing.py)

D = 768
MEMORY_TARGET = 0.25   # v1's peak over eager's, at most
TIME_TARGET = 1.1      # v1's time over compiled's, at most
CPU_CASE = (1024, 64, 8192)  # N, d, V


def composition(hidden, weight, targets, bias):
    return F.cross_entropy(F.linear(hidden, weight, bias), targets)


def liger_variant():
    """Liger-Kernel's fused linear cross-entropy, or None where it is not installed."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception:
        return None
    return lambda hidden, weight, targets, bias: liger_fused_linear_cross_entropy(
        hidden, weight, targets, bias)


def variants(cuda: bool) -> dict:
    found = {"v1": lambda h, w, t, b: ops.linear_cross_entropy(h, w, t, b, backend="fused")}
    if cuda:  # (through the interpreter version 2 takes ~20 s a step at the CPU case)
        found["v2"] = lambda h, w, t, b: linear_cross_entropy_v2.LinearCrossEntropyV2.apply(
            h, w, b, t, -100, "mean", 0.0, True)
    found["eager"] = composition
    if cuda:
        found["compiled"] = torch.compile(composition)
        liger = liger_variant()
        if liger is not None:
            found["liger"] = liger
    return found


def make_inputs(n: int, d: int, vocab: int, device: torch.device, dtype=torch.bfloat16):
    generator = torch.Generator().manual_seed(n + vocab)
    hidden = torch.randn(n, d, generator=generator).to(device=device, dtype=dtype)
    weight = (torch.randn(vocab, d, generator=generator) / d ** 0.5).to(device=device, dtype=dtype)
    bias = torch.zeros(vocab).to(device=device, dtype=dtype)
    targets = torch.randint(0, vocab, (n,), generator=generator).to(device)
    return hidden, weight, bias, targets


def step_of(fn, hidden, weight, bias, targets):
    """One forward+backward on fresh leaves (their gradients freed when it returns)."""
    def step():
        leaves = [t.detach().requires_grad_() for t in (hidden, weight, bias)]
        fn(leaves[0], leaves[1], targets, leaves[2]).backward()
    return step


def measure_cuda(fn, inputs, warmup: int, reps: int) -> tuple[float | None, int | None]:
    """(median ms, peak bytes beyond the inputs), or (None, None) when it runs out of memory."""
    try:
        return cuda_median_ms_and_peak(step_of(fn, *inputs), reps, warmup)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None


def measure_cuda_case(found: dict, args, case: dict) -> dict:
    """The row of one (N, V) at d = D on the GPU: every variant's time and peak, v1's
    ratios and whether they meet the targets, version 2's skipped tiles."""
    n, vocab = case["N"], case["V"]
    inputs = make_inputs(n, D, vocab, torch.device("cuda"))
    row = {"dtype": "bfloat16", "N": n, "d": D, "V": vocab}
    for name, fn in found.items():
        row[f"{name}_ms"], row[f"{name}_peak_bytes"] = measure_cuda(fn, inputs, args.warmup,
                                                                    args.reps)
    del inputs
    torch.cuda.empty_cache()
    memory = (row["v1_peak_bytes"] / row["eager_peak_bytes"]
              if row["v1_peak_bytes"] and row["eager_peak_bytes"] else None)
    time = row["v1_ms"] / row["compiled_ms"] if row["v1_ms"] and row["compiled_ms"] else None
    row["v1_memory_vs_eager"], row["v1_time_vs_compiled"] = memory, time
    row["v2_skipped_tiles"] = int(linear_cross_entropy_v2.LinearCrossEntropyV2.skipped_tiles)
    row["v2_tiles"] = (-(-n // linear_cross_entropy_v2.V2_BLOCKS[0])
                       * -(-vocab // linear_cross_entropy_v2.V2_BLOCKS[1]))
    row["meets_targets"] = (memory is not None and time is not None
                            and memory <= MEMORY_TARGET and time <= TIME_TARGET)
    return row


def cuda_table(found: dict) -> Table:
    def mib(name):
        return lambda r: r[f"{name}_peak_bytes"] and r[f"{name}_peak_bytes"] / 2**20
    return Table([Column("N", "N", width=6), Column("V", "V", width=7)]
                 + [Column(f"{name} ms", f"{name}_ms", ".3f", missing="oom") for name in found]
                 + [Column(f"{name} MiB", mib(name), ".1f", missing="oom") for name in found]
                 + [Column("mem/eager", "v1_memory_vs_eager", ".3f", width=9, missing="oom"),
                    Column("time/comp", "v1_time_vs_compiled", ".3f", width=9, missing="oom")])


def measure_cpu_case(reps: int, failures: list[str], case: dict) -> dict:
    """The memory claim on one small case on the CPU: v1 and eager, their time, peak and
    largest allocation (from torch.profiler); a failure where it does not hold."""
    n, d, vocab = case["N"], case["d"], case["V"]
    inputs = make_inputs(n, d, vocab, torch.device("cpu"))
    row = {"dtype": "bfloat16", "N": n, "d": d, "V": vocab}
    for name, fn in variants(cuda=False).items():
        step = step_of(fn, *inputs)
        row[f"{name}_ms"] = median_ms(step, reps=reps, warmup=1, cuda=False)
        row[f"{name}_peak_bytes"], row[f"{name}_largest_bytes"] = cpu_memory(step)
        print(f"{name:<6} {row[f'{name}_ms']:>9.1f} ms  peak {row[f'{name}_peak_bytes'] / 2**20:7.2f} "
              f"MiB  largest allocation {row[f'{name}_largest_bytes'] / 2**20:7.2f} MiB")
    logits_bytes = n * vocab * 2
    row["v1_memory_vs_eager"] = row["v1_peak_bytes"] / row["eager_peak_bytes"]
    row["meets_targets"] = (row["v1_memory_vs_eager"] <= MEMORY_TARGET
                            and row["v1_largest_bytes"] < logits_bytes)
    claim = (f"v1's peak is {row['v1_memory_vs_eager']:.3f} of eager's (target <= "
             f"{MEMORY_TARGET}); its largest allocation {row['v1_largest_bytes'] / 2**20:.2f} "
             f"MiB against the logits' {logits_bytes / 2**20:.2f} MiB")
    print(f"{claim}: {'holds' if row['meets_targets'] else 'DOES NOT HOLD'}")
    if not row["meets_targets"]:
        failures.append(f"the memory claim does not hold: {claim}")
    return row


def main() -> int:
    parser = benchmark_parser(__doc__, reps=10, warmup=3)
    parser.add_argument("--rows", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[512, 50257, 128256])
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    n, d, vocab = CPU_CASE
    if not cuda:
        print(f"no CUDA GPU: the memory claim on one small case on the CPU, N = {n}, d = {d}, "
              f"V = {vocab}, bf16 (the Triton kernel through its interpreter; times are not "
              f"a GPU's)")
    ok, why = ops.available()["linear_cross_entropy"]  # on a CPU too: the interpreter runs it
    if not ok:
        print(f"the fused linear_cross_entropy cannot run here: {why}", file=sys.stderr)
        return 1
    card = card_of(torch.device("cuda" if cuda else "cpu"))
    if cuda:
        found = variants(cuda=True)
        cases = [{"N": rows, "V": v} for rows in args.rows for v in args.vocabs]
        return run_benchmarks("linear_cross_entropy", f"linear + cross-entropy forward+backward, "
                              f"bf16, d = {D},", card, args.reps, cases,
                              functools.partial(measure_cuda_case, found, args), cuda_table(found),
                              args.out)
    failures, reps = [], min(args.reps, 3)
    return run_benchmarks("linear_cross_entropy", "linear + cross-entropy forward+backward, "
                          "bf16, the memory claim,", card, reps, [{"N": n, "d": d, "V": vocab}],
                          functools.partial(measure_cpu_case, reps, failures), None, args.out,
                          failures)


if __name__ == "__main__":
    raise SystemExit(main())
