"""The host's share of a training step: the seed GPT's structure (6 layers, 6 heads, its 84
parameter tensors, dropout 0.1) at sizes where the arithmetic is negligible (batch 1,
context 8, d_model 48), so that a step's time is what Python, autograd, the dispatch of
fastgpt's ops and the optimizer's bookkeeping cost: what a GPU waits for when the host
falls behind it.

    python bench/bench_host.py [--backends reference torch fused] [--steps 200] [--runs 7]
                               [--out results.json]

ms per step of train.train_step (forward, loss, backward, AdamW, zero_grad) with one
intra-op thread, for each backend that can run here: median of --runs timed runs of
--steps steps, after 20 warm-up steps, the backends taking turns run by run. On a GPU a
final synchronize ends each run (the launches are asynchronous: the loop's time is the
host's as long as the GPU keeps up, as it does at these sizes).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source tree
from fastgpt import ops  # noqa: E402
from fastgpt.model import GPT  # noqa: E402
from fastgpt.optim import AdamW, param_groups  # noqa: E402
from fastgpt.train import train_step, training_module  # noqa: E402
from harness import (  # noqa: E402  (bench/harness.py)
    Column, Table, benchmark_parser, card_of, run_benchmarks)

SIZES = dict(vocab_size=512, context_length=8, d_model=48, num_heads=6, num_layers=6,
             dropout=0.1)
WARMUP = 20


def make_step(backend: str, device: torch.device):
    """A closure running one train_step of the seed-structured model under `backend`."""
    previous = ops.set_backend(backend)
    try:
        torch.manual_seed(0)
        model = GPT(**SIZES).to(device)
        optimizer = AdamW(param_groups(model, 0.01), lr=3e-4)
        module = training_module(model)
        x = torch.randint(0, SIZES["vocab_size"], (1, SIZES["context_length"]), device=device)
        batch = (x, torch.roll(x, -1, 1))
        batches = iter(lambda: batch, None)
    finally:
        ops.set_backend(previous)

    def step():
        previous = ops.set_backend(backend)
        try:
            train_step(module, optimizer, batches, device)
        finally:
            ops.set_backend(previous)
    return step


def main() -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--backends", nargs="+", default=["reference", "torch", "fused"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(1)
    steps = {}
    for backend in args.backends:
        why = None  # why this backend cannot run every op here
        if backend == "torch":
            why = next((w for ok, w in map(ops.torch_status, ops.KERNELS) if not ok), None)
        elif backend == "fused":
            why = next((w for ok, w in ops.available().values() if not ok), None)
        if why:
            print(f"{backend}: skipped ({why})")
            continue
        steps[backend] = make_step(backend, device)

    def measure_all(case: dict) -> list[dict]:
        times: dict[str, list[float]] = {name: [] for name in steps}
        for step in steps.values():
            for _ in range(WARMUP):
                step()
        for _ in range(args.runs):
            for name, step in steps.items():
                started = time.perf_counter()
                for _ in range(args.steps):
                    step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append((time.perf_counter() - started) / args.steps * 1e3)
        return [{"backend": name, "host_ms": statistics.median(runs), "runs": runs}
                for name, runs in times.items()]

    table = Table([Column("backend", "backend", width=10, left=True),
                   Column("ms/step", "host_ms", ".3f")])
    return run_benchmarks("host", f"seed structure at {SIZES}", card_of(device), args.runs,
                          [{"sizes": "seed structure"}], measure_all, table, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
