"""Fused softmax-cross-entropy in Triton: one kernel reads each logit row, computes the
row's loss with an online softmax (running max and sum over vocab blocks, arXiv 1805.02867)
and, when a gradient is needed, writes d(loss)/d(logits) in the same launch. The backward
pass then only scales that stored gradient by grad_output.

Semantics follow torch.nn.functional.cross_entropy (ignore_index, label_smoothing, the
three reductions); accumulation is fp32 for fp32, bf16 and fp16 logits, and the loss is
returned in fp32. Several rows share a program when V is small (the chapter's V = 512 is
2 KB a row in fp32), one row per program streams large vocabularies.

On a CPU the kernel runs through Triton's interpreter when TRITON_INTERPRET=1 is set
before this module is imported: every load is cast to fp32 first (the interpreter's bf16
arithmetic is not to be trusted) and only core tl math is used (no libdevice).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK_V = 4096   # vocab columns per loop iteration (a power of two)
TILE_ELEMENTS = 4096  # block_rows * block_v when V is small: several rows per program


@triton.jit
def _cross_entropy_kernel(
    logits_ptr, logits_row_stride,
    targets_ptr,
    grad_ptr, grad_row_stride,
    loss_ptr, lse_ptr,
    grad_scale_ptr,  # fp32: one scale for all rows, or one per row (SCALE_PER_ROW)
    n_rows, n_cols,
    ignore_index, label_smoothing,
    HAS_SMOOTHING: tl.constexpr,
    LSE_GIVEN: tl.constexpr,      # backward of reduction="none": lse saved by the forward
    COMPUTE_GRAD: tl.constexpr,
    SCALE_PER_ROW: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_in = rows < n_rows
    rows = rows.to(tl.int64)  # row * stride passes 2^31 for large N * V
    targets = tl.load(targets_ptr + rows, mask=row_in, other=ignore_index)
    valid = row_in & (targets != ignore_index)
    targets = tl.where(valid, targets, 0)
    row_logits = logits_ptr + rows * logits_row_stride  # (BLOCK_ROWS,) pointers

    if LSE_GIVEN:
        lse = tl.load(lse_ptr + rows, mask=row_in, other=0.0)
    else:
        # Pass 1: running max m and running sum d of exp(x - m) over the vocab blocks.
        m = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
        d = tl.zeros([BLOCK_ROWS], tl.float32)
        x_sum = tl.zeros([BLOCK_ROWS], tl.float32)  # sum of logits, for label smoothing
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_bounds = row_in[:, None] & (cols[None, :] < n_cols)
            x = tl.load(row_logits[:, None] + cols[None, :], mask=in_bounds,
                        other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=1))
            # While a row has seen only -inf, shift by 0, not -inf: exp(-inf - -inf) is nan.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            d = d * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
            m = m_new
            if HAS_SMOOTHING:
                x_sum += tl.sum(tl.where(in_bounds, x, 0.0), axis=1)
        # rows past the end (d = 0, m = -inf) get lse 0: finite, never stored
        lse = tl.where(row_in, m + tl.log(tl.where(row_in, d, 1.0)), 0.0)

        x_target = tl.load(row_logits + targets, mask=valid, other=0.0).to(tl.float32)
        loss = lse - x_target
        if HAS_SMOOTHING:
            # torch: (1 - e) * nll + e * mean over classes of -log p, where -log p_j = lse - x_j
            loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - x_sum / n_cols)
        tl.store(loss_ptr + rows, tl.where(valid, loss, 0.0), mask=row_in)
        tl.store(lse_ptr + rows, lse, mask=row_in)

    # Pass 2: d loss / d x_j = (softmax_j - (1 - e) * [j == target] - e / V) * scale.
    if COMPUTE_GRAD:
        if SCALE_PER_ROW:
            scale = tl.load(grad_scale_ptr + rows, mask=row_in, other=0.0)
        else:
            scale = tl.load(grad_scale_ptr) + tl.zeros([BLOCK_ROWS], tl.float32)
        scale = tl.where(valid, scale, 0.0)
        row_grad = grad_ptr + rows * grad_row_stride
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_bounds = row_in[:, None] & (cols[None, :] < n_cols)
            x = tl.load(row_logits[:, None] + cols[None, :], mask=in_bounds,
                        other=float("-inf")).to(tl.float32)
            g = tl.exp(x - lse[:, None])
            if HAS_SMOOTHING:
                g -= label_smoothing / n_cols
            g = tl.where(cols[None, :] == targets[:, None], g - (1.0 - label_smoothing), g)
            g = g * scale[:, None]
            tl.store(row_grad[:, None] + cols[None, :], g.to(grad_ptr.dtype.element_ty),
                     mask=in_bounds)


def block_sizes(n_cols: int, block_v: int | None = None,
                block_rows: int | None = None) -> tuple[int, int]:
    """(block_rows, block_v): the whole row in one block up to MAX_BLOCK_V columns, and
    as many rows per program as fill TILE_ELEMENTS. Tests force small blocks so that the
    vocab loop runs several times."""
    if block_v is None:
        block_v = min(triton.next_power_of_2(n_cols), MAX_BLOCK_V)
    if block_rows is None:
        block_rows = max(1, TILE_ELEMENTS // block_v)
    for name, value in (("block_v", block_v), ("block_rows", block_rows)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two, got {value}")
    return block_rows, block_v


def launch(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
           label_smoothing: float, grad_scale: torch.Tensor | None,
           lse: torch.Tensor | None = None, block_v: int | None = None,
           block_rows: int | None = None
           ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Run the kernel on logits (N, V) float32/bf16/fp16 with unit column stride and
    targets (N,) int64.

    grad_scale: None (no gradient), a fp32 scalar tensor, or a fp32 (N,) tensor of per-row
    scales. lse: None to compute the loss (and lse), or the (N,) fp32 lse of an earlier
    launch to compute only the gradient. Returns (loss (N,) fp32 or None, lse (N,) fp32,
    grad (N, V) in logits' dtype or None).
    """
    n_rows, n_cols = logits.shape
    device = logits.device
    lse_given = lse is not None
    loss = None if lse_given else torch.empty(n_rows, dtype=torch.float32, device=device)
    if lse is None:
        lse = torch.empty(n_rows, dtype=torch.float32, device=device)
    grad = None if grad_scale is None else torch.empty(n_rows, n_cols, dtype=logits.dtype,
                                                       device=device)
    rows_per_program, block_v = block_sizes(n_cols, block_v, block_rows)
    grid = (triton.cdiv(n_rows, rows_per_program),)
    _cross_entropy_kernel[grid](
        logits, logits.stride(0), targets,
        grad if grad is not None else lse, n_cols,   # grad_ptr unused without a gradient
        loss if loss is not None else lse, lse,      # loss_ptr unused when lse is given
        grad_scale if grad_scale is not None else lse,
        n_rows, n_cols, ignore_index, float(label_smoothing),
        HAS_SMOOTHING=label_smoothing > 0.0,
        LSE_GIVEN=lse_given,
        COMPUTE_GRAD=grad is not None,
        SCALE_PER_ROW=grad_scale is not None and grad_scale.dim() == 1,
        BLOCK_ROWS=rows_per_program,
        BLOCK_V=block_v,
        num_warps=4 if rows_per_program * block_v <= 4096 else 8,
    )
    return loss, lse, grad


