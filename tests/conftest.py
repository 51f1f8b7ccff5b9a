import argparse
import dataclasses
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

# Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter. It
# must be switched on before any kernel is defined, so before fastgpt's kernels import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own cache dir (corpus downloads, prepared tokens)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FASTGPT_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def real_text() -> str:
    """About 100 KB of real English prose and code: the source of Python's argparse module,
    present on every machine (the tests must not depend on ../shared)."""
    return Path(argparse.__file__).read_text(encoding="utf-8")


@pytest.fixture
def corpus_file(tmp_path, real_text) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(real_text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def cpu_extension(tmp_path_factory):
    """The CPU build of fastgpt._C, compiled once per session and loaded into this process
    (one build of the namespace fastgpt per process)."""
    from fastgpt.ops import extension
    if torch.cuda.is_available():
        pytest.skip("a GPU process loads the CUDA build; the CPU build is for CPU machines")
    if not extension.registered():
        extension.build(cuda=False, build_directory=str(tmp_path_factory.mktemp("ext_cpu")))
    return torch.ops.fastgpt


def build_on_cpu(name: str, tmp_path_factory):
    """tests/cuda_on_cpu/<name>.cpp: CUDA kernels from csrc/ compiled with g++ through
    tests/cuda_on_cpu/cuda_on_cpu.h, as a Python module (once per session). -fsanitize=thread
    makes g++ call racecheck's hooks at every load and store (no ThreadSanitizer runtime is
    linked: tests/cuda_on_cpu/racecheck.h is that runtime)."""
    from torch.utils.cpp_extension import load

    here = Path(__file__).resolve().parent
    cuda_include = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
    if not (cuda_include / "cuda_bf16.h").exists():
        from helpers import require_or_skip
        require_or_skip(f"needs the CUDA headers (cuda_bf16.h) under {cuda_include}")
    return load(name=name, sources=[str(here / "cuda_on_cpu" / f"{name}.cpp")],
                extra_include_paths=[str(here.parent / "csrc"), str(cuda_include)],
                # no memcpy/memset made of a kernel's loops: racecheck would not see them
                extra_cflags=["-O2", "-std=c++20", "-fno-strict-aliasing", "-fsanitize=thread",
                              "--param=tsan-instrument-func-entry-exit=0",
                              "-fno-tree-loop-distribute-patterns"],
                build_directory=str(tmp_path_factory.mktemp(name)))


@pytest.fixture(scope="session")
def kernels_on_cpu(tmp_path_factory):
    """csrc/'s CUDA kernels run on the CPU under racecheck (tests/cuda_on_cpu/kernels_on_cpu.cpp)."""
    return build_on_cpu("kernels_on_cpu", tmp_path_factory)


@dataclasses.dataclass(frozen=True)
class CudaBuild:
    """fastgpt._C built with its CUDA kernels by nvcc (see the cuda_build fixture)."""
    library: str   # the built fastgpt_C_cuda*.so
    log: str       # the build's output: ninja's nvcc commands, ptxas's -v resource report
                   # per kernel, then "CUDA kernel <op> True|False" for each op
    seconds: float


@pytest.fixture(scope="session")
def cuda_build(tmp_path_factory) -> CudaBuild:
    """fastgpt._C with the CUDA kernels (the sm_80 and sm_90 SASS and compute_90 PTX of
    extension.cuda_flags()), built once per session into a temporary folder, in a
    subprocess (this process may hold the CPU build: one build of the namespace per
    process), with verbose=True. Skipped without nvcc (failed where FASTGPT_REQUIRE_KERNELS=1);
    a failed build fails every test that uses it, with the end of its log. 141 s on an
    otherwise idle 2-core machine."""
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    if not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        from helpers import require_or_skip
        require_or_skip("no nvcc: set CUDA_HOME to a CUDA toolkit")
    build_directory = tmp_path_factory.mktemp("ext_cuda")
    code = textwrap.dedent(f"""
        import torch
        from fastgpt.ops import extension
        extension.build(cuda=True, build_directory={str(build_directory)!r}, verbose=True)
        for op in ("adamw_step", "attention_forward", "attention_backward"):
            print("CUDA kernel", op, torch._C._dispatch_has_kernel_for_dispatch_key(
                "fastgpt::" + op, "CUDA"))
    """)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "CUDA_HOME": cuda_home}, timeout=900)
    log = result.stdout + result.stderr
    if result.returncode != 0:
        pytest.fail(f"the CUDA build of fastgpt._C failed:\n{log[-3000:]}")
    return CudaBuild(str(next(build_directory.glob("fastgpt_C_cuda*.so"))), log,
                     time.perf_counter() - start)
