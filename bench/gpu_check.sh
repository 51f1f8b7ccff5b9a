#!/usr/bin/env bash
# The one command for a machine with a GPU: build the CUDA extension, run the kernel tests,
# compute-sanitizer on small kernel runs, `fastgpt verify` and every benchmark in bench/,
# then write bench/results/<date>-<gpu>.md and .json (commit, GPU, driver, CUDA, torch and
# triton versions, each step's outcome) and print a summary table last.
#
#   bash bench/gpu_check.sh
#
# Runs from the source tree as it is (no install, no network): it needs torch, triton,
# numpy, pytest and ninja, not tokenizers/tqdm/matplotlib, so it runs the kernel tests only
# (the full suite is CI's job). Exits 2 without a GPU, 1 if any step fails.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# .gpu-packages/ (git-ignored), if there: packages carried to a bare GPU machine, e.g. the
# tokenizers (an abi3 wheel: any Python >= 3.10) and tqdm package directories of a venv
export PYTHONPATH="$PWD${PWD:+:$PWD/.gpu-packages}${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU is visible to torch here; this check needs one (run pytest for the CPU checks)" >&2
  exit 2
fi

gpu=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
stem="bench/results/$(date -u +%Y-%m-%d)-$gpu"
mkdir -p bench/results
log="$stem.log"
: > "$log"
names=() results=() seconds=()

step() {  # step NAME COMMAND...: run, log, record PASS/FAIL and the time
  local name=$1; shift
  local start=$SECONDS
  echo "== $name: $*" | tee -a "$log"
  if "$@" >> "$log" 2>&1; then results+=(PASS); else results+=(FAIL); fi
  names+=("$name"); seconds+=($((SECONDS - start)))
  echo "   ${results[-1]} in ${seconds[-1]} s" | tee -a "$log"
}

KERNEL_TESTS="tests/test_cross_entropy.py tests/test_adamw.py tests/test_attention.py tests/test_ops_reference.py tests/test_optim.py tests/test_model.py tests/test_verify.py"

step "build fastgpt._C" "$PYTHON" -c "
from fastgpt.ops import extension
extension.build(cuda=True, verbose=True)
ok, why = extension.load_extension()
print('fused AdamW:', ok, why)
from fastgpt import ops
attention_ok, attention_why = ops.status('causal_attention')
print(attention_why)
raise SystemExit(0 if ok and attention_ok else 1)"
step "kernel tests" "$PYTHON" -m pytest -q -p no:cacheprovider $KERNEL_TESTS
SANITIZER="$CUDA_HOME/bin/compute-sanitizer"
SMALL_RUN="
import torch
from fastgpt import ops
from fastgpt.optim import AdamW
x = torch.randn(37, 1000, device='cuda', requires_grad=True)
t = torch.randint(0, 1000, (37,), device='cuda')
for reduction in ('mean', 'none'):
    ops.cross_entropy(x, t, reduction=reduction, backend='fused').sum().backward()
ps = [torch.nn.Parameter(torch.randn(n, device='cuda')) for n in (1, 7, 70001)]
for p in ps: p.grad = torch.randn_like(p)
AdamW(ps, backend='fused', max_grad_norm=1.0).step()
from fastgpt.ops.cuda_attention import attention
for dtype in (torch.float32, torch.bfloat16):
    for T, D in ((70, 64), (33, 128)):
        q, k, v = (torch.randn(2, 2, T, D, device='cuda', dtype=dtype, requires_grad=True) for _ in range(3))
        for deterministic in (False, True):
            attention(q, k, v, D ** -0.5, 0.1, deterministic).sum().backward()
torch.cuda.synchronize()
print('ok')"
if [ -x "$SANITIZER" ]; then
  for tool in memcheck racecheck; do
    step "compute-sanitizer $tool" "$SANITIZER" --tool "$tool" --error-exitcode 1 "$PYTHON" -c "$SMALL_RUN"
  done
else
  echo "== compute-sanitizer: not found at $SANITIZER" | tee -a "$log"
  names+=("compute-sanitizer"); results+=(FAIL); seconds+=(0)
