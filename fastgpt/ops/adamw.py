"""The AdamW step as an op: one update of a list of parameters in place, by the reference
(fastgpt/ops/reference.py), torch's fused AdamW (`torch._fused_adamw_`) or fastgpt's CUDA
kernel (csrc/adamw.cu; on a CPU the CPU build's loop). The optimizer around it, its state
and its step counts, is fastgpt.optim.AdamW; the maths is in its docstring."""

from __future__ import annotations

import torch

from fastgpt.ops import dispatch, reference


def adamw_step(params: list[torch.Tensor], grads: list[torch.Tensor],
               exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], *,
               lr: float | torch.Tensor, beta1: float, beta2: float, eps: float,
               weight_decay: float, step: int, grad_scale: torch.Tensor | None = None,
               step_tensor: torch.Tensor | None = None, backend: str | None = None) -> None:
    """One AdamW update of `params` (all on one device) in place, at step `step` (counting
    from 1); exp_avgs / exp_avg_sqs (float32, the parameters' shapes) are updated in place.

    lr: a float, or a float32 scalar tensor (read on the device by the fused and torch
    paths). grad_scale: a float32 scalar tensor on the device, e.g. the clipping factor,
    that multiplies every gradient first: the reference and the kernel leave `grads` as
    they are; torch's op divides them in place by its reciprocal (so .grad then holds the
    clipped gradients, as after torch.nn.utils.clip_grad_norm_). step_tensor: a float32
    (1,) tensor on the device that already holds `step` (capturable steps: the kernel and
    torch's op read it there); None, the step is passed by value.

    torch's fused AdamW keeps its moments in the parameters' dtype: with fastgpt's fp32
    moments it takes float32 parameters only (a ValueError otherwise, under "torch").
    """
    device = params[0].device
    chosen = dispatch.resolve_backend("adamw", backend, device)
    if chosen == "torch" and any(p.dtype != torch.float32 for p in params):  # asked for
        raise ValueError("torch's fused AdamW keeps its moments in the parameters' dtype; "
                         "with fastgpt's float32 moments it takes float32 parameters only, "
                         f"got {sorted({str(p.dtype) for p in params})}")
    if chosen == "fused":
        lr_tensor = None
        if isinstance(lr, torch.Tensor):
            lr_tensor, lr = lr.to(device, torch.float32).reshape(1), float("nan")
        torch.ops.fastgpt.adamw_step(params, [g.contiguous() for g in grads], exp_avgs,
                                     exp_avg_sqs, lr, beta1, beta2, eps, weight_decay,
                                     int(step), grad_scale, lr_tensor, step_tensor)
    elif chosen == "torch":
        if step_tensor is None:  # a fill on the device: no copy from the host, no sync
            step_tensor = torch.full((), float(step), dtype=torch.float32, device=device)
        if isinstance(lr, torch.Tensor):
            lr = lr.to(device, torch.float32)
        torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [],
                            [step_tensor] * len(params), lr=lr, beta1=beta1, beta2=beta2,
                            weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False,
                            grad_scale=None if grad_scale is None else 1.0 / grad_scale,
                            found_inf=None)
    else:
        reference.adamw_step(params, grads, exp_avgs, exp_avg_sqs, lr=float(lr), beta1=beta1,
                             beta2=beta2, eps=eps, weight_decay=weight_decay, step=step,
                             grad_scale=grad_scale)
