"""Kernels that a benchmark has yet to decide on: not used by fastgpt.ops."""
