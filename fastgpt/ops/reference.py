"""Pure-PyTorch reference ops: the maths written out, the ground truth every fused kernel
is tested against, and the path used wherever a kernel cannot run (e.g. on a CPU)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     dropout_p: float = 0.0, scale: float | None = None,
                     keep: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q @ k^T * scale, causal mask) with dropout on the probabilities, times v.

    q, k, v: (B, H, T, D), float; returns (B, H, T, D). scale defaults to 1/sqrt(D).
    k and v may be longer than q (Tk > Tq, generation with a KV cache): the queries are then
    the last Tq positions, query i at position Tk - Tq + i.
    keep: an explicit dropout mask (B, H, Tq, Tk) bool, True where a probability is kept
    (scaled by 1 / (1 - dropout_p)); None draws one with F.dropout. Materialises the
    (B, H, Tq, Tk) scores: simple and exact, not memory-frugal.
    """
    Tq, Tk, D = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale                      # (B, H, Tq, Tk)
    # query i sits at position Tk - Tq + i and sees the keys up to it. (Compared from
    # positions, not a stored bool matrix, which torch.compile's CPU code loads slowly.)
    positions = torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)
    future = torch.arange(Tk, device=q.device)[None, :] > positions    # (Tq, Tk)
    scores = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if keep is not None:
        probs = probs * keep / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return probs @ v


# FlashAttention-2, tile loop for tile loop as csrc/attention.cu runs it: the CUDA code
# mirrors these two functions, so their index arithmetic is proven on a CPU first.

