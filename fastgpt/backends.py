"""Backend names and specs, without torch: the CLI parses and validates a config with this
before anything heavy is imported. fastgpt.ops re-exports every name here."""

from __future__ import annotations

from fastgpt import FastGPTError

BACKENDS = ("auto", "reference", "torch", "fused")

# op name -> what its fused kernel is
KERNELS = {
    "cross_entropy": "Triton fused softmax-cross-entropy",
    "adamw": "CUDA fused AdamW step",
    "causal_attention": "CUDA fused causal attention",
    "linear_cross_entropy": "Triton fused linear + cross-entropy (chunked, no (N, V) logits)",
}


# op name -> PyTorch's own op that backend "torch" runs
TORCH_OPS = {
    "cross_entropy": "F.cross_entropy",
    "adamw": "torch._fused_adamw_ (torch's fused AdamW)",
    "causal_attention": "F.scaled_dot_product_attention(is_causal=True)",
    "linear_cross_entropy": "F.linear then F.cross_entropy",
}


class BackendUnavailable(FastGPTError):
    """backend="fused" (or "torch") was asked for an op that cannot run here."""


class UnknownBackend(FastGPTError, ValueError):
    """A backend name that is not one of BACKENDS."""


def check_backend(backend: str, source: str = "backend") -> str:
    if backend not in BACKENDS:
        raise UnknownBackend(f"{source} must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def parse_backend(spec: str, source: str = "backend") -> dict[str, str]:
    """{op: backend} for every op from "auto" | "reference" | "torch" | "fused" (all ops) or
    "op=backend,op=backend" (the ops not named: "auto")."""
    if "=" not in spec:
        return dict.fromkeys(KERNELS, check_backend(spec.strip(), source))
    chosen = dict.fromkeys(KERNELS, "auto")
    for item in spec.split(","):
        op, _, backend = item.partition("=")
        op = op.strip()
        if op not in KERNELS:
            raise UnknownBackend(f"{source}: unknown op {op!r} in {spec!r}; the ops are "
                                 f"{', '.join(KERNELS)}")
        chosen[op] = check_backend(backend.strip(), f"{source} for {op}")
    return chosen
