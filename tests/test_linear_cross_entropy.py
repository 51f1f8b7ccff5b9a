"""The fused linear + cross-entropy (fastgpt/ops/triton_linear_ce.py) against the plain
composition F.cross_entropy(F.linear(hidden, weight, bias), targets).

Without a GPU the Triton kernel runs through its interpreter (conftest sets
TRITON_INTERPRET=1), on CPU tensors; chunk_rows is set small so that every case runs
several chunks and most a partial last one. Tolerance, for the loss and each of the three
gradients: FlashAttention's rule, in fp32 as in bf16: the error against the fp64
composition (from the same rounded inputs) at most twice that of torch's own composition in
the inputs' dtype, plus 1e-6 of the largest magnitude (the paths sum in different orders),
plus, in bf16 where "mean"/"sum" scale the gradients by a grad_output other than 1
afterwards, one more rounding (half an ulp, a whole one under the interpreter, which
truncates): fastgpt.verify.twice_torchs_error, which `fastgpt verify` uses too.
"""

import importlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastgpt import ops
from fastgpt.model import GPT
from fastgpt.ops import reference, triton_linear_ce
from fastgpt.ops.experimental import linear_cross_entropy_v2
from fastgpt.verify import FP32_RELATIVE, twice_torchs_error
from helpers import quick, require_or_skip

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
try:
    cpu_memory = importlib.import_module("timing").cpu_memory  # bench/timing.py
finally:
    sys.path.remove(str(BENCH))

# every test here is a GPU test where there is one (marked gpu; `quick`: gpu_check.sh's
# quick stage too); without one they run through Triton's interpreter
pytestmark = pytest.mark.gpu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def needs_the_kernel():
    ok, why = ops.available()["linear_cross_entropy"]
    if not ok:
        require_or_skip(f"fused linear_cross_entropy unavailable: {why}")


