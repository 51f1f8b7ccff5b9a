import argparse
import contextlib
import dataclasses
import hashlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from filelock import FileLock

# Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter. It
# must be switched on before any kernel is defined, so before fastgpt's kernels import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist (pyproject's addopts: -n auto) runs one worker per core: each takes its share
# of the cores for torch's thread pools and for the processes its tests start, so that N
# workers do not run N x cores threads.
XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if XDIST_WORKERS > 1:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, cores // XDIST_WORKERS)
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own cache dir (corpus downloads, prepared tokens, auto's measured
    choices), and runs the reference ops unless it names a backend: `auto` in training
    measures which implementation is fastest, and two runs that a test compares must not
    choose differently (tests/test_tune.py tests auto's choice with an injected clock)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FASTGPT_CACHE", str(cache))
    monkeypatch.setenv("FASTGPT_BACKEND", "reference")
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


# --- the compiled test builds, cached per machine and source hash ------------------------
# Each build goes to BUILD_CACHE/<name>-<hash of everything that determines it>, made under a
# file lock: the xdist workers wait for one build, and a later run with the same sources,
# flags and toolchain loads it as it is.
BUILD_CACHE = Path(os.environ.get("FASTGPT_TEST_BUILD_CACHE")
                   or Path.home() / ".cache" / "fastgpt-tests")
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
CSRC = ROOT / "csrc"
CUDA_HOME = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)


def with_includes(sources: list[Path], include_dirs: list[Path]) -> list[Path]:
    """The sources and every file they #include "..." (found as the preprocessor finds it:
    in the including file's folder, then in include_dirs), transitively."""
    found, todo = set(), [path.resolve() for path in sources]
    while todo:
        path = todo.pop()
        if path not in found:
            found.add(path)
            for name in INCLUDE.findall(path.read_text(encoding="utf-8")):
                places = [d / name for d in (path.parent, *include_dirs) if (d / name).is_file()]
                todo += places[:1]
    return sorted(found)


def version_of(program: str) -> str:
    return subprocess.run([program, "--version"], capture_output=True, text=True).stdout


@contextlib.contextmanager
def cached_build(name: str, files: list[Path], *settings: str):
    """Yields (directory, done) for building `name` from these files with these settings
    (flags, include folders, nvcc's version), holding the directory's lock. done: an earlier
    build there completed; if not, the directory is emptied (what a failed or killed build
    left) and marked done when the with-block ends without an exception. torch's and
    Python's versions and the host compiler's are part of the key."""
    key = hashlib.sha256()
    for part in (torch.__version__, torch.version.git_version, sys.version,
                 version_of(os.environ.get("CXX", "c++")), *settings):
        key.update(part.encode() + b"\0")
    for path in files:  # named from the checkout's root: every clone shares the build
        where = path.resolve()
        where = where.relative_to(ROOT) if where.is_relative_to(ROOT) else where
        key.update(str(where).encode() + b"\0" + path.read_bytes() + b"\0")
    directory = BUILD_CACHE / f"{name}-{key.hexdigest()[:16]}"
    directory.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{directory}.lock"):
        done = directory / "done"
        if not done.exists():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
        yield directory, done.exists()
        done.touch()


def extension_build(cuda: bool):
    """cached_build of fastgpt.ops.extension.build(cuda): its sources and their headers,
    extension.py itself (the sources and flags it passes), nvcc's flags and version."""
    from fastgpt.ops import extension
    sources = [CSRC / name
               for name in extension.CPU_SOURCES + (extension.CUDA_SOURCES if cuda else ())]
    nvcc = [" ".join(extension.cuda_flags()), version_of(str(CUDA_HOME / "bin" / "nvcc"))]
    return cached_build("fastgpt_C_cuda" if cuda else "fastgpt_C_cpu",
                        [Path(extension.__file__), *with_includes(sources, [CSRC])],
                        *(nvcc if cuda else ()))


@pytest.fixture(scope="session")
def cpu_extension():
    """The CPU build of fastgpt._C, compiled once per machine and source hash (cached_build)
    and loaded into this process (one build of the namespace fastgpt per process)."""
    from fastgpt.ops import extension
    if torch.cuda.is_available():
        pytest.skip("a GPU process loads the CUDA build; the CPU build is for CPU machines")
    if not extension.registered():
        with extension_build(cuda=False) as (directory, done):
            if done:
                torch.ops.load_library(directory / "fastgpt_C_cpu.so")
                extension.register_fakes()
            else:
                extension.build(cuda=False, build_directory=str(directory))
    return torch.ops.fastgpt


