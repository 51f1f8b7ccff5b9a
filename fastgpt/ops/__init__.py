"""The ops the model and trainer call: attention, the loss (and, in fastgpt.optim, AdamW).

Each op takes `backend`: "auto" (the fused kernel where it can run, else the reference),
"reference" (always the pure-PyTorch op), or "fused" (the kernel, or a clear error saying
why it cannot run). No fused kernel ships yet, so "auto" resolves to the reference today.
"""

from __future__ import annotations

import torch

from fastgpt import FastGPTError
from fastgpt.ops import reference

BACKENDS = ("auto", "reference", "fused")

# op name -> what its fused kernel is
KERNELS = {
    "cross_entropy": "Triton fused softmax-cross-entropy",
    "adamw": "CUDA fused AdamW step",
    "causal_attention": "CUDA fused causal attention",
}


class BackendUnavailable(FastGPTError):
    """backend="fused" was asked for an op whose kernel cannot run here."""


def available() -> dict[str, tuple[bool, str]]:
    """For each op: (whether its fused kernel can run here, why not / what it is)."""
    return {op: (False, f"{kernel}: not implemented yet") for op, kernel in KERNELS.items()}


def resolve_backend(op: str, backend: str) -> str:
    """The backend that will run `op`: "reference" or "fused"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    ok, why = available()[op]
    if backend == "fused" and not ok:
        raise BackendUnavailable(f"fused {op} cannot run: {why}")
    return "fused" if ok and backend != "reference" else "reference"


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     dropout_p: float = 0.0, scale: float | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """Causal softmax attention. q, k, v: (B, H, T, D) -> (B, H, T, D)."""
    resolve_backend("causal_attention", backend)
    return reference.causal_attention(q, k, v, dropout_p=dropout_p, scale=scale)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0,
                  backend: str = "auto") -> torch.Tensor:
    """F.cross_entropy over logits (N, V) and int64 targets (N,)."""
    resolve_backend("cross_entropy", backend)
    return reference.cross_entropy(logits, targets, ignore_index=ignore_index,
                                   reduction=reduction, label_smoothing=label_smoothing)