def make_inputs(n, vocab, d, dtype, with_bias, ignore, seed=0):
    """hidden (n, d), weight (vocab, d) (scaled so the logits spread ~1-3), bias or None,
    targets (n,) with every 5th row ignored ("some"), all ("all") or none."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=generator) * 2
    weight = torch.randn(vocab, d, generator=generator) / d ** 0.5
    bias = torch.randn(vocab, generator=generator) if with_bias else None
    targets = torch.randint(0, vocab, (n,), generator=generator)
    if ignore == "some":
        targets[::5] = -100
    elif ignore == "all":
        targets[:] = -100
    cast = lambda t: None if t is None else t.to(device=DEVICE, dtype=dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(bias), targets.to(DEVICE)


def loss_and_grads(fn, hidden, weight, bias, targets, grad_output, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)
              if t is not None]
    loss = fn(leaves[0], leaves[1], targets, leaves[2] if bias is not None else None, **kwargs)
    grads = torch.autograd.grad(loss, leaves, grad_output.to(loss.dtype))
    return [loss.detach(), *grads]


def torch_composition(hidden, weight, targets, bias, **kwargs):
    return F.cross_entropy(F.linear(hidden, weight, bias), targets, **kwargs)


# (dtype, N, V, d, reduction, label smoothing, bias, ignored rows, chunk_rows): the issue's
# V in {2, 512, 1000, 50257} and d in {64, 384}, each reduction in fp32 and bf16
CASES = [
    (torch.float32, 37, 2, 64, "mean", 0.0, True, "some", 16),
    (torch.bfloat16, 37, 2, 384, "sum", 0.1, False, "none", 16),
    (torch.float32, 50, 512, 384, "none", 0.0, True, "some", 16),
    (torch.bfloat16, 50, 512, 64, "mean", 0.0, True, "some", 24),
    (torch.float32, 29, 1000, 64, "sum", 0.1, False, "some", 8),
    (torch.bfloat16, 29, 1000, 384, "none", 0.1, True, "some", None),
    (torch.float32, 20, 50257, 64, "mean", 0.1, True, "some", 8),
    (torch.bfloat16, 20, 50257, 384, "none", 0.0, False, "some", 16),
    (torch.float32, 23, 512, 64, "mean", 0.0, True, "all", 16),
    (torch.bfloat16, 23, 1000, 64, "none", 0.0, True, "all", 8),
    (torch.float16, 33, 1000, 64, "sum", 0.0, True, "some", 16),
]


@quick
@pytest.mark.parametrize("dtype,n,vocab,d,reduction,smoothing,with_bias,ignore,chunk_rows",
                         CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_loss_and_gradients_match_the_composition(dtype, n, vocab, d, reduction, smoothing,
                                                  with_bias, ignore, chunk_rows):
    hidden, weight, bias, targets = make_inputs(n, vocab, d, dtype, with_bias, ignore)
    shape = (n,) if reduction == "none" else ()
    grad_output = (torch.rand(shape, generator=torch.Generator().manual_seed(1),
                              dtype=torch.float64) + 0.5).to(DEVICE)
    kwargs = dict(reduction=reduction, label_smoothing=smoothing)
    ours = loss_and_grads(triton_linear_ce.fused_linear_cross_entropy, hidden, weight, bias,
                          targets, grad_output, chunk_rows=chunk_rows, **kwargs)
    torch_own = loss_and_grads(torch_composition, hidden, weight, bias, targets, grad_output,
                               **kwargs)
    wide = [None if t is None else t.double() for t in (hidden, weight, bias)]
    exact = loss_and_grads(torch_composition, *wide, targets, grad_output, **kwargs)
    assert ours[0].dtype == torch.float32 and ours[0].shape == shape
    for name, mine, input_ in zip(("grad_hidden", "grad_weight", "grad_bias"), ours[1:],
                                  (hidden, weight, bias)):
        assert mine.dtype == input_.dtype and mine.shape == input_.shape, name
    interpreting = ops.triton_interpreting() and DEVICE == "cpu"
    rescaled = reduction != "none" and dtype != torch.float32  # a second rounding
    for name, mine, theirs, want in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"),
                                        ours, torch_own, exact):
        assert torch.equal(torch.isnan(mine), torch.isnan(want)), name
        if ignore == "all":  # loss nan (mean) or 0; no gradient anywhere
            if name != "loss":
                assert not mine.any(), name
            continue
        bound = twice_torchs_error(theirs, want, dtype, int(rescaled and name != "loss"),
                                   interpreting)
        error = (mine.double() - want).abs().max().item()
        assert error <= bound, (name, error, bound)


def test_chunk_rows_keep_the_logits_within_the_inputs_size():
    for n, vocab, d in ((8192, 50257, 768), (16384, 512, 384), (5, 128256, 64), (37, 2, 64)):
        rows = triton_linear_ce.chunk_rows_for(n, vocab, d)
        assert 1 <= rows <= n
        assert rows * vocab <= max(n, vocab) * d or rows == 1
    assert triton_linear_ce.chunk_rows_for(8192, 50257, 768) == 768
    assert triton_linear_ce.chunk_rows_for(16384, 512, 384) == 12288  # two chunks


def test_the_fused_path_never_allocates_the_logits():
    """Every allocation torch makes during forward + backward (inside the custom op and the
    interpreter's launches too), from the profiler: the fused path's largest is the fp32
    grad_weight accumulator (V x d), below one (N, V) tensor; the composition's is the
    logits. N = 256, V = 1000, d = 32: logits 1 MB in fp32, chunks of 32 rows."""
    if DEVICE != "cpu":
        pytest.skip("the allocation count is the CPU path's (bench/ measures GPU memory)")
    n, vocab, d = 256, 1000, 32
    hidden, weight, bias, targets = make_inputs(n, vocab, d, torch.float32, True, "some")
    logits_bytes = n * vocab * 4
    results = {}
    for backend in ("fused", "reference"):
        def step():
            leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
            if backend == "fused":
                triton_linear_ce.fused_linear_cross_entropy(
                    leaves[0], leaves[1], targets, leaves[2], chunk_rows=32).backward()
            else:
                ops.linear_cross_entropy(leaves[0], leaves[1], targets, leaves[2],
                                         backend=backend).backward()
        results[backend] = cpu_memory(step)
    peak, largest = results["fused"]
    assert largest == vocab * d * 4  # the fp32 grad_weight accumulator
    assert peak < logits_bytes
    assert results["reference"][1] >= logits_bytes  # the check sees the logits when made


def test_reduction_none_recomputes_in_the_backward_and_mean_does_not(monkeypatch):
    """"mean" computes the gradients in its forward (one launch per chunk, none in the
    backward); "none" its loss alone, then the chunks again in the backward with each
    row's grad_output."""
    from fastgpt.ops import triton_ce
    launches = []
    launch = triton_ce.launch
    monkeypatch.setattr(triton_ce, "launch", lambda *a, **k: launches.append(
        k.get("grad") is not None) or launch(*a, **k))
    hidden, weight, bias, targets = make_inputs(40, 64, 16, torch.float32, True, "some")
    for reduction, forward, backward in (("mean", [True] * 3, []),
                                         ("none", [False] * 3, [True] * 3)):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        loss = triton_linear_ce.fused_linear_cross_entropy(
            leaves[0], leaves[1], targets, leaves[2], reduction=reduction, chunk_rows=16)
        assert launches == forward, reduction
        launches.clear()
        loss.sum().backward()
        assert launches == backward, reduction
        launches.clear()


def test_without_gradients_only_the_loss_is_computed():
    hidden, weight, bias, targets = make_inputs(20, 100, 16, torch.float32, True, "some")
    with torch.no_grad():
        loss = triton_linear_ce.fused_linear_cross_entropy(hidden, weight, targets, bias,
                                                           reduction="none", chunk_rows=8)
    want = reference.linear_cross_entropy(hidden, weight, targets, bias, reduction="none")
    torch.testing.assert_close(loss, want, rtol=FP32_RELATIVE, atol=0)
    # only hidden requires grad (a frozen head): the weight and bias get none
    frozen = hidden.clone().requires_grad_()
    ops.linear_cross_entropy(frozen, weight, targets, bias, backend="fused").backward()
    assert frozen.grad is not None and weight.grad is None and bias.grad is None


def test_autocast_casts_as_f_linear_does():
    """Under torch.autocast the inputs are cast to its dtype, as F.linear's would be: the
    fused loss is the one of explicitly cast bf16 inputs, and the gradients reach the fp32
    leaves."""
    hidden, weight, bias, targets = make_inputs(24, 300, 32, torch.float32, True, "some")
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = ops.linear_cross_entropy(*leaves[:2], targets, leaves[2], backend="fused")
    want = ops.linear_cross_entropy(*(t.bfloat16() for t in (hidden, weight)), targets,
                                    bias.bfloat16(), backend="fused")
    assert torch.equal(loss, want)
    loss.backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in leaves)


