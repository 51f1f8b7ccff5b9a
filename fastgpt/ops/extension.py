"""The C++/CUDA extension fastgpt._C (sources in csrc/): finding it and building it.

At run time: the module built by `pip install` (setup.py) if present, else a JIT build
with torch.utils.cpp_extension.load (cached under ~/.cache/torch_extensions) when a GPU and
nvcc are present, else the kernels are unavailable, with the reason. Either way the ops
appear under torch.ops.fastgpt.

This module only finds, builds and loads it; each kernel's self-check lives beside its op
(fastgpt.ops.dispatch.adamw_self_check, cuda_attention.self_check) and
fastgpt.ops.dispatch.status runs them.

`build(cuda=False)` compiles the CPU build (bindings and the CPU loops, no nvcc): CI tests
the kernels' shared arithmetic through it. Only one build can be loaded per process: both
register the namespace fastgpt.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent.parent.parent / "csrc"
CPU_SOURCES = ("bindings.cpp", "adamw_cpu.cpp", "attention_cpu.cpp")
# attention_d*.cu: one head dim's attention kernels each, so that they compile in parallel
CUDA_SOURCES = ("adamw.cu", "attention.cu", "attention_d32.cu", "attention_d64.cu",
                "attention_d128.cu")
DEFAULT_ARCHS = "8.0;9.0+PTX"  # A100, H100, and PTX that newer GPUs JIT-compile


def cuda_flags() -> list[str]:
    """nvcc flags: -O3, the ptxas resource report (spills show up in the build log), the
    architectures of TORCH_CUDA_ARCH_LIST (default: SASS for sm_80 and sm_90, and PTX for
    compute_90 where an arch says +PTX, so a newer GPU JIT-compiles it rather than falling
    back to the reference), and --threads 0: nvcc compiles the architectures of a file in
    parallel."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
    flags = ["-O3", "-Xptxas", "-v", "-lineinfo", "--threads", "0"]
    for arch in archs.replace(",", ";").replace(" ", ";").split(";"):
        if arch:
            number = arch.replace(".", "").replace("+PTX", "")
            codes = [f"sm_{number}"] + ([f"compute_{number}"] if arch.endswith("+PTX") else [])
            flags.append(f"-gencode=arch=compute_{number},code=[{','.join(codes)}]")
    return flags


def build(cuda: bool, build_directory: str | None = None, verbose: bool = False) -> None:
    """JIT-compile and load the extension: with the CUDA kernels (needs nvcc) or the CPU
    build. Registers the torch.ops.fastgpt ops in this process."""
    from torch.utils.cpp_extension import load

    sources = [str(CSRC / name) for name in CPU_SOURCES + (CUDA_SOURCES if cuda else ())]
    if build_directory:
        Path(build_directory).mkdir(parents=True, exist_ok=True)
    load(name="fastgpt_C_cuda" if cuda else "fastgpt_C_cpu", sources=sources,
         extra_cflags=["-O3"], extra_cuda_cflags=cuda_flags() if cuda else None,
         with_cuda=cuda, is_python_module=False, build_directory=build_directory,
         verbose=verbose)
    register_fakes()


def registered() -> bool:
    return hasattr(torch.ops.fastgpt, "adamw_step")


def register_fakes() -> None:
    """Fake (meta) implementations, so torch.compile can trace through the ops: adamw_step
    only mutates its inputs, so its fake does nothing; attention_forward gives (out, lse)
    and attention_backward (dq, dk, dv) of the right shapes."""
    if registered() and not getattr(register_fakes, "done", False):
        torch.library.register_fake("fastgpt::adamw_step")(
            lambda params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps,
            weight_decay, step, grad_scale, lr_tensor=None, step_tensor=None: None)
        torch.library.register_fake("fastgpt::attention_forward")(
            lambda q, k, v, scale, dropout_p, seed, offset: (
                torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)))
        torch.library.register_fake("fastgpt::attention_backward")(
            lambda q, k, v, out, lse, grad_out, scale, dropout_p, seed, offset, deterministic: (
                torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)))
        register_fakes.done = True


@functools.cache
def load_extension() -> tuple[bool, str]:
    """(whether the CUDA kernels of fastgpt._C are loaded, where from or why not).
    Loads the prebuilt module if there is one (its CPU ops register either way)."""
    source = "loaded in this process"
    if not registered():
        try:
            import fastgpt._C  # noqa: F401  (built by setup.py; registers the ops)
            register_fakes()
            source = "prebuilt fastgpt._C"
        except ImportError:
            source = None
    if not torch.cuda.is_available():
        return False, "needs a CUDA GPU"
    if not _cuda_impl_present():
        if registered():
            return False, "the loaded fastgpt._C is a CPU build (no CUDA kernels)"
        from torch.utils.cpp_extension import CUDA_HOME
        if CUDA_HOME is None:
            return False, "no CUDA toolkit (nvcc) to build fastgpt._C; set CUDA_HOME"
        try:
            build(cuda=True)
        except Exception as exc:  # compiler errors are long: keep the first line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return False, f"building fastgpt._C failed ({first[:300]})"
        source = "JIT-built from csrc/ (cached in ~/.cache/torch_extensions)"
    return True, source


def _cuda_impl_present() -> bool:
    return registered() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fastgpt::adamw_step", "CUDA")
