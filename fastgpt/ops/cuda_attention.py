"""Fused causal attention: the CUDA kernels of csrc/attention.cu as an autograd Function.

The forward saves only q, k, v, the output and one fp32 log-sum-exp per row; the backward
recomputes the probabilities from them (FlashAttention-2). Dropout is decided by Philox
keyed by (seed, offset), drawn per call from torch's CPU generator (so torch.manual_seed and
a checkpoint's RNG state reproduce it, with no device sync) and regenerated identically in
the backward; `dropout_mask` rebuilds the very mask of a call for tests.

Inputs: q, k, v (B, H, T, D), all float32 (the CUDA-core kernels) or all bfloat16 / float16
(the tensor-core kernels), D in {32, 64, 128}, any B, H and T >= 1, on one CUDA device.
"""

from __future__ import annotations

import torch

HEAD_DIMS = (32, 64, 128)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the kernels cannot take these inputs (None: they can)."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        return (f"q, k, v must share one (B, H, T, D) shape, got {tuple(q.shape)}, "
                f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        return f"q, k, v must all be float32, bfloat16 or float16, got {q.dtype}, {k.dtype}, {v.dtype}"
    if q.shape[-1] not in HEAD_DIMS:
        return f"the head dim must be 32, 64 or 128, got {q.shape[-1]}"
    if q.shape[-2] < 1 or q.numel() == 0:
        return f"B, H and T must be at least 1, got {tuple(q.shape)}"
    if not (q.device == k.device == v.device) or q.device.type != "cuda":
        return f"q, k, v must be on one CUDA device, got {q.device}, {k.device}, {v.device}"
    return None


def draw_seed() -> tuple[int, int]:
    """A fresh (seed, offset) for one call's dropout, from torch's CPU generator."""
    seed, offset = torch.randint(0, 2 ** 62, (2,)).tolist()
    return seed, offset


def dropout_mask(shape: torch.Size | tuple, seed: int, offset: int, dropout_p: float,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """The keep-mask (B, H, T, T) bool that the kernels apply for (seed, offset): csrc/philox.h
    run on the CPU (fastgpt::attention_dropout_mask), for tests against the reference."""
    B, H, T = shape[0], shape[1], shape[2]
    keep = torch.ops.fastgpt.attention_dropout_mask(seed, offset, B * H, T, dropout_p)
    return keep.view(B, H, T, T).to(device)


class FusedCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale: float, dropout_p: float, deterministic: bool,
                seed: int, offset: int):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = torch.ops.fastgpt.attention_forward(q, k, v, scale, dropout_p, seed, offset)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (scale, dropout_p, seed, offset, deterministic)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.fastgpt.attention_backward(q, k, v, out, lse,
                                                          grad_out.contiguous(), *ctx.args)
        return dq, dk, dv, None, None, None, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              dropout_p: float = 0.0, deterministic: bool = False,
              seed: int | None = None, offset: int = 0) -> torch.Tensor:
    """Causal attention through the kernels: (B, H, T, D) -> (B, H, T, D) in q's dtype.
    seed None draws one (draw_seed) when dropout_p > 0."""
    if seed is None:
        seed, offset = draw_seed() if dropout_p > 0.0 else (0, 0)
    return FusedCausalAttention.apply(q, k, v, float(scale), float(dropout_p),
                                      bool(deterministic), int(seed), int(offset))


def self_check(device: torch.device) -> None:
    """Run the forward and both backwards once on `device` for each dtype the kernels take,
    against the reference in float64, so that "auto" never trains through a kernel that
    does not build or run right here. Raises RuntimeError saying what went wrong.
    Bounds, relative to the largest entry: 1e-4 in fp32 (sums of ~100 terms in another
    order) and 2^-5 in bf16/fp16 (inputs, P and dS rounded to 8 or 11 bits); a wrong mask
    or tile moves entries by O(0.1)."""
    from fastgpt.ops.reference import causal_attention

    generator = torch.Generator().manual_seed(0)
    B, H, T, D = 1, 2, 77, 64
    for dtype in DTYPES:
        q, k, v, grad_out = (torch.randn(B, H, T, D, generator=generator).to(device, dtype)
                             for _ in range(4))
        tol = 1e-4 if dtype == torch.float32 else 2.0 ** -5
        for deterministic in (False, True):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            with torch.enable_grad(), torch.autocast(device.type, enabled=False):
                out = attention(*leaves, D ** -0.5, 0.1, deterministic, seed=3, offset=1)
                out.backward(grad_out)
                keep = dropout_mask(q.shape, 3, 1, 0.1, device)
                exact = [t.double().requires_grad_() for t in (q, k, v)]
                want = causal_attention(*exact, dropout_p=0.1, keep=keep)
                want.backward(grad_out.double())
            for name, got, ref in [("out", out, want)] + [
                    (f"d{n}", a.grad, b.grad) for n, a, b in zip("qkv", leaves, exact)]:
                error = (got.double() - ref.detach()).abs().max().item()
                if not error <= tol * max(1.0, ref.abs().max().item()):
                    raise RuntimeError(f"{dtype} {name} (deterministic={deterministic}) differs "
                                       f"from the reference by {error:.3g}")