def test_bad_inputs_get_one_line_errors():
    hidden, weight, bias, targets = make_inputs(6, 10, 8, torch.float32, True, "none")
    calls = {
        "agree on d": lambda: ops.linear_cross_entropy(hidden, weight[:, :4], targets),
        "bias must be": lambda: ops.linear_cross_entropy(hidden, weight, targets, bias[:3]),
        "must match": lambda: ops.linear_cross_entropy(hidden, weight.double(), targets),
        "targets must be": lambda: ops.linear_cross_entropy(hidden, weight, targets[:2]),
        "out of range": lambda: ops.linear_cross_entropy(hidden, weight, targets + 10),
        "float32, bfloat16 or float16": lambda: ops.linear_cross_entropy(
            hidden.double(), weight.double(), targets, backend="fused"),
        "chunk_rows": lambda: triton_linear_ce.fused_linear_cross_entropy(
            hidden, weight, targets, chunk_rows=0),
    }
    for expected, call in calls.items():
        with pytest.raises(ValueError, match=expected) as info:
            call()
        assert "\n" not in str(info.value)


def small_gpt():
    torch.manual_seed(0)
    return GPT(vocab_size=512, context_length=32, d_model=64, num_heads=2, num_layers=2,
               dropout=0.0).to(DEVICE)


