"""`fastgpt verify`: passes here, and fails loudly when a kernel is wrong."""

import pytest
import torch

from fastgpt import ops
from fastgpt.cli import main

pytestmark = pytest.mark.skipif(
    not ops.available()["cross_entropy"][0],
    reason=f"no fused kernel can run here: {ops.available()['cross_entropy'][1]}")


def test_verify_passes_and_prints_the_table(capsys):
    assert main(["verify"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for dtype in ("float32", "bfloat16", "float16"):
        for reduction in ("mean", "sum", "none"):
            assert any(line.startswith(f"ce grad ({reduction}") and f" {dtype} " in line
                       and line.endswith("PASS") for line in lines), (dtype, reduction)
    assert "train step grads" in out and "params after 3 steps" in out
    assert "FAIL" not in out and " 0 failed" in out


def test_verify_fails_when_the_kernel_is_wrong(capsys, monkeypatch):
    from fastgpt.ops import triton_ce
    real_launch = triton_ce.launch

    def launch_with_a_small_error(*args, **kwargs):
        loss, lse, grad = real_launch(*args, **kwargs)
        if grad is not None:
            grad[0, 0] += 1e-3 * grad.abs().max()  # an error of 1e-3 of the largest entry:
        return loss, lse, grad                       # 1000x the fp32 tolerance

    monkeypatch.setattr(triton_ce, "launch", launch_with_a_small_error)
    assert main(["verify"]) == 1
    out = capsys.readouterr().out
    fails = [line for line in out.splitlines() if line.endswith("FAIL")]
    assert any(line.startswith("ce grad (mean") and " float32 " in line for line in fails)
    assert any(line.startswith("train step grads") for line in fails)
