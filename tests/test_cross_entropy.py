"""The fused Triton cross-entropy against torch.nn.functional.cross_entropy.

Without a GPU this runs the kernel through Triton's interpreter (conftest sets
TRITON_INTERPRET=1), on CPU tensors; small block_v values make the vocab loop run several
times. Tolerances (the rules live in fastgpt/verify.py, which `fastgpt verify` uses too):
- anything computed in fp32 (every loss, fp32 gradients): within 1e-6 of the largest
  magnitude of the fp64 reference (fp32's epsilon is 1.2e-7; the paths sum in different
  orders over at most a few thousand terms);
- bf16/fp16 gradients: element by element within the rounding bound (half an ulp per
  rounding on a GPU; a whole ulp for bf16 under the interpreter, which truncates; two
  roundings when "mean"/"sum" rescale by a grad_output other than 1); and where rounded once,
  FlashAttention's rule: the max error at most twice that of torch's own computation in the
  same dtype, plus 1e-6 of the largest magnitude.
"""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from fastgpt import FastGPTError, ops
from fastgpt.model import GPT
from fastgpt.verify import FP32_RELATIVE, low_precision_grad_ok
from helpers import quick, require_or_skip

# On a GPU these run natively and a kernel that fails its self-check fails them (it is not
# skipped); without one they need Triton's interpreter.
# Every test here is a GPU test where there is one (marked gpu: the full GPU matrix of
# bench/gpu_check.sh --full; `quick` the ones of its quick stage).
pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def needs_the_kernel():
    if not torch.cuda.is_available() and not ops.available()["cross_entropy"][0]:
        require_or_skip(f"fused cross_entropy unavailable: {ops.available()['cross_entropy'][1]}")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def fused(logits, targets, block_v=None, block_rows=None, **kwargs):
    """The op with backend "fused"; with tile sizes, its fused path (where they are set)."""
    if block_v is None and block_rows is None:
        return ops.cross_entropy(logits, targets, backend="fused", **kwargs)
    from fastgpt.ops import triton_ce
    return triton_ce.fused_cross_entropy(logits, targets, block_v=block_v,
                                         block_rows=block_rows, **kwargs)


def loss_and_grad(fn, logits, targets, grad_output, **kwargs):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, targets, **kwargs)
    (grad,) = torch.autograd.grad(loss, x, grad_output.to(loss.dtype))
    return loss.detach(), grad


def assert_matches_torch(logits, targets, grad_output=None, block_v=None, block_rows=None,
                         **kwargs):
    """Loss and gradient of the fused op against fp64, judged against torch in the same dtype."""
    reduction = kwargs.get("reduction", "mean")
    shape = (logits.shape[0],) if reduction == "none" else ()
    if grad_output is None:
        grad_output = torch.randn(shape, generator=torch.Generator().manual_seed(1),
                                  dtype=torch.float64).to(DEVICE)
    ours = loss_and_grad(fused, logits, targets, grad_output, block_v=block_v,
                         block_rows=block_rows, **kwargs)
    theirs = loss_and_grad(F.cross_entropy, logits, targets, grad_output, **kwargs)
    exact = loss_and_grad(F.cross_entropy, logits.double(), targets, grad_output, **kwargs)
    assert ours[0].dtype == torch.float32  # the fused loss is kept in fp32
    assert ours[1].dtype == logits.dtype and ours[1].shape == logits.shape
    interpreting = ops.triton_interpreting() and not logits.is_cuda
    for name, mine, torch_own, want in zip(("loss", "grad"), ours, theirs, exact):
        assert torch.equal(torch.isnan(mine), torch.isnan(want)), name
        finite = ~torch.isnan(want)
        mine, torch_own, want = mine.double()[finite], torch_own.double()[finite], want[finite]
        if want.numel() == 0:
            continue
        floor = FP32_RELATIVE * want.abs().max().item()
        error = (mine - want).abs().max().item()
        if name == "loss" or logits.dtype == torch.float32:
            assert error <= floor, (name, error)
            continue
        roundings = 2 if reduction != "none" and grad_output.item() != 1.0 else 1
        assert low_precision_grad_ok(mine, want, logits.dtype, roundings, interpreting).all()
        if roundings == 1 and not (interpreting and logits.dtype == torch.bfloat16):
            torch_error = (torch_own - want).abs().max().item()
            assert error <= 2 * torch_error + floor, (name, error, torch_error)
    return ours


