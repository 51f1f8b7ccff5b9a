"""The benchmarks run (on a CPU in their reference-only mode) and write their JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastgpt import ops

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_bench(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run bench/<script> with `args` in a fresh Python, its output captured as text."""
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                          text=True, timeout=timeout)


# quality.py's fused run needs the cross-entropy kernel (on a CPU through the interpreter)
@pytest.fixture
def fused_cross_entropy():
    if not ops.available()["cross_entropy"][0]:
        from helpers import require_or_skip
        require_or_skip(f"the fused cross_entropy cannot run here: "
                        f"{ops.available()['cross_entropy'][1]}")


needs_fused_cross_entropy = pytest.mark.usefixtures("fused_cross_entropy")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run is bench/'s own job")
@needs_fused_cross_entropy
@pytest.mark.slow
def test_linear_cross_entropy_benchmark_checks_the_memory_claim_on_a_cpu(tmp_path):
    out = tmp_path / "lce.json"
    result = run_bench("bench_linear_cross_entropy.py", "--reps", "1", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no CUDA GPU: the memory claim on one small case" in result.stdout
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["N"], row["d"], row["V"]) == (1024, 64, 8192)
    assert row["meets_targets"] and row["v1_memory_vs_eager"] <= 0.25
    assert row["v1_largest_bytes"] < row["N"] * row["V"] * 2 <= row["eager_largest_bytes"]
    text = _import_bench("report").render([out])
    assert "| 1024 | 64 | 8192 |" in text and "| n/a | n/a | yes |" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run is bench/'s own job")
