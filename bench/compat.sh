#!/usr/bin/env bash
# Before spending a GPU lease: the CPU test suite with the GPU machine's versions (torch
# 2.11, triton 3.6: bench/README.md), in a venv of its own (.venv-compat, git-ignored), so
# that a version problem shows up here and not in the lease's minutes. Not part of CI.
#
#   bash bench/compat.sh [PYTEST ARGS...]        # e.g. bash bench/compat.sh tests/test_cross_entropy.py
#
# TORCH=2.11.0 TRITON=3.6.0 VENV=.venv-compat are the defaults. The first run downloads
# torch (a CUDA build, a few GB); later runs reuse the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${TORCH:-2.11.0}
TRITON=${TRITON:-3.6.0}
VENV=${VENV:-.venv-compat}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
. "$VENV/bin/activate"
if ! python -c "import torch, triton, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH' or triton.__version__ != '$TRITON')" 2>/dev/null; then
  pip install "torch==$TORCH" "triton==$TRITON"
fi
# the project as the README installs it, with those versions kept (they satisfy its ranges)
pip install -e ".[test]" "torch==$TORCH" "triton==$TRITON"
python -c "import torch, triton; print(f'compat: torch {torch.__version__}, triton {triton.__version__}')"
pytest -p no:cacheprovider "$@"
