"""One AdamW step: fastgpt's fused CUDA step against torch's AdamW implementations.

    python bench/bench_adamw.py [--out results.json] [--reps 50]

Parameter sets: the seed GPT's (11.1M in 84 tensors) and a GPT-2-small-sized one (124M in
the same layout at d_model 768, 12 layers, vocab 50257, context 1024). Variants, without
and with gradient clipping to norm 1.0:
  fastgpt     fastgpt.optim.AdamW(backend="fused") (max_grad_norm inside the step)
  for-loop    torch.optim.AdamW(foreach=False)    (clip_grad_norm_ first when clipping)
  foreach     torch.optim.AdamW(foreach=True)
  fused       torch.optim.AdamW(fused=True)
Median of --reps CUDA-event timings after warm-up; bandwidth counts the bytes that must
move in fp32: read p, g, m, v and write p, m, v (28 bytes a parameter). Without a GPU it
says so and times fastgpt's reference step and torch's for-loop on the CPU.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source tree
from fastgpt.model import GPT  # noqa: E402
from fastgpt.optim import AdamW  # noqa: E402
from harness import (  # noqa: E402  (bench/harness.py)
    Column, Table, benchmark_parser, card_of, device_for, run_benchmarks)
from timing import median_ms  # noqa: E402  (bench/timing.py)

SETS = {
    "seed (11.1M)": dict(vocab_size=512, context_length=256, d_model=384, num_heads=6,
                         num_layers=6),
    "gpt2-small (124M)": dict(vocab_size=50257, context_length=1024, d_model=768,
                              num_heads=12, num_layers=12),
}


def params_of(sizes: dict, device: torch.device) -> list[torch.nn.Parameter]:
    with torch.device("meta"):
        shapes = [p.shape for p in GPT(**sizes, dropout=0.0).parameters()]
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=generator).to(device))
        p.grad = torch.randn(shape, generator=generator).to(device)
        params.append(p)
    return params


def time_step(make_optimizer, params, clip: bool, reps: int, warmup: int, cuda: bool,
              clip_outside: bool) -> float:
    optimizer = make_optimizer(params)

    def step():
        if clip and clip_outside:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    return median_ms(step, reps, warmup, cuda)


def main() -> int:
    parser = benchmark_parser(__doc__, reps=50, warmup=5)
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    args = parser.parse_args()

    device = device_for("adamw")
    if device is None:
        return 1
    cuda = device.type == "cuda"
    if cuda:
        reps = args.reps
        variants = {
            "fastgpt": (lambda clip: lambda ps: AdamW(ps, lr=1e-4, backend="fused",
                                                      max_grad_norm=1.0 if clip else None),
                        False),
            "for-loop": (lambda clip: lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=False),
                         True),
            "foreach": (lambda clip: lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
                        True),
            "fused": (lambda clip: lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True), True),
        }
    else:
        print("no CUDA GPU: timing fastgpt's reference step and torch's for-loop on the CPU")
        reps = min(args.reps, 3)
        variants = {
            "fastgpt-reference": (lambda clip: lambda ps: AdamW(
                ps, lr=1e-4, backend="reference", max_grad_norm=1.0 if clip else None), False),
            "for-loop": (lambda clip: lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=False),
                         True),
        }

    @functools.lru_cache(maxsize=1)  # both clip cases of a set on the same tensors
    def params(set_name: str) -> list[torch.nn.Parameter]:
        return params_of(SETS[set_name], device)

    def measure(case: dict) -> dict:
        ps = params(case["set"])
        n = sum(p.numel() for p in ps)
        row = {"set": case["set"], "parameters": n, "tensors": len(ps), "clip": case["clip"]}
        for name, (make, clip_outside) in variants.items():
            row[f"{name}_ms"] = time_step(make(case["clip"]), ps, case["clip"], reps,
                                          min(args.warmup, reps), cuda, clip_outside)
        if cuda:
            row["fastgpt_GBps"] = 28 * n / (row["fastgpt_ms"] * 1e-3) / 1e9
        return row

    table = Table([Column("parameters", "set", width=20, left=True),
                   Column("clip", lambda r: str(r["clip"]), width=5, left=True)]
                  + [Column(f"{name} ms", f"{name}_ms", ".3f", width=20) for name in variants]
                  + ([Column("fastgpt GB/s", "fastgpt_GBps", ".0f", width=13)] if cuda else []))
    cases = [{"set": set_name, "clip": clip} for set_name in args.sets for clip in (False, True)]
    return run_benchmarks("adamw", "AdamW step", card_of(device), reps, cases, measure, table,
                          args.out)


if __name__ == "__main__":
    raise SystemExit(main())
