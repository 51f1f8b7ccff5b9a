"""Does `fastgpt train --compile` pay, and how does fastgpt's step compare with nanoGPT's,
eager and compiled, side by side in one run?

    python bench/bench_compile.py [--config cpu] [--nanogpt PATH/TO/nanoGPT/model.py]
                                  [--backend auto] [--runs 9] [--steps 3] [--out results.json]

Variants, fp32, each on the same batches (the corpus's bytes as tokens) from its own seeded
initialisation:
  fastgpt           fastgpt's training step (train.training_module + train.train_step),
                    fastgpt's AdamW, with --backend's ops (default auto: measured at these
                    shapes first, as `fastgpt train` does; the choice is printed):
                    `fastgpt train`
  fastgpt-compiled  the same through torch.compile: `fastgpt train --compile`
  nanogpt           nanoGPT's model.py (GPT with its loss, configure_optimizers' AdamW), the
                    same sizes (GELU and one fused qkv projection: its architecture), when
                    --nanogpt names its model.py (github.com/karpathy/nanoGPT; nothing of it
                    is part of fastgpt)
  nanogpt-compiled  the same through torch.compile, as nanoGPT's train.py does
The timed runs take turns (run r of every variant before run r + 1 of any) so that a noisy
machine's drift is shared; the median per step is kept. No speed from wrong maths: first,
with dropout off (a compiled graph draws its masks with its own generator), fastgpt's
compiled step must give the eager step's loss and gradients, else the script fails. The
check runs in float64 where every chosen op takes it (the reference and torch's ops; not
the fused kernels): loss within 1e-12 relative, every gradient within 1e-10 of its largest
entry (sums in other orders; measured ~1e-16 and ~1e-14 at the cpu and seed sizes on a
CPU). In fp32 (with a fused kernel) 1e-5 and 1e-4: fp32 sums in other orders move a ReLU's
input across 0 now and then, which changes a gradient entry outright (measured ~1e-6 at
the cpu sizes, up to 3e-4 at the seed sizes with SDPA). The last losses of the timed steps are shown,
not checked: after dozens of AdamW steps two orders of summation (and inductor's parallel
embedding backward, whose order varies run to run) drift apart by up to about a percent
on one batch.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source tree
from bench_train import CONFIGS, SEED, byte_tokens, model_sizes  # noqa: E402
from fastgpt import ops, tune  # noqa: E402
from fastgpt.config import TrainConfig  # noqa: E402
from fastgpt.data import BatchStream, NextTokenDataset  # noqa: E402
from fastgpt.model import GPT  # noqa: E402
from fastgpt.optim import AdamW, param_groups  # noqa: E402
from fastgpt.train import train_step, training_module  # noqa: E402
from harness import (  # noqa: E402  (bench/harness.py)
    Column, Table, benchmark_parser, card_of, report_failures, run_benchmarks)
from timing import time_ms  # noqa: E402

LR, WEIGHT_DECAY = 1e-3, 0.01


# compiled against eager, (loss, gradient) tolerances per dtype: see the module docstring
TOLERANCES = {torch.float64: (1e-12, 1e-10), torch.float32: (1e-5, 1e-4)}


def fastgpt_step(sizes: dict, batches, device: torch.device, compile: bool):
    torch.manual_seed(SEED)
    model = GPT(**model_sizes(sizes)).to(device)
    optimizer = AdamW(param_groups(model, WEIGHT_DECAY), lr=LR)
    step = training_module(model, compile=compile)
    return lambda: train_step(step, optimizer, batches, device)


def compiled_errors(sizes: dict, batch, device: torch.device,
                    dtype: torch.dtype) -> tuple[float, float]:
    """(relative loss error, largest gradient error relative to that gradient's largest
    entry) of the compiled step against the eager one, dropout off, on one batch."""
    x, y = (t.to(device) for t in batch)
    results = []
    for compile in (False, True):
        torch.manual_seed(SEED)
        model = GPT(**{**model_sizes(sizes), "dropout": 0.0}).to(device, dtype)
        loss = training_module(model, compile=compile)(x, y)
        loss.backward()
        results.append((loss.detach().double(), [p.grad.double() for p in model.parameters()]))
    (eager, eager_grads), (compiled, compiled_grads) = results
    loss_error = ((compiled - eager).abs() / eager.abs()).item()
    grad_error = max(((g - w).abs().max() / w.abs().max().clamp(min=1e-30)).item()
                     for g, w in zip(compiled_grads, eager_grads))
    return loss_error, grad_error


def nanogpt_step(path: str, sizes: dict, batches, device: torch.device, compile: bool):
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    nanogpt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nanogpt)
    torch.manual_seed(SEED)
    config = nanogpt.GPTConfig(
        block_size=sizes["context_length"], vocab_size=sizes["vocab_size"],
        n_layer=sizes["num_layers"], n_head=sizes["num_heads"], n_embd=sizes["d_model"],
        dropout=sizes["dropout"], bias=True)
    model = nanogpt.GPT(config).to(device)
    optimizer = model.configure_optimizers(WEIGHT_DECAY, LR, (0.9, 0.999), device.type)
    forward = torch.compile(model) if compile else model

    def step():
        x, y = next(batches)
        _, loss = forward(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def main() -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--config", choices=list(CONFIGS), help="default: seed on a GPU, "
                        "cpu on a CPU")
    parser.add_argument("--nanogpt", help="nanoGPT's model.py, to run it beside fastgpt")
    parser.add_argument("--runs", type=int, default=9, help="timed runs; the median is kept")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compiles)")
    parser.add_argument("--corpus", default="pystdlib")
    parser.add_argument("--device", choices=["cuda", "cpu"])
    parser.add_argument("--backend", default="auto", help="fastgpt's ops (as `fastgpt train "
                        "--backend`; default auto, measured at these shapes)")
    args = parser.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    config = args.config or ("seed" if cuda else "cpu")
    sizes = CONFIGS[config]
    train_ids, _ = byte_tokens(args.corpus)
    run_config = TrainConfig(**sizes, backend="" if args.backend == "auto" else args.backend)
    choices = tune.choose_backends(run_config, device, sizes["batch_size"], print)
    for choice in choices.values():
        print(choice.describe())
    previous = ops.set_backend(tune.backend_spec(run_config, choices))
    try:
        return check_and_time(args, config, sizes, device, train_ids)
    finally:
        ops.set_backend(previous)


TABLE = Table([Column("variant", "variant", left=True),
               Column("ms/step", "ms_per_step", ".1f"),
               Column("vs eager fastgpt", lambda r: f"{r['vs_fastgpt']:.2f}x"),
               Column("vs compiled nanoGPT", lambda r: r["vs_nanogpt_compiled"]
                      and f"{r['vs_nanogpt_compiled']:.2f}x", missing=""),
               Column("warm-up s", "warmup_s", ".1f"),
               Column("last loss", "loss", ".4f")], markdown=True)


def check_and_time(args, config: str, sizes: dict, device: torch.device, train_ids) -> int:
    """The check, then the timed runs and the table (main's body, under the chosen ops)."""
    cuda = device.type == "cuda"
    check = BatchStream(NextTokenDataset(train_ids, sizes["context_length"], "train"),
                        sizes["batch_size"], SEED, pin_memory=False)
    chosen = {ops.get_backend(op) for op in tune.TUNED_OPS}  # what a training step calls
    dtype = torch.float32 if "fused" in chosen or "auto" in chosen else torch.float64
    loss_error, grad_error = compiled_errors(sizes, next(check), device, dtype)
    loss_rtol, grad_rtol = TOLERANCES[dtype]
    print(f"compiled against eager, dropout off, {str(dtype).removeprefix('torch.')}: loss "
          f"{loss_error:.1e} relative, gradients {grad_error:.1e} of their largest entry")
    if not (loss_error <= loss_rtol and grad_error <= grad_rtol):
        return report_failures([f"the compiled step differs from the eager one (tolerances "
                                f"{loss_rtol:.0e}, {grad_rtol:.0e})"])
    builders = {
        "fastgpt": lambda batches: fastgpt_step(sizes, batches, device, False),
        "fastgpt-compiled": lambda batches: fastgpt_step(sizes, batches, device, True)}
    if args.nanogpt:
        builders["nanogpt"] = lambda b: nanogpt_step(args.nanogpt, sizes, b, device, False)
        builders["nanogpt-compiled"] = lambda b: nanogpt_step(args.nanogpt, sizes, b, device,
                                                              True)

    def time_in_turns(case: dict) -> list[dict]:
        """Every variant built and warmed up, then timed in turns: a row each."""
        steps, losses, times, warmup_s = {}, {}, {}, {}
        for name, build in builders.items():
            batches = BatchStream(NextTokenDataset(train_ids, sizes["context_length"], "train"),
                                  sizes["batch_size"], SEED, pin_memory=cuda)
            started = time.perf_counter()
            steps[name] = build(batches)
            for _ in range(args.warmup):
                steps[name]()
            if cuda:
                torch.cuda.synchronize()
            warmup_s[name] = time.perf_counter() - started
            times[name] = []
        for _ in range(args.runs):
            for name, step in steps.items():
                def run():
                    for _ in range(args.steps):
                        losses[name] = step()
                times[name].append(time_ms(run, cuda) / args.steps)
        medians = {name: statistics.median(runs) for name, runs in times.items()}
        return [{"variant": name, "ms_per_step": ms, "warmup_s": warmup_s[name],
                 "loss": losses[name].item(), "runs": times[name],
                 "vs_fastgpt": ms / medians["fastgpt"],
                 "vs_nanogpt_compiled": (ms / medians["nanogpt-compiled"]
                                         if "nanogpt-compiled" in medians else None)}
                for name, ms in medians.items()]

    return run_benchmarks("compile", f"{config}: {sizes}", card_of(device), args.runs,
                          [{"config": config}], time_in_turns, TABLE, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
