"""The benchmarks run (on a CPU in their reference-only mode) and write their JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run is bench/'s own job")
def test_cross_entropy_benchmark_reference_mode(tmp_path):
    out = tmp_path / "ce.json"
    result = subprocess.run([sys.executable, str(BENCH / "bench_cross_entropy.py"), "--vocabs",
                             "512", "--reps", "1", "--warmup", "1", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "no CUDA GPU: timing the reference and eager torch on the CPU only" in result.stdout
    data = json.loads(out.read_text())
    assert [(r["dtype"], r["V"], r["N"]) for r in data["rows"]] == [
        ("float32", 512, 8192), ("bfloat16", 512, 8192)]
    assert all(r["eager_ms"] > 0 and r["reference_ms"] > 0 for r in data["rows"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run is bench/'s own job")
def test_adamw_benchmark_reference_mode(tmp_path):
    out = tmp_path / "adamw.json"
    result = subprocess.run([sys.executable, str(BENCH / "bench_adamw.py"), "--sets",
                             "seed (11.1M)", "--reps", "1", "--warmup", "1", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "no CUDA GPU" in result.stdout
    data = json.loads(out.read_text())
    assert [(r["set"], r["clip"], r["parameters"]) for r in data["rows"]] == [
        ("seed (11.1M)", False, 11_132_672), ("seed (11.1M)", True, 11_132_672)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs for real")
def test_gpu_check_refuses_cleanly_without_a_gpu():
    result = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], capture_output=True,
                            text=True, timeout=120, env={**__import__("os").environ,
                                                         "PYTHON": sys.executable})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "gpu_check: no CUDA GPU is visible to torch here; this check needs one "
        "(run pytest for the CPU checks)"]
