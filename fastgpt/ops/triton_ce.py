"""Fused softmax-cross-entropy in Triton.

One kernel computes each row's loss with an online softmax (running max m and sum d of
exp(x - m) over vocab blocks, arXiv 1805.02867) and, when a gradient is needed, writes
d(loss)/d(logits) in the same launch:
- reduction "mean"/"sum": the gradient is written in the forward pass; the backward only
  scales it by grad_output (a no-op when grad_output is 1, as for loss.backward()), with no
  host sync.
- reduction "none": the forward saves m and log d; the backward's launch writes the
  gradient already scaled by each row's own grad_output (one rounding in bf16/fp16, and no
  N x V buffer held between the passes).
When a row fits in one block (V <= 4096, the chapter's 512 included) the logits are read
from memory once; longer rows are read twice (the max and sum, then the gradient).

Semantics follow torch.nn.functional.cross_entropy (ignore_index, label_smoothing, the
three reductions); accumulation is fp32 for fp32, bf16 and fp16 logits, and the loss is
returned in fp32. The loss and the gradient are formed as (m - x) + log d and
exp((x - m) - log d), never through lse = m + log d, which would cost an ulp of lse (1e-3
absolute at logits of 1e4). Several rows share a program when V is small; large
vocabularies stream one row per program.

On a CPU the kernel runs through Triton's interpreter when TRITON_INTERPRET=1 is set before
this module is imported: every load is cast to fp32 first (the interpreter's bf16
arithmetic is not to be trusted) and only core tl math is used (no libdevice).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the Triton losses take
MAX_BLOCK_V = 4096     # vocab columns per loop iteration (a power of two)
TILE_ELEMENTS = 4096   # block_rows * block_v for small V: several rows per program
MAX_BLOCK_ROWS = 32    # keeps enough programs to fill the GPU when V is tiny
SCALE_BLOCK = 4096
# Through the interpreter (CPU tensors) each program costs milliseconds of Python whatever
# its size, so there the tiles are as large as numpy handles well: few, big programs.
INTERPRETER_TILE_ELEMENTS = 131072
INTERPRETER_MAX_BLOCK_ROWS = 256
INTERPRETER_SCALE_BLOCK = 65536


@triton.jit
def _cross_entropy_kernel(
    logits_ptr, logits_row_stride,
    targets_ptr,
    grad_ptr, grad_row_stride,
    loss_ptr,
    stats_ptr,       # fp32 (2, n_rows): the rows' max m, then log d
    grad_scale_ptr,  # fp32: one scale for all rows, or one per row (SCALE_PER_ROW)
    n_rows, n_cols,
    ignore_index, label_smoothing,
    HAS_SMOOTHING: tl.constexpr,
    STATS_GIVEN: tl.constexpr,    # the backward of reduction="none": m, log d saved
    COMPUTE_GRAD: tl.constexpr,
    SCALE_PER_ROW: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,   # n_cols <= BLOCK_V: keep the tile for the gradient
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_in = rows < n_rows
    rows = rows.to(tl.int64)  # row * stride passes 2^31 for large N * V
    targets = tl.load(targets_ptr + rows, mask=row_in, other=ignore_index)
    valid = row_in & (targets != ignore_index)
    # A target outside [0, n_cols) (when the caller skipped the check) is never read: its
    # row's loss and gradient are nan, so the mistake shows instead of a wrong number.
    bad = valid & ((targets < 0) | (targets >= n_cols))
    valid = valid & ~bad
    targets = tl.where(valid, targets, -1)  # -1: no column is the target
    row_logits = logits_ptr + rows * logits_row_stride  # (BLOCK_ROWS,) pointers
    cols = tl.arange(0, BLOCK_V)

    if STATS_GIVEN:
        m = tl.load(stats_ptr + rows, mask=row_in, other=0.0)
        log_d = tl.load(stats_ptr + n_rows + rows, mask=row_in, other=0.0)
    else:
        # Pass 1: the rows' max m, sum d of exp(x - m) and (for label smoothing) sum of x.
        m = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
        d = tl.zeros([BLOCK_ROWS], tl.float32)
        x_sum = tl.zeros([BLOCK_ROWS], tl.float32)
        if SINGLE_BLOCK:  # the whole row in one tile, kept in registers for pass 2
            in_bounds = row_in[:, None] & (cols[None, :] < n_cols)
            x = tl.load(row_logits[:, None] + cols[None, :], mask=in_bounds,
                        other=float("-inf")).to(tl.float32)
            m = tl.max(x, axis=1)
            # A row of only -inf shifts by 0, not -inf: exp(-inf - -inf) would be nan.
            shift = tl.where(m == float("-inf"), 0.0, m)
            d = tl.sum(tl.exp(x - shift[:, None]), axis=1)
            if HAS_SMOOTHING:
                x_sum = tl.sum(tl.where(in_bounds, x, 0.0), axis=1)
        else:  # online softmax: rescale the running sum whenever the max grows
            for start in range(0, n_cols, BLOCK_V):
                in_bounds = row_in[:, None] & (start + cols[None, :] < n_cols)
                x = tl.load(row_logits[:, None] + start + cols[None, :], mask=in_bounds,
                            other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(x, axis=1))
                shift = tl.where(m_new == float("-inf"), 0.0, m_new)
                d = d * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
                m = m_new
                if HAS_SMOOTHING:
                    x_sum += tl.sum(tl.where(in_bounds, x, 0.0), axis=1)
        # rows past the end (d = 0, m = -inf) get finite stats; they are never stored
        m = tl.where(row_in, m, 0.0)
        log_d = tl.log(tl.where(row_in, d, 1.0))

        x_target = tl.load(row_logits + targets, mask=valid, other=0.0).to(tl.float32)
        loss = (m - x_target) + log_d
        if HAS_SMOOTHING:
            # torch: (1 - e) * nll + e * mean over classes of -log p, -log p_j = m - x_j + log d
            loss = (1.0 - label_smoothing) * loss + label_smoothing * (
                (m - x_sum / n_cols) + log_d)
        loss = tl.where(valid, loss, tl.where(bad, float("nan"), 0.0))
        tl.store(loss_ptr + rows, loss, mask=row_in)
        tl.store(stats_ptr + rows, m, mask=row_in)
        tl.store(stats_ptr + n_rows + rows, log_d, mask=row_in)

    # Pass 2: d loss / d x_j = (softmax_j - (1 - e) * [j == target] - e / V) * scale.
    if COMPUTE_GRAD:
        if SCALE_PER_ROW:
            scale = tl.load(grad_scale_ptr + rows, mask=row_in, other=0.0)
        else:
            scale = tl.load(grad_scale_ptr + tl.zeros([BLOCK_ROWS], tl.int32))
        scale = tl.where(valid, scale, tl.where(bad, float("nan"), 0.0))
        row_grad = grad_ptr + rows * grad_row_stride
        for start in range(0, n_cols, BLOCK_V):
            in_bounds = row_in[:, None] & (start + cols[None, :] < n_cols)
            if not SINGLE_BLOCK or STATS_GIVEN:  # else x is still pass 1's tile
                x = tl.load(row_logits[:, None] + start + cols[None, :], mask=in_bounds,
                            other=float("-inf")).to(tl.float32)
            g = tl.exp((x - m[:, None]) - log_d[:, None])
            if HAS_SMOOTHING:
                g -= label_smoothing / n_cols
            is_target = start + cols[None, :] == targets[:, None]
            g = tl.where(is_target, g - (1.0 - label_smoothing), g) * scale[:, None]
            tl.store(row_grad[:, None] + start + cols[None, :],
                     g.to(grad_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def _scale_kernel(grad_ptr, scale_ptr, n, BLOCK: tl.constexpr):
    """grad *= scale, read from device memory; a scale of exactly 1 moves no data. The
    branch is on the one scalar: with `scale != 1` in every lane's mask instead, the
    compiler could not tell that the mask is constant over a vector and accessed every
    element alone (bench/results/kernels-sm90.md shows both)."""
    scale = tl.load(scale_ptr)
    if scale != 1.0:
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        in_bounds = offsets < n
        g = tl.load(grad_ptr + offsets, mask=in_bounds).to(tl.float32)
        tl.store(grad_ptr + offsets, (g * scale).to(grad_ptr.dtype.element_ty), mask=in_bounds)


def block_sizes(n_cols: int, block_v: int | None = None, block_rows: int | None = None,
                interpreted: bool = False) -> tuple[int, int]:
    """(block_rows, block_v): the whole row in one block up to MAX_BLOCK_V columns, and as
    many rows per program as fill TILE_ELEMENTS, at most MAX_BLOCK_ROWS (the INTERPRETER_
    sizes when `interpreted`). Tests force small blocks so that the vocab loop runs
    several times."""
    if block_v is None:
        block_v = min(triton.next_power_of_2(n_cols), MAX_BLOCK_V)
    if block_rows is None:
        tile, max_rows = ((INTERPRETER_TILE_ELEMENTS, INTERPRETER_MAX_BLOCK_ROWS) if interpreted
                          else (TILE_ELEMENTS, MAX_BLOCK_ROWS))
        block_rows = min(max_rows, max(1, tile // block_v))
    for name, value in (("block_v", block_v), ("block_rows", block_rows)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two, got {value}")
    return block_rows, block_v


def _on_device(tensor: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


@dataclasses.dataclass
class KernelLaunch:
    """One launch of a @triton.jit kernel: kernel[grid](*args, **options), options being
    its constexpr arguments and num_warps. launch() and _scale_op run theirs;
    bench/triton_aot.py compiles self_check_launches() ahead of time for a GPU."""
    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    options: dict

    def run(self) -> None:
        self.kernel[self.grid](*self.args, **self.options)


def prepare_launch(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                   label_smoothing: float, grad_scale: torch.Tensor | None,
                   stats: torch.Tensor | None = None, block_v: int | None = None,
                   block_rows: int | None = None, interpreted: bool | None = None,
                   grad: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None,
                              KernelLaunch]:
    """launch()'s outputs, allocated, and the kernel launch that fills them, not run.
    interpreted (default: whether logits are on the CPU) picks the interpreter's block
    sizes. grad: where to write the gradient (default: a new tensor); it may be `logits`
    itself (every element is read before its program writes it)."""
    n_rows, n_cols = logits.shape
    device = logits.device
    stats_given = stats is not None
    loss = None if stats_given else torch.empty(n_rows, dtype=torch.float32, device=device)
    if stats is None:
        stats = torch.empty(2, n_rows, dtype=torch.float32, device=device)
    if grad_scale is None:
        grad = None
    elif grad is None:
        grad = torch.empty(n_rows, n_cols, dtype=logits.dtype, device=device)
    elif grad.shape != logits.shape or grad.stride(1) != 1 or grad.dtype != logits.dtype:
        raise ValueError("grad must have logits' shape and dtype, with unit column stride")
    if interpreted is None:
        interpreted = not logits.is_cuda
    rows_per_program, block_v = block_sizes(n_cols, block_v, block_rows, interpreted)
    kernel_launch = KernelLaunch(
        _cross_entropy_kernel, (triton.cdiv(n_rows, rows_per_program),),
        (logits, logits.stride(0), targets,
         grad if grad is not None else stats,  # grad_ptr unused without a gradient
         grad.stride(0) if grad is not None else n_cols,
         loss if loss is not None else stats, stats,  # loss_ptr unused when stats given
         grad_scale if grad_scale is not None else stats,
         n_rows, n_cols, ignore_index, float(label_smoothing)),
        dict(HAS_SMOOTHING=label_smoothing > 0.0,
             STATS_GIVEN=stats_given,
             COMPUTE_GRAD=grad is not None,
             SCALE_PER_ROW=grad_scale is not None and grad_scale.dim() == 1,
             BLOCK_ROWS=rows_per_program,
             BLOCK_V=block_v,
             SINGLE_BLOCK=n_cols <= block_v,
             num_warps=8 if block_v >= 4096 else 4))
    return loss, stats, grad, kernel_launch


def launch(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
           label_smoothing: float, grad_scale: torch.Tensor | None,
           stats: torch.Tensor | None = None, block_v: int | None = None,
           block_rows: int | None = None, grad: torch.Tensor | None = None
           ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Run the kernel on logits (N, V) float32/bf16/fp16 with unit column stride and
    targets (N,) int64.

    grad_scale: None (no gradient), a fp32 scalar tensor, or a fp32 (N,) tensor of per-row
    scales. stats: None to compute the loss, or the (2, N) fp32 (m, log d) of an earlier
    launch to compute only the gradient. grad: see prepare_launch. Returns (loss (N,) fp32
    or None, stats (2, N) fp32, grad (N, V) in logits' dtype or None).
    """
    loss, stats, grad, kernel_launch = prepare_launch(
        logits, targets, ignore_index, label_smoothing, grad_scale, stats, block_v, block_rows,
        grad=grad)
    with _on_device(logits):
        kernel_launch.run()
    return loss, stats, grad


