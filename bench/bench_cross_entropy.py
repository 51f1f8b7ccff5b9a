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

import argparse
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source tree
from fastgpt import ops  # noqa: E402
from fastgpt.ops import reference  # noqa: E402
from timing import cuda_median_ms_and_peak, median_ms, write_result  # noqa: E402

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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON file for the results")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--vocabs", type=int, nargs="+",
                        help="V values (default: 512 32768 131072; on a CPU 512 32768)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    card = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or 'unknown'})"
    if cuda:
        ok, why = ops.available()["cross_entropy"]
        if not ok:
            print(f"the fused kernel cannot run: {why}", file=sys.stderr)
            return 1
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

    print(f"cross-entropy forward+backward, N = {N}, on {card}; torch {torch.__version__}")
    header = f"{'dtype':<9} {'V':>7} " + " ".join(f"{name + ' ms':>13}" for name in variants)
    if cuda:
        header += " " + " ".join(f"{name + ' MiB':>13}" for name in variants)
        header += f" {'vs eager':>9}"
    print(header)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for vocab in vocabs:
            generator = torch.Generator().manual_seed(vocab)
            logits = torch.randn(N, vocab, generator=generator).to(device=device, dtype=dtype)
            targets = torch.randint(0, vocab, (N,), generator=generator).to(device)
            row = {"dtype": str(dtype).replace("torch.", ""), "N": N, "V": vocab}
            for name, fn in variants.items():
                ms, peak = measure(fn, logits, targets, min(args.warmup, reps), reps)
                row[f"{name}_ms"], row[f"{name}_peak_bytes"] = ms, peak
            line = f"{row['dtype']:<9} {vocab:>7} " + " ".join(
                f"{row[f'{name}_ms']:>13.3f}" for name in variants)
            if cuda:
                line += " " + " ".join(f"{row[f'{name}_peak_bytes'] / 2**20:>13.1f}"
                                       for name in variants)
                line += f" {row['eager_ms'] / row['fused_ms']:>8.2f}x"
            print(line)
            rows.append(row)
            del logits
    write_result(args.out, "cross_entropy", card, reps, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
