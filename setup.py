"""Build script. Metadata, dependencies and the console script live in pyproject.toml.

It builds the CUDA extension fastgpt._C from csrc/ with torch.utils.cpp_extension when it
can and should:
- FASTGPT_BUILD_CUDA=0: never; FASTGPT_BUILD_CUDA=1: also on a machine without a GPU;
- otherwise only when a GPU and a CUDA toolkit are present.
torch must be importable while building (pip's build isolation hides it: use
`FASTGPT_BUILD_CUDA=1 pip install --no-build-isolation -e .`). Without a build the package
is pure Python, and fastgpt JIT-builds the kernels at first use where a GPU and nvcc exist.
"""

import os
import sys

from setuptools import setup


def extension_build() -> dict:
    wanted = os.environ.get("FASTGPT_BUILD_CUDA", "")
    if wanted == "0":
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        print("fastgpt: torch is not importable while building (pip's build isolation?): "
              "installing pure Python; the kernels build at first use", file=sys.stderr)
        return {}
    if CUDA_HOME is None:
        print("fastgpt: no CUDA toolkit found: installing pure Python", file=sys.stderr)
        return {}
    if wanted != "1" and not torch.cuda.is_available():
        print("fastgpt: no GPU here: not compiling CUDA kernels (FASTGPT_BUILD_CUDA=1 to "
              "build them anyway)", file=sys.stderr)
        return {}
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from fastgpt.ops.extension import CPU_SOURCES, CUDA_SOURCES, cuda_flags

    sources = [os.path.join("csrc", name) for name in CPU_SOURCES + CUDA_SOURCES]
    extension = CUDAExtension("fastgpt._C", sources,
                              extra_compile_args={"cxx": ["-O3"], "nvcc": cuda_flags()})
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(**extension_build())
