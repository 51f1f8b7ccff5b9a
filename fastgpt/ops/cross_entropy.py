"""Softmax cross-entropy over logits: the op's entry point, its torch path
(F.cross_entropy) and its fused path (the Triton kernel of fastgpt/ops/triton_ce.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastgpt.ops import dispatch, reference


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0,
                  backend: str | None = None, check_targets: bool = True) -> torch.Tensor:
    """F.cross_entropy over logits (N, V) and int64 targets (N,).

    Every backend returns the loss in fp32 whatever the logits' dtype ("torch" runs
    F.cross_entropy on the logits cast to fp32, as torch.autocast does; F.cross_entropy
    alone would return the logits' dtype). The fused path is
    triton_ce.fused_cross_entropy (where tests and benchmarks set its tile sizes).

    No call waits for the device. A target outside [0, V) that is not ignore_index is
    caught without a host sync (reference.check_target_range): on CPU tensors a ValueError
    naming it; on a GPU an asynchronous device-side assert, which stops the process at its
    next synchronisation (as F.cross_entropy's own does). check_targets=False skips that
    check (a few small launches) for targets validated where they were made; an
    out-of-range target then gives its row a nan loss and gradient in the fused kernel
    (which reads nothing outside the row) and an index error in the reference.
    """
    chosen = dispatch.resolve_backend("cross_entropy", backend, logits.device)
    if chosen == "reference":
        return reference.cross_entropy(logits, targets, ignore_index=ignore_index,
                                       reduction=reduction, label_smoothing=label_smoothing,
                                       check_targets=check_targets)
    if chosen == "torch":
        reference.check_cross_entropy_inputs(logits, targets, ignore_index, reduction,
                                             label_smoothing, check_targets)
        # in fp32, as under torch.autocast (cross_entropy is on its fp32 list) and as the
        # other implementations compute it: the loss in fp32, the gradient rounded once
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits, targets, ignore_index=ignore_index,
                               reduction=reduction, label_smoothing=label_smoothing)
    from fastgpt.ops import triton_ce

    return triton_ce.fused_cross_entropy(logits, targets, ignore_index=ignore_index,
                                         reduction=reduction, label_smoothing=label_smoothing,
                                         check_targets=check_targets)