class FusedCrossEntropy(torch.autograd.Function):
    """mean/sum: the gradient is written in the forward's launch, backward scales it.
    none: the forward saves the lse; the backward's launch writes the gradient already
    scaled by each row's grad_output (one rounding in bf16/fp16, no second pass)."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, reduction, label_smoothing, compute_grad,
                block_v, block_rows):
        n_valid = (targets != ignore_index).sum()
        grad_scale = None
        if compute_grad and reduction == "mean":
            grad_scale = 1.0 / n_valid.clamp(min=1).to(torch.float32)
        elif compute_grad and reduction == "sum":
            grad_scale = torch.ones((), dtype=torch.float32, device=logits.device)
        loss, lse, grad = launch(logits, targets, ignore_index, label_smoothing, grad_scale,
                                 block_v=block_v, block_rows=block_rows)
        ctx.reduction = reduction
        ctx.kernel_args = (ignore_index, label_smoothing, block_v, block_rows)
        if compute_grad and reduction == "none":
            ctx.save_for_backward(logits, targets, lse)
        elif compute_grad:
            ctx.save_for_backward(grad)
        if reduction == "none":
            return loss
        if reduction == "sum":
            return loss.sum()
        return loss.sum() / n_valid  # all rows ignored: 0 / 0 = nan, as torch gives

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.reduction == "none":
            logits, targets, lse = ctx.saved_tensors
            ignore_index, label_smoothing, block_v, block_rows = ctx.kernel_args
            _, _, grad = launch(logits, targets, ignore_index, label_smoothing,
                                grad_output.to(torch.float32).contiguous(), lse=lse,
                                block_v=block_v, block_rows=block_rows)
            return grad, None, None, None, None, None, None, None
        (grad,) = ctx.saved_tensors
        # Scaled in place (no second N x V buffer): a second backward through this graph is
        # then refused by autograd's version check rather than given a wrong gradient.
        if not torch.equal(grad_output, torch.ones_like(grad_output)):  # loss.backward(): 1
            grad.mul_(grad_output)
        return grad, None, None, None, None, None, None, None


def self_check(device: torch.device) -> None:
    """Compile and run the kernel once on `device` against the reference, so that "auto"
    never routes training through a kernel that does not build or run right here.
    Raises RuntimeError with what went wrong."""
    from fastgpt.ops.reference import cross_entropy as reference_cross_entropy

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 37, generator=generator).to(device)
    targets = torch.tensor([0, 36, 5, -100, 17], device=device)
    got = []
    for fn in (reference_cross_entropy, None):
        x = logits.clone().requires_grad_()
        if fn is None:
            loss = FusedCrossEntropy.apply(x, targets, -100, "mean", 0.0, True, 16, None)
        else:
            loss = fn(x, targets)
        loss.backward()
        got.append((loss.detach(), x.grad))
    (ref_loss, ref_grad), (loss, grad) = got
    # fp32 both ways; 1e-5 leaves room for summation order, catches any real fault
    if not (torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
            and torch.allclose(grad, ref_grad, rtol=1e-5, atol=1e-6)):
        raise RuntimeError(f"loss {loss.item()} against the reference's {ref_loss.item()}")
