"""`fastgpt verify`: the reference path against the fused path and against PyTorch's own ops
(backend "torch") on identical inputs, for every op that can run on this machine, and for a
whole training step of a small GPT.

On a CPU the Triton kernel runs through Triton's interpreter (this module switches it on
before the kernels are imported); on a GPU everything runs natively. Prints one table row
per comparison and returns non-zero if any row fails.

Tolerances (the `tol` column, an absolute bound on the max error), from the functions
below, which the tests use too; the torch rows take the fused rows' (the `impl` column says
which implementation a row judges; torch's fused AdamW takes fp32 parameters only):
- values computed in fp32 (any loss, fp32 gradients): 1e-6 of the largest magnitude
  compared, against fp64 (both paths accumulate in fp32, in different orders);
- bf16/fp16 gradients: FlashAttention's rule, the fused error against fp64 at most twice
  that of torch's F.cross_entropy in that dtype, plus the rounding bound of
  `rounding_bound`;
- the fused linear + cross-entropy (loss and three gradients, fp32 and bf16):
  twice_torchs_error, twice the error of torch's own F.linear + F.cross_entropy in that
  dtype plus 1e-6 of the largest magnitude (and a rounding where "sum" rescales a bf16
  gradient);
- the training step (fp32): loss 1e-6 relative; each parameter's gradient 1e-5 of its
  largest entry (dlogits' fp32 rounding carried back through the layers); parameters after
  3 AdamW steps 1% of the learning rate per step. Adam divides each gradient by its own
  scale, so a gradient difference of 1e-5 of a tensor's largest entry becomes an update
  difference of 1e-5 * lr * (largest / own): up to 1% of lr for entries 1000x below their
  tensor's largest. (A wrong gradient fails the grads row long before this one.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


FP32_RELATIVE = 1e-6
ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}  # spacing, relative to a value


def rounding_bound(dtype: torch.dtype, roundings: int, interpreting: bool) -> float:
    """Relative error of a value rounded `roundings` times to dtype: half an ulp per
    rounding on a GPU (round to nearest even), a whole ulp for bf16 under Triton's
    interpreter (which truncates)."""
    per_rounding = ULP[dtype] * (1.0 if interpreting and dtype == torch.bfloat16 else 0.5)
    return roundings * per_rounding


def low_precision_grad_ok(mine: torch.Tensor, want: torch.Tensor, dtype: torch.dtype,
                          roundings: int, interpreting: bool) -> torch.Tensor:
    """Element by element: |mine - want| within the rounding bound of |want|, plus fp32's
    error (1e-6 of the largest value) and the dtype's subnormal spacing per rounding."""
    floor = FP32_RELATIVE * want.abs().max() + roundings * torch.finfo(dtype).smallest_normal * ULP[dtype]
    return (mine - want).abs() <= rounding_bound(dtype, roundings, interpreting) * want.abs() + floor


def twice_torchs_error(theirs: torch.Tensor, want: torch.Tensor, dtype: torch.dtype,
                       extra_roundings: int = 0, interpreting: bool = False) -> float:
    """FlashAttention's rule as a bound on the max error against `want` (fp64): twice the
    max error of torch's own computation in `dtype` (theirs), plus 1e-6 of want's largest
    magnitude (fp32 sums in other orders), plus `extra_roundings` roundings to dtype of it
    (a gradient rescaled after it was rounded)."""
    want = want.double()
    scale = want.abs().max().item() if want.numel() else 0.0
    bound = 2 * (theirs.double() - want).abs().max().item() + FP32_RELATIVE * scale
    if extra_roundings and dtype in ULP:
        bound += rounding_bound(dtype, extra_roundings, interpreting) * scale
    return bound


@dataclass
class Row:
    op: str
    impl: str
    dtype: str
    shape: str
    max_abs: float
    max_rel: float
    tol: float

    @property
    def passed(self) -> bool:
        return self.max_abs <= self.tol  # nan fails


def _row(op: str, impl: str, dtype: torch.dtype, shape, got: torch.Tensor,
         want: torch.Tensor, tol: float) -> Row:
    got, want = got.detach().double(), want.detach().double()
    if torch.equal(torch.isnan(got), torch.isnan(want)):
        finite = ~torch.isnan(want)
        got, want = got[finite], want[finite]
        error = (got - want).abs().max().item() if want.numel() else 0.0
    else:
        error = float("nan")
    scale = want.abs().max().item() if want.numel() else 0.0
    return Row(op, impl, str(dtype).replace("torch.", ""), "x".join(map(str, shape)), error,
               error / scale if scale else error, tol)


