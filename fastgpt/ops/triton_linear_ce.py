"""Fused linear + cross-entropy: the loss of hidden @ weight.T + bias without the (N, V)
logits (or their gradient) in memory at once.

Version 1, chunked (Liger-Kernel's fused linear cross-entropy): the rows go in chunks; per
chunk, the logits by one matmul into a buffer reused by every chunk, then the Triton
cross-entropy kernel (fastgpt/ops/triton_ce.py) writes the chunk's loss and, in place of
its logits, d(loss)/d(logits); from that gradient, the chunk's rows of grad_hidden
(gradient @ weight) and its share of grad_weight (gradient.T @ hidden, accumulated in fp32
for bf16/fp16 inputs) and grad_bias (column sums, fp32). All of it in the forward pass, as
the fused cross-entropy does: the backward only scales the three gradients by grad_output
(nothing when it is 1). reduction="none" needs each row's own grad_output, so there the
forward computes the loss alone (and each row's max and log-sum) and the backward runs the
chunks again, logits recomputed, with per-row scales.

Chunk size (chunk_rows_for): a chunk's logits never hold more elements than the larger of
hidden (N x d) and weight (V x d), the op's own inputs, so the memory beyond them stays
within a small multiple of their size whatever N and V are. At GPT-2's V = 50,257 with
d = 768 that is 768 rows a chunk (a 77 MB bf16 buffer where the whole logits at N = 8192
are 823 MB, and again for their gradient); at the chapter's V = 512 two chunks or fewer.

The loss is returned in fp32 (as the fused cross-entropy's); the gradients in the inputs'
dtypes. Accumulation: each matmul accumulates in fp32 (tensor cores, or the CPU's fp32
GEMM); grad_weight and grad_bias sum the chunks in fp32 and are rounded once at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from fastgpt.ops import triton_ce

CHUNK_ROW_MULTIPLE = 16  # chunk rows rounded down to this (whole tensor-core tiles)


def chunk_rows_for(n_rows: int, vocab: int, d: int) -> int:
    """Rows per chunk: the most whose logits (rows x vocab) hold no more elements than the
    larger of hidden (n_rows x d) and weight (vocab x d), rounded down to a multiple of
    CHUNK_ROW_MULTIPLE when that leaves any; at least 1, at most n_rows."""
    rows = max(n_rows, vocab) * d // vocab
    if rows >= CHUNK_ROW_MULTIPLE:
        rows -= rows % CHUNK_ROW_MULTIPLE
    return max(1, min(n_rows, rows))


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b, for a, b fp32, bf16 or fp16: the product accumulated in fp32 and
    added without rounding to a's dtype. On a GPU one GEMM whose epilogue adds into acc
    (addmm with out_dtype); on a CPU, which has no such GEMM, through fp32 copies of a, b
    (the same arithmetic, a chunk-sized copy more)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def chunked_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    targets: torch.Tensor, ignore_index: int, label_smoothing: float,
                    grad_scale: torch.Tensor | None, stats: torch.Tensor | None,
                    chunk_rows: int, needs: tuple[bool, bool, bool]
                    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None,
                               torch.Tensor | None, torch.Tensor | None]:
    """Version 1's chunk loop. hidden (N, d), weight (V, d), bias (V,) or None, all one
    dtype, contiguous; targets (N,) int64.

    grad_scale: None (the loss only), a fp32 scalar tensor (d loss_i / d logits scaled by
    it: 1/n_valid for "mean", 1 for "sum") or fp32 (N,) (each row by its own: "none"'s
    backward). stats: None, or the (2, N) fp32 row max and log-sum of an earlier call, to
    compute the gradients alone. needs: which of grad_hidden, grad_weight, grad_bias to
    compute (when grad_scale is given).
    Returns (loss (N,) fp32 or None when stats are given, stats (2, N) fp32, grad_hidden
    (N, d), grad_weight (V, d) in the inputs' dtype and grad_bias (V,), each None when not
    computed).
    """
    n_rows, d = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    compute_grad = grad_scale is not None
    need_hidden, need_weight, need_bias = (need and compute_grad for need in needs)
    need_bias = need_bias and bias is not None
    loss = None if stats is not None else torch.empty(n_rows, dtype=torch.float32, device=device)
    out_stats = torch.empty(2, n_rows, dtype=torch.float32, device=device) if stats is None \
        else stats
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    fp32 = torch.float32
    grad_weight = torch.zeros(vocab, d, dtype=fp32, device=device) if need_weight else None
    grad_bias = torch.zeros(vocab, dtype=fp32, device=device) if need_bias else None
    per_row_scale = compute_grad and grad_scale.dim() == 1
    buffer = hidden.new_empty(min(chunk_rows, n_rows), vocab)  # one chunk's logits, reused
    for start in range(0, n_rows, chunk_rows):
        end = min(start + chunk_rows, n_rows)
        h = hidden[start:end]
        logits = buffer[:end - start]
        if bias is None:
            torch.mm(h, weight.t(), out=logits)
        else:
            torch.addmm(bias, h, weight.t(), out=logits)
        chunk_loss, chunk_stats, grad = triton_ce.launch(
            logits, targets[start:end], ignore_index, label_smoothing,
            grad_scale[start:end] if per_row_scale else grad_scale,
            stats=None if stats is None else stats[:, start:end].contiguous(),
            grad=logits if compute_grad else None)
        if stats is None:
            loss[start:end] = chunk_loss
            out_stats[:, start:end] = chunk_stats
        if grad_hidden is not None:
            torch.mm(grad, weight, out=grad_hidden[start:end])
        if grad_weight is not None:
            _add_product(grad_weight, grad.t(), h)
        if grad_bias is not None:
            grad_bias += grad.sum(0, dtype=fp32)
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return loss, out_stats, grad_hidden, grad_weight, grad_bias


# The chunk loop as one custom op, so that torch.compile traces the loss through its fake
# (shape-only) version and runs the loop at run time, rather than tracing into Triton.

def _or_empty(tensor: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if tensor is None else tensor


@torch.library.custom_op("fastgpt::linear_cross_entropy_chunks", mutates_args=())
def _chunks_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               targets: torch.Tensor, grad_scale: torch.Tensor | None,
               stats: torch.Tensor | None, ignore_index: int, label_smoothing: float,
               chunk_rows: int, needs: list[bool]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """chunked_forward, with empty tensors for what it does not compute (the stats too when
    given: a custom op returns no alias of an input)."""
    with torch.autocast(hidden.device.type, enabled=False):  # its fp32 sums stay fp32
        loss, out_stats, *grads = chunked_forward(
            hidden, weight, bias, targets, ignore_index, label_smoothing, grad_scale, stats,
            chunk_rows, tuple(needs))
    return tuple(_or_empty(t, hidden) for t in (loss, None if stats is not None else out_stats,
                                                 *grads))


@_chunks_op.register_fake
def _(hidden, weight, bias, targets, grad_scale, stats, ignore_index, label_smoothing,
      chunk_rows, needs):
    n_rows = hidden.shape[0]
    compute_grad = grad_scale is not None
    empty = hidden.new_empty(0)
    given = stats is not None
    return (empty if given else hidden.new_empty(n_rows, dtype=torch.float32),
            empty if given else hidden.new_empty(2, n_rows, dtype=torch.float32),
            torch.empty_like(hidden) if compute_grad and needs[0] else empty,
            torch.empty_like(weight) if compute_grad and needs[1] else empty,
            torch.empty_like(bias) if compute_grad and needs[2] and bias is not None else empty)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Version 1 (see the module docstring for which pass computes the gradients)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, reduction, label_smoothing,
                chunk_rows):
        needs = list(ctx.needs_input_grad[:3])
        compute_grad = any(needs)
        n_valid, grad_scale = triton_ce.gradient_scale(targets, ignore_index, reduction,
                                                       compute_grad)
        loss, stats, *grads = _chunks_op(hidden, weight, bias, targets, grad_scale, None,
                                         ignore_index, label_smoothing, chunk_rows, needs)
        ctx.reduction = reduction
        ctx.needs = needs
        ctx.kernel_args = (ignore_index, label_smoothing, chunk_rows)
        if compute_grad and reduction == "none":
            ctx.save_for_backward(hidden, weight, bias, targets, stats)
        elif compute_grad:
            ctx.save_for_backward(*grads)
        return triton_ce.reduce(loss, reduction, n_valid)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if ctx.reduction == "none":
            hidden, weight, bias, targets, stats = ctx.saved_tensors
            ignore_index, label_smoothing, chunk_rows = ctx.kernel_args
            _, _, *grads = _chunks_op(hidden, weight, bias, targets,
                                      grad_output.to(torch.float32).contiguous(), stats,
                                      ignore_index, label_smoothing, chunk_rows, ctx.needs)
        else:
            grads = list(ctx.saved_tensors)
            for grad in grads:
                if grad.numel():
                    # in place, no host sync; nothing moves when grad_output is 1. In bf16 /
                    # fp16 a grad_output other than 1 rounds the gradients a second time.
                    triton_ce._scale_op(grad, grad_output)
        grads = [grad if need and grad.numel() else None for grad, need in zip(grads, ctx.needs)]
        return (*grads, None, None, None, None, None)


# ---------------------------------------------------------------------------------------
# Version 2: no logits in global memory (Cut Cross-Entropy's structure, apple/ml-cross-entropy).
# The forward multiplies hidden and weight tiles on chip and keeps each row's online max and
# sum; the backward recomputes each logit tile, skips the tiles whose gradient is below the
# inputs' resolution, and adds the tile's share of grad_hidden and grad_weight with fp32
# atomics. Kept beside version 1 for the benchmark (bench/bench_linear_cross_entropy.py),
# which decides whether it ships: it is not what fastgpt.ops.linear_cross_entropy runs.
# ---------------------------------------------------------------------------------------

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


# self_check's cases: (dtype, vocab, d, reduction, label smoothing, bias), 40 rows in
# chunks of 16 (a partial last chunk)
SELF_CHECK_CASES = ((torch.float32, 37, 64, "mean", 0.0, True),
                    (torch.bfloat16, 512, 64, "none", 0.1, False),
                    (torch.float32, 5000, 32, "sum", 0.0, True))
SELF_CHECK_ROWS, SELF_CHECK_CHUNK = 40, 16


def self_check(device: torch.device) -> None:
    """Run version 1 once per case on `device` against the fp64 reference (loss and the
    three gradients), so that "auto" never trains through a path that does not run right
    here. Raises RuntimeError naming the case that went wrong."""
    from fastgpt.ops.reference import linear_cross_entropy as reference

    generator = torch.Generator().manual_seed(0)
    with torch.enable_grad(), torch.inference_mode(False), torch.autocast(
            device.type, enabled=False):
        for dtype, vocab, d, reduction, smoothing, with_bias in SELF_CHECK_CASES:
            inputs = [torch.randn(SELF_CHECK_ROWS, d, generator=generator),
                      torch.randn(vocab, d, generator=generator) / d ** 0.5]
            if with_bias:
                inputs.append(torch.randn(vocab, generator=generator))
            inputs = [t.to(device=device, dtype=dtype) for t in inputs]
            targets = torch.randint(0, vocab, (SELF_CHECK_ROWS,), generator=generator)
            targets[::5] = -100
            targets = targets.to(device)
            grad_output = (torch.rand((SELF_CHECK_ROWS,) if reduction == "none" else (),
                                      generator=generator, dtype=torch.float64) + 0.5).to(device)
            results = []
            for fused in (False, True):
                leaves = [t.detach().clone().requires_grad_() for t in inputs]
                if fused:
                    loss = ChunkedLinearCrossEntropy.apply(
                        leaves[0], leaves[1], leaves[2] if with_bias else None, targets, -100,
                        reduction, smoothing, SELF_CHECK_CHUNK)
                    loss.backward(grad_output.to(loss.dtype))
                    results.append([loss] + [t.grad for t in leaves])
                else:
                    wide = [t.double() for t in leaves]
                    loss = reference(wide[0], wide[1], targets, wide[2] if with_bias else None,
                                     reduction=reduction, label_smoothing=smoothing)
                    results.append([loss] + list(torch.autograd.grad(loss, leaves, grad_output)))
            # 1e-5 (fp32) / 2^-5 (bf16: inputs, logits and gradients each rounded) of each
            # tensor's largest value: room for rounding, and any real fault shows
            tol = 1e-5 if dtype == torch.float32 else 2.0 ** -5
            for name, want, got in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"),
                                       *results):
                error = (got.double() - want.double()).abs().max().item()
                if not error <= tol * want.double().abs().max().item():
                    raise RuntimeError(f"{dtype} V={vocab} d={d} {reduction}: {name} error "
                                       f"{error:.3g} against the reference")


def version_2_launches() -> list[tuple[str, triton_ce.KernelLaunch]]:
    """Version 2's launches as a GPU would make them, on meta tensors (shapes and dtypes,
    no data), for fastgpt/ops/triton_aot.py to compile ahead of time: the forward and the
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