@quick
def test_the_training_step_gives_the_same_loss_and_gradients_fused_and_reference():
    """GPT.loss through the fused path against the reference (fp32, dropout 0): the loss
    within 1e-6 relative, every parameter's gradient within 1e-5 of its largest entry (as
    verify's training-step rows: dlogits' fp32 rounding carried back through the layers).
    The reference gives exactly what lm_head then the cross-entropy always gave."""
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 512, (4, 32), generator=generator).to(DEVICE)
    targets = torch.randint(0, 512, (4, 32), generator=generator).to(DEVICE)
    results = {}
    for backend in ("reference", "fused"):
        model = small_gpt()
        loss = model.loss(idx, targets, backend=backend)
        loss.backward()
        results[backend] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    model = small_gpt()
    logits = model(idx)
    assert torch.equal(results["reference"][0],
                       reference.cross_entropy(logits.flatten(0, 1), targets.flatten()))
    (ref_loss, ref_grads), (loss, grads) = results["reference"], results["fused"]
    assert (loss - ref_loss).abs() <= FP32_RELATIVE * ref_loss.abs()
    for name, want in ref_grads.items():
        assert (grads[name] - want).abs().max() <= 1e-5 * want.abs().max(), name


# Version 2 (no logits in global memory), called directly: it is a benchmark candidate,
# not what ops.linear_cross_entropy runs. (dtype, N, V, d, reduction, smoothing, bias)
V2_CASES = [
    (torch.float32, 37, 1000, 64, "mean", 0.0, True),
    (torch.float32, 29, 512, 384, "none", 0.1, False),
    (torch.bfloat16, 70, 512, 384, "sum", 0.0, True),
    (torch.bfloat16, 20, 50257, 64, "none", 0.0, True),
]


def version_2(filter):
    def fn(hidden, weight, targets, bias, reduction="mean", label_smoothing=0.0):
        return linear_cross_entropy_v2.LinearCrossEntropyV2.apply(
            hidden, weight, bias, targets, -100, reduction, label_smoothing, filter)
    return fn


def assert_within_twice_torchs_error(fn, dtype, n, vocab, d, reduction, smoothing, with_bias,
                                     spread=1.0):
    hidden, weight, bias, targets = make_inputs(n, vocab, d, dtype, with_bias, "some")
    hidden = hidden * spread
    shape = (n,) if reduction == "none" else ()
    grad_output = (torch.rand(shape, generator=torch.Generator().manual_seed(1),
                              dtype=torch.float64) + 0.5).to(DEVICE)
    kwargs = dict(reduction=reduction, label_smoothing=smoothing)
    ours = loss_and_grads(fn, hidden, weight, bias, targets, grad_output, **kwargs)
    torch_own = loss_and_grads(torch_composition, hidden, weight, bias, targets, grad_output,
                               **kwargs)
    wide = [None if t is None else t.double() for t in (hidden, weight, bias)]
    exact = loss_and_grads(torch_composition, *wide, targets, grad_output, **kwargs)
    interpreting = ops.triton_interpreting() and DEVICE == "cpu"
    for name, mine, theirs, want in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"),
                                        ours, torch_own, exact):
        # version 2 scales by grad_output before it rounds: no second rounding
        bound = twice_torchs_error(theirs, want, dtype, 0, interpreting)
        error = (mine.double() - want).abs().max().item()
        assert error <= bound, (name, error, bound)


@pytest.mark.parametrize("dtype,n,vocab,d,reduction,smoothing,with_bias", V2_CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.slow
def test_version_2_matches_the_composition(dtype, n, vocab, d, reduction, smoothing,
                                           with_bias):
    assert_within_twice_torchs_error(version_2(filter=False), dtype, n, vocab, d, reduction,
                                     smoothing, with_bias)
    assert not linear_cross_entropy_v2.LinearCrossEntropyV2.skipped_tiles.item()


@pytest.mark.slow
def test_version_2_skips_negligible_tiles_within_the_same_bound(monkeypatch):
    """A confident model (logits spread ~8x wider than at initialisation) leaves many
    vocabulary tiles with every probability below bf16's gradient resolution (2^-12): the
    backward skips them (and counts them) and stays within twice torch's own bf16 error.
    The GPU's tile sizes here too (the interpreter's wider tiles would rarely be all
    negligible)."""
    monkeypatch.setattr(linear_cross_entropy_v2, "V2_INTERPRETER_BLOCKS",
                        linear_cross_entropy_v2.V2_BLOCKS)
    assert_within_twice_torchs_error(version_2(filter=True), torch.bfloat16, 20, 8192, 64,
                                     "mean", 0.0, True, spread=8.0)
    assert linear_cross_entropy_v2.LinearCrossEntropyV2.skipped_tiles.item() > 0