def _cross_entropy_rows(device: torch.device, interpreting: bool, impl: str) -> list[Row]:
    from fastgpt import ops

    shapes = ([(8192, 512), (4096, 32768), (512, 131072)] if device.type == "cuda"
              else [(64, 512), (16, 1000), (3, 50257)])
    rows = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for (n, v), (reduction, smoothing, ignore) in zip(
                shapes, [("mean", 0.0, -100), ("none", 0.1, 3), ("sum", 0.0, -1)]):
            generator = torch.Generator().manual_seed(n + v)
            logits = (torch.randn(n, v, generator=generator) * 3).to(dtype).to(device)
            targets = torch.randint(0, v, (n,), generator=generator).to(device)
            targets[::7] = ignore
            grad_output = (torch.ones(()) if reduction == "mean"
                           else torch.rand(n if reduction == "none" else (),
                                           generator=generator) + 0.5).to(device)
            results = {}
            for path, x in (("own", logits), (impl, logits), ("exact", logits.double())):
                x = x.clone().requires_grad_()
                kwargs = dict(reduction=reduction, ignore_index=ignore, label_smoothing=smoothing)
                if path == "own":  # PyTorch's own computation in this dtype
                    loss = torch.nn.functional.cross_entropy(x, targets, **kwargs)
                else:
                    loss = ops.cross_entropy(x, targets, **kwargs,
                                             backend="reference" if path == "exact" else path)
                loss.backward(grad_output.to(loss.dtype))
                results[path] = (loss.detach().double(), x.grad.double())
            label = f"{reduction}, ls {smoothing}"
            fused, exact = results[impl][0], results["exact"][0]
            tol = FP32_RELATIVE * exact.abs().max().item()
            rows.append(_row(f"ce loss ({label})", impl, dtype, (n, v), fused, exact, tol))
            fused, ref, exact = results[impl][1], results["own"][1], results["exact"][1]
            scale = exact.abs().max().item()
            if dtype == torch.float32:
                tol = FP32_RELATIVE * scale
            else:  # rounded once, or twice when mean/sum rescale by a grad_output other than 1
                roundings = 2 if reduction == "sum" else 1
                tol = (2 * (ref - exact).abs().max().item()
                       + rounding_bound(dtype, roundings, interpreting) * scale)
            rows.append(_row(f"ce grad ({label})", impl, dtype, (n, v), fused, exact, tol))
    return rows


def _linear_cross_entropy_rows(device: torch.device, interpreting: bool,
                               impl: str) -> list[Row]:
    """The fused linear + cross-entropy's loss and three gradients against the fp64
    composition, by twice_torchs_error (torch's own F.linear + F.cross_entropy in that
    dtype): fp32 and bf16, each reduction, with and without bias, GPT-2's vocabulary."""
    from fastgpt import ops

    shapes = ([(4096, 768, 50257), (8192, 384, 512), (1000, 768, 32000)]
              if device.type == "cuda" else [(64, 384, 512), (24, 64, 50257), (37, 64, 1000)])
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for (n, d, v), (reduction, smoothing, with_bias) in zip(
                shapes, [("mean", 0.0, True), ("none", 0.1, False), ("sum", 0.0, True)]):
            generator = torch.Generator().manual_seed(n + v)
            inputs = [torch.randn(n, d, generator=generator) * 2,
                      torch.randn(v, d, generator=generator) / d ** 0.5]
            if with_bias:
                inputs.append(torch.randn(v, generator=generator))
            targets = torch.randint(0, v, (n,), generator=generator)
            targets[::7] = -100
            targets = targets.to(device)
            grad_output = (torch.ones(()) if reduction == "mean"
                           else torch.rand(n if reduction == "none" else (),
                                           generator=generator) + 0.5).to(device)
            results = {}
            for path, cast in (("own", dtype), (impl, dtype), ("exact", torch.float64)):
                leaves = [t.to(dtype).to(device=device, dtype=cast).requires_grad_()
                          for t in inputs]
                bias = leaves[2] if with_bias else None
                kwargs = dict(reduction=reduction, label_smoothing=smoothing)
                if path == "own":  # PyTorch's own computation in this dtype
                    loss = torch.nn.functional.cross_entropy(
                        torch.nn.functional.linear(leaves[0], leaves[1], bias), targets, **kwargs)
                else:
                    loss = ops.linear_cross_entropy(
                        leaves[0], leaves[1], targets, bias, **kwargs,
                        backend="reference" if path == "exact" else path)
                grads = torch.autograd.grad(loss, leaves, grad_output.to(loss.dtype))
                results[path] = [loss.detach(), *grads]
            label = f"{reduction}, ls {smoothing}" + (", bias" if with_bias else "")
            names = ("loss", "grad hidden", "grad weight", "grad bias")
            for i, name in enumerate(names[:len(results["exact"])]):
                rescaled = reduction == "sum" and name != "loss"  # a grad_output other than 1
                tol = twice_torchs_error(results["own"][i], results["exact"][i], dtype,
                                         int(rescaled), interpreting)
                rows.append(_row(f"lce {name} ({label})", impl, dtype, (n, d, v),
                                 results[impl][i], results["exact"][i], tol))
    return rows


