"""The ops the model and trainer call: attention, the loss (cross_entropy on logits, or
linear_cross_entropy from the hidden states without the logits) and, in fastgpt.optim, AdamW.

Each op takes `backend`:
  "auto"       the fused kernel when the tensors are on CUDA and the kernel is available,
               else the pure-PyTorch reference;
  "reference"  always the reference (fastgpt/ops/reference.py);
  "fused"      the kernel, or a BackendUnavailable error that says why it cannot run.
  None         the process-wide default: set_backend(...), else $FASTGPT_BACKEND, else "auto".
The default is one of those names for every op, or a per-op list such as
"linear_cross_entropy=fused,adamw=reference" (ops not named: "auto").

The Triton kernel also runs on CPU tensors through Triton's interpreter when
TRITON_INTERPRET=1 is set before fastgpt's kernels are imported (slow: for tests).
"""

from __future__ import annotations

import functools
import os

import torch

from fastgpt.backends import (  # noqa: F401  (re-exported: fastgpt.ops.parse_backend etc.)
    BACKENDS, KERNELS, BackendUnavailable, UnknownBackend, check_backend, parse_backend)
from fastgpt.ops import cuda_attention, reference

_default_backend: str | None = None
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the Triton losses take


def set_backend(spec: str | None) -> str | None:
    """Set the process-wide default (see parse_backend; None: back to $FASTGPT_BACKEND or
    "auto"). Returns the previous setting, so a caller can restore it."""
    global _default_backend
    previous = _default_backend
    if spec is not None:
        parse_backend(spec)
    _default_backend = spec
    return previous


def get_backend(op: str | None = None) -> str:
    """The process-wide default: set_backend(...), else $FASTGPT_BACKEND, else "auto"; for
    `op`, that op's backend in it."""
    if _default_backend is not None:
        spec, source = _default_backend, "backend"
    else:
        spec, source = os.environ.get("FASTGPT_BACKEND") or "auto", "FASTGPT_BACKEND"
    chosen = parse_backend(spec, source)
    return spec if op is None else chosen[op]


def fused_where_available() -> str:
    """The backend spec that takes every fused kernel able to run here and the reference
    for the rest (e.g. to run the kernels through the interpreter on a CPU)."""
    ok = [op for op, (runs, _) in available().items() if runs]
    return ",".join(f"{op}=fused" for op in ok) if ok else "reference"


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "yes", "on")