def build_on_cpu(name: str):
    """tests/cuda_on_cpu/<name>.cpp: CUDA kernels from csrc/ compiled with g++ through
    tests/cuda_on_cpu/cuda_on_cpu.h, as a Python module (once per machine and source hash:
    cached_build). -fsanitize=thread makes g++ call racecheck's hooks at every load and
    store (no ThreadSanitizer runtime is linked: tests/cuda_on_cpu/racecheck.h is that
    runtime)."""
    from torch.utils.cpp_extension import load

    cuda_include = CUDA_HOME / "include"
    if not (cuda_include / "cuda_bf16.h").exists():
        from helpers import require_or_skip
        require_or_skip(f"needs the CUDA headers (cuda_bf16.h) under {cuda_include}")
    source = TESTS / "cuda_on_cpu" / f"{name}.cpp"
    # no memcpy/memset made of a kernel's loops: racecheck would not see them
    flags = ["-O2", "-std=c++20", "-fno-strict-aliasing", "-fsanitize=thread",
             "--param=tsan-instrument-func-entry-exit=0", "-fno-tree-loop-distribute-patterns"]
    # the CUDA headers (cuda_bf16.h ...) are the toolkit's: its nvcc's version stands for them
    with cached_build(name, with_includes([source], [CSRC]), " ".join(flags), str(cuda_include),
                      version_of(str(CUDA_HOME / "bin" / "nvcc"))) as (directory, done):
        if not done:
            return load(name=name, sources=[str(source)],
                        extra_include_paths=[str(CSRC), str(cuda_include)], extra_cflags=flags,
                        build_directory=str(directory))
        spec = importlib.util.spec_from_file_location(name, directory / f"{name}.so")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


@pytest.fixture(scope="session")
def kernels_on_cpu():
    """csrc/'s CUDA kernels run on the CPU under racecheck (tests/cuda_on_cpu/kernels_on_cpu.cpp)."""
    return build_on_cpu("kernels_on_cpu")


@pytest.fixture(scope="session")
def triton_cache() -> Path:
    """Triton's cache for the kernels compiled ahead of time (test_kernel_report.py), kept
    per machine as the builds are: Triton keys each entry by the kernel's source, its
    specialization, the target and Triton's own version, so that a changed kernel compiles
    anew (30 s on the 2-core machine) and an unchanged one is read back."""
    return BUILD_CACHE / "triton"


@dataclasses.dataclass(frozen=True)
class CudaBuild:
    """fastgpt._C built with its CUDA kernels by nvcc (see the cuda_build fixture)."""
    library: str   # the built fastgpt_C_cuda*.so
    log: str       # the build's output: ninja's nvcc commands, ptxas's -v resource report
                   # per kernel, then "CUDA kernel <op> True|False" for each op


@pytest.fixture(scope="session")
def cuda_build() -> CudaBuild:
    """fastgpt._C with the CUDA kernels (the sm_80 and sm_90 SASS and compute_90 PTX of
    extension.cuda_flags()), built in a subprocess (this process may hold the CPU build: one
    build of the namespace per process) with verbose=True, once per machine and source hash
    (cached_build; its log kept beside it, in build.log). Skipped without nvcc (failed where
    FASTGPT_REQUIRE_KERNELS=1); a failed build fails every test that uses it, with the end
    of its log, and is not kept. 141 s on an otherwise idle 2-core machine."""
    if not (CUDA_HOME / "bin" / "nvcc").exists():
        from helpers import require_or_skip
        require_or_skip("no nvcc: set CUDA_HOME to a CUDA toolkit")
    with extension_build(cuda=True) as (directory, done):
        if not done:
            code = textwrap.dedent(f"""
                import torch
                from fastgpt.ops import extension
                extension.build(cuda=True, build_directory={str(directory)!r}, verbose=True)
                for op in ("adamw_step", "attention_forward", "attention_backward"):
                    print("CUDA kernel", op, torch._C._dispatch_has_kernel_for_dispatch_key(
                        "fastgpt::" + op, "CUDA"))
            """)
            # a session of its own: a build that overruns goes with ninja's and nvcc's
            # processes, which would otherwise go on writing into the directory
            build = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True,
                                     env={**os.environ, "CUDA_HOME": str(CUDA_HOME)})
            try:
                log = "".join(build.communicate(timeout=900))
            except subprocess.TimeoutExpired:
                os.killpg(build.pid, signal.SIGKILL)
                log = "".join(build.communicate()) + "\n(killed after 900 s)"
            if build.returncode != 0:
                pytest.fail(f"the CUDA build of fastgpt._C failed:\n{log[-3000:]}")
            (directory / "build.log").write_text(log)
        return CudaBuild(str(next(directory.glob("fastgpt_C_cuda*.so"))),
                         (directory / "build.log").read_text())
