#!/usr/bin/env bash
# The one command for a machine with a GPU: the check in stages, in order of value, within
# a time budget, each stage's outcome written the moment it ends (bench/gpu_check.py has
# the stages and the files; bench/README.md their times and the command for a lease).
#
#   bash bench/gpu_check.sh [--out DIR] [--budget SECONDS] [--full] [--only STAGE ...]
#                           [--continue] [--list]
#
# DIR: $OUT if set, else bench/results/; budget 420 s. Runs from the source tree as it is
# (no install, no network). Exits 2 without a GPU, 1 if a stage failed or overran.
# GPU_CHECK_COMMIT=SHA names the commit where the tree is a copy without .git.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# .gpu-packages/ (git-ignored), if there: packages carried to a bare GPU machine, e.g. the
# tokenizers (an abi3 wheel: any Python >= 3.10) and tqdm package directories of a venv
export PYTHONPATH="$PWD:$PWD/.gpu-packages${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
# the compiled extension, Triton's and torch.compile's caches in the (git-ignored) build/:
# a second command on a machine that keeps the tree's ignored files reuses them
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/build/torch_extensions}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/build/triton_cache}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/build/inductor_cache}
exec "$PYTHON" -u bench/gpu_check.py "$@"