def _adamw_rows(device: torch.device, impl: str) -> list[Row]:
    """Parameters after 5 steps with identical gradients: the fused (or torch's) step against
    the reference, fp32 and bf16 parameters (torch's: fp32), sizes that leave partial chunks
    and odd tails."""
    from fastgpt.optim import AdamW

    steps = 5
    sizes = [1, 7, 1000, 65537, 3 * 65536 + 5] if device.type == "cuda" else [1, 7, 1000, 4099]
    rows = []
    for dtype in (torch.float32,) if impl == "torch" else (torch.float32, torch.bfloat16):
        generator = torch.Generator().manual_seed(0)
        start = [torch.randn(n, generator=generator) for n in sizes]
        grads = [[torch.randn(n, generator=generator) for n in sizes] for _ in range(steps)]
        results = {}
        for backend in ("reference", impl):
            params = [torch.nn.Parameter(p.to(device=device, dtype=dtype, copy=True))
                      for p in start]
            optimizer = AdamW(params, lr=1e-2, weight_decay=0.1, max_grad_norm=5.0,
                              backend=backend)
            for step_grads in grads:
                for p, g in zip(params, step_grads):
                    p.grad = g.to(device=device, dtype=dtype)
                optimizer.step()
            results[backend] = torch.cat([p.detach().flatten() for p in params])
        want, got = results["reference"].double(), results[impl].double()
        scale = want.abs().max().item()
        # fp32: the same operations, fused multiply-adds rounding differently; bf16: the
        # same fp32 maths rounded to bf16 once a step, a value near a rounding boundary
        # may land one ulp apart
        tol = (FP32_RELATIVE * scale if dtype == torch.float32
               else rounding_bound(dtype, 2, False) * scale)
        rows.append(_row(f"adamw params after {steps}", impl, dtype, [sum(sizes)], got, want,
                         tol))
    return rows


def _attention_rows(device: torch.device, impl: str) -> list[Row]:
    """The attention kernels' out, dq, dk, dv against the float64 reference at the seed's
    shape (B=8, H=6, T=256, D=64) and a long odd one (on a GPU), with dropout (the kernels'
    own mask); torch's SDPA without dropout (its mask is its own): bounds from
    cuda_attention.errors_against_fp64 (FlashAttention's rule: twice the reference's own
    error in the precision computed in, plus a floor; its docstring gives each)."""
    from fastgpt import ops
    from fastgpt.ops.cuda_attention import errors_against_fp64

    rows = []
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        shapes = ((8, 6, 256, 64), (1, 4, 1000, 128))[:2 if device.type == "cuda" else 1]
        for B, H, T, D in shapes:
            q, k, v, grad_out = (torch.randn(B, H, T, D, generator=generator).to(device, dtype)
                                 for _ in range(4))
            if impl == "torch":
                errors = errors_against_fp64(q, k, v, grad_out, D ** -0.5, attend=lambda *qkv: (
                    ops.causal_attention(*qkv, backend="torch")))
                label = "(no dropout)"
            else:
                errors = errors_against_fp64(q, k, v, grad_out, D ** -0.5, 0.1, seed=1, offset=0)
                label = "(dropout 0.1)"
            for name, c in errors.items():
                rows.append(Row(f"attention {name} {label}", impl,
                                str(dtype).replace("torch.", ""), f"{B}x{H}x{T}x{D}", c.error,
                                c.error / c.largest, c.bound))
    return rows