def _release(version: str) -> tuple[int, int]:
    major, minor = (version.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run the cross-entropy kernel here, or None.

    Triton before 3.7 turns a runtime loop bound (the kernel's `range(0, n_cols, BLOCK_V)`)
    into a Python int with int() of a 1-element array, which NumPy 2.4 refuses (a
    DeprecationWarning before it); Triton 3.7 squeezes the array first. Compiled for a GPU
    the kernel does not meet this."""
    import numpy
    import triton

    if _release(triton.__version__) < (3, 7) and _release(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter cannot run the kernel with "
                f"NumPy {numpy.__version__} (its loop bounds go through int() of a "
                f"1-element array, an error since NumPy 2.4): use triton>=3.7 or "
                f"numpy<2.4 to run it on the CPU")
    return None


def _triton_status() -> tuple[bool, str]:
    device = torch.cuda.current_device() if torch.cuda.is_available() else None
    return _triton_status_on(device)


@functools.cache
def _triton_status_on(device_index: int | None) -> tuple[bool, str]:
    """Whether the Triton kernel runs (and passes its self-check) on this CUDA device."""
    try:
        import triton
        from fastgpt.ops import triton_ce  # noqa: F401  (defines the kernels)
    except Exception as exc:  # ImportError, or a Triton install that cannot load
        return False, f"triton cannot be imported ({type(exc).__name__}: {exc})"
    if triton_interpreting():
        problem = interpreter_problem()
        if problem:
            return False, problem
        return True, (f"Triton {triton.__version__} through its interpreter "
                      f"(TRITON_INTERPRET=1): CPU tensors, slowly")
    if device_index is None:  # fastgpt verify sets TRITON_INTERPRET on a CPU
        return False, ("needs a CUDA GPU to train with it; `fastgpt verify` runs it here "
                       "through Triton's interpreter (TRITON_INTERPRET=1 uses it on CPU "
                       "tensors, slowly)")
    name = torch.cuda.get_device_name(device_index)
    try:
        triton_ce.self_check(torch.device("cuda", device_index))
    except Exception as exc:
        return False, (f"Triton {triton.__version__} failed its self-check on {name} "
                       f"({type(exc).__name__}: {str(exc)[:300]})")
    return True, f"Triton {triton.__version__} on {name}"


def _adamw_status() -> tuple[bool, str]:
    from fastgpt.ops import extension

    ok, why = extension.load_extension()
    if not torch.cuda.is_available():
        if extension.registered():  # e.g. the CPU build, loaded by extension.build
            return True, ("fastgpt._C's CPU loop (the kernel's arithmetic) on CPU tensors, "
                          "which `fastgpt verify` tests; the CUDA kernel needs a CUDA GPU")
        return False, why
    if not ok:
        return False, why
    return _adamw_self_check_on(torch.cuda.current_device(), why)


@functools.cache
def _adamw_self_check_on(device_index: int, source: str) -> tuple[bool, str]:
    """Whether the loaded AdamW kernel passes its self-check on this CUDA device."""
    from fastgpt.ops.adamw import self_check

    try:
        self_check(torch.device("cuda", device_index))
    except Exception as exc:
        return False, f"{source}, but it failed its self-check ({type(exc).__name__}: {exc})"
    return True, source


def status(op: str) -> tuple[bool, str]:
    """(whether `op`'s fused kernel can run here, what it runs on or why not). Only that
    op's kernel is looked at (and, on a GPU, built and self-checked once)."""
    if op == "cross_entropy":
        ok, why = _triton_status()
    elif op == "linear_cross_entropy":
        ok, why = _linear_cross_entropy_status()
    elif op == "adamw":
        ok, why = _adamw_status()
    else:
        ok, why = _attention_status()
    return ok, f"{KERNELS[op]}: {why}"


def _linear_cross_entropy_status() -> tuple[bool, str]:
    ok, why = _triton_status()  # it runs the cross-entropy kernel, checked first
    if not ok or not torch.cuda.is_available() or triton_interpreting():
        return ok, why
    return _linear_cross_entropy_self_check_on(torch.cuda.current_device(), why)


@functools.cache
def _linear_cross_entropy_self_check_on(device_index: int, source: str) -> tuple[bool, str]:
    """Whether the fused linear + cross-entropy passes its self-check on this CUDA device."""
    from fastgpt.ops import triton_linear_ce

    try:
        triton_linear_ce.self_check(torch.device("cuda", device_index))
    except Exception as exc:
        return False, (f"{source}, but linear_cross_entropy failed its self-check "
                       f"({type(exc).__name__}: {str(exc)[:300]})")
    return True, source


def _attention_status() -> tuple[bool, str]:
    device = torch.cuda.current_device() if torch.cuda.is_available() else None
    return _attention_status_on(device)


@functools.cache
def _attention_status_on(device_index: int | None) -> tuple[bool, str]:
    """Whether the attention kernels run (and pass their self-check) on this CUDA device."""
    from fastgpt.ops import extension

    ok, why = extension.load_extension()
    if not ok:
        return False, why
    device = torch.device("cuda", device_index)
    try:
        cuda_attention.self_check(device)
    except Exception as exc:
        return False, (f"{why}, but attention failed its self-check on "
                       f"{torch.cuda.get_device_name(device)} ({type(exc).__name__}: "
                       f"{str(exc)[:300]})")
    return True, f"{why}, on {torch.cuda.get_device_name(device)}"


def available() -> dict[str, tuple[bool, str]]:
    """For each op: (whether its fused kernel can run here, what it runs on or why not)."""
    return {op: status(op) for op in KERNELS}


def _fused_runs_on(op: str, device: torch.device) -> bool:
    """Beyond CUDA tensors: the Triton kernel under the interpreter, AdamW's CPU build."""
    if device.type == "cuda":
        return True
    if op in ("cross_entropy", "linear_cross_entropy"):
        return triton_interpreting()
    if op == "adamw":
        return torch._C._dispatch_has_kernel_for_dispatch_key("fastgpt::adamw_step", "CPU") \
            if hasattr(torch.ops.fastgpt, "adamw_step") else False
    return False


def resolve_backend(op: str, backend: str | None, device: torch.device | None = None) -> str:
    """The backend that will run `op` on tensors on `device`: "reference" or "fused".

    Under torch.compile a graph keeps the choice it was traced with; set_backend() makes
    the next call recompile, while $FASTGPT_BACKEND is read when a graph is traced."""
    backend = get_backend(op) if backend is None else check_backend(backend)
    return _resolve(op, backend, device)


# Whether a kernel can run is host-side setup (its build, a self-check, cached results):
# torch.compile takes the answer as a constant rather than trace it (which would trace
# imports and break the graph).
@torch.compiler.assume_constant_result
def _resolve(op: str, backend: str, device: torch.device | None) -> str:
    if backend == "reference":
        return "reference"
    ok, why = status(op)
    on_cuda = device is not None and device.type == "cuda"
    if backend == "auto":
        return "fused" if ok and on_cuda else "reference"
    if not ok:
        raise BackendUnavailable(f"fused {op} cannot run: {why}")
    if device is not None and not _fused_runs_on(op, device):
        raise BackendUnavailable(f"fused {op} needs CUDA tensors, got {device} ones")
    return "fused"


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     dropout_p: float = 0.0, scale: float | None = None,
                     backend: str | None = None,
                     deterministic: bool | None = None) -> torch.Tensor:
    """Causal softmax attention with dropout on the probabilities.
    q, k, v: (B, H, T, D) -> (B, H, T, D); scale defaults to 1/sqrt(D).

    The fused kernel takes float32, bfloat16 or float16 with D in {32, 64, 128}; under
    "auto" other inputs go to the reference, under "fused" they raise ValueError.
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
    chosen = resolve_backend("causal_attention", backend, q.device)
    why_not = cuda_attention.unsupported(q, k, v) if chosen == "fused" else None
    if why_not is not None and (backend or get_backend("causal_attention")) == "fused":
        raise ValueError(f"the fused causal_attention cannot take these inputs: {why_not}")
    if chosen == "reference" or why_not is not None:
        return reference.causal_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return cuda_attention.attention(q, k, v, scale, dropout_p, deterministic)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0,
                  backend: str | None = None, check_targets: bool = True,
                  block_v: int | None = None, block_rows: int | None = None) -> torch.Tensor:
    """F.cross_entropy over logits (N, V) and int64 targets (N,).

    The fused kernel returns the loss in fp32 whatever the logits' dtype (torch returns the
    logits' dtype); block_v / block_rows override its tile sizes (powers of two; for tests
    and benchmarks; the reference ignores them).

    No call waits for the device. A target outside [0, V) that is not ignore_index is
    caught without a host sync (reference.check_target_range): on CPU tensors a ValueError
    naming it; on a GPU an asynchronous device-side assert, which stops the process at its
    next synchronisation (as F.cross_entropy's own does). check_targets=False skips that
    check (a few small launches) for targets validated where they were made; an
    out-of-range target then gives its row a nan loss and gradient in the fused kernel
    (which reads nothing outside the row) and an index error in the reference.
    """
    if resolve_backend("cross_entropy", backend, logits.device) == "reference":
        return reference.cross_entropy(logits, targets, ignore_index=ignore_index,
                                       reduction=reduction, label_smoothing=label_smoothing,
                                       check_targets=check_targets)
    from fastgpt.ops.triton_ce import FusedCrossEntropy

    reference.check_cross_entropy_inputs(logits, targets, ignore_index, reduction,
                                         label_smoothing, check_targets)
    if logits.dtype not in FUSED_DTYPES:
        raise ValueError(f"the fused cross_entropy takes float32, bfloat16 or float16 logits, "
                         f"got {logits.dtype}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    compute_grad = logits.requires_grad and torch.is_grad_enabled()
    return FusedCrossEntropy.apply(logits, targets.contiguous(), ignore_index, reduction,
                                   float(label_smoothing), compute_grad, block_v, block_rows)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, *, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0,
                         backend: str | None = None, check_targets: bool = True,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """F.cross_entropy(hidden @ weight.T + bias, targets, ...) with gradients for hidden,
    weight and bias, where the fused path never holds the (N, V) logits.

    hidden: (N, d); weight: (V, d), as nn.Linear stores it; bias: (V,) or None; all one
    float dtype (under torch.autocast, cast to its dtype as F.linear would be); targets:
    (N,) int64. ignore_index, reduction, label_smoothing, check_targets: as in
    cross_entropy. The fused path (fastgpt/ops/triton_linear_ce.py) takes float32, bfloat16
    or float16 and returns the loss in fp32, as the reference does for bf16/fp16;
    chunk_rows overrides its rows per chunk (for tests and benchmarks; the reference
    ignores it). No call waits for the device.
    """
    device_type = hidden.device.type
    # (not torch.amp.is_autocast_available: torch 2.11's compile breaks the graph on it; meta
    # tensors, which the no-sync test uses, have no autocast to ask about)
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if resolve_backend("linear_cross_entropy", backend, hidden.device) == "reference":
        return reference.linear_cross_entropy(hidden, weight, targets, bias,
                                              ignore_index=ignore_index, reduction=reduction,
                                              label_smoothing=label_smoothing,
                                              check_targets=check_targets)
    from fastgpt.ops import triton_linear_ce

    reference.check_linear_cross_entropy_inputs(hidden, weight, bias, targets, ignore_index,
                                                reduction, label_smoothing, check_targets)
    if hidden.dtype not in FUSED_DTYPES:
        raise ValueError(f"the fused linear_cross_entropy takes float32, bfloat16 or float16 "
                         f"inputs, got {hidden.dtype}")
    if chunk_rows is None:
        chunk_rows = triton_linear_ce.chunk_rows_for(hidden.shape[0], weight.shape[0],
                                                     hidden.shape[1])
    elif chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    return triton_linear_ce.ChunkedLinearCrossEntropy.apply(
        hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
        targets.contiguous(), ignore_index, reduction, float(label_smoothing), chunk_rows)