def tiled_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                            block_q: int = 64, block_k: int = 64, dropout_p: float = 0.0,
                            keep: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention without the (T, T) matrices: (out (B, H, T, D) in q's dtype,
    lse (B, H, T), the log-sum-exp of each row's scaled scores). Accumulation and lse are
    float32 for float32/bf16/fp16 inputs, as in the kernels (float64 for float64 inputs,
    so that the tests can be exact).

    One "program" per Q tile of block_q rows: it streams the K/V tiles up to the diagonal
    (tiles wholly in the future are never visited; the diagonal ones are masked), keeping a
    running max m and sum l of exp(s - m) per row and rescaling its fp32 accumulator when m
    grows. keep: the dropout mask as in causal_attention (the kernel regenerates its own);
    dropout applies to the normalised probabilities, so l sums the undropped ones.
    """
    B, H, T, D = q.shape
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    out = torch.empty_like(q)
    lse = torch.empty(B, H, T, dtype=acc_dtype, device=q.device)
    rows = torch.arange(T, device=q.device)
    for q0 in range(0, T, block_q):
        q1 = min(q0 + block_q, T)
        qi = q[:, :, q0:q1].to(acc_dtype)
        m = torch.full((B, H, q1 - q0), float("-inf"), dtype=acc_dtype, device=q.device)
        l = torch.zeros(B, H, q1 - q0, dtype=acc_dtype, device=q.device)
        acc = torch.zeros(B, H, q1 - q0, D, dtype=acc_dtype, device=q.device)
        for k0 in range(0, q1, block_k):  # k0 < q1: the tile holds a key some row can see
            k1 = min(k0 + block_k, T)
            kj, vj = k[:, :, k0:k1].to(acc_dtype), v[:, :, k0:k1].to(acc_dtype)
            s = qi @ kj.transpose(-2, -1) * scale                          # (B, H, bq, bk)
            if k1 - 1 > q0:  # some key lies after some query: mask the future
                s = s.masked_fill(rows[k0:k1][None, :] > rows[q0:q1][:, None], float("-inf"))
            m_new = torch.maximum(m, s.amax(-1))  # finite: key 0 is in every row's past
            p = torch.exp(s - m_new[..., None])
            correction = torch.exp(m - m_new)     # 0 on the first tile (m = -inf)
            l = l * correction + p.sum(-1)
            if keep is not None:
                p = p * keep[:, :, q0:q1, k0:k1] / (1.0 - dropout_p)
            acc = acc * correction[..., None] + p @ vj
            m = m_new
        out[:, :, q0:q1] = (acc / l[..., None]).to(q.dtype)
        lse[:, :, q0:q1] = m + torch.log(l)
    return out, lse


def tiled_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor,
                             scale: float, block_q: int = 64, block_k: int = 64,
                             dropout_p: float = 0.0, keep: torch.Tensor | None = None,
                             deterministic: bool = False
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in q's dtype from the forward's out and lse, recomputing P tile by tile.

    Accumulation is in lse's dtype. First Dr = rowsum(dO * O) per row. Then one "program"
    per K/V tile: for every Q tile that can see it, P = exp(S * scale - lse),
    dV += (P dropped)^T dO, dP = dO V^T (dropped), dS = P * (dP - Dr), dK += dS^T Q * scale,
    and dQ += dS K * scale added into a shared dQ (fp32 atomicAdd on a GPU). deterministic=True instead gives
    each Q tile its own pass over the K/V tiles for dQ (no atomics, P computed twice).
    """
    B, H, T, D = q.shape
    acc_dtype = lse.dtype
    dr = (grad_out.to(acc_dtype) * out.to(acc_dtype)).sum(-1)         # (B, H, T)
    dq = torch.zeros(B, H, T, D, dtype=acc_dtype, device=q.device)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    rows = torch.arange(T, device=q.device)

    def tile(q0: int, q1: int, k0: int, k1: int):
        """P (undropped), the dropped P and dS of the tile (q0:q1) x (k0:k1)."""
        qi, kj, vj = (t.to(acc_dtype) for t in (q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1]))
        s = qi @ kj.transpose(-2, -1) * scale
        if k1 - 1 > q0:
            s = s.masked_fill(rows[k0:k1][None, :] > rows[q0:q1][:, None], float("-inf"))
        p = torch.exp(s - lse[:, :, q0:q1, None])                       # masked: exp(-inf) = 0
        dp = grad_out[:, :, q0:q1].to(acc_dtype) @ vj.transpose(-2, -1)
        p_dropped = p
        if keep is not None:
            tile_keep = keep[:, :, q0:q1, k0:k1].to(acc_dtype) / (1.0 - dropout_p)
            p_dropped, dp = p * tile_keep, dp * tile_keep
        return p_dropped, p * (dp - dr[:, :, q0:q1, None])

    for k0 in range(0, T, block_k):
        k1 = min(k0 + block_k, T)
        dk_acc = torch.zeros(B, H, k1 - k0, D, dtype=acc_dtype, device=q.device)
        dv_acc = torch.zeros(B, H, k1 - k0, D, dtype=acc_dtype, device=q.device)
        for q0 in range(k0 - k0 % block_q, T, block_q):  # Q tiles whose last row >= k0
            q1 = min(q0 + block_q, T)
            p_dropped, ds = tile(q0, q1, k0, k1)
            dv_acc += p_dropped.transpose(-2, -1) @ grad_out[:, :, q0:q1].to(acc_dtype)
            dk_acc += ds.transpose(-2, -1) @ q[:, :, q0:q1].to(acc_dtype) * scale
            if not deterministic:
                dq[:, :, q0:q1] += ds @ k[:, :, k0:k1].to(acc_dtype) * scale
        dk[:, :, k0:k1], dv[:, :, k0:k1] = dk_acc.to(k.dtype), dv_acc.to(v.dtype)
    if deterministic:
        for q0 in range(0, T, block_q):
            q1 = min(q0 + block_q, T)
            for k0 in range(0, q1, block_k):
                k1 = min(k0 + block_k, T)
                dq[:, :, q0:q1] += tile(q0, q1, k0, k1)[1] @ k[:, :, k0:k1].to(acc_dtype) * scale
    return dq.to(q.dtype), dk, dv


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0,
                  check_targets: bool = True) -> torch.Tensor:
    """Cross-entropy as log-softmax + gather, with F.cross_entropy's semantics.

    logits: (N, V) float; targets: (N,) int64. Rows whose target is ignore_index count 0
    and are left out of the mean (all rows ignored gives nan, as torch does). Label
    smoothing mixes in the mean of -log p over the V classes: (1 - e) * nll + e * smooth.
    reduction: "mean" -> scalar, "sum" -> scalar, "none" -> (N,).
    bf16/fp16 logits are computed in fp32 (as torch's autocast does for cross_entropy) and
    the loss is returned in fp32, like the fused kernel's; fp64 stays fp64.
    check_targets: see fastgpt.ops.cross_entropy.
    """
    check_cross_entropy_inputs(logits, targets, ignore_index, reduction, label_smoothing,
                               check_targets)
    valid = targets != ignore_index
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()  # a sum of bf16 losses would lose all precision
    log_probs = torch.log_softmax(logits, dim=-1)                   # (N, V)
    safe_targets = torch.where(valid, targets, 0)
    loss = -log_probs.gather(1, safe_targets[:, None]).squeeze(1)   # (N,)
    if label_smoothing > 0.0:
        smooth = -log_probs.mean(dim=-1)
        loss = (1.0 - label_smoothing) * loss + label_smoothing * smooth
    loss = loss.masked_fill(~valid, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum()


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, *, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0,
                         check_targets: bool = True) -> torch.Tensor:
    """cross_entropy(F.linear(hidden, weight, bias), targets, ...): the plain composition,
    which materialises the (N, V) logits (and, for the backward, their gradient).

    hidden: (N, d) float; weight: (V, d), as nn.Linear stores it; bias: (V,) or None;
    targets: (N,) int64. The rest as in cross_entropy.
    """
    check_linear_cross_entropy_inputs(hidden, weight, bias, targets, ignore_index, reduction,
                                      label_smoothing, check_targets)
    return cross_entropy(F.linear(hidden, weight, bias), targets, ignore_index=ignore_index,
                         reduction=reduction, label_smoothing=label_smoothing,
                         check_targets=False)