def random_case(N, V, dtype, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=gen, dtype=torch.float64) * scale).to(dtype)
    targets = torch.randint(0, V, (N,), generator=gen)
    return logits.to(DEVICE), targets.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N, V, block_v", [
    (1, 2, None), (5, 7, None), (13, 7, 2), (37, 512, 128), (16, 512, None),
    (9, 1000, 256), (3, 50257, 4096),
])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("seed", [0, 17])
def test_matches_torch(dtype, N, V, block_v, reduction, seed):
    logits, targets = random_case(N, V, dtype, seed=seed)
    assert_matches_torch(logits, targets, reduction=reduction, block_v=block_v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-100, 3, -1])
def test_ignore_index_and_label_smoothing(dtype, reduction, ignore_index):
    logits, targets = random_case(21, 300, dtype, seed=2)
    targets[::3] = ignore_index
    for label_smoothing in (0.0, 0.1):
        loss, grad = assert_matches_torch(logits, targets, reduction=reduction,
                                          ignore_index=ignore_index, block_v=64,
                                          label_smoothing=label_smoothing)
        assert torch.all(grad[::3] == 0)  # ignored rows get no gradient
        if reduction == "none":
            assert torch.all(loss[::3] == 0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_gives_what_torch_gives(reduction):
    logits, targets = random_case(6, 50, torch.float32)
    targets[:] = -100
    loss, grad = assert_matches_torch(logits, targets, reduction=reduction, block_v=16)
    assert torch.all(grad == 0)
    if reduction == "mean":
        assert torch.isnan(loss)  # 0 / 0, as torch


def test_several_rows_per_program_and_row_counts_off_the_block():
    # block_rows 8: N = 1, 7, 8, 9, 17 cover partial first and last row blocks
    for N in (1, 7, 8, 9, 17):
        logits, targets = random_case(N, 512, torch.float32, seed=N)
        assert_matches_torch(logits, targets, block_v=128, block_rows=8)


@quick
@pytest.mark.parametrize("V", [512, 1000, 50257])
def test_the_gpu_default_tile_sizes(V):
    # Through the interpreter the default tiles are larger (few programs); here the GPU's
    # defaults run on CPU too, with a row count off their row block.
    from fastgpt.ops.triton_ce import block_sizes

    block_rows, block_v = block_sizes(V)  # the GPU's choice for this V
    assert block_sizes(V, interpreted=True)[1] == block_v
    logits, targets = random_case(2 * block_rows + 3, V, torch.float32, seed=V)
    for reduction in ("mean", "none"):
        assert_matches_torch(logits, targets, reduction=reduction, block_v=block_v,
                             block_rows=block_rows)


@quick
def test_extreme_logits():
    logits, targets = random_case(8, 300, torch.float32, seed=3)
    logits[0] = 1e4                                  # all equal and huge
    logits[1, ::2] = -1e4
    logits[2] = float("-inf")                        # -inf everywhere but the target
    logits[2, targets[2]] = 0.0
    logits[3, :200] = float("-inf")                  # the first blocks entirely -inf
    targets[3] = 250
    logits[4, targets[4]] = 1e4                      # certain and right
    logits[5, (targets[5] + 1) % 300] = 1e4          # certain and wrong
    loss, grad = assert_matches_torch(logits, targets, reduction="none", block_v=64)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert loss[2] == 0 and loss[4] == 0
    # row by row, not only against the batch's largest loss (1e4): each loss to 1e-6 of
    # itself, as fp32 allows, however large the logits
    want = F.cross_entropy(logits.double(), targets, reduction="none")
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-6)


@quick
def test_confident_row_in_bf16_keeps_the_target_gradient():
    # p(target) ~ 0.9999: the target's gradient p - 1 ~ -1e-4 must not round to 0 (the bug
    # Liger-Kernel fixed by computing it in fp32); 1% of it is far below bf16's own
    # rounding of the logits' effect here.
    V = 512
    logits = torch.zeros(4, V, dtype=torch.bfloat16, device=DEVICE)
    targets = torch.tensor([0, 5, 100, 511], device=DEVICE)
    logits[torch.arange(4), targets] = 15.0
    loss, grad = loss_and_grad(fused, logits, targets, torch.tensor(1.0, device=DEVICE),
                               reduction="sum", block_v=128)
    exact = loss_and_grad(F.cross_entropy, logits.double(), targets,
                          torch.tensor(1.0, dtype=torch.float64, device=DEVICE),
                          reduction="sum")[1]
    want = exact[torch.arange(4), targets]
    got = grad[torch.arange(4), targets].double()
    assert (want < -1e-4).all() and (want > -2e-4).all()
    assert ((got - want).abs() <= 0.01 * want.abs()).all()


