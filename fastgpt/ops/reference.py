"""Pure-PyTorch reference ops: the maths written out, the ground truth every fused kernel
is tested against, and the path used wherever a kernel cannot run (e.g. on a CPU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """softmax(q @ k^T * scale, causal mask) with dropout on the probabilities, times v.

    q, k, v: (B, H, T, D), float; returns (B, H, T, D). scale defaults to 1/sqrt(D).
    Materialises the (B, H, T, T) scores: simple and exact, not memory-frugal.
    """
    T, D = q.shape[-2], q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale                      # (B, H, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))              # query i sees keys <= i
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return probs @ v


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy as log-softmax + gather, with F.cross_entropy's semantics.

    logits: (N, V) float; targets: (N,) int64. Rows whose target is ignore_index count 0
    and are left out of the mean (all rows ignored gives nan, as torch does). Label
    smoothing mixes in the mean of -log p over the V classes: (1 - e) * nll + e * smooth.
    reduction: "mean" -> scalar, "sum" -> scalar, "none" -> (N,).
    bf16/fp16 logits are computed in fp32 (as torch's autocast does for cross_entropy) and
    the loss is returned in fp32, like the fused kernel's; fp64 stays fp64.
    """
    check_cross_entropy_inputs(logits, targets, ignore_index, reduction, label_smoothing)
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


def check_cross_entropy_inputs(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                               reduction: str, label_smoothing: float) -> None:
    """Raise ValueError for what F.cross_entropy would reject or silently get wrong; every
    backend calls this first. Checking the targets' range costs a device sync."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"targets must be ({logits.shape[0]},), got shape {tuple(targets.shape)}")
    if targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64, got {targets.dtype}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if targets.device != logits.device:
        raise ValueError(f"targets are on {targets.device}, logits on {logits.device}")
    num_classes = logits.shape[1]
    valid = targets != ignore_index
    out_of_range = valid & ((targets < 0) | (targets >= num_classes))
    if out_of_range.any():
        bad = targets[out_of_range][0].item()
        raise ValueError(f"target {bad} is out of range for {num_classes} classes "
                         f"(and is not ignore_index={ignore_index})")
