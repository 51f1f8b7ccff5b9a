"""fastgpt.ops (cross_entropy, causal_attention, the backend switch) against PyTorch.

Tolerances: comparisons are normwise relative, |actual - expected| <= REL * scale with
scale = max(1, max|expected|) (the inputs are O(1) by construction, so a unit floor keeps
entries that are exactly zero in one implementation and rounding noise in the other, e.g.
SDPA's q/k gradients at T=1, from failing on a meaningless elementwise ratio).
- float64: REL 1e-12. The unit roundoff is 1.1e-16; these ops chain a few reductions over at
  most 1000 terms, so honest differences stay below ~1e-14 (measured ~3e-16).
- float32: REL 1e-6 for cross-entropy (unit roundoff 6e-8; the mean/sum reduce up to 65
  rows in a different order than torch, a few ulps; measured <= 1.6e-7).
- float32 attention: REL 2e-6. The backward chains four matmuls over up to T=64 keys and
  D=32 dims, each adding ~sqrt(n) ulps; measured <= 5e-7 against both SDPA and the float64
  truth, and any real mistake (scale, mask off by one) is an O(0.1) error.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastgpt import FastGPTError, ops
from fastgpt.ops import reference

REL_CE = {torch.float64: 1e-12, torch.float32: 1e-6}
REL_ATTN = {torch.float64: 1e-12, torch.float32: 2e-6}

CROSS_ENTROPIES = [pytest.param(ops.cross_entropy, id="ops"),
                   pytest.param(reference.cross_entropy, id="reference")]


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Normwise relative comparison, see the module docstring; nan/inf must match exactly."""
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    finite = expected[torch.isfinite(expected)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=rel * scale, equal_nan=True)


def run_ce(fn, logits, targets, grad_seed=0, **kwargs):
    """Loss and d(loss)/d(logits); for reduction="none" the backward uses a random grad_output."""
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, targets, **kwargs)
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(grad_seed),
                    dtype=loss.dtype)
    loss.backward(g)
    return loss.detach(), x.grad


def check_ce_against_torch(fn, logits, targets, rel, **kwargs):
    got, got_grad = run_ce(fn, logits, targets, **kwargs)
    want, want_grad = run_ce(F.cross_entropy, logits, targets, **kwargs)
    assert_close_rel(got, want, rel)
    assert_close_rel(got_grad, want_grad, rel)
    return got, got_grad


def make_ce_inputs(N, V, dtype, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=gen, dtype=torch.float64) * scale).to(dtype)
    targets = torch.randint(0, V, (N,), generator=gen)
    return logits, targets


# --------------------------------------------------------------------------------------
# cross_entropy
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("V", [2, 7, 512, 1000])
def test_cross_entropy_matches_torch(dtype, V):
    for N in (1, 5, 33):
        logits, targets = make_ce_inputs(N, V, dtype, seed=V * 100 + N)
        for reduction in ("mean", "sum", "none"):
            want, want_grad = run_ce(F.cross_entropy, logits, targets, reduction=reduction)
            for fn in (ops.cross_entropy, reference.cross_entropy):
                got, got_grad = run_ce(fn, logits, targets, reduction=reduction)
                assert got.shape == ((N,) if reduction == "none" else ())
                assert got.dtype == dtype
                assert_close_rel(got, want, REL_CE[dtype])
                assert_close_rel(got_grad, want_grad, REL_CE[dtype])


@pytest.mark.parametrize("fn", CROSS_ENTROPIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [None, 3, -1, 7])
def test_cross_entropy_ignore_index(fn, dtype, reduction, ignore_index):
    N, V = 13, 7
    logits, targets = make_ce_inputs(N, V, dtype, seed=11)
    kwargs = {} if ignore_index is None else {"ignore_index": ignore_index}
    ignored = ignore_index if ignore_index is not None else -100
    rows = torch.tensor([0, 4, 5, 12])
    targets[rows] = ignored
    if ignore_index == 3:  # an in-range ignore_index: make sure other rows are not all 3
        assert (targets != 3).sum() >= 5
    got, grad = check_ce_against_torch(fn, logits, targets, REL_CE[dtype],
                                       reduction=reduction, **kwargs)
    mask = targets == ignored
    # ignored rows contribute nothing: zero loss (for "none") and zero gradient
    assert torch.all(grad[mask] == 0)
    assert torch.all(grad[~mask].abs().sum(dim=1) > 0)
    if reduction == "none":
        assert torch.all(got[mask] == 0)