@quick
def test_non_contiguous_logits():
    base, targets = random_case(12, 600, torch.float32, seed=4)
    strided = base.t().contiguous().t()              # column-major: stride (1, 12)
    assert not strided.is_contiguous()
    assert_matches_torch(strided, targets, block_v=128)
    every_other_row = torch.cat([base, base]).view(2, 12, 600).transpose(0, 1)[:, 0]
    assert_matches_torch(every_other_row, targets, block_v=128)  # row stride 1200


@quick
def test_caller_logits_are_never_overwritten():
    logits, targets = random_case(10, 100, torch.bfloat16)
    before = logits.clone()
    x = logits.requires_grad_()
    fused(x, targets).backward()
    assert torch.equal(logits.detach(), before)


def test_no_grad_and_logits_without_grad():
    logits, targets = random_case(10, 100, torch.float32)
    want = F.cross_entropy(logits, targets)
    with torch.no_grad():
        assert torch.allclose(fused(logits.clone().requires_grad_(), targets), want,
                              rtol=1e-6, atol=0)  # fp32, see the module docstring
    loss = fused(logits, targets)
    assert not loss.requires_grad
    assert torch.allclose(loss, want, rtol=1e-6, atol=0)
    assert loss != 0  # the "loss 0 without grad" bug of other fused losses


@quick
def test_backward_uses_each_rows_own_grad_output():
    logits, targets = random_case(6, 40, torch.float32)
    x = logits.clone().requires_grad_()
    weights = torch.arange(6, dtype=torch.float32, device=DEVICE)
    (fused(x, targets, reduction="none") * weights).sum().backward()
    row_grads = torch.autograd.functional.jacobian(
        lambda z: F.cross_entropy(z, targets, reduction="none"), logits)  # (N, N, V)
    want = torch.einsum("n,nnv->nv", weights, row_grads)
    torch.testing.assert_close(x.grad, want, rtol=0, atol=1e-6)  # fp32, module docstring


def test_a_second_backward_after_scaling_is_refused_not_wrong():
    logits, targets = random_case(4, 30, torch.float32)
    x = logits.clone().requires_grad_()
    loss = fused(x, targets) * 2.0   # grad_output 2: the stored gradient is scaled in place
    loss.backward(retain_graph=True)
    reference = logits.clone().requires_grad_()
    (F.cross_entropy(reference, targets) * 2.0).backward()
    torch.testing.assert_close(x.grad, reference.grad, rtol=0, atol=1e-6)  # fp32, see top
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the check is a device-side "
                    "assert: test_an_out_of_range_target_on_a_gpu_is_a_device_side_assert")
