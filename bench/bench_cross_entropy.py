"""Forward+backward time and peak memory of fastgpt's fused cross-entropy against PyTorch.

    python bench/bench_cross_entropy.py [--out results.json] [--reps 20]

Rows: N = 8192 (the chapter's 32 x 256 batch), V in {512, 32768, 131072}, fp32 and bf16.
Columns, each the median of --reps timed runs after warm-up (CUDA events on a GPU):
  fused     fastgpt.ops.cross_entropy(backend="fused") (the Triton kernel)
  eager     torch.nn.functional.cross_entropy
  compiled  torch.compile(torch.nn.functional.cross_entropy)
  reference fastgpt's pure-PyTorch reference (log-softmax + gather)
Peak memory is what the forward+backward allocates beyond its inputs (logits, targets).
Without a GPU it says so and times the reference and eager torch on the CPU, at the
shapes that fit in a few seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source tree
from fastgpt import ops  # noqa: E402
from fastgpt.ops import reference  # noqa: E402
from harness import (  # noqa: E402  (bench/harness.py)
    Column, Table, benchmark_parser, card_of, device_for, run_benchmarks)
from timing import cuda_median_ms_and_peak, median_ms  # noqa: E402  (bench/timing.py)

N = 8192


def measure(fn, logits: torch.Tensor, targets: torch.Tensor, warmup: int, reps: int
            ) -> tuple[float, int | None]:
    """(median ms of forward+backward, peak bytes allocated beyond the inputs or None)."""
    def step():
        x = logits.detach().requires_grad_()
        fn(x, targets).backward()

    if not logits.is_cuda:
        return median_ms(step, reps, warmup, cuda=False), None
    return cuda_median_ms_and_peak(step, reps, warmup)


def main() -> int:
    parser = benchmark_parser(__doc__, reps=20, warmup=5)
    parser.add_argument("--vocabs", type=int, nargs="+",
                        help="V values (default: 512 32768 131072; on a CPU 512 32768)")
    args = parser.parse_args()

    device = device_for("cross_entropy")
    if device is None:
        return 1
    cuda = device.type == "cuda"
    if cuda:
        vocabs, reps = args.vocabs or (512, 32768, 131072), args.reps
        variants = {
            "fused": lambda x, t: ops.cross_entropy(x, t, backend="fused"),
            "eager": F.cross_entropy,
            "compiled": torch.compile(F.cross_entropy),
            "reference": reference.cross_entropy,
        }
    else:
        print("no CUDA GPU: timing the reference and eager torch on the CPU only")
        vocabs, reps = args.vocabs or (512, 32768), min(args.reps, 3)
        variants = {"eager": F.cross_entropy, "reference": reference.cross_entropy}

    def measure_case(case: dict) -> dict:
        generator = torch.Generator().manual_seed(case["V"])
        dtype = getattr(torch, case["dtype"])
        logits = torch.randn(N, case["V"], generator=generator).to(device=device, dtype=dtype)
        targets = torch.randint(0, case["V"], (N,), generator=generator).to(device)
        row = {"dtype": case["dtype"], "N": N, "V": case["V"]}
        for name, fn in variants.items():
            ms, peak = measure(fn, logits, targets, min(args.warmup, reps), reps)
            row[f"{name}_ms"], row[f"{name}_peak_bytes"] = ms, peak
        return row

    columns = [Column("dtype", "dtype", width=9, left=True), Column("V", "V", width=7)]
    columns += [Column(f"{name} ms", f"{name}_ms", ".3f", width=13) for name in variants]
    if cuda:
        columns += [Column(f"{name} MiB", lambda r, name=name: r[f"{name}_peak_bytes"] / 2**20,
                           ".1f", width=13) for name in variants]
        columns.append(Column("vs eager", lambda r: f"{r['eager_ms'] / r['fused_ms']:.2f}x",
                              width=9))
    cases = [{"dtype": dtype, "V": vocab} for dtype in ("float32", "bfloat16")
             for vocab in vocabs]
    return run_benchmarks("cross_entropy", f"cross-entropy forward+backward, N = {N},",
                          card_of(device), reps, cases, measure_case, Table(columns), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
