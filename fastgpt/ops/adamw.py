"""The fused AdamW step's self-check: fastgpt._C's kernel (csrc/adamw.cu, or on a CPU the
CPU build's loop) against the reference step, before fastgpt.ops lets the optimizer use it.
The optimizer itself, its state and its two paths, is fastgpt.optim.AdamW."""

from __future__ import annotations

import torch

from fastgpt.ops import reference


def self_check(device: torch.device) -> None:
    """One fused AdamW step against reference.adamw_step on `device`: fp32 and bf16,
    aligned and unaligned tensors, more tensors than one launch takes. Raises RuntimeError
    if they disagree beyond rounding (1e-5 relative for fp32, 2^-7 for bf16)."""
    generator = torch.Generator().manual_seed(0)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=1)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2.0 ** -7)):
        sizes = [1 + (i * 977) % 5000 for i in range(40)]
        start = [torch.randn(n + 1, generator=generator) for n in sizes]
        grads = [torch.randn(n, generator=generator) for n in sizes]
        results = []
        for fused in (False, True):
            # every other tensor starts one element in: unaligned for the vector loads
            params = [s.to(device, dtype, copy=True)[i % 2:i % 2 + n]
                      for i, (s, n) in enumerate(zip(start, sizes))]
            moments = [[torch.zeros(p.shape, device=device) for p in params] for _ in range(2)]
            device_grads = [g.to(device, dtype) for g in grads]
            if fused:
                torch.ops.fastgpt.adamw_step(
                    params, device_grads, *moments, hyper["lr"], hyper["beta1"],
                    hyper["beta2"], hyper["eps"], hyper["weight_decay"], hyper["step"], None)
            else:
                reference.adamw_step(params, device_grads, *moments, **hyper)
            results.append(torch.cat([p.float().flatten() for p in params]))
        error = (results[0] - results[1]).abs().max().item()
        if not error <= tol * results[0].abs().max().item():
            raise RuntimeError(f"{dtype} step differs from the reference by {error:.3g}")