@pytest.mark.parametrize("script, args, says, keys, rows", [
    ("bench_cross_entropy.py", ("--vocabs", "512"),
     "no CUDA GPU: timing the reference and eager torch on the CPU only", ("dtype", "V", "N"),
     [("float32", 512, 8192), ("bfloat16", 512, 8192)]),
    ("bench_adamw.py", ("--sets", "seed (11.1M)"), "no CUDA GPU", ("set", "clip", "parameters"),
     [("seed (11.1M)", False, 11_132_672), ("seed (11.1M)", True, 11_132_672)]),
], ids=["cross_entropy", "adamw"])
@pytest.mark.slow
def test_reference_mode_writes_its_rows(tmp_path, script, args, says, keys, rows):
    out = tmp_path / "result.json"
    result = run_bench(script, *args, "--reps", "1", "--warmup", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert says in result.stdout
    data = json.loads(out.read_text())
    assert [tuple(r[k] for k in keys) for r in data["rows"]] == rows
    times = [v for r in data["rows"] for k, v in r.items() if k.endswith("_ms")]
    assert times and all(t > 0 for t in times)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run is bench/'s own job")
@pytest.mark.slow
def test_host_benchmark_times_each_backend_that_runs_every_op(tmp_path):
    out = tmp_path / "host.json"
    result = run_bench("bench_host.py", "--steps", "2", "--runs", "2", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fused: skipped (" in result.stdout  # no CUDA kernel runs here
    rows = json.loads(out.read_text())["rows"]
    assert [r["backend"] for r in rows] == ["reference", "torch"]
    assert all(r["host_ms"] > 0 and len(r["runs"]) == 2 for r in rows)


@pytest.mark.slow
def test_prepare_benchmark_reports_time_memory_and_the_split(tmp_path):
    out = tmp_path / "prepare.json"
    result = run_bench("bench_prepare.py", "--mb", "1", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["MB"], row["vocab"]) == (1.0, 512)
    assert 0 < row["train_tokenizer_s"] < row["wall_s"] and 0 < row["encode_s"] < row["wall_s"]
    # the prepare's own peak (it imports no torch), not the ~700 MB that this benchmark's
    # process (torch imported) held when it forked the child
    assert 20 < row["peak_rss_mb"] < 400 and row["MB_per_s"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs for real")
@pytest.mark.slow
def test_gpu_check_refuses_cleanly_without_a_gpu():
    result = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], capture_output=True,
                            text=True, timeout=120, env={**__import__("os").environ,
                                                         "PYTHON": sys.executable})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "gpu_check: no CUDA GPU is visible to torch here; this check needs one "
        "(run pytest for the CPU checks)"]


def _import_bench(name):
    """A bench/ script as a module (bench/ holds timing.py, which the scripts import)."""
    import importlib

    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run is bench/'s own job")
@pytest.mark.slow
def test_train_benchmark_cpu_mode(tmp_path):
    out = tmp_path / "train.json"
    result = run_bench("bench_train.py", "--configs", "tiny", "--steps", "2", "--runs", "1",
                       "--warmup", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "no CUDA GPU: timing on the CPU (variants 1, 2 and the inline baseline)" in result.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["1", "2", "inline"]
    for r in rows:
        assert r["ms_per_step"] > 0 and r["mfu"] > 0 and r["steps"] == 3
        assert r["tokens_per_s"] == pytest.approx(8 * 64 / (r["ms_per_step"] / 1e3))
        assert r["val_loss"] < r["untrained_val_loss"]  # 3 steps at lr 3e-4 already learn
    assert rows[0]["loss_drift_vs_1"] == 0.0
    assert abs(rows[1]["loss_drift_vs_1"]) <= 0.01
    shown = run_bench("report.py", str(out), timeout=60)  # and report.py renders it
    assert shown.returncode == 0, shown.stderr
    assert "| tiny | 1 | chapter loop, fp32, reference ops | `reference` |" in shown.stdout
    assert "float32 matmul peak measured in the run" in shown.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run is bench/'s own job")
@pytest.mark.slow
def test_train_benchmark_runs_the_stock_and_fused_variants_on_a_cpu(tmp_path):
    # variants 3-5 are the GPU's (gpu_check runs 1 3 4 5): a tiny CPU run catches a variant
    # that no longer builds or steps before a lease is spent on it (4 and 5 take the Triton
    # kernel through the interpreter where it runs, else the reference)
    out = tmp_path / "train.json"
    result = subprocess.run(
        [sys.executable, str(BENCH / "bench_train.py"), "--configs", "tiny", "--device", "cpu",
         "--variants", "1", "3", "4", "5", "--steps", "1", "--runs", "1", "--warmup", "1",
         "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [r["variant"] for r in json.loads(out.read_text())["rows"]] == ["1", "3", "4", "5"]


def test_train_benchmark_flops_per_token_counts_like_nanogpt():
    bench_train = _import_bench("bench_train")
    from fastgpt.model import GPT

    sizes = bench_train.CONFIGS["seed"]
    model = GPT(**{k: v for k, v in sizes.items() if k != "batch_size"})
    non_embedding = 11_132_672 - 512 * 384 - 256 * 384
    assert bench_train.flops_per_token(model, sizes) == 6 * non_embedding + 12 * 6 * 384 * 256


@pytest.mark.slow
def test_train_benchmark_fails_loudly_when_a_variant_learns_wrong(monkeypatch, capsys):
    bench_train = _import_bench("bench_train")
    build = bench_train.build_variant

    def build_with_a_wrong_variant_2(name, sizes, device, train_ids):
        model, step = build(name, sizes, device, train_ids)
        if name != "2":
            return model, step

        def wrong_step():  # as if a kernel's gradient were 30x too large
            loss = step()
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p), alpha=0.05)
            return loss
        return model, wrong_step

    monkeypatch.setattr(bench_train, "build_variant", build_with_a_wrong_variant_2)
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--configs", "tiny", "--device", "cpu",
                                      "--variants", "1", "2", "--steps", "1", "--runs", "1",
                                      "--warmup", "1"])
    assert bench_train.main() == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "tiny/2: val loss" in err and "from variant 1's" in err


