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


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                               targets: torch.Tensor, bias: torch.Tensor | None = None, *,
                               ignore_index: int = -100, reduction: str = "mean",
                               label_smoothing: float = 0.0, check_targets: bool = True,
                               chunk_rows: int | None = None) -> torch.Tensor:
    """fastgpt.ops.linear_cross_entropy's fused path (after autocast's cast): its input
    checks, then version 1. chunk_rows overrides the rows per chunk (None: chunk_rows_for's
    choice), for tests and benchmarks."""
    from fastgpt.ops import reference

    reference.check_linear_cross_entropy_inputs(hidden, weight, bias, targets, ignore_index,
                                                reduction, label_smoothing, check_targets)
    if hidden.dtype not in triton_ce.DTYPES:
        raise ValueError(f"the fused linear_cross_entropy takes float32, bfloat16 or float16 "
                         f"inputs, got {hidden.dtype}")
    if chunk_rows is None:
        chunk_rows = chunk_rows_for(hidden.shape[0], weight.shape[0], hidden.shape[1])
    elif chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    return ChunkedLinearCrossEntropy.apply(
        hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
        targets.contiguous(), ignore_index, reduction, float(label_smoothing), chunk_rows)


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
