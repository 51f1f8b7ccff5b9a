"""Which implementation runs each op: the backend settings, what can run here and why not
(each fused kernel's build and self-check, once per device), and the resolution of a
backend name to the implementation that runs.

Backends, per op (fastgpt.backends.BACKENDS):
  "auto"       the fused kernel when the tensors are on CUDA and the kernel passed its
               self-check, else the pure-PyTorch reference;
  "reference"  always the reference (fastgpt/ops/reference.py), the maths written out;
  "torch"      PyTorch's own op (fastgpt.backends.TORCH_OPS): SDPA, F.cross_entropy,
               torch's fused AdamW;
  "fused"      the kernel, or a BackendUnavailable error that says why it cannot run.
  None         the process-wide default: set_backend(...), else $FASTGPT_BACKEND, else "auto".
The default is one of those names for every op, or a per-op list such as
"linear_cross_entropy=fused,adamw=torch" (ops not named: "auto").
"""

from __future__ import annotations

import functools
import os

import torch

from fastgpt.backends import KERNELS, BackendUnavailable, check_backend, parse_backend
from fastgpt.ops import cuda_attention, reference

_default_backend: str | None = None


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
    try:
        adamw_self_check(torch.device("cuda", device_index))
    except Exception as exc:
        return False, f"{source}, but it failed its self-check ({type(exc).__name__}: {exc})"
    return True, source


def adamw_self_check(device: torch.device) -> None:
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


def torch_status(op: str) -> tuple[bool, str]:
    """(whether PyTorch's own `op` runs here, what it is or why not)."""
    from fastgpt.backends import TORCH_OPS

    if op == "adamw" and not hasattr(torch, "_fused_adamw_"):
        return False, f"torch {torch.__version__} has no fused AdamW (torch._fused_adamw_)"
    return True, f"{TORCH_OPS[op]}, torch {torch.__version__}"


def resolve_backend(op: str, backend: str | None, device: torch.device | None = None) -> str:
    """The implementation that will run `op` on tensors on `device`: "reference", "torch"
    or "fused".

    Under torch.compile a graph keeps the choice it was traced with; set_backend() makes
    the next call recompile, while $FASTGPT_BACKEND is read when a graph is traced."""
    backend = get_backend(op) if backend is None else check_backend(backend)
    return _resolve(op, backend, device)


# Whether a kernel can run is host-side setup (its build, a self-check, cached results):
# torch.compile takes the answer as a constant rather than trace it (which would trace
# imports and break the graph).
@torch.compiler.assume_constant_result
def _resolve(op: str, backend: str, device: torch.device | None) -> str:
    if backend in ("reference", "torch"):
        if backend == "torch" and not torch_status(op)[0]:
            raise BackendUnavailable(f"torch {op} cannot run: {torch_status(op)[1]}")
        return backend
    ok, why = status(op)
    on_cuda = device is not None and device.type == "cuda"
    if backend == "auto":
        return "fused" if ok and on_cuda else "reference"
    if not ok:
        raise BackendUnavailable(f"fused {op} cannot run: {why}")
    if device is not None and not _fused_runs_on(op, device):
        raise BackendUnavailable(f"fused {op} needs CUDA tensors, got {device} ones")
    return "fused"