# The interface bench_compile.py uses of nanoGPT's model.py (GPTConfig, GPT(config) whose
# forward(idx, targets) gives (logits, loss), configure_optimizers), written here from
# scratch: a stand-in, so that the test needs no copy of nanoGPT.
NANOGPT_STAND_IN = """
from dataclasses import dataclass
import torch
import torch.nn.functional as F

@dataclass
class GPTConfig:
    block_size: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float
    bias: bool

class GPT(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.emb = torch.nn.Embedding(config.vocab_size, config.n_embd)
        self.head = torch.nn.Linear(config.n_embd, config.vocab_size)

    def forward(self, idx, targets):
        logits = self.head(self.emb(idx))
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        return torch.optim.AdamW(self.parameters(), lr=learning_rate, betas=betas,
                                 weight_decay=weight_decay)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run is bench/'s own job")
@pytest.mark.slow
def test_compile_benchmark_times_every_variant_in_turns(tmp_path):
    nanogpt = tmp_path / "model.py"
    nanogpt.write_text(NANOGPT_STAND_IN)
    out = tmp_path / "compile.json"
    result = subprocess.run(
        [sys.executable, str(BENCH / "bench_compile.py"), "--config", "tiny", "--runs", "2",
         "--steps", "1", "--warmup", "1", "--nanogpt", str(nanogpt), "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["fastgpt", "fastgpt-compiled", "nanogpt",
                                            "nanogpt-compiled"]
    assert all(len(r["runs"]) == 2 and r["ms_per_step"] > 0 for r in rows)
    assert "compiled against eager, dropout off, float64: loss " in result.stdout
    assert "| fastgpt-compiled |" in result.stdout


def test_compile_benchmark_fails_when_the_compiled_step_computes_something_else(monkeypatch,
                                                                             capsys):
    bench_compile = _import_bench("bench_compile")
    monkeypatch.setattr(bench_compile, "compiled_errors", lambda *args: (3e-3, 1e-7))
    monkeypatch.setattr(sys, "argv", ["bench_compile.py", "--config", "tiny", "--device", "cpu"])
    default = ops.get_backend()
    assert bench_compile.main() == 1
    assert "FAILED:\n  the compiled step differs from the eager one" in capsys.readouterr().err
    assert ops.get_backend() == default  # the script's reference ops end with it


@needs_fused_cross_entropy
@pytest.mark.slow
def test_quality_trains_both_backends_and_compares_them(tmp_path, corpus_file):
    out_dir = tmp_path / "quality"
    result = subprocess.run(
        [sys.executable, str(BENCH / "quality.py"), "--presets", "cpu", "--corpus",
         str(corpus_file), "--no-cpu-extension", "--out-dir", str(out_dir), "--set",
         "max_steps=4", "eval_interval=2", "eval_batches=2", "context_length=16", "d_model=32",
         "num_layers=1", "batch_size=8"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    data = json.loads((out_dir / "quality.json").read_text())
    (r,) = data["results"]
    assert r["fused_backend"].startswith("cross_entropy=fused")
    assert list(r["reference_curve"]) == list(r["fused_curve"]) == ["0", "2", "4"]
    assert r["passed"] and abs(r["relative_difference"]) <= 0.01
    assert r["reference_final"] < r["reference_curve"]["0"]  # it learned something
    assert (out_dir / "quality.png").stat().st_size > 0
    assert "| 4 |" in (out_dir / "quality.md").read_text()
    for path in ("reference", "fused"):
        assert (out_dir / f"cpu-{path}" / "metrics.jsonl").exists()


@needs_fused_cross_entropy
def test_quality_catches_a_kernel_that_learns_wrong(tmp_path, corpus_file, monkeypatch):
    quality = _import_bench("quality")
    from fastgpt.ops import reference

    def wrong_kernel(hidden, weight, bias, targets, ignore_index, reduction, *rest):
        return 1.05 * reference.linear_cross_entropy(  # 5% too much loss
            hidden, weight, targets, bias, ignore_index=ignore_index, reduction=reduction)

    monkeypatch.setattr("fastgpt.ops.triton_linear_ce.ChunkedLinearCrossEntropy.apply",
                        wrong_kernel)
    monkeypatch.setattr(sys, "argv", [
        "quality.py", "--presets", "cpu", "--corpus", str(corpus_file), "--no-cpu-extension",
        "--out-dir", str(tmp_path / "q"), "--set", "max_steps=2", "eval_interval=2",
        "eval_batches=2", "context_length=16", "d_model=32", "num_layers=1", "batch_size=8"])
    assert quality.main() == 1
    assert "**FAIL**" in (tmp_path / "q" / "quality.md").read_text()


def test_quality_refuses_overrides_it_sets_itself(monkeypatch, capsys):
    quality = _import_bench("quality")
    monkeypatch.setattr(sys, "argv", ["quality.py", "--set", "backend=reference"])
    assert quality.main() == 2
    assert "--set backend=... is chosen by quality.py itself" in capsys.readouterr().err


def test_report_renders_gpu_shaped_results(tmp_path):
    # The keys are those the benchmarks write on a GPU; the numbers only test the layout.
    report = _import_bench("report")
    ce = {"benchmark": "cross_entropy", "device": "GPU", "torch": "2.x", "cuda": "13.0",
          "reps": 20, "rows": [{"dtype": "bfloat16", "N": 8192, "V": 512, "fused_ms": 0.5,
                                "fused_peak_bytes": 2**20, "eager_ms": 1.0,
                                "eager_peak_bytes": 2**21, "compiled_ms": 0.75,
                                "compiled_peak_bytes": 2**20, "reference_ms": 2.0,
                                "reference_peak_bytes": 2**22}]}
    adamw = {"benchmark": "adamw", "device": "GPU", "torch": "2.x", "cuda": "13.0", "reps": 50,
             "rows": [{"set": "seed (11.1M)", "parameters": 11132672, "tensors": 84,
                       "clip": True, "fastgpt_ms": 0.1, "for-loop_ms": 2.0, "foreach_ms": 0.4,
                       "fused_ms": 0.2, "fastgpt_GBps": 3000.0}]}
    paths = []
    for result in (ce, adamw):
        paths.append(tmp_path / f"{result['benchmark']}.json")
        paths[-1].write_text(json.dumps(result))
    text = report.render(paths)
    assert "| bfloat16 | 512 | 0.500 | 1.000 | 0.750 | 2.000 | 2.00x | 1.50x | 1.0 | 2.0 |" in text
    assert "| seed (11.1M) | yes | 0.100 | 2.000 | 0.400 | 0.200 | 2.00x | 4.00x | 3000 |" in text


@pytest.mark.slow
def test_report_renders_the_attention_benchmark(tmp_path):
    out = tmp_path / "attention.json"
    result = run_bench("bench_attention.py", "--seqs", "16", "--tokens", "32", "--reps", "1",
                       "--device", "cpu", "--out", str(out))
    assert result.returncode == 0, result.stderr
    shown = run_bench("report.py", str(out), timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "| dtype | B x H x T x D | check | reference ms | sdpa-math ms |" in shown.stdout
    assert "| float32 | 2x6x16x64 | - | " in shown.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run is bench/'s own job")
@pytest.mark.slow
def test_attention_benchmark_cpu_mode(tmp_path):
    out = tmp_path / "attention.json"
    result = run_bench("bench_attention.py", "--seqs", "16", "64", "--tokens", "128", "--reps",
                       "1", "--warmup", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "no CUDA GPU: timing the reference and SDPA's math backend on the CPU only" \
        in result.stdout
    data = json.loads(out.read_text())
    assert data["benchmark"] == "attention" and data["reps"] == 1
    rows = data["rows"]
    assert [(r["dtype"], r["B"], r["H"], r["T"], r["D"]) for r in rows] == [
        ("float32", 8, 6, 16, 64), ("float32", 2, 6, 64, 64)]
    for r in rows:
        assert r["correct"] is None and "fastgpt_fwd_ms" not in r
        for name in ("reference", "sdpa-math"):
            assert r[f"{name}_error"] is None
            for p, factor in (("fwd", 1.0), ("bwd", 2.5), ("fwd_bwd", 3.5)):
                assert r[f"{name}_{p}_ms"] > 0
                assert r[f"{name}_{p}_tflops"] == pytest.approx(
                    factor * 2 * r["B"] * 6 * r["T"] ** 2 * 64 / (r[f"{name}_{p}_ms"] * 1e9))


def test_attention_benchmark_counts_flops_like_flashattention():
    bench = _import_bench("bench_attention")
    forward = 2 * 32 * 6 * 256 ** 2 * 64  # causal: half of full attention's 4 B H T^2 D
    assert bench.attention_flops(32, 6, 256, 64) == forward
    assert bench.attention_flops(32, 6, 256, 64, "bwd") == 2.5 * forward
    assert bench.attention_flops(32, 6, 256, 64, "fwd_bwd") == 3.5 * forward
    assert bench.targets(256, 64) == {"sdpa": 0.9, "reference": 3.0}
    assert bench.targets(4096, 128) == {"sdpa": 0.75} and bench.targets(1024, 64) == {}


def test_attention_benchmark_check_passes_a_flash_like_kernel_and_catches_wrong_ones():
    import torch.nn.functional as F

    bench = _import_bench("bench_attention")
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 64, 64, generator=generator).bfloat16() for _ in range(3))

    def fp32_inside(q, k, v):  # as a flash kernel computes: fp32 accumulation, bf16 out
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                              is_causal=True).to(q.dtype)

    def forgets_dv(q, k, v):
        return bench.reference.causal_attention(q, k, v.detach() + 0 * v)

    def off_by_2_percent(q, k, v):
        return 1.02 * bench.reference.causal_attention(q, k, v)

    assert all(e <= t for e, t in bench.check(fp32_inside, q, k, v).values())
    wrong_dv = bench.check(forgets_dv, q, k, v)
    assert wrong_dv["dv"][0] > wrong_dv["dv"][1] and wrong_dv["out"][0] <= wrong_dv["out"][1]
    wrong_out = bench.check(off_by_2_percent, q, k, v)
    assert wrong_out["out"][0] > wrong_out["out"][1]


def test_attention_benchmark_records_what_cannot_run():
    from torch.nn.attention import SDPBackend

    bench = _import_bench("bench_attention")
    q = torch.randn(1, 2, 16, 64, requires_grad=True)

    def oom(q, k, v):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8 GiB")

    assert bench.run_provider(oom, q, q, q, 1, 0, cuda=False) == (None, "out of memory")
    times, why = bench.run_provider(bench.sdpa(SDPBackend.CUDNN_ATTENTION), q, q, q, 1, 0,
                                    cuda=False)  # no cuDNN on a CPU: torch says so, no crash
    assert times is None and why.startswith("RuntimeError: No viable backend")


def _run_attention_main(bench, monkeypatch, providers, why_not, out):
    monkeypatch.setattr(bench, "providers_for", lambda cuda: (providers, why_not))
    monkeypatch.setattr(sys, "argv", ["bench_attention.py", "--device", "cpu", "--seqs", "256",
                                      "--tokens", "256", "--reps", "1", "--warmup", "1",
                                      "--out", str(out)])
    return bench.main()


def test_attention_benchmark_marks_a_wrong_kernel_and_prints_the_targets(monkeypatch, capsys,
                                                                         tmp_path):
    bench = _import_bench("bench_attention")
    cpu, _ = bench.providers_for(cuda=False)

    def wrong(q, k, v):  # stands in for the fused kernel, 5% off
        return 1.05 * bench.reference.causal_attention(q, k, v)

    out = tmp_path / "attention.json"
    assert _run_attention_main(bench, monkeypatch, {"fastgpt": wrong, **cpu}, None, out) == 1
    shown = capsys.readouterr()
    assert "B=1 H=6 T=256 D=64: WRONG (worst: " in shown.out
    assert "fastgpt vs best SDPA:" in shown.out and "fastgpt vs reference:" in shown.out
    assert "[issue's H100 target: fwd+bwd >= 0.9x; " in shown.out
    assert "[issue's H100 target: fwd+bwd >= 3.0x; " in shown.out
    assert "FAILED" in shown.err and "B=1 H=6 T=256 D=64: fastgpt is WRONG" in shown.err
    (row,) = json.loads(out.read_text())["rows"]
    assert row["correct"] is False
    assert row["check"]["out"]["error"] > row["check"]["out"]["tolerance"]
    assert row["best_sdpa_fwd_bwd"] == "sdpa-math"
    for baseline in ("sdpa-math", "reference"):
        key = "sdpa" if baseline == "sdpa-math" else "reference"
        for p in ("fwd", "bwd", "fwd_bwd"):
            assert row[f"fastgpt_vs_{key}_{p}"] == pytest.approx(
                row[f"{baseline}_{p}_ms"] / row[f"fastgpt_{p}_ms"])
    assert (row["target_vs_sdpa_fwd_bwd"], row["target_vs_reference_fwd_bwd"]) == (0.9, 3.0)


def test_attention_benchmark_fails_when_the_fused_kernel_cannot_run(monkeypatch, capsys,
                                                                    tmp_path):
    bench = _import_bench("bench_attention")
    cpu, _ = bench.providers_for(cuda=False)
    out = tmp_path / "attention.json"
    assert _run_attention_main(bench, monkeypatch, cpu, "the extension failed to build", out) == 1
    err = capsys.readouterr().err
    assert "the fused kernel cannot run: the extension failed to build" in err
    (row,) = json.loads(out.read_text())["rows"]  # the other providers were still timed
    assert row["correct"] is None and row["reference_fwd_bwd_ms"] > 0


def test_harness_times_every_case_and_lists_the_failures_at_the_end(tmp_path, capsys):
    harness = _import_bench("harness")
    failures = []

    def measure(case):
        if case["V"] == 2:
            raise ValueError("the kernel crashed")
        if case["V"] == 3:
            failures.append("V=3: slower than its target")
        return {"V": case["V"], "fused_ms": 1.5 * case["V"], "peak_bytes": None}

    table = harness.Table([harness.Column("V", "V", width=3, left=True),
                           harness.Column("fused ms", "fused_ms", ".2f"),
                           harness.Column("MiB", "peak_bytes", ".1f", width=5)])
    out = tmp_path / "result.json"
    status = harness.run_benchmarks("cross_entropy", "a stand-in", "CPU", 7,
                                    [{"V": 1}, {"V": 2}, {"V": 3}], measure, table, str(out),
                                    failures)
    assert status == 1
    shown = capsys.readouterr()
    assert shown.out.splitlines()[:4] == [
        f"a stand-in on CPU; torch {torch.__version__}",
        "V       fused ms   MiB",
        "1           1.50   n/a",
        "3           4.50   n/a"]
    assert "Traceback" in shown.err and "ValueError: the kernel crashed" in shown.err
    assert shown.err.endswith("FAILED:\n  V=2: ValueError: the kernel crashed\n"
                              "  V=3: slower than its target\n")
    result = json.loads(out.read_text())  # the cases that ran, as report.py reads them
    assert (result["benchmark"], result["device"], result["reps"]) == ("cross_entropy", "CPU", 7)
    assert [r["V"] for r in result["rows"]] == [1, 3]


def test_harness_markdown_table_and_a_clean_run(tmp_path, capsys):
    harness = _import_bench("harness")
    table = harness.Table([harness.Column("variant", "variant", left=True),
                           harness.Column("vs 1", "drift", "+.1%", missing="")], markdown=True)
    status = harness.run_benchmarks(
        "train", "a stand-in", "CPU", 1, [{"config": "tiny"}],
        lambda case: [{"variant": "1", "drift": None}, {"variant": "2", "drift": 0.004}],
        table, None)
    assert status == 0
    shown = capsys.readouterr()
    assert shown.out.splitlines()[1:] == ["| variant | vs 1 |", "|---|---:|", "| 1 |  |",
                                          "| 2 | +0.4% |"]
    assert shown.err == "" and not list(tmp_path.iterdir())  # no --out: no file