@pytest.mark.parametrize("targets, message", [
    ([0, 7], "target 7 is out of range for 7 classes"),
    ([-5, 1], "target -5 is out of range"),
])
def test_out_of_range_targets_are_a_clear_error(targets, message):
    logits = torch.zeros(2, 7, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        fused(logits, torch.tensor(targets, device=DEVICE))


@pytest.mark.parametrize("bad", [7, 1000, -1, -5])
def test_an_unchecked_out_of_range_target_gives_nan_and_is_never_read(bad):
    # check_targets=False: the kernel itself neither reads nor writes outside the row; the
    # row's loss and gradient are nan (the others exact), so the mistake cannot pass unseen
    logits, targets = random_case(6, 7, torch.float32, seed=11)
    targets[2] = bad
    x = logits.clone().requires_grad_()
    loss = ops.cross_entropy(x, targets, reduction="none", backend="fused", check_targets=False)
    loss.sum().backward()
    assert torch.isnan(loss[2]) and torch.isnan(x.grad[2]).all()
    keep = torch.arange(6, device=DEVICE) != 2
    want = F.cross_entropy(logits[keep], targets[keep], reduction="none")
    torch.testing.assert_close(loss[keep], want, rtol=1e-6, atol=1e-6)  # fp32, see top
    mean = ops.cross_entropy(logits, targets, backend="fused", check_targets=False)
    assert torch.isnan(mean)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_an_out_of_range_target_on_a_gpu_is_a_device_side_assert():
    # in a process of its own: a device-side assert ends the CUDA context
    script = textwrap.dedent("""
        import torch
        from fastgpt import ops
        logits = torch.zeros(4, 7, device="cuda")
        targets = torch.tensor([0, 1, 7, 2], device="cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")   # the call itself must not wait
        loss = ops.cross_entropy(logits, targets, backend="fused")
        torch.cuda.set_sync_debug_mode(0)
        print("returned without a sync", flush=True)
        torch.cuda.synchronize()
        print("NOT CAUGHT")
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert "returned without a sync" in done.stdout, done.stderr
    assert done.returncode != 0 and "NOT CAUGHT" not in done.stdout
    assert "device-side assert" in done.stderr


def test_bad_inputs():
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        fused(torch.zeros(2, 7, dtype=torch.float64, device=DEVICE),
              torch.zeros(2, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="power of two"):
        fused(torch.zeros(2, 7, device=DEVICE), torch.zeros(2, dtype=torch.long, device=DEVICE),
              block_v=6)


@quick
def test_model_gives_the_same_loss_and_gradients_on_both_backends():
    torch.manual_seed(0)
    model = GPT(vocab_size=512, context_length=16, d_model=32, num_heads=2, num_layers=2,
                dropout=0.0).to(DEVICE)
    idx = torch.randint(0, 512, (3, 16), device=DEVICE)
    targets = torch.randint(0, 512, (3, 16), device=DEVICE)
    results = {}
    for backend in ("reference", "fused"):
        model.zero_grad()
        loss = model.loss(idx, targets, backend=backend)
        loss.backward()
        results[backend] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (ref_loss, ref_grads), (fused_loss, fused_grads) = results["reference"], results["fused"]
    # fp32 on both paths: the losses differ by summation order only (1e-6 relative), and
    # the gradients by fp32 rounding of dlogits carried through two layers (1e-5 of each
    # tensor's largest entry).
    torch.testing.assert_close(fused_loss, ref_loss, rtol=1e-6, atol=0)
    for name, want in ref_grads.items():
        atol = 1e-5 * max(want.abs().max().item(), 1e-12)
        torch.testing.assert_close(fused_grads[name], want, rtol=0, atol=atol, msg=name)


def test_process_default_backend(monkeypatch):
    from fastgpt.ops import triton_ce
    logits, targets = random_case(4, 30, torch.float32)
    fused_calls = []
    real_apply = triton_ce.FusedCrossEntropy.apply
    monkeypatch.setattr(triton_ce.FusedCrossEntropy, "apply",
                        lambda *args: fused_calls.append(1) or real_apply(*args))
    monkeypatch.setenv("FASTGPT_BACKEND", "fused")
    assert ops.get_backend() == "fused"
    ops.cross_entropy(logits, targets)
    assert fused_calls == [1]
    previous = ops.set_backend("reference")
    try:
        assert ops.get_backend() == "reference"  # set_backend wins over the environment
        ops.cross_entropy(logits, targets)
        assert fused_calls == [1]
    finally:
        ops.set_backend(previous)
    monkeypatch.setenv("FASTGPT_BACKEND", "cuda")
    with pytest.raises(FastGPTError, match="FASTGPT_BACKEND must be one of"):
        ops.get_backend()


def test_a_per_op_default_backend(monkeypatch):
    assert ops.parse_backend("fused") == dict.fromkeys(ops.KERNELS, "fused")
    assert ops.parse_backend(" cross_entropy = fused , adamw=reference") == {
        "cross_entropy": "fused", "adamw": "reference", "causal_attention": "auto",
        "linear_cross_entropy": "auto"}
    monkeypatch.setenv("FASTGPT_BACKEND", "cross_entropy=reference")
    assert ops.get_backend("cross_entropy") == "reference"
    assert ops.get_backend("adamw") == "auto"
    logits, targets = random_case(4, 7, torch.float32)
    fused_calls = []
    monkeypatch.setattr("fastgpt.ops.triton_ce.FusedCrossEntropy.apply",
                        lambda *a: fused_calls.append(1) or torch.zeros(()))
    previous = ops.set_backend("adamw=reference,cross_entropy=fused")
    try:
        ops.cross_entropy(logits, targets)  # the per-op default picks the kernel
        assert fused_calls == [1]
        assert ops.resolve_backend("adamw", None, logits.device) == "reference"
    finally:
        ops.set_backend(previous)
    for bad, message in (("attention=fused", "unknown op 'attention'"),
                         ("adamw=fast", "backend for adamw must be one of")):
        with pytest.raises(FastGPTError, match=message):
            ops.set_backend(bad)
    assert ops.get_backend() == "cross_entropy=reference"  # a refused spec changes nothing


def test_fused_where_available_names_the_kernels_that_run_here(monkeypatch):
    monkeypatch.setattr(ops.dispatch, "available", lambda: {
        "cross_entropy": (True, ""), "adamw": (False, "no"), "causal_attention": (False, "")})
    assert ops.fused_where_available() == "cross_entropy=fused"
    assert ops.parse_backend(ops.fused_where_available())["adamw"] == "auto"
    monkeypatch.setattr(ops.dispatch, "available",
                        lambda: dict.fromkeys(ops.KERNELS, (False, "")))
    assert ops.fused_where_available() == "reference"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU without the interpreter")
@pytest.mark.slow
def test_fused_on_cpu_without_the_interpreter_says_why(tmp_path):
    code = ("import torch; from fastgpt import ops\n"
            "try:\n"
            "    ops.cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), "
            "backend='fused')\n"
            "except ops.BackendUnavailable as e: print(e)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=120)
    assert "fused cross_entropy cannot run" in result.stdout
    assert "TRITON_INTERPRET=1" in result.stdout


@pytest.mark.parametrize("fault", ["loss", "grad"])
def test_self_check_passes_and_catches_a_wrong_kernel(monkeypatch, fault):
    from fastgpt.ops import triton_ce
    triton_ce.self_check(torch.device(DEVICE))
    with torch.no_grad():  # callers may ask for available() anywhere, eval loops included
        triton_ce.self_check(torch.device(DEVICE))
    real_launch = triton_ce.launch

    def slightly_wrong(*args, **kwargs):
        loss, stats, grad = real_launch(*args, **kwargs)
        if fault == "loss" and loss is not None:
            loss = loss + 1e-3
        if fault == "grad" and grad is not None:
            grad[0, 1] += 0.05 * grad.abs().max()
        return loss, stats, grad

    monkeypatch.setattr(triton_ce, "launch", slightly_wrong)
    with pytest.raises(RuntimeError, match=f"{fault if fault == 'loss' else 'gradient'} error"):
        triton_ce.self_check(torch.device(DEVICE))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: 2^31 logits "
                    "(4 GiB in bf16) are too many for the interpreter")
def test_more_than_2_to_the_31_logits():
    V = 65536
    N = (2 ** 31) // V + 3  # the last rows start past element 2^31
    logits = torch.zeros(N, V, dtype=torch.bfloat16, device="cuda")
    tail = torch.randn(3, V, generator=torch.Generator().manual_seed(0)).to(logits)
    logits[-3:] = tail
    targets = torch.zeros(N, dtype=torch.long, device="cuda")
    targets[-3:] = torch.tensor([5, V - 1, 1234])
    x = logits.requires_grad_()
    loss = fused(x, targets, reduction="none")
    loss.sum().backward()
    want_x = tail.double().requires_grad_()
    want = F.cross_entropy(want_x, targets[-3:], reduction="none")
    want.sum().backward()
    # the loss is fp32 from bf16 inputs (1e-5 relative); the gradient is bf16 (2^-8 relative)
    torch.testing.assert_close(loss[-3:].double(), want.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(x.grad[-3:].double(), want_x.grad, rtol=2 ** -8, atol=1e-7)
    assert torch.all(loss[:-3] == loss[0])  # the all-zero rows: ln V each


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@quick
def test_the_kernel_compiles_and_passes_its_self_check_on_this_gpu():
    ok, why = ops.available()["cross_entropy"]
    assert ok, why


@pytest.mark.parametrize("triton_version, numpy_version, runs", [
    ("3.6.0", "2.4.6", False), ("3.6.0", "2.3.5", True), ("3.7.0", "2.4.6", True),
    ("3.8.0", "2.5.0", True), ("3.10.1", "2.4.0", True), ("3.5.1+git1234", "2.4.0rc1", False),
])
def test_the_interpreter_range_that_runs_the_kernel(monkeypatch, triton_version,
                                                    numpy_version, runs):
    # measured with bench/compat.sh: triton 3.6.0 + numpy 2.4.6 fails every interpreted
    # test ("only 0-dimensional arrays can be converted to Python scalars"); 3.6.0 + 2.3.5
    # and 3.8.0 + 2.4.6 pass
    import numpy
    import triton
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    problem = ops.interpreter_problem()
    assert (problem is None) == runs
    if not runs:
        assert f"Triton {triton_version}'s interpreter cannot run the kernel" in problem
        assert "triton>=3.7 or numpy<2.4" in problem
