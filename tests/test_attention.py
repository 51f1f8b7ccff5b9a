"""Causal attention: the tiled FlashAttention-2 algorithm (fastgpt/ops/reference.py, the
blueprint of csrc/attention.cu) against the explicit reference and SDPA.

Tolerances: in float64 both sides round at 1.1e-16 per operation over a few hundred
terms, so 1e-12 relative (to the largest entry, inputs O(1)) is far above honest noise and
far below any indexing mistake (a wrong mask or a missed tile moves entries by O(0.1)). In
float32 the tiled version accumulates in fp32 in another order than the reference's
matmuls: 2e-6, as tests/test_ops_reference.py states for attention.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from fastgpt.ops import reference

REL = {torch.float64: 1e-12, torch.float32: 2e-6}


def close(actual, expected, rel):
    scale = max(1.0, expected.abs().max().item())
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= rel * scale, (error, rel * scale)


def inputs(B, H, T, D, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=gen, dtype=torch.float64).to(dtype)
            for _ in range(3)]


def reference_with_grads(q, k, v, grad_out, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = reference.causal_attention(*leaves, **kwargs)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves]


def masked_lse(q, k, scale):
    T = q.shape[-2]
    s = (q.double() @ k.double().transpose(-2, -1)) * scale
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.logsumexp(s, dim=-1)


TILES = [(64, 64), (16, 32), (32, 16), (16, 16)]


@pytest.mark.parametrize("T", [1, 17, 255, 257])
@pytest.mark.parametrize("D", [32, 64])
@pytest.mark.parametrize("block_q, block_k", TILES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_tiled_forward_and_backward_equal_the_explicit_reference(T, D, block_q, block_k, dtype):
    B, H = 1, 2
    q, k, v = inputs(B, H, T, D, dtype, seed=T + D)
    grad_out = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(9),
                           dtype=torch.float64).to(dtype)
    scale = 1.0 / math.sqrt(D)
    out, lse = reference.tiled_attention_forward(q, k, v, scale, block_q, block_k)
    assert out.dtype == dtype and lse.dtype == dtype and lse.shape == (B, H, T)
    want, want_grads = reference_with_grads(q, k, v, grad_out)
    close(out, want, REL[dtype])
    close(lse, masked_lse(q, k, scale), REL[dtype])
    grads = reference.tiled_attention_backward(q, k, v, out, lse, grad_out, scale,
                                               block_q, block_k)
    for name, g, w in zip("qkv", grads, want_grads):
        assert g.dtype == dtype, name
        close(g, w, REL[dtype])
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    close(out, sdpa, REL[dtype])


def test_low_precision_inputs_accumulate_in_fp32():
    q, k, v = inputs(1, 2, 40, 32, torch.bfloat16, seed=1)
    out, lse = reference.tiled_attention_forward(q, k, v, 32 ** -0.5, 16, 16)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    close(lse, masked_lse(q, k, 32 ** -0.5), 2e-6)


@pytest.mark.parametrize("T", [17, 100])
def test_tiled_dropout_with_the_same_mask_equals_the_reference(T):
    B, H, D, p = 2, 2, 32, 0.3
    q, k, v = inputs(B, H, T, D, torch.float64, seed=T)
    keep = torch.rand(B, H, T, T, generator=torch.Generator().manual_seed(3)) >= p
    grad_out = torch.randn(B, H, T, D, dtype=torch.float64)
    scale = D ** -0.5
    out, lse = reference.tiled_attention_forward(q, k, v, scale, 16, 32, dropout_p=p, keep=keep)
    want, want_grads = reference_with_grads(q, k, v, grad_out, dropout_p=p, keep=keep)
    close(out, want, 1e-12)
    close(lse, masked_lse(q, k, scale), 1e-12)  # the lse is of the undropped probabilities
    grads = reference.tiled_attention_backward(q, k, v, out, lse, grad_out, scale, 16, 32,
                                               dropout_p=p, keep=keep)
    for g, w in zip(grads, want_grads):
        close(g, w, 1e-12)
    no_dropout, _ = reference.tiled_attention_forward(q, k, v, scale, 16, 32)
    assert (out - no_dropout).abs().max() > 1e-2  # the mask really was applied


def test_deterministic_dq_gives_the_same_bits():
    q, k, v = inputs(2, 2, 77, 32, torch.float32, seed=5)
    grad_out = torch.randn(2, 2, 77, 32)
    out, lse = reference.tiled_attention_forward(q, k, v, 0.2, 16, 32)
    atomic = reference.tiled_attention_backward(q, k, v, out, lse, grad_out, 0.2, 16, 32)
    ordered = reference.tiled_attention_backward(q, k, v, out, lse, grad_out, 0.2, 16, 32,
                                                 deterministic=True)
    for a, b in zip(atomic, ordered):  # the same adds in the same order, here
        assert torch.equal(a, b)


def test_reference_keep_mask_scales_the_kept_probabilities():
    q, k, v = inputs(1, 1, 5, 4, torch.float64, seed=2)
    keep = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    keep[..., 3, 0] = False
    full = reference.causal_attention(q, k, v)
    dropped = reference.causal_attention(q, k, v, dropout_p=0.5, keep=keep)
    assert torch.allclose(dropped[..., :3, :], 2 * full[..., :3, :])  # kept rows: x 1/(1-p)
    scores = (q[0, 0, 3] @ k[0, 0, :4].T) * 0.5
    probs = torch.softmax(scores, dim=-1)
    assert torch.allclose(dropped[0, 0, 3], 2 * (probs[1:] @ v[0, 0, 1:4]))


# --- the Philox generator and the dropout mask the kernels share (csrc/philox.h) ---------

# Random123's known-answer vectors for Philox4x32-10: (counter, key) -> output
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, want", PHILOX_KAT)
def test_philox_gives_the_known_answers(cpu_extension, counter, key, want):
    assert tuple(cpu_extension.philox4x32_10(*counter, *key)) == want


def test_the_dropout_mask_is_a_pure_function_of_seed_offset_and_index(cpu_extension):
    mask = cpu_extension.attention_dropout_mask
    keep = mask(1234, 7, 6, 33, 0.1)
    assert keep.shape == (6, 33, 33) and keep.dtype == torch.bool
    assert torch.equal(keep, mask(1234, 7, 6, 33, 0.1))          # regenerated identically
    assert not torch.equal(keep, mask(1234, 8, 6, 33, 0.1))      # the next call's offset
    assert not torch.equal(keep, mask(1235, 7, 6, 33, 0.1))
    # element n is word n % 4 of Philox block (n // 4, offset) keyed by the seed
    flat = keep.flatten()
    for n in (0, 1, 2, 3, 4, 4001, flat.numel() - 1):
        words = cpu_extension.philox4x32_10(n // 4, 0, 7, 0, 1234, 0)
        assert flat[n].item() == (words[n % 4] >= int(0.1 * 2**32)), n
    # the first head's mask does not depend on how many heads follow it
    assert torch.equal(mask(1234, 7, 1, 33, 0.1), keep[:1])


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_the_dropout_mask_keeps_one_minus_p(cpu_extension, p):
    keep = cpu_extension.attention_dropout_mask(99, 0, 16, 128, p)
    n = keep.numel()
    kept = keep.sum().item() / n
    # binomial: 6 standard deviations of the kept fraction, sqrt(p (1 - p) / n) (0 at p=0)
    assert abs(kept - (1 - p)) <= 6 * math.sqrt(p * (1 - p) / n)
    if p == 0.0:
        assert keep.all()


def test_the_dropout_mask_rejects_bad_arguments(cpu_extension):
    with pytest.raises(RuntimeError, match="p must be in \\[0, 1\\)"):
        cpu_extension.attention_dropout_mask(0, 0, 1, 4, 1.0)
    with pytest.raises(RuntimeError, match="must be at least 1"):
        cpu_extension.attention_dropout_mask(0, 0, 0, 4, 0.1)


def test_the_tiled_algorithm_with_the_kernel_s_mask_equals_the_reference(cpu_extension):
    B, H, T, D, p = 2, 3, 70, 32, 0.2
    q, k, v = inputs(B, H, T, D, torch.float64, seed=11)
    keep = cpu_extension.attention_dropout_mask(5, 0, B * H, T, p).view(B, H, T, T)
    out, _ = reference.tiled_attention_forward(q, k, v, D ** -0.5, 32, 16, dropout_p=p,
                                               keep=keep)
    close(out, reference.causal_attention(q, k, v, dropout_p=p, keep=keep), 1e-12)


# --- csrc/attention.cu (fp32 forward) against the tiled algorithm, on a GPU --------------

def test_the_attention_forward_fake_gives_the_shapes(cpu_extension):
    with torch._subclasses.fake_tensor.FakeTensorMode():  # what torch.compile traces with
        q = torch.empty(2, 3, 17, 64)
        out, lse = cpu_extension.attention_forward(q, q, q, 0.125, 0.0, 0, 0)
    assert out.shape == (2, 3, 17, 64) and lse.shape == (2, 3, 17)
    assert lse.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("T", [1, 17, 64, 255, 256, 1000])
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_cuda_fp32_forward_equals_the_tiled_algorithm(T, D, dropout_p):
    from fastgpt.ops import extension
    ok, why = extension.load_extension()
    assert ok, why  # on a GPU the extension must build and pass its self-check
    B, H = 2, 3
    q, k, v = (t.cuda() for t in inputs(B, H, T, D, torch.float32, seed=T * D))
    scale = D ** -0.5
    out, lse = torch.ops.fastgpt.attention_forward(q, k, v, scale, dropout_p, 42, 3)
    keep = None
    if dropout_p:
        keep = torch.ops.fastgpt.attention_dropout_mask(42, 3, B * H, T, dropout_p)
        keep = keep.view(B, H, T, T).cuda()
    want, want_lse = reference.tiled_attention_forward(q.double(), k.double(), v.double(),
                                                       scale, 32, 32, dropout_p, keep)
    # fp32 on the GPU against fp64: the sums run over up to T keys and D dims in another
    # order, a few ulps each; 1e-5 of the largest entry (inputs O(1)), ~1e-4 as the issue
    # allows for fp32, is far below what a wrong mask or tile (O(0.1)) would give.
    close(out, want, 1e-5)
    close(lse, want_lse, 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_forward_rejects_bad_inputs():
    from fastgpt.ops import extension
    assert extension.load_extension()[0]
    good = torch.randn(1, 2, 8, 64, device="cuda")
    cases = [((good.half(), good, good), "float32"),
             ((good[..., :48].contiguous(),) * 3, "head dim must be 32, 64 or 128"),
             ((good, good[:, :1], good), "same shape"),
             ((good.transpose(2, 3).contiguous().transpose(2, 3), good, good), "contiguous"),
             ((good.cpu(), good, good), "CUDA device")]
    for (q, k, v), message in cases:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.fastgpt.attention_forward(q, k, v, 0.125, 0.0, 0, 0)