def scale_launch(grad: torch.Tensor, scale: torch.Tensor,
                 interpreted: bool | None = None) -> KernelLaunch:
    """_scale_kernel's launch for grad (contiguous) *= scale (fp32, one element);
    interpreted (default: whether grad is on the CPU) picks the interpreter's block."""
    if interpreted is None:
        interpreted = not grad.is_cuda
    block = INTERPRETER_SCALE_BLOCK if interpreted else SCALE_BLOCK
    return KernelLaunch(_scale_kernel, (triton.cdiv(grad.numel(), block),),
                        (grad, scale, grad.numel()), dict(BLOCK=block, num_warps=8))


# The launches as custom ops, so that torch.compile traces the loss through their fake
# (shape-only) versions and calls the kernels at run time, instead of tracing into Triton.

@torch.library.custom_op("fastgpt::cross_entropy_forward", mutates_args=())
def _forward_op(logits: torch.Tensor, targets: torch.Tensor, grad_scale: torch.Tensor | None,
                ignore_index: int, label_smoothing: float, block_v: int | None,
                block_rows: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """launch() computing the loss: (loss (N,), stats (2, N), grad (N, V), or an empty
    tensor when grad_scale is None)."""
    loss, stats, grad = launch(logits, targets, ignore_index, label_smoothing, grad_scale,
                               block_v=block_v, block_rows=block_rows)
    return loss, stats, logits.new_empty(0) if grad is None else grad


@_forward_op.register_fake
def _(logits, targets, grad_scale, ignore_index, label_smoothing, block_v, block_rows):
    n_rows = logits.shape[0]
    return (logits.new_empty(n_rows, dtype=torch.float32),
            logits.new_empty(2, n_rows, dtype=torch.float32),
            logits.new_empty(0) if grad_scale is None else torch.empty_like(logits))


@torch.library.custom_op("fastgpt::cross_entropy_backward", mutates_args=())
def _backward_op(logits: torch.Tensor, targets: torch.Tensor, stats: torch.Tensor,
                 grad_scale: torch.Tensor, ignore_index: int, label_smoothing: float,
                 block_v: int | None, block_rows: int | None) -> torch.Tensor:
    """launch() with the forward's stats: the gradient (N, V), each row scaled by its own
    grad_scale (N,)."""
    return launch(logits, targets, ignore_index, label_smoothing, grad_scale, stats=stats,
                  block_v=block_v, block_rows=block_rows)[2]


@_backward_op.register_fake
def _(logits, targets, stats, grad_scale, ignore_index, label_smoothing, block_v, block_rows):
    return torch.empty_like(logits)


@torch.library.custom_op("fastgpt::cross_entropy_scale_", mutates_args=("grad",))
def _scale_op(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """grad (contiguous) *= scale (a one-element tensor on grad's device), in place,
    without a host sync: the kernel itself skips the work when scale is exactly 1. As a
    custom op that declares the mutation, torch bumps grad's version for autograd."""
    with _on_device(grad):
        scale_launch(grad, scale.to(torch.float32).reshape(1)).run()


@_scale_op.register_fake
def _(grad, scale):
    return None


def gradient_scale(targets: torch.Tensor, ignore_index: int, reduction: str,
                   compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(n_valid, the rows' number not ignored, as a device tensor; the scale of each row's
    d loss / d logits that the forward writes: 1/n_valid for "mean", 1 for "sum", None
    without a gradient or for "none", whose backward scales each row by its own
    grad_output). No host sync."""
    n_valid = (targets != ignore_index).sum()
    grad_scale = None
    if compute_grad and reduction == "mean":
        grad_scale = 1.0 / n_valid.clamp(min=1).to(torch.float32)
    elif compute_grad and reduction == "sum":
        grad_scale = torch.ones((), dtype=torch.float32, device=targets.device)
    return n_valid, grad_scale


def reduce(loss: torch.Tensor, reduction: str, n_valid: torch.Tensor) -> torch.Tensor:
    """The rows' losses (N,) reduced as F.cross_entropy does."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / n_valid  # all rows ignored: 0 / 0 = nan, as torch gives


class FusedCrossEntropy(torch.autograd.Function):
    """See the module docstring for which pass writes the gradient."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, reduction, label_smoothing, compute_grad,
                block_v, block_rows):
        n_valid, grad_scale = gradient_scale(targets, ignore_index, reduction, compute_grad)
        loss, stats, grad = _forward_op(logits, targets, grad_scale, ignore_index,
                                        label_smoothing, block_v, block_rows)
        ctx.reduction = reduction
        ctx.kernel_args = (ignore_index, label_smoothing, block_v, block_rows)
        if compute_grad and reduction == "none":
            ctx.save_for_backward(logits, targets, stats)
        elif compute_grad:
            ctx.save_for_backward(grad)
        return reduce(loss, reduction, n_valid)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if ctx.reduction == "none":
            logits, targets, stats = ctx.saved_tensors
            grad = _backward_op(logits, targets, stats,
                                grad_output.to(torch.float32).contiguous(), *ctx.kernel_args)
            return grad, None, None, None, None, None, None, None
        (grad,) = ctx.saved_tensors
        # Scaled in place (no second N x V buffer): a second backward through this graph
        # is then refused by autograd's version check rather than given a wrong gradient.
        # In bf16/fp16 a grad_output other than 1 rounds the gradient a second time.
        _scale_op(grad, grad_output)
        return grad, None, None, None, None, None, None, None


def fused_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *,
                        ignore_index: int = -100, reduction: str = "mean",
                        label_smoothing: float = 0.0, check_targets: bool = True,
                        block_v: int | None = None, block_rows: int | None = None
                        ) -> torch.Tensor:
    """fastgpt.ops.cross_entropy's fused path: its input checks, then the kernel. block_v /
    block_rows override the tile sizes (powers of two; None: block_sizes' choice), for
    tests and benchmarks."""
    from fastgpt.ops import reference

    reference.check_cross_entropy_inputs(logits, targets, ignore_index, reduction,
                                         label_smoothing, check_targets)
    if logits.dtype not in DTYPES:
        raise ValueError(f"the fused cross_entropy takes float32, bfloat16 or float16 logits, "
                         f"got {logits.dtype}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    compute_grad = logits.requires_grad and torch.is_grad_enabled()
    return FusedCrossEntropy.apply(logits, targets.contiguous(), ignore_index, reduction,
                                   float(label_smoothing), compute_grad, block_v, block_rows)


# self_check's cases: (logits dtype, vocab, reduction, label smoothing), on 6 rows
SELF_CHECK_CASES = ((torch.float32, 37, "mean", 0.0), (torch.bfloat16, 512, "mean", 0.0),
                    (torch.float32, 5000, "sum", 0.1), (torch.bfloat16, 5000, "none", 0.0))
SELF_CHECK_ROWS = 6


def self_check(device: torch.device) -> None:
    """Compile and run the kernel's variants once on `device` against the reference (fp32
    and bf16, one block and a vocab loop, mean / sum / none, label smoothing), so that
    "auto" never routes training through a kernel that does not build or run right here.
    Raises RuntimeError saying which variant went wrong."""
    from fastgpt.ops.reference import cross_entropy as reference_cross_entropy

    generator = torch.Generator().manual_seed(0)
    with torch.enable_grad(), torch.inference_mode(False), torch.autocast(
            device.type, enabled=False):
        for dtype, vocab, reduction, smoothing in SELF_CHECK_CASES:
            logits = torch.randn(SELF_CHECK_ROWS, vocab, generator=generator).to(
                device=device, dtype=dtype)
            targets = torch.tensor([0, vocab - 1, 5, -100, 17, 3], device=device)
            grad_output = torch.rand((SELF_CHECK_ROWS,) if reduction == "none" else (),
                                     generator=generator, dtype=torch.float64).to(device) + 0.5
            results = []
            for fused in (False, True):
                x = logits.clone().requires_grad_()
                if fused:
                    loss = FusedCrossEntropy.apply(x, targets, -100, reduction, smoothing, True,
                                                   None, None)
                else:
                    loss = reference_cross_entropy(x.double(), targets, reduction=reduction,
                                                   label_smoothing=smoothing)
                loss.backward(grad_output.to(loss.dtype))
                results.append((loss.double(), x.grad.double()))
            (want_loss, want_grad), (loss, grad) = results
            # 1e-5 (fp32) / 2^-6 (bf16, two roundings of the gradient) of the largest value
            # leave room for rounding and catch any real fault
            tol = 1e-5 if dtype == torch.float32 else 2.0 ** -6
            loss_err = (loss - want_loss).abs().max().item()
            grad_err = (grad - want_grad).abs().max().item()
            if not (loss_err <= 1e-5 * want_loss.abs().max().item()
                    and grad_err <= tol * want_grad.abs().max().item()):
                raise RuntimeError(
                    f"{dtype} V={vocab} {reduction}: loss error {loss_err:.3g}, gradient error "
                    f"{grad_err:.3g} against the reference")


def self_check_launches() -> list[tuple[str, KernelLaunch]]:
    """The kernel launches that self_check makes on a GPU, (case, launch) for each, on meta
    tensors (shapes and dtypes, no data): what bench/triton_aot.py compiles ahead of
    time. For each case, FusedCrossEntropy's forward and backward: with reduction "none" the
    forward computes the loss alone and the backward the gradient from the saved stats with
    a per-row scale; otherwise the forward writes the gradient (one scale) and the backward
    scales it in place with _scale_kernel. tests/test_kernel_report.py checks this list
    against the launches that a run of self_check records."""
    launches = []
    for dtype, vocab, reduction, smoothing in SELF_CHECK_CASES:
        case = f"{str(dtype).removeprefix('torch.')} V={vocab} {reduction}" + (
            f" smoothing={smoothing}" if smoothing else "")
        logits = torch.empty(SELF_CHECK_ROWS, vocab, dtype=dtype, device="meta")
        targets = torch.empty(SELF_CHECK_ROWS, dtype=torch.int64, device="meta")
        per_row = torch.empty(SELF_CHECK_ROWS, dtype=torch.float32, device="meta")
        one = torch.empty((), dtype=torch.float32, device="meta")
        if reduction == "none":
            _, stats, _, forward = prepare_launch(logits, targets, -100, smoothing, None,
                                                  interpreted=False)
            backward = prepare_launch(logits, targets, -100, smoothing, per_row, stats=stats,
                                      interpreted=False)[3]
        else:
            _, _, grad, forward = prepare_launch(logits, targets, -100, smoothing, one,
                                                 interpreted=False)
            backward = scale_launch(grad, one.reshape(1), interpreted=False)
        launches += [(f"{case}, forward", forward), (f"{case}, backward", backward)]
    return launches
