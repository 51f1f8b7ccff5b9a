"""Linear + cross-entropy from the hidden states: the op's entry point, its torch path
(F.linear then F.cross_entropy, which holds the (N, V) logits) and its fused path (the
chunked Triton version of fastgpt/ops/triton_linear_ce.py, which never does)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastgpt.ops import dispatch, reference


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, *, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0,
                         backend: str | None = None, check_targets: bool = True
                         ) -> torch.Tensor:
    """F.cross_entropy(hidden @ weight.T + bias, targets, ...) with gradients for hidden,
    weight and bias, where the fused path never holds the (N, V) logits.

    hidden: (N, d); weight: (V, d), as nn.Linear stores it; bias: (V,) or None; all one
    float dtype (under torch.autocast, cast to its dtype as F.linear would be); targets:
    (N,) int64. ignore_index, reduction, label_smoothing, check_targets: as in
    cross_entropy. The fused path (fastgpt/ops/triton_linear_ce.py) takes float32, bfloat16
    or float16 and returns the loss in fp32, as the others do for bf16/fp16 (tests and
    benchmarks set its rows per chunk through triton_linear_ce.fused_linear_cross_entropy).
    No call waits for the device.
    """
    device_type = hidden.device.type
    # (not torch.amp.is_autocast_available: torch 2.11's compile breaks the graph on it; meta
    # tensors, which the no-sync test uses, have no autocast to ask about)
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    chosen = dispatch.resolve_backend("linear_cross_entropy", backend, hidden.device)
    if chosen == "reference":
        return reference.linear_cross_entropy(hidden, weight, targets, bias,
                                              ignore_index=ignore_index, reduction=reduction,
                                              label_smoothing=label_smoothing,
                                              check_targets=check_targets)
    if chosen == "torch":
        reference.check_linear_cross_entropy_inputs(hidden, weight, bias, targets, ignore_index,
                                                    reduction, label_smoothing, check_targets)
        # the logits in the inputs' dtype, the loss in fp32 (as under torch.autocast)
        logits = F.linear(hidden, weight, bias)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits, targets,
                               ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=label_smoothing)
    from fastgpt.ops import triton_linear_ce

    return triton_linear_ce.fused_linear_cross_entropy(
        hidden, weight, targets, bias, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, check_targets=check_targets)
