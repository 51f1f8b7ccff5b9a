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

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source tree
from fastgpt import ops  # noqa: E402
from fastgpt.model import GPT  # noqa: E402
from fastgpt.optim import AdamW  # noqa: E402
from timing import median_ms, write_result  # noqa: E402  (bench/timing.py)

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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON file for the results")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        ok, why = ops.available()["adamw"]
        if not ok:
            print(f"the fused AdamW step cannot run: {why}", file=sys.stderr)
            return 1
        card = torch.cuda.get_device_name()
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
        card, reps = "CPU", min(args.reps, 3)
        variants = {
            "fastgpt-reference": (lambda clip: lambda ps: AdamW(
                ps, lr=1e-4, backend="reference", max_grad_norm=1.0 if clip else None), False),
            "for-loop": (lambda clip: lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=False),
                         True),
        }
    print(f"AdamW step on {card}; torch {torch.__version__}")
    print(f"{'parameters':<20} {'clip':<5} " + " ".join(f"{name + ' ms':>20}" for name in variants)
          + (f" {'fastgpt GB/s':>13}" if cuda else ""))
    rows = []
    for set_name in args.sets:
        params = params_of(SETS[set_name], device)
        n = sum(p.numel() for p in params)
        for clip in (False, True):
            row = {"set": set_name, "parameters": n, "tensors": len(params), "clip": clip}
            for name, (make, clip_outside) in variants.items():
                row[f"{name}_ms"] = time_step(make(clip), params, clip, reps,
                                              min(args.warmup, reps), cuda, clip_outside)
            line = f"{set_name:<20} {str(clip):<5} " + " ".join(
                f"{row[f'{name}_ms']:>20.3f}" for name in variants)
            if cuda:
                row["fastgpt_GBps"] = 28 * n / (row["fastgpt_ms"] * 1e-3) / 1e9
                line += f" {row['fastgpt_GBps']:>13.0f}"
            print(line)
            rows.append(row)
        del params
    write_result(args.out, "adamw", card, reps, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
