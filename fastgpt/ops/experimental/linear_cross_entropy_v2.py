"""Fused linear + cross-entropy, version 2: no logits in global memory (Cut Cross-Entropy's
structure, apple/ml-cross-entropy). The forward multiplies hidden and weight tiles on chip
and keeps each row's online max and sum; the backward recomputes each logit tile, skips the
tiles whose gradient is below the inputs' resolution, and adds the tile's share of
grad_hidden and grad_weight with fp32 atomics.

Experimental: the benchmark (bench/bench_linear_cross_entropy.py) decides whether it ships
(only if a GPU run shows less memory at equal or better time than version 1,
fastgpt/ops/triton_linear_ce.py, which is what fastgpt.ops.linear_cross_entropy runs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from fastgpt.ops import triton_ce


@triton.jit
def _load_columns(ptr, rows, row_in, k, d, BLOCK_D: tl.constexpr, TO_FP32: tl.constexpr):
    """Columns k .. k + BLOCK_D of the given rows of a contiguous (*, d) matrix, zero
    outside it; in fp32 through the interpreter (no arithmetic on bf16's raw bits there)."""
    ks = k + tl.arange(0, BLOCK_D)
    tile = tl.load(ptr + rows[:, None] * d + ks[None, :],
                   mask=row_in[:, None] & (ks < d)[None, :], other=0.0)
    if TO_FP32:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b accumulated in fp32; IEEE (fp32 inputs): fp32 products, as torch's matmul
    gives without tf32."""
    if IEEE:
        product = tl.dot(a, b, input_precision="ieee")
    else:
        product = tl.dot(a, b)
    return product


@triton.jit
def _logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_in, col_in, d,
                HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_D: tl.constexpr, TO_FP32: tl.constexpr, IEEE: tl.constexpr):
    """hidden[rows] @ weight[cols].T (+ bias[cols]) as a (BLOCK_N, BLOCK_V) fp32 tile."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for k in range(0, d, BLOCK_D):
        h = _load_columns(hidden_ptr, rows, row_in, k, d, BLOCK_D, TO_FP32)
        w = _load_columns(weight_ptr, cols, col_in, k, d, BLOCK_D, TO_FP32)
        acc += _dot(h, tl.trans(w), IEEE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _lse_forward_kernel(hidden_ptr, weight_ptr, bias_ptr, targets_ptr, partial_ptr,
                        n_rows, vocab, d, tiles_per_split,
                        HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                        BLOCK_D: tl.constexpr, TO_FP32: tl.constexpr, IEEE: tl.constexpr):
    """One program per (row block, vocab split): over its vocab tiles, each row's max m,
    sum of exp(x - m), target logit and sum of logits, stored to partial (4, splits, N)."""
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < n_rows
    rows = rows.to(tl.int64)
    targets = tl.load(targets_ptr + rows, mask=row_in, other=-1)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    x_target = tl.zeros([BLOCK_N], tl.float32)
    x_sum = tl.zeros([BLOCK_N], tl.float32)
    for tile in range(split * tiles_per_split, (split + 1) * tiles_per_split):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_in = cols < vocab
        cols = cols.to(tl.int64)
        x = _logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_in, col_in, d,
                        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, TO_FP32, IEEE)
        x_target += tl.sum(tl.where(cols[None, :] == targets[:, None], x, 0.0), axis=1)
        x_sum += tl.sum(tl.where(col_in[None, :], x, 0.0), axis=1)
        x = tl.where(col_in[None, :], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile past the end
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
        m = m_new
    out = partial_ptr + split * n_rows + rows
    stride = n_splits * n_rows
    tl.store(out, m, mask=row_in)
    tl.store(out + stride, s, mask=row_in)
    tl.store(out + 2 * stride, x_target, mask=row_in)
    tl.store(out + 3 * stride, x_sum, mask=row_in)


@triton.jit
def _grad_backward_kernel(hidden_ptr, weight_ptr, bias_ptr, targets_ptr, stats_ptr, scale_ptr,
                          grad_hidden_ptr, grad_weight_ptr, grad_bias_ptr, skipped_ptr,
                          n_rows, vocab, d, label_smoothing, filter_below,
                          HAS_BIAS: tl.constexpr, NEED_HIDDEN: tl.constexpr,
                          NEED_WEIGHT: tl.constexpr, NEED_BIAS: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                          TO_FP32: tl.constexpr, IEEE: tl.constexpr):
    """One program per (row block, vocab tile): the logit tile again, its gradient
    g = (softmax - (1 - e) onehot - e / V) * scale_row, and, unless every |softmax - onehot|
    in it is below filter_below (then skipped and counted), g @ weight[tile] into grad_hidden
    and g.T @ hidden[rows] into grad_weight (fp32 atomics), column sums into grad_bias."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_in, col_in = rows < n_rows, cols < vocab
    rows, cols = rows.to(tl.int64), cols.to(tl.int64)
    targets = tl.load(targets_ptr + rows, mask=row_in, other=-1)
    m = tl.load(stats_ptr + rows, mask=row_in, other=0.0)
    log_s = tl.load(stats_ptr + n_rows + rows, mask=row_in, other=0.0)
    scale = tl.load(scale_ptr + rows, mask=row_in, other=0.0)  # 0 for ignored rows
    x = _logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_in, col_in, d,
                    HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, TO_FP32, IEEE)
    in_tile = row_in[:, None] & col_in[None, :] & (scale != 0.0)[:, None]
    p = tl.where(in_tile, tl.exp((x - m[:, None]) - log_s[:, None]), 0.0)
    is_target = (cols[None, :] == targets[:, None]) & in_tile
    if tl.max(tl.maximum(p, is_target.to(tl.float32))) < filter_below:
        tl.atomic_add(skipped_ptr, 1)
    else:
        g = p - (1.0 - label_smoothing) * is_target.to(tl.float32)
        g = tl.where(in_tile, g - label_smoothing / vocab, 0.0) * scale[:, None]
        if NEED_BIAS:
            tl.atomic_add(grad_bias_ptr + cols, tl.sum(g, axis=0), mask=col_in)
        g = g.to(hidden_ptr.dtype.element_ty)  # rounded as the eager logits' gradient
        if TO_FP32:
            g = g.to(tl.float32)
        ks = tl.arange(0, BLOCK_D)
        for k in range(0, d, BLOCK_D):
            k_in = (k + ks < d)[None, :]
            if NEED_HIDDEN:
                w = _load_columns(weight_ptr, cols, col_in, k, d, BLOCK_D, TO_FP32)
                tl.atomic_add(grad_hidden_ptr + rows[:, None] * d + k + ks[None, :],
                              _dot(g, w, IEEE), mask=row_in[:, None] & k_in)
            if NEED_WEIGHT:
                h = _load_columns(hidden_ptr, rows, row_in, k, d, BLOCK_D, TO_FP32)
                tl.atomic_add(grad_weight_ptr + cols[:, None] * d + k + ks[None, :],
                              _dot(tl.trans(g), h, IEEE), mask=col_in[:, None] & k_in)


# tile sizes: (BLOCK_N, BLOCK_V, BLOCK_D); fp32 (IEEE dots on the CUDA cores, their operands
# in registers) smaller, else it spills; through the interpreter larger tiles, fewer programs
V2_BLOCKS = (64, 128, 64)
V2_FP32_BLOCKS = (32, 64, 16)
V2_INTERPRETER_BLOCKS = (64, 1024, 128)
V2_TARGET_PROGRAMS = 512  # the forward splits the vocabulary until about this many programs
# warps a program: with 4 the bf16 forward spills on sm_80, with 8 the fp32 ones do
# (255 registers; tests/test_kernel_report.py finds any spill)
V2_WARPS, V2_FP32_WARPS = 8, 4


def filter_threshold(dtype: torch.dtype) -> float:
    """Below this, |softmax - onehot| is under the gradient's resolution in `dtype`
    (Cut Cross-Entropy's rule, eps / 32: 2^-12 for bf16, 2^-15 for fp16, 2^-28 for fp32)."""
    return torch.finfo(dtype).eps / 32


def v2_options(hidden: torch.Tensor, bias: torch.Tensor | None,
               interpreted: bool | None = None) -> dict:
    """The constexprs both version 2 kernels share (interpreted, default: hidden on the CPU)."""
    if interpreted is None:
        interpreted = not hidden.is_cuda
    block_n, block_v, block_d = (V2_INTERPRETER_BLOCKS if interpreted else
                                 V2_FP32_BLOCKS if hidden.dtype == torch.float32 else V2_BLOCKS)
    return dict(HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
                TO_FP32=interpreted, IEEE=hidden.dtype == torch.float32,
                num_warps=V2_FP32_WARPS if hidden.dtype == torch.float32 else V2_WARPS)


def v2_forward_launch(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      targets: torch.Tensor, options: dict
                      ) -> tuple[torch.Tensor, triton_ce.KernelLaunch]:
    """(partial (4, splits, N) fp32, allocated, and the forward's launch that fills it): the
    vocabulary split among programs until about V2_TARGET_PROGRAMS (one split through the
    interpreter)."""
    n_rows, d = hidden.shape
    vocab = weight.shape[0]
    row_blocks = triton.cdiv(n_rows, options["BLOCK_N"])
    vocab_tiles = triton.cdiv(vocab, options["BLOCK_V"])
    splits = 1 if options["TO_FP32"] else max(1, min(vocab_tiles,
                                                     V2_TARGET_PROGRAMS // row_blocks))
    tiles_per_split = triton.cdiv(vocab_tiles, splits)
    splits = triton.cdiv(vocab_tiles, tiles_per_split)  # none left empty
    partial = torch.empty(4, splits, n_rows, dtype=torch.float32, device=hidden.device)
    return partial, triton_ce.KernelLaunch(
        _lse_forward_kernel, (row_blocks, splits),
        (hidden, weight, hidden if bias is None else bias, targets, partial, n_rows, vocab, d,
         tiles_per_split), dict(options))


def v2_backward_launch(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       targets: torch.Tensor, stats: torch.Tensor, scale: torch.Tensor,
                       label_smoothing: float, filter: bool, needs: tuple[bool, bool, bool],
                       options: dict) -> tuple[list, torch.Tensor, triton_ce.KernelLaunch]:
    """([grad_hidden, grad_weight, grad_bias] fp32 zeros or None, the skipped-tile counter,
    and the backward's launch): one program per (row block, vocab tile)."""
    n_rows, d = hidden.shape
    vocab = weight.shape[0]
    fp32 = dict(dtype=torch.float32, device=hidden.device)
    grads = [torch.zeros(n_rows, d, **fp32) if needs[0] else None,
             torch.zeros(vocab, d, **fp32) if needs[1] else None,
             torch.zeros(vocab, **fp32) if needs[2] and bias is not None else None]
    skipped = torch.zeros(1, dtype=torch.int32, device=hidden.device)
    threshold = filter_threshold(hidden.dtype) if filter and label_smoothing == 0.0 else 0.0
    return grads, skipped, triton_ce.KernelLaunch(
        _grad_backward_kernel,
        (triton.cdiv(n_rows, options["BLOCK_N"]), triton.cdiv(vocab, options["BLOCK_V"])),
        (hidden, weight, hidden if bias is None else bias, targets, stats, scale,
         *(stats if g is None else g for g in grads), skipped, n_rows, vocab, d,
         float(label_smoothing), threshold),
        dict(options, NEED_HIDDEN=grads[0] is not None, NEED_WEIGHT=grads[1] is not None,
             NEED_BIAS=grads[2] is not None))


class LinearCrossEntropyV2(torch.autograd.Function):
    """Version 2. forward(hidden, weight, bias, targets, ignore_index, reduction,
    label_smoothing, filter): the loss as version 1 gives it; the backward recomputes the
    logits tile by tile. filter: skip negligible tiles (filter_threshold) or not.
    `skipped_tiles` (a one-element int32 tensor) counts the last backward's skips."""

    skipped_tiles: torch.Tensor | None = None

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, reduction, label_smoothing,
                filter):
        vocab = weight.shape[0]
        options = v2_options(hidden, bias)
        partial, launch = v2_forward_launch(hidden, weight, bias, targets, options)
        with triton_ce._on_device(hidden):
            launch.run()
        part_m, part_s = partial[0], partial[1]
        x_target, x_sum = partial[2].sum(0), partial[3].sum(0)
        m = part_m.max(0).values
        log_s = (part_s * torch.exp(part_m - m)).sum(0).log()
        valid = targets != ignore_index
        loss = (m - x_target) + log_s
        if label_smoothing > 0.0:
            loss = (1.0 - label_smoothing) * loss + label_smoothing * ((m - x_sum / vocab) + log_s)
        loss = torch.where(valid, loss, 0.0)
        n_valid = valid.sum()
        ctx.save_for_backward(hidden, weight, bias, targets, torch.stack([m, log_s]), n_valid)
        ctx.args = (ignore_index, reduction, label_smoothing, filter, options)
        return triton_ce.reduce(loss, reduction, n_valid)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        hidden, weight, bias, targets, stats, n_valid = ctx.saved_tensors
        ignore_index, reduction, label_smoothing, filter, options = ctx.args
        # each row's scale: its grad_output, over n_valid for "mean", 0 where ignored
        scale = grad_output.to(torch.float32).expand(hidden.shape[0])
        if reduction == "mean":
            scale = scale / n_valid.clamp(min=1)
        scale = torch.where(targets != ignore_index, scale, 0.0).contiguous()
        grads, skipped, launch = v2_backward_launch(
            hidden, weight, bias, targets, stats, scale, label_smoothing, filter,
            ctx.needs_input_grad[:3], options)
        with triton_ce._on_device(hidden):
            launch.run()
        LinearCrossEntropyV2.skipped_tiles = skipped
        grads = [None if g is None else g.to(t.dtype)
                 for g, t in zip(grads, (hidden, weight, bias))]
        return (*grads, None, None, None, None, None)


def version_2_launches() -> list[tuple[str, triton_ce.KernelLaunch]]:
    """Version 2's launches as a GPU would make them, on meta tensors (shapes and dtypes,
    no data), for bench/triton_aot.py to compile ahead of time: the forward and the
    backward (all three gradients, the filter on) at GPT-2's shape in bf16 (N = 8192,
    d = 768, V = 50257, with bias) and the chapter's in fp32 (N = 8192, d = 384, V = 512)."""
    launches = []
    for dtype, d, vocab in ((torch.bfloat16, 768, 50257), (torch.float32, 384, 512)):
        n_rows = 8192
        meta = dict(device="meta")
        hidden = torch.empty(n_rows, d, dtype=dtype, **meta)
        weight = torch.empty(vocab, d, dtype=dtype, **meta)
        bias = torch.empty(vocab, dtype=dtype, **meta)
        targets = torch.empty(n_rows, dtype=torch.int64, **meta)
        options = v2_options(hidden, bias, interpreted=False)
        partial, forward = v2_forward_launch(hidden, weight, bias, targets, options)
        stats = torch.empty(2, n_rows, dtype=torch.float32, **meta)
        scale = torch.empty(n_rows, dtype=torch.float32, **meta)
        backward = v2_backward_launch(hidden, weight, bias, targets, stats, scale, 0.0, True,
                                      (True, True, True), options)[2]
        case = f"linear CE v2 {str(dtype).removeprefix('torch.')} d={d} V={vocab}"
        launches += [(f"{case}, forward", forward), (f"{case}, backward", backward)]
    return launches
