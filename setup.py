"""Build script. Metadata, dependencies and the console script live in pyproject.toml.

This file exists for the CUDA extension `fastgpt._C` (built from csrc/ with
torch.utils.cpp_extension once the kernels land); today the package is pure Python.
"""
from setuptools import setup

setup()