@pytest.mark.parametrize("fn", CROSS_ENTROPIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_cross_entropy_mean_divides_by_valid_rows(fn, dtype):
    logits, targets = make_ce_inputs(10, 7, dtype, seed=3)
    targets[:4] = -100
    mean = fn(logits, targets, reduction="mean")
    total = fn(logits, targets, reduction="sum")
    # same numbers divided by the 6 valid rows; one division apart (a couple of ulps)
    assert_close_rel(mean, total / 6, REL_CE[dtype])


@pytest.mark.parametrize("fn", CROSS_ENTROPIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_all_rows_ignored(fn, dtype, label_smoothing):
    logits, _ = make_ce_inputs(6, 5, dtype, seed=4)
    targets = torch.full((6,), -100, dtype=torch.int64)
    for reduction in ("mean", "sum", "none"):
        got, grad = check_ce_against_torch(fn, logits, targets, REL_CE[dtype],
                                           reduction=reduction, label_smoothing=label_smoothing)
        if reduction == "mean":
            assert torch.isnan(got)
        elif reduction == "sum":
            assert got.item() == 0.0
        else:
            assert torch.equal(got, torch.zeros(6, dtype=dtype))
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("fn", CROSS_ENTROPIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("with_ignored", [False, True])
def test_cross_entropy_label_smoothing(fn, dtype, with_ignored):
    for V in (2, 7, 512):
        logits, targets = make_ce_inputs(17, V, dtype, seed=5 + V)
        if with_ignored:
            targets[[1, 2, 9]] = -100
        for reduction in ("mean", "sum", "none"):
            check_ce_against_torch(fn, logits, targets, REL_CE[dtype], reduction=reduction,
                                   label_smoothing=0.1)


@pytest.mark.parametrize("fn", CROSS_ENTROPIES)
def test_cross_entropy_label_smoothing_changes_the_loss(fn):
    logits, targets = make_ce_inputs(9, 7, torch.float64, seed=6)
    plain = fn(logits, targets)
    smooth = fn(logits, targets, label_smoothing=0.1)
    full = fn(logits, targets, label_smoothing=1.0)
    # label_smoothing=1 is the mean over classes of -log p, averaged over rows
    want_full = -torch.log_softmax(logits, dim=-1).mean()
    assert_close_rel(full, want_full, REL_CE[torch.float64])
    assert_close_rel(smooth, 0.9 * plain + 0.1 * full, REL_CE[torch.float64])
    assert abs(smooth.item() - plain.item()) > 1e-3


@pytest.mark.parametrize("fn", CROSS_ENTROPIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_extreme_logits(fn, dtype, reduction):
    N, V = 8, 7
    logits, targets = make_ce_inputs(N, V, dtype, seed=7, scale=1e4)
    logits[0] = 1e4
    logits[0, targets[0]] = -1e4                        # target far below the rest
    logits[1] = -1e4
    logits[1, targets[1]] = 1e4                         # target far above the rest
    logits[2, (targets[2] + 1) % V] = float("-inf")     # one -inf away from the target
    logits[3] = float("-inf")
    logits[3, targets[3]] = 0.0                         # only the target is finite
    logits[4] = float("-inf")
    logits[4, targets[4]] = -1e4
    logits[4, (targets[4] + 3) % V] = 1e4
    targets[5] = -100
    logits[5, 0] = float("-inf")                        # an ignored row with a -inf
    got, grad = check_ce_against_torch(fn, logits, targets, REL_CE[dtype], reduction=reduction)
    assert torch.isfinite(got).all()
    assert torch.isfinite(grad).all()
    if reduction == "none":
        assert got[3].item() == 0.0
        # -log p = 2e4 + log(V - 1) exactly in real arithmetic; 1e-6 relative is ~10 fp32 ulps
        assert got[0].item() == pytest.approx(2e4 + math.log(V - 1), rel=1e-6)
        assert got[4].item() == pytest.approx(2e4, rel=1e-6)


@pytest.mark.parametrize("fn", CROSS_ENTROPIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_cross_entropy_non_contiguous_logits(fn, dtype, reduction, layout):
    N, V = 11, 9
    gen = torch.Generator().manual_seed(8)
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[3] = -100
    if layout == "transposed":
        base = torch.randn(V, N, generator=gen, dtype=torch.float64).to(dtype)
        make = lambda b: b.t()                                       # noqa: E731
    else:
        base = torch.randn(N, 2 * V, generator=gen, dtype=torch.float64).to(dtype)
        make = lambda b: b[:, ::2]                                   # noqa: E731
    assert not make(base).is_contiguous()

    def grads(f):
        b = base.clone().requires_grad_(True)
        loss = f(make(b), targets, reduction=reduction, label_smoothing=0.1)
        g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
        loss.backward(g)
        return loss.detach(), b.grad

    got, got_grad = grads(fn)
    want, want_grad = grads(F.cross_entropy)
    assert_close_rel(got, want, REL_CE[dtype])
    assert_close_rel(got_grad, want_grad, REL_CE[dtype])
    # and the same as on a contiguous copy
    assert_close_rel(got, fn(make(base).contiguous(), targets, reduction=reduction,
                             label_smoothing=0.1), REL_CE[dtype])


@pytest.mark.parametrize("fn", CROSS_ENTROPIES)
@pytest.mark.parametrize("bad", [7, 100, -5, -1])
def test_cross_entropy_target_out_of_range(fn, bad):
    logits, targets = make_ce_inputs(6, 7, torch.float32, seed=9)
    targets[2] = bad
    with pytest.raises(ValueError, match=rf"target {bad} is out of range for 7 classes"):
        fn(logits, targets)


@pytest.mark.parametrize("fn", CROSS_ENTROPIES)
def test_target_check_where_the_data_is_not_on_the_host_is_an_asynchronous_assert(
        fn, monkeypatch):
    # on a GPU (or inside torch.compile) the check is torch._assert_async: no host read, no
    # graph break; eager on CPU tensors that assert raises at once
    monkeypatch.setattr(reference, "_readable_on_host", lambda tensor: False)
    logits, targets = make_ce_inputs(6, 7, torch.float32, seed=9)
    fn(logits, targets)  # in range: nothing
    targets[3] = 7
    with pytest.raises(RuntimeError, match="cross_entropy: a target is out of range for 7 "
                                           r"classes \(and is not ignore_index=-100\)"):
        fn(logits, targets)


@pytest.mark.parametrize("fn", CROSS_ENTROPIES)
@pytest.mark.parametrize("ignore_index", [-100, -5, 7, 1000])
def test_cross_entropy_ignore_index_outside_range_is_accepted(fn, ignore_index):
    logits, targets = make_ce_inputs(6, 7, torch.float64, seed=10)
    targets[[1, 4]] = ignore_index
    got = fn(logits, targets, ignore_index=ignore_index, reduction="none")
    want = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")
    assert_close_rel(got, want, REL_CE[torch.float64])
    assert got[1].item() == 0.0 and got[4].item() == 0.0
    # the same out-of-range value is an error when it is not ignore_index
    with pytest.raises(ValueError, match="out of range"):
        fn(logits, targets, ignore_index=ignore_index + 1 if ignore_index != -100 else -99)


@pytest.mark.parametrize("fn", CROSS_ENTROPIES)
@pytest.mark.parametrize("logits_shape,targets_shape,match", [
    ((7,), (7,), "logits must be"),
    ((2, 3, 7), (2, 3), "logits must be"),
    ((5, 7), (4,), "targets must be"),
    ((5, 7), (5, 1), "targets must be"),
    ((5, 7), (), "targets must be"),
])
def test_cross_entropy_bad_shapes(fn, logits_shape, targets_shape, match):
    logits = torch.randn(logits_shape)
    targets = torch.zeros(targets_shape, dtype=torch.int64)
    with pytest.raises(ValueError, match=match):
        fn(logits, targets)


@pytest.mark.parametrize("fn", CROSS_ENTROPIES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.float32])
def test_cross_entropy_bad_target_dtype(fn, dtype):
    logits = torch.randn(5, 7)
    with pytest.raises(ValueError, match="targets must be int64"):
        fn(logits, torch.zeros(5, dtype=dtype))


@pytest.mark.parametrize("fn", CROSS_ENTROPIES)
def test_cross_entropy_bad_logits_dtype(fn):
    with pytest.raises(ValueError, match="logits"):
        fn(torch.zeros(5, 7, dtype=torch.int64), torch.zeros(5, dtype=torch.int64))


@pytest.mark.parametrize("fn", CROSS_ENTROPIES)
@pytest.mark.parametrize("kwargs,match", [
    ({"reduction": "avg"}, "reduction must be"),
    ({"reduction": "MEAN"}, "reduction must be"),
    ({"reduction": None}, "reduction must be"),
    ({"label_smoothing": -0.1}, "label_smoothing must be"),
    ({"label_smoothing": 1.5}, "label_smoothing must be"),
])
def test_cross_entropy_bad_arguments(fn, kwargs, match):
    logits, targets = make_ce_inputs(5, 7, torch.float32)
    with pytest.raises(ValueError, match=match):
        fn(logits, targets, **kwargs)


# --------------------------------------------------------------------------------------
# causal_attention
# --------------------------------------------------------------------------------------

def explicit_attention(q, k, v, scale=None):
    """Row by row in float64: output i = sum_{j<=i} softmax_j(q_i . k_j * scale) v_j."""
    q, k, v = q.double(), k.double(), v.double()
    T, D = q.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    rows = []
    for i in range(T):
        s = (q[..., i:i + 1, :] * k[..., :i + 1, :]).sum(-1) * scale   # (B, H, i+1)
        w = torch.exp(s - s.max(dim=-1, keepdim=True).values)
        w = w / w.sum(dim=-1, keepdim=True)
        rows.append((w.unsqueeze(-1) * v[..., :i + 1, :]).sum(-2))       # (B, H, D)
    return torch.stack(rows, dim=-2)


def attention_inputs(B, H, T, D, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=gen, dtype=torch.float64).to(dtype)
            for _ in range(3)]


def attention_and_grads(fn, inputs, grad_out, **kwargs):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves, **kwargs)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


_TRUTH: dict = {}


def explicit_truth(T, D, dtype, inputs, grad_out):
    """explicit_attention's output and gradients in float64 on the (rounded) inputs, computed
    once per case and shared by the ops/reference parametrisations (the loop is slow)."""
    key = (T, D, dtype)
    if key not in _TRUTH:
        _TRUTH[key] = attention_and_grads(explicit_attention, [t.double() for t in inputs],
                                          grad_out)
    return _TRUTH[key]


ATTENTIONS = [pytest.param(ops.causal_attention, id="ops"),
              pytest.param(reference.causal_attention, id="reference")]


@pytest.mark.parametrize("fn", ATTENTIONS)
@pytest.mark.parametrize("T", [1, 17, 64])
@pytest.mark.parametrize("D", [8, 32])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_causal_attention_matches_explicit_and_sdpa(fn, T, D, dtype):
    B, H = 2, 3
    inputs = attention_inputs(B, H, T, D, dtype, seed=T * 10 + D)
    grad_out = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64)
    rel = REL_ATTN[dtype]

    out, grads = attention_and_grads(fn, inputs, grad_out)
    assert out.shape == (B, H, T, D) and out.dtype == dtype

    truth, truth_grads = explicit_truth(T, D, dtype, inputs, grad_out)
    assert_close_rel(out.double(), truth, rel)
    for g, tg in zip(grads, truth_grads):
        assert_close_rel(g.double(), tg, rel)

    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    want, want_grads = attention_and_grads(sdpa, inputs, grad_out)
    assert_close_rel(out, want, rel)
    for g, wg in zip(grads, want_grads):
        assert_close_rel(g, wg, rel)


@pytest.mark.parametrize("fn", ATTENTIONS)
@pytest.mark.parametrize("scale", [0.05, 1.0, 2.5])
def test_causal_attention_custom_scale(fn, scale):
    inputs = attention_inputs(2, 2, 17, 8, torch.float64, seed=3)
    grad_out = torch.randn(2, 2, 17, 8, generator=torch.Generator().manual_seed(2),
                           dtype=torch.float64)
    out, grads = attention_and_grads(fn, inputs, grad_out, scale=scale)
    truth, truth_grads = attention_and_grads(explicit_attention, inputs, grad_out, scale=scale)
    assert_close_rel(out, truth, REL_ATTN[torch.float64])
    for g, tg in zip(grads, truth_grads):
        assert_close_rel(g, tg, REL_ATTN[torch.float64])
    want = F.scaled_dot_product_attention(*inputs, is_causal=True, scale=scale)
    assert_close_rel(out, want, REL_ATTN[torch.float64])
    # a different scale really gives a different answer
    default = fn(*inputs)
    assert (out - default).abs().max() > 1e-3


@pytest.mark.parametrize("fn", ATTENTIONS)
@pytest.mark.parametrize("queries", [1, 5, 17])
def test_causal_attention_with_fewer_queries_than_keys_takes_the_last_positions(fn, queries):
    # generation with a key/value cache: q holds the last positions of the sequence
    q, k, v = attention_inputs(2, 3, 17, 8, torch.float64, seed=6)
    whole = fn(q, k, v)
    last = fn(q[:, :, -queries:], k, v)
    assert_close_rel(last, whole[:, :, -queries:], REL_ATTN[torch.float64])
    with pytest.raises(ValueError, match="k and v must be at least as long as q"):
        ops.causal_attention(q, k[:, :, :4], v[:, :, :4])


@pytest.mark.parametrize("fn", ATTENTIONS)
def test_causal_attention_is_causal(fn):
    T = 17
    q, k, v = attention_inputs(2, 3, T, 8, torch.float32, seed=4)
    base = fn(q, k, v)
    gen = torch.Generator().manual_seed(5)
    for i in (0, 5, T - 2):
        k2, v2 = k.clone(), v.clone()
        k2[..., i + 1:, :] = torch.randn(k2[..., i + 1:, :].shape, generator=gen) * 10
        v2[..., i + 1:, :] = torch.randn(v2[..., i + 1:, :].shape, generator=gen) * 10
        out = fn(q, k2, v2)
        # exact: masked probabilities are exactly 0, so future keys/values add exact zeros
        # and every row's arithmetic is the same as before
        assert torch.equal(out[..., :i + 1, :], base[..., :i + 1, :])
        assert not torch.equal(out[..., i + 1:, :], base[..., i + 1:, :])
        # while changing a past (or the current) key/value does change row i
        k3 = k.clone()
        k3[..., i, :] += 1.0
        v3 = v.clone()
        v3[..., i, :] += 1.0
        assert (fn(q, k3, v3)[..., i, :] - base[..., i, :]).abs().max() > 1e-3


@pytest.mark.parametrize("fn", ATTENTIONS)
def test_causal_attention_dropout(fn):
    q, k, v = attention_inputs(2, 3, 17, 8, torch.float32, seed=6)
    no_dropout = fn(q, k, v)
    # dropout_p=0 is deterministic and identical to the default
    assert torch.equal(fn(q, k, v, dropout_p=0.0), no_dropout)
    assert torch.equal(fn(q, k, v, dropout_p=0.0), fn(q, k, v, dropout_p=0.0))

    torch.manual_seed(123)
    a = fn(q, k, v, dropout_p=0.5)
    b = fn(q, k, v, dropout_p=0.5)
    torch.manual_seed(123)
    a_again = fn(q, k, v, dropout_p=0.5)
    assert a.shape == no_dropout.shape
    assert torch.isfinite(a).all()
    assert not torch.equal(a, b)                 # random from call to call
    assert torch.equal(a, a_again)               # driven by torch's global RNG
    assert (a - no_dropout).abs().max() > 1e-3   # and differs from no dropout


def test_causal_attention_dropout_is_unbiased():
    """Dropout on the probabilities rescales by 1/(1-p): the mean over many draws tends to
    the no-dropout output. 2000 draws at p=0.5: each output entry is a sum of at most 17
    terms of size |v| <= ~4, so its per-draw std is below ~4 * sqrt(p/(1-p)) ~ 4 and the
    mean's standard error is below 4/sqrt(2000) = 0.09; 0.5 is > 5 standard errors, while
    forgetting the rescale would be off by half the output (max |output| ~ 1-2)."""
    q, k, v = attention_inputs(1, 1, 17, 8, torch.float64, seed=7)
    torch.manual_seed(0)
    draws = 2000
    reps = [t.expand(draws, 1, 17, 8) for t in (q, k, v)]
    mean = ops.causal_attention(*reps, dropout_p=0.5).mean(dim=0, keepdim=True)
    want = ops.causal_attention(q, k, v)
    assert (mean - want).abs().max() < 0.5
    assert want.abs().max() > 1.0


# --------------------------------------------------------------------------------------
# the backend switch
# --------------------------------------------------------------------------------------

def test_available_lists_every_op():
    table = ops.available()
    assert set(table) == {"cross_entropy", "adamw", "causal_attention", "linear_cross_entropy"}
    for op, entry in table.items():
        assert isinstance(entry, tuple) and len(entry) == 2, op
        ok, why = entry
        assert isinstance(ok, bool), op
        assert isinstance(why, str) and why.strip(), op


def test_backend_unavailable_is_a_fastgpt_error():
    assert issubclass(ops.BackendUnavailable, FastGPTError)


def _linear_ce_inputs(dtype):
    generator = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(5, 4, generator=generator), torch.randn(7, 4, generator=generator)
    return hidden.to(dtype), weight.to(dtype), torch.randint(0, 7, (5,), generator=generator)


def _call(op, backend, dtype=torch.float64):
    if op == "cross_entropy":
        logits, targets = make_ce_inputs(5, 7, dtype)
        return ops.cross_entropy(logits, targets, backend=backend)
    if op == "linear_cross_entropy":
        return ops.linear_cross_entropy(*_linear_ce_inputs(dtype), backend=backend)
    q, k, v = attention_inputs(1, 2, 5, 8, dtype)
    return ops.causal_attention(q, k, v, backend=backend)


def _reference(op, dtype=torch.float64):
    if op == "cross_entropy":
        return reference.cross_entropy(*make_ce_inputs(5, 7, dtype))
    if op == "linear_cross_entropy":
        return reference.linear_cross_entropy(*_linear_ce_inputs(dtype))
    return reference.causal_attention(*attention_inputs(1, 2, 5, 8, dtype))


@pytest.mark.parametrize("op", ["cross_entropy", "causal_attention", "linear_cross_entropy"])
@pytest.mark.parametrize("backend", ["reference", "auto", None])
def test_reference_and_auto_backends_on_cpu_tensors(op, backend):
    # "auto" picks a fused kernel only for CUDA tensors: on CPU tensors it is the reference
    assert torch.equal(_call(op, backend), _reference(op))


@pytest.mark.parametrize("op", ["cross_entropy", "causal_attention", "linear_cross_entropy"])
def test_fused_backend(op):
    ok, why = ops.available()[op]
    if ok:  # e.g. the Triton kernel through the interpreter; it takes fp32, not fp64
        assert_close_rel(_call(op, "fused", torch.float32).double(),
                         _reference(op, torch.float32).double(), REL_CE[torch.float32])
        return
    with pytest.raises(ops.BackendUnavailable) as info:
        _call(op, "fused")
    message = str(info.value)
    assert op in message and why in message


def _value_and_grads(op, backend, dtype=torch.float64):
    """The op's output and the gradients of (output * fixed weights).sum() for its inputs."""
    generator = torch.Generator().manual_seed(11)
    if op == "cross_entropy":
        logits, targets = make_ce_inputs(6, 9, dtype)
        targets[2] = -100
        inputs = [logits.requires_grad_()]
        out = ops.cross_entropy(logits, targets, reduction="none", label_smoothing=0.1,
                                backend=backend)
    elif op == "linear_cross_entropy":
        hidden, weight, targets = _linear_ce_inputs(dtype)
        bias = torch.randn(7, generator=generator).to(dtype)
        inputs = [t.requires_grad_() for t in (hidden, weight, bias)]
        out = ops.linear_cross_entropy(*inputs[:2], targets, inputs[2], reduction="sum",
                                       ignore_index=3, backend=backend)
    else:
        inputs = [t.requires_grad_() for t in attention_inputs(2, 3, 11, 8, dtype)]
        out = ops.causal_attention(*inputs, scale=0.3, backend=backend)
    weights = torch.rand(out.shape, generator=generator, dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad((out * weights).sum(), inputs)
    return [out.detach(), *grads]


@pytest.mark.parametrize("op", ["cross_entropy", "causal_attention", "linear_cross_entropy"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_backend_matches_the_reference(op, dtype):
    """PyTorch's own op (SDPA, F.cross_entropy, F.linear + F.cross_entropy) with every
    argument passed through (reduction, ignore_index, label smoothing, bias, scale): value
    and gradients equal the reference's to the dtype's rounding (fp64 1e-12 relative; fp32
    1e-6: both sum in fp32, in different orders)."""
    rel = REL_CE[dtype]
    got, want = _value_and_grads(op, "torch", dtype), _value_and_grads(op, "reference", dtype)
    assert got[0].dtype == want[0].dtype
    for mine, theirs in zip(got, want):
        assert_close_rel(mine.double(), theirs.double(), rel)


@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
def test_torch_backend_returns_a_bf16_loss_in_fp32(op):
    loss = _call(op, "torch", torch.bfloat16)
    assert loss.dtype == torch.float32
    assert_close_rel(loss.double(), _reference(op, torch.bfloat16).double(), 1e-6)


def test_torch_backend_runs_sdpa(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(k) or real(*a, **k))
    q, k, v = attention_inputs(1, 2, 5, 8, torch.float32)
    ops.causal_attention(q, k, v, dropout_p=0.25, backend="torch")
    assert calls == [dict(dropout_p=0.25, is_causal=True, scale=None)]


def _adamw_case(backend, dtype=torch.float32, grad_scale=None, steps=3):
    generator = torch.Generator().manual_seed(5)
    params = [torch.randn(n, generator=generator).to(dtype) for n in (1, 7, 300)]
    moments = [[torch.zeros(p.shape) for p in params] for _ in range(2)]
    grads = [[torch.randn(p.shape, generator=generator).to(dtype) for p in params]
             for _ in range(steps)]
    for step, step_grads in enumerate(grads, 1):
        ops.adamw_step(params, [g.clone() for g in step_grads], *moments, lr=1e-2, beta1=0.9,
                       beta2=0.99, eps=1e-8, weight_decay=0.1, step=step,
                       grad_scale=grad_scale, backend=backend)
    return params, moments


@pytest.mark.parametrize("grad_scale", [None, torch.tensor(0.25)])
def test_torch_adamw_step_matches_the_reference(grad_scale):
    """torch's fused AdamW over fastgpt's state: parameters and both moments after 3 steps,
    fp32 (~1e-6 relative: the same formula, fused multiply-adds rounding differently; the
    clipping factor applied as a division by its reciprocal: one more rounding)."""
    got, want = _adamw_case("torch", grad_scale=grad_scale), _adamw_case(
        "reference", grad_scale=grad_scale)
    for mine, theirs in zip([*got[0], *got[1][0], *got[1][1]],
                            [*want[0], *want[1][0], *want[1][1]]):
        assert_close_rel(mine.double(), theirs.double(), 2e-6)


def test_torch_adamw_takes_fp32_parameters_only():
    with pytest.raises(ValueError, match="takes float32 parameters only"):
        _adamw_case("torch", torch.bfloat16, steps=1)


@pytest.mark.parametrize("op", ["cross_entropy", "causal_attention", "linear_cross_entropy"])
@pytest.mark.parametrize("backend", ["triton", "", "Reference"])
def test_unknown_backend(op, backend):
    with pytest.raises(ValueError, match="backend must be one of"):
        _call(op, backend)


def test_resolve_backend():
    assert ops.resolve_backend("adamw", "reference") == "reference"
    assert ops.resolve_backend("adamw", "torch") == "torch"
    assert ops.resolve_backend("adamw", "auto") in ("reference", "fused")
    with pytest.raises(ValueError):
        ops.resolve_backend("adamw", "cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_are_computed_in_fp32(dtype):
    # A bf16 sum of 1000 losses of ~8 would be off by several units; computed in fp32 (as
    # autocast does, and as the fused kernel does) it is exact to fp32 rounding (1e-6).
    logits, targets = make_ce_inputs(1000, 512, dtype)
    logits.requires_grad_()
    loss = reference.cross_entropy(logits, targets, reduction="sum")
    assert loss.dtype == torch.float32
    want = F.cross_entropy(logits.detach().double(), targets, reduction="sum")
    assert abs(loss.item() - want.item()) <= 1e-6 * want.item()
    loss.backward()
    assert logits.grad.dtype == dtype
