"""Causal attention: the op's entry point, its torch path (SDPA) and its fused path (the
CUDA kernels of csrc/attention.cu, wrapped in fastgpt/ops/cuda_attention.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastgpt.backends import check_backend
from fastgpt.ops import cuda_attention, dispatch, reference


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     dropout_p: float = 0.0, scale: float | None = None,
                     backend: str | None = None,
                     deterministic: bool | None = None) -> torch.Tensor:
    """Causal softmax attention with dropout on the probabilities.
    q, k, v: (B, H, T, D) -> (B, H, T, D); scale defaults to 1/sqrt(D).

    The fused kernel takes float32, bfloat16 or float16 with D in {32, 64, 128}; under
    "auto" other inputs go to the reference, under "fused" they raise ValueError. "torch"
    is F.scaled_dot_product_attention(is_causal=True), whichever of its backends torch
    picks (its dropout draws its own mask: the same distribution, not the same mask).
    deterministic: the kernel's backward without atomics (None: whatever
    torch.use_deterministic_algorithms says); the reference is always deterministic.
    k, v longer than q (generation with a KV cache: q holds the last positions) run the
    reference whatever the backend: a few query rows, no kernel of their own.
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if backend is not None:
        check_backend(backend)  # a misspelt name fails here too
    if k.shape[-2] != q.shape[-2]:
        if k.shape[-2] < q.shape[-2]:
            raise ValueError(f"k and v must be at least as long as q, got {k.shape[-2]} "
                             f"keys for {q.shape[-2]} queries")
        return reference.causal_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    chosen = dispatch.resolve_backend("causal_attention", backend, q.device)
    why_not = cuda_attention.unsupported(q, k, v) if chosen == "fused" else None
    asked = backend or dispatch.get_backend("causal_attention")
    if why_not is not None and asked == "fused":
        raise ValueError(f"the fused causal_attention cannot take these inputs: {why_not}")
    if chosen == "torch":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True,
                                              scale=scale)
    if chosen == "reference" or why_not is not None:
        return reference.causal_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return cuda_attention.attention(q, k, v, scale, dropout_p, deterministic)