fi
step "fastgpt verify" "$PYTHON" -m fastgpt verify
step "bench cross_entropy" "$PYTHON" bench/bench_cross_entropy.py --out "$stem-cross_entropy.json"
step "bench adamw" "$PYTHON" bench/bench_adamw.py --out "$stem-adamw.json"
step "bench attention" "$PYTHON" bench/bench_attention.py --out "$stem-attention.json"
step "bench train" "$PYTHON" bench/bench_train.py --out "$stem-train.json"
# the trainer under torchrun on every GPU here (NCCL; with one GPU, a one-rank group): it
# needs tokenizers and tqdm (matplotlib only draws loss.png), which a bare GPU machine may
# lack (see .gpu-packages above): then it is reported as SKIP
if "$PYTHON" -c "import tokenizers, tqdm" 2>/dev/null; then
  smoke=$(mktemp -d)
  step "torchrun smoke test" env FASTGPT_CACHE="$smoke/cache" "$PYTHON" -m torch.distributed.run \
    --standalone --nproc_per_node "$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")" \
    -m fastgpt train --preset cpu --corpus pystdlib --max_steps 60 --eval_interval 30 \
    --runs_dir "$smoke/runs" --name torchrun-smoke
else
  echo "== torchrun smoke test: SKIP (needs tokenizers and tqdm: pip install -e ., or .gpu-packages/)" | tee -a "$log"
  names+=("torchrun smoke test"); results+=(SKIP); seconds+=(0)
fi

# the report: environment, the summary, then each step's output
env_json=$("$PYTHON" - <<'EOF'
import json, subprocess, platform, torch
def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as exc:
        return f"unavailable ({exc})"
try:
    import triton
    triton_version = triton.__version__
except Exception as exc:
    triton_version = f"unavailable ({exc})"
print(json.dumps({
    "commit": run("git", "rev-parse", "HEAD") or "unknown",
    "dirty": bool(run("git", "status", "--porcelain")),
    "gpu": torch.cuda.get_device_name(),
    "driver": run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
    "cuda": torch.version.cuda, "torch": torch.__version__, "triton": triton_version,
    "python": platform.python_version(),
}))
EOF
)
summary=""
failed=0
for i in "${!names[@]}"; do
  summary+=$(printf '| %-26s | %-4s | %5s s |' "${names[$i]}" "${results[$i]}" "${seconds[$i]}")$'\n'
  [ "${results[$i]}" = FAIL ] && failed=$((failed + 1))
done
steps_json=$("$PYTHON" -c "
import json, sys
names, results, seconds = sys.argv[1].split('|'), sys.argv[2].split('|'), sys.argv[3].split('|')
print(json.dumps([{'step': n, 'result': r, 'seconds': int(s)} for n, r, s in zip(names, results, seconds)]))
" "$(IFS='|'; echo "${names[*]}")" "$(IFS='|'; echo "${results[*]}")" "$(IFS='|'; echo "${seconds[*]}")")
echo "{\"environment\": $env_json, \"steps\": $steps_json, \"failed\": $failed}" > "$stem.json"
results=()
for name in cross_entropy adamw attention train; do
  [ -f "$stem-$name.json" ] && results+=("$stem-$name.json")
done
tables=""
if [ ${#results[@]} -gt 0 ]; then
  tables=$("$PYTHON" bench/report.py "${results[@]}" 2>&1)
fi
commit=$("$PYTHON" -c "import json, sys; print(json.loads(sys.argv[1])['commit'][:12])" "$env_json")
{
  echo "# GPU check: $gpu, $(date -u +%Y-%m-%d)"
  echo
  echo "Environment: \`$env_json\`"
  echo
  echo "| step | result | time |"
  echo "|---|---|---|"
  printf '%s' "$summary"
  echo
  echo "## Results"
  echo
  echo "$tables"
  echo
  echo "Full output (the log of every step):"
  echo
  echo '```'
  cat "$log"
  echo '```'
} > "$stem.md"

# the latest run's tables are the published ones
{
  echo "# Results"
  echo
  echo "The latest \`bash bench/gpu_check.sh\` run: $gpu, $(date -u +%Y-%m-%d), commit"
  echo "\`$commit\`$([ "$(echo "$env_json" | grep -c '"dirty": true')" = 1 ] && echo " (with uncommitted changes)")."
  echo "Its full report, with every step's output: [$(basename "$stem").md]($(basename "$stem").md)."
  echo "Loss quality (\`bench/quality.py\`) is a separate, longer run; see bench/README.md."
  echo
  echo "| step | result | time |"
  echo "|---|---|---|"
  printf '%s' "$summary"
  echo
  echo "$tables"
} > bench/results/README.md

echo
echo "wrote $stem.md, $stem.json (and per-benchmark JSON beside them), bench/results/README.md"
echo "| step                       | res  |  time   |"
printf '%s' "$summary"
[ "$failed" -eq 0 ]