def adamw_step(params: list[torch.Tensor], grads: list[torch.Tensor],
               exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], *, lr: float,
               beta1: float, beta2: float, eps: float, weight_decay: float, step: float,
               grad_scale: torch.Tensor | None = None) -> None:
    """One AdamW update of `params` in place (fastgpt.optim's docstring has the maths), at
    step `step` (counting from 1); exp_avgs / exp_avg_sqs (float32, the parameters' shapes)
    are updated in place too. grad_scale (a float32 scalar tensor, e.g. the clipping factor)
    multiplies every gradient first. One torch._foreach_* call per line for all tensors (per
    element exactly torch.optim.AdamW(foreach=False)'s arithmetic); like torch's foreach
    AdamW it holds the denominators (and for bf16/fp16 parameters fp32 copies) of all of
    `params` at once. bf16/fp16 parameters: fp32 maths, rounded once on the way back."""
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** step)
    fp32 = [p if p.dtype == torch.float32 else p.float() for p in params]
    grads = [g if g.dtype == torch.float32 else g.float() for g in grads]
    if grad_scale is not None:
        grads = torch._foreach_mul(grads, grad_scale)
    torch._foreach_mul_(fp32, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, bias_correction2_sqrt)
    torch._foreach_add_(denoms, eps)
    torch._foreach_addcdiv_(fp32, exp_avgs, denoms, value=-lr / bias_correction1)
    for p, param in zip(params, fp32):
        if param is not p:
            p.copy_(param)


def check_linear_cross_entropy_inputs(hidden: torch.Tensor, weight: torch.Tensor,
                                      bias: torch.Tensor | None, targets: torch.Tensor,
                                      ignore_index: int, reduction: str, label_smoothing: float,
                                      check_targets: bool = True) -> None:
    """check_cross_entropy_inputs for the logits that hidden @ weight.T + bias would be:
    the shapes, dtypes and devices of hidden, weight and bias, then check_loss_arguments
    (on the host, no sync)."""
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be (N, d) and weight (V, d), got shapes "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (N, d) and weight (V, d) must agree on d, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if not hidden.is_floating_point():
        raise ValueError(f"hidden must be a floating-point tensor, got {hidden.dtype}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be ({weight.shape[0]},), got shape {tuple(bias.shape)}")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is None:
            continue
        if tensor.dtype != hidden.dtype:
            raise ValueError(f"{name} is {tensor.dtype} and hidden {hidden.dtype}: they must "
                             f"match (cast one, or run under torch.autocast)")
        if tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device}, hidden on {hidden.device}")
    check_loss_arguments(targets, hidden.shape[0], weight.shape[0], hidden.device,
                         ignore_index, reduction, label_smoothing, check_targets)


def check_cross_entropy_inputs(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                               reduction: str, label_smoothing: float,
                               check_targets: bool = True) -> None:
    """Raise ValueError for what F.cross_entropy would reject or silently get wrong; every
    backend calls this first. Shapes, dtypes and devices are checked on the host (no sync);
    the targets' range by check_target_range, unless check_targets is False."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
    check_loss_arguments(targets, logits.shape[0], logits.shape[1], logits.device,
                         ignore_index, reduction, label_smoothing, check_targets)


def check_loss_arguments(targets: torch.Tensor, n_rows: int, num_classes: int,
                         device: torch.device, ignore_index: int, reduction: str,
                         label_smoothing: float, check_targets: bool = True) -> None:
    """What both losses check beyond their inputs' own shapes: targets (n_rows,) int64 on
    `device`, the reduction and label smoothing, and (check_target_range) the targets'
    range, unless check_targets is False."""
    if targets.shape != (n_rows,):
        raise ValueError(f"targets must be ({n_rows},), got shape {tuple(targets.shape)}")
    if targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64, got {targets.dtype}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if targets.device != device:
        raise ValueError(f"targets are on {targets.device}, the inputs on {device}")
    if check_targets:
        check_target_range(targets, num_classes, ignore_index)


def check_target_range(targets: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Targets must lie in [0, num_classes) unless they are ignore_index. Never a host sync:
    on CPU tensors in eager mode, a ValueError naming the first bad target (the data is on
    the host already); elsewhere (CUDA tensors, or inside torch.compile) an asynchronous
    assert, torch._assert_async: on a GPU a device-side assert that stops the process at the
    next synchronisation, as F.cross_entropy's own check does, and under torch.compile on a
    CPU a RuntimeError; no branch on the data, so no graph break."""
    out_of_range = (targets != ignore_index) & ((targets < 0) | (targets >= num_classes))
    if _readable_on_host(targets):
        if out_of_range.any():
            bad = targets[out_of_range][0].item()
            raise ValueError(f"target {bad} is out of range for {num_classes} classes "
                             f"(and is not ignore_index={ignore_index})")
    else:
        torch._assert_async(~out_of_range.any(),
                            f"cross_entropy: a target is out of range for {num_classes} "
                            f"classes (and is not ignore_index={ignore_index})")


def _readable_on_host(tensor: torch.Tensor) -> bool:
    """Whether reading `tensor` from Python costs no device sync and breaks no graph."""
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()