def _training_step_rows(device: torch.device, impl: str) -> list[Row]:
    from fastgpt import ops
    from fastgpt.model import GPT
    from fastgpt.optim import AdamW, param_groups

    steps, lr = 3, 1e-3
    sizes = dict(vocab_size=512, context_length=64, d_model=64, num_heads=2, num_layers=2,
                 dropout=0.0)
    batch = (4, 64) if device.type == "cpu" else (32, 64)
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 512, batch, generator=generator).to(device)
    targets = torch.randint(0, 512, batch, generator=generator).to(device)
    runs = {}
    for path in ("reference", impl):
        torch.manual_seed(0)
        # the fused run takes every kernel that can run here, the reference the rest
        previous = ops.set_backend(ops.fused_where_available() if path == "fused" else path)
        model = GPT(**sizes).to(device)
        optimizer = AdamW(param_groups(model, 0.01), lr=lr)
        first = None
        for _ in range(steps):
            loss = model.loss(idx, targets)
            loss.backward()
            if first is None:
                first = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        ops.set_backend(previous)
        runs[path] = (*first, dict(model.named_parameters()))
    (ref_loss, ref_grads, ref_params), (loss, grads, params) = runs["reference"], runs[impl]
    shape = f"gpt {batch[0]}x{batch[1]}"
    rows = [_row("train step loss", impl, torch.float32, [shape], loss, ref_loss,
                 1e-6 * ref_loss.abs().item())]
    worst_grad = max((_row("train step grads", impl, torch.float32, [shape], grads[n], g,
                           1e-5 * g.abs().max().item()) for n, g in ref_grads.items()),
                     key=lambda r: r.max_abs / r.tol if r.tol else float("inf"))
    rows.append(worst_grad)
    rows.append(_row(f"params after {steps} steps", impl, torch.float32, [shape],
                     torch.cat([params[n].flatten() for n in ref_params]),
                     torch.cat([p.flatten() for p in ref_params.values()]), 1e-2 * lr * steps))
    return rows


def verify(print_fn=print) -> int:
    """Run every comparison this machine allows; print the table; 0 if all pass."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is imported
    from fastgpt import ops

    interpreting = device.type == "cpu" and ops.triton_interpreting()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print_fn(f"fastgpt verify on {name}"
             + (" (Triton kernels through the interpreter)" if interpreting else ""))
    can_run = {"fused": ops.available(), "torch": {op: ops.torch_status(op) for op in ops.KERNELS}}
    skipped = [f"{impl} {op}: {why}" for impl, table in can_run.items()
               for op, (ok, why) in table.items() if not ok]
    rows: list[Row] = []
    for impl in ("fused", "torch"):
        available = can_run[impl]
        if available["cross_entropy"][0]:
            rows += _cross_entropy_rows(device, interpreting, impl)
        if available["linear_cross_entropy"][0]:
            rows += _linear_cross_entropy_rows(device, interpreting, impl)
        if available["adamw"][0]:
            rows += _adamw_rows(device, impl)
        if available["causal_attention"][0]:
            rows += _attention_rows(device, impl)
        if any(ok for ok, _ in available.values()):
            rows += _training_step_rows(device, impl)

    header = (f"{'op':<36} {'impl':<5} {'dtype':<9} {'shape':<13} {'max abs err':>11} "
              f"{'max rel err':>11} {'tol':>9}  result")
    print_fn(header)
    print_fn("-" * len(header))
    for r in rows:
        print_fn(f"{r.op:<36} {r.impl:<5} {r.dtype:<9} {r.shape:<13} {r.max_abs:>11.3e} "
                 f"{r.max_rel:>11.3e} {r.tol:>9.2e}  {'PASS' if r.passed else 'FAIL'}")
    for line in skipped:
        print_fn(f"not verified here: {line}")
    failed = sum(not r.passed for r in rows)
    print_fn(f"{len(rows) - failed} passed, {failed} failed")
    return 1 if failed or not rows else 0
