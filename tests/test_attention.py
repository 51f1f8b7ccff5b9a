"""Causal attention: the tiled FlashAttention-2 algorithm (fastgpt/ops/reference.py, the
blueprint of csrc/attention.cu) against the explicit reference and SDPA.

Tolerances: in float64 both sides round at 1.1e-16 per operation over a few hundred
terms, so 1e-12 relative (to the largest entry, inputs O(1)) is far above honest noise and
far below any indexing mistake (a wrong mask or a missed tile moves entries by O(0.1)). In
float32 the tiled version accumulates in fp32 in another order than the reference's
matmuls: 2e-6, as tests/test_ops_reference.py states for attention.
"""

import os
import math

import pytest
import torch
import torch.nn.functional as F

from fastgpt.ops import reference
from helpers import gpu, quick

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
    for deterministic in (False, True):  # dQ added per K/V tile, or per Q tile in one pass
        grads = reference.tiled_attention_backward(q, k, v, out, lse, grad_out, scale,
                                                   block_q, block_k, deterministic=deterministic)
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
    # key j of row r (= bh * T + i) is word j % 4 of Philox block
    # (r * ceil(T / 4) + j // 4, offset) keyed by the seed: 4 keys of a row per call
    rows = keep.view(6 * 33, 33)
    for r, j in ((0, 0), (0, 1), (0, 3), (0, 4), (1, 0), (1, 32), (5 * 33 + 7, 30),
                 (6 * 33 - 1, 32)):
        words = cpu_extension.philox4x32_10(r * 9 + j // 4, 0, 7, 0, 1234, 0)
        assert rows[r, j].item() == (words[j % 4] >= int(0.1 * 2**32)), (r, j)
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


# --- csrc/attention.cu through fastgpt.ops.causal_attention --------------------------------

def test_the_attention_fakes_give_the_shapes(cpu_extension):
    with torch._subclasses.fake_tensor.FakeTensorMode():  # what torch.compile traces with
        q = torch.empty(2, 3, 17, 64, dtype=torch.bfloat16)
        out, lse = cpu_extension.attention_forward(q, q, q, 0.125, 0.0, 0, 0)
        dq, dk, dv = cpu_extension.attention_backward(q, q, q, out, lse, out, 0.125, 0.1, 1, 2,
                                                      False)
    assert out.shape == (2, 3, 17, 64) and out.dtype == torch.bfloat16
    assert lse.shape == (2, 3, 17) and lse.dtype == torch.float32
    assert all(g.shape == q.shape and g.dtype == q.dtype for g in (dq, dk, dv))


def test_the_cpu_build_has_no_attention_kernel_so_auto_takes_the_reference(cpu_extension):
    from fastgpt import ops
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("fastgpt::attention_forward", "CPU")
    ok, why = ops.status("causal_attention")
    assert not ok and "CUDA GPU" in why
    q, k, v = inputs(1, 2, 9, 32, torch.float32, seed=0)
    assert torch.equal(ops.causal_attention(q, k, v, backend="auto"),
                       reference.causal_attention(q, k, v))
    with pytest.raises(ops.BackendUnavailable, match="fused causal_attention cannot run"):
        ops.causal_attention(q, k, v, backend="fused")
    with pytest.raises(ValueError, match="dropout_p must be in"):
        ops.causal_attention(q, k, v, dropout_p=1.0)


def test_what_the_kernels_cannot_take_is_said():
    from fastgpt.ops.cuda_attention import unsupported
    q = torch.empty(1, 2, 8, 64)
    assert "CUDA device" in unsupported(q, q, q)
    assert "head dim must be 32, 64 or 128" in unsupported(*[torch.empty(1, 2, 8, 48)] * 3)
    assert "float32, bfloat16 or float16" in unsupported(q.double(), q.double(), q.double())
    assert "float32, bfloat16 or float16" in unsupported(q, q.half(), q)
    assert "one (B, H, T, D) shape" in unsupported(q, q[:, :1], q)
    assert "at least 1" in unsupported(*[torch.empty(0, 2, 8, 64)] * 3)


def test_dropout_mask_is_the_cpu_op_s_mask_in_the_call_s_shape(cpu_extension):
    from fastgpt.ops.cuda_attention import dropout_mask
    keep = dropout_mask((2, 3, 11, 32), 7, 5, 0.25)
    assert keep.shape == (2, 3, 11, 11)
    assert torch.equal(keep.flatten(), cpu_extension.attention_dropout_mask(7, 5, 6, 11, 0.25)
                       .flatten())


# --- on a GPU ----------------------------------------------------------------------------



@gpu
@quick
def test_the_kernels_build_and_pass_their_self_check_on_this_gpu():
    from fastgpt import ops
    ok, why = ops.status("causal_attention")
    assert ok, why  # a broken kernel must fail the GPU run, not skip its tests


# (T, D) of the quick GPU stage, each with every dtype and dropout: a tile and a half, a
# long row with many tiles, the large head dim off a tile boundary, the small one
QUICK_SHAPES = {(17, 64), (1000, 64), (255, 128), (64, 32)}


@gpu
@pytest.mark.parametrize("T, D, dropout_p, dtype", [
    pytest.param(T, D, dropout_p, dtype, id=f"{name}-{dropout_p}-{D}-{T}",
                 marks=[quick] if (T, D) in QUICK_SHAPES else [])
    for dtype, name in ((torch.float32, "f32"), (torch.bfloat16, "bf16"), (torch.float16, "f16"))
    for dropout_p in (0.0, 0.1) for D in (32, 64, 128) for T in (1, 17, 64, 255, 256, 1000, 4096)])
def test_cuda_kernels_against_fp64(T, D, dropout_p, dtype):
    """out, lse, dq, dk, dv within errors_against_fp64's bounds (FlashAttention's rule: twice
    torch's own error in the precision the kernel computes in, plus a floor said there), the
    same rule as the CPU run of these kernels below."""
    from fastgpt.ops.cuda_attention import errors_against_fp64
    B, H = (1, 2) if T == 4096 else (2, 3)
    q, k, v, grad_out = (t.cuda() for t in inputs(B, H, T, D, dtype, seed=T * D) + [
        torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(1)).to(dtype)])
    errors = errors_against_fp64(q, k, v, grad_out, D ** -0.5, dropout_p, seed=42, offset=3)
    assert set(errors) == {"out", "lse", "dq", "dk", "dv"}
    for name, c in errors.items():
        assert c.error <= c.bound, (name, c)


@gpu
@quick
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_the_deterministic_backward_repeats_bit_for_bit(dtype):
    from fastgpt.ops.cuda_attention import attention, errors_against_fp64
    q, k, v = (t.cuda() for t in inputs(2, 3, 300, 64, dtype, seed=4))
    grad_out = torch.randn_like(q)
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        attention(*leaves, 0.125, 0.1, True, seed=9, offset=0).backward(grad_out)
        grads.append([t.grad for t in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    for name, c in errors_against_fp64(q, k, v, grad_out, 0.125, 0.1, True, seed=9,
                                       offset=0).items():
        assert c.error <= c.bound, (name, c)


@gpu
@quick
def test_dropout_draws_a_new_mask_per_call_and_follows_torch_manual_seed():
    from fastgpt import ops
    q, k, v = (t.cuda() for t in inputs(1, 2, 64, 64, torch.bfloat16, seed=6))
    torch.manual_seed(0)
    first, second = (ops.causal_attention(q, k, v, dropout_p=0.1, backend="fused")
                     for _ in range(2))
    torch.manual_seed(0)
    again = ops.causal_attention(q, k, v, dropout_p=0.1, backend="fused")
    assert not torch.equal(first, second) and torch.equal(first, again)


@gpu
@quick
def test_non_contiguous_inputs_as_the_model_passes_them():
    from fastgpt import ops
    x = torch.randn(2, 40, 3 * 6 * 64, device="cuda", dtype=torch.bfloat16)
    q, k, v = (t.view(2, 40, 6, 64).transpose(1, 2) for t in x.split(6 * 64, dim=-1))
    assert not q.is_contiguous()
    got = ops.causal_attention(q, k, v, backend="fused")
    want = ops.causal_attention(q.contiguous(), k.contiguous(), v.contiguous(),
                                backend="fused")
    assert torch.equal(got, want)


@gpu
@quick
def test_cuda_kernels_reject_bad_inputs():
    from fastgpt import ops
    assert ops.status("causal_attention")[0]
    good = torch.randn(1, 2, 8, 64, device="cuda")
    cases = [((good.double(),) * 3, "float32, bfloat16 or float16"),
             ((good, good.half(), good), "one dtype"),
             ((good[..., :48].contiguous(),) * 3, "head dim must be 32, 64 or 128"),
             ((good, good[:, :1], good), "same shape"),
             ((good.transpose(2, 3).contiguous().transpose(2, 3), good, good), "contiguous"),
             ((good.cpu(), good, good), "CUDA device")]
    for (q, k, v), message in cases:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.fastgpt.attention_forward(q, k, v, 0.125, 0.0, 0, 0)
    with pytest.raises(ValueError, match="head dim must be 32, 64 or 128"):
        ops.causal_attention(*(good[..., :48],) * 3, backend="fused")


@gpu
@quick
def test_the_model_gives_the_same_loss_and_gradients_with_the_kernel():
    """GPT (dropout 0, fp32) with the reference attention against the same GPT with the fused
    kernel: the loss within 1e-6 relative and every gradient within 1e-5 of its tensor's
    largest entry (fp32 sums in another order, through 2 layers of backward)."""
    from fastgpt import ops
    from fastgpt.model import GPT
    idx = torch.randint(0, 512, (4, 100), generator=torch.Generator().manual_seed(0)).cuda()
    targets = torch.roll(idx, -1, dims=1)
    results = []
    for backend in ("reference", "causal_attention=fused,linear_cross_entropy=reference"):
        torch.manual_seed(0)
        model = GPT(vocab_size=512, context_length=128, d_model=128, num_heads=2, num_layers=2,
                    dropout=0.0).cuda()
        previous = ops.set_backend(backend)
        try:
            loss = model.loss(idx, targets)
            loss.backward()
        finally:
            ops.set_backend(previous)
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}))
    (ref_loss, ref_grads), (loss, grads) = results
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    for name, want in ref_grads.items():
        error = (grads[name] - want).abs().max().item()
        assert error <= 1e-5 * want.abs().max().item(), (name, error)


# --- csrc/attention.cuh's kernels run on the CPU (tests/cuda_on_cpu) ----------------------------

def test_the_cpu_run_catches_a_kernel_writing_outside_a_buffer(kernels_on_cpu):
    # the red zones that every buffer allocated by the kernels' dispatch gets in the CPU run
    assert kernels_on_cpu.write_one(10, 9)[9].item() == 1.0
    with pytest.raises(RuntimeError, match="wrote outside a 40-byte buffer, at byte 40 of it"):
        kernels_on_cpu.write_one(10, 10)
    with pytest.raises(RuntimeError, match="wrote outside a 40-byte buffer, at byte -4 of it"):
        kernels_on_cpu.write_one(10, -1)
    with pytest.raises(RuntimeError, match="wrote outside"):
        kernels_on_cpu.write_one(10, 10 + 4096)  # a tile row further


# The CPU run's cases of the fp32 kernels: (dtype, D, T, dropout_p), each through the
# forward and both backwards (dQ by atomics, and by the deterministic dQ kernel). They take
# 32-key tiles and 4-row blocks; T = 1, 63, 64, 65, 127, 128, 129 are tile edges (T = 65 and
# 129 leave a last tile of one row: a loop bound off by one there drops it), the head dims in
# turn, dropout on and off. Seconds per case on 2 cores under racecheck: T ~64 1.6, T ~128 6.
CPU_RUN_CASES = [
    (torch.float32, 32, 1, 0.1), (torch.float32, 64, 63, 0.0), (torch.float32, 128, 64, 0.1),
    (torch.float32, 32, 65, 0.0), (torch.float32, 64, 127, 0.1),
    (torch.float32, 128, 128, 0.0), (torch.float32, 32, 129, 0.1),
]

# The tensor-core (bf16/fp16, mma.sync) kernels' cases: every dtype x head dim x dropout 0 /
# 0.1 at T = 1, 17, 64, 127, 128, 129, 255, 256 (the forward's 128-row blocks, the 64-key
# K/V tiles, the backward's 64- and 32-row query tiles, and one past and one short of each)
# and 1000 (16 K/V tiles, several double-buffer rounds), through the forward and both
# backwards. One (batch, head) at T = 1000, else B = 1, H = 2; every third case below
# T = 1000 takes q, k, v as the model passes them (B = 2, H = 2, or 1 from T = 255: transposed
# views of one (B, T, 3, H, D) projection) and grad_out a transposed slice, so that the
# kernels read through the strides. Racecheck watches every case but T = 1000, whose code paths T = 255
# and 256 already take (four K/V tiles: each double buffer reused), at 25-30% of a case's
# time. About 1-2 s per case at T <= 256 (D = 128 strided, 8 s), 4-30 s at T = 1000, on 2
# cores: about 7 minutes in all, the largest part of CI.
TENSOR_CORE_CASES = [
    (dtype, D, T, p)
    for dtype in (torch.bfloat16, torch.float16) for D in (32, 64, 128)
    for T in (1, 17, 64, 127, 128, 129, 255, 256, 1000) for p in (0.0, 0.1)
]


# each case in one of three schedules in turn (tests/cuda_on_cpu/cuda_on_cpu.h: blocks
# forward, reversed, shuffled; fibers resumed in rotated or reshuffled order after each
# barrier); tests/test_cuda_on_cpu.py runs some cases in all of them and compares the bits
CPU_RUN_SCHEDULES = [("forward", 0), ("reversed", 0), ("shuffled", 5)]


@pytest.mark.parametrize("dtype, D, T, dropout_p, schedule", [
    pytest.param(*case, CPU_RUN_SCHEDULES[i % 3],
                 id=f"{str(case[0])[6:]}-D{case[1]}-T{case[2]}-p{case[3]:g}-"
                    f"{CPU_RUN_SCHEDULES[i % 3][0]}")
    for i, case in enumerate(CPU_RUN_CASES)])
@pytest.mark.slow
def test_cuda_kernels_run_on_cpu_match_fp64(kernels_on_cpu, cpu_extension, dtype, D, T,
                                            dropout_p, schedule):
    """The fp32 CUDA kernels themselves, run fiber per thread: out, lse, dq, dk, dv against
    float64 by errors_against_fp64's rule, the GPU tests' (FlashAttention's: twice torch's
    own error in the precision the kernel computes in, plus a floor; its docstring gives
    each bound's reason and the errors measured here), with dropout applied by the reference
    through the mask csrc/philox.h gives for the same (seed, offset). Reads past an input
    give NaN, writes outside an output and races (racecheck) fail the call
    (tests/cuda_on_cpu). Launches: Dr (and dQ's accumulator zeroed), dK/dV (with atomic dQ),
    and the deterministic dQ kernel."""
    gen = torch.Generator().manual_seed(D + T)
    q, k, v, g = (torch.randn(1, 2, T, D, generator=gen).to(dtype) for _ in range(4))
    run_on_cpu_against_fp64(kernels_on_cpu, q, k, v, g, dropout_p, 1234 + T, 56 + D, schedule,
                            lambda deterministic: 3 if deterministic else 2)


def run_on_cpu_against_fp64(kernels_on_cpu, q, k, v, g, dropout_p, seed, offset, schedule,
                            backward_launches, check_races=True):
    """The CUDA kernels run on the CPU (tests/cuda_on_cpu), forward and both backwards,
    judged against float64 by errors_against_fp64."""
    from fastgpt.ops.cuda_attention import errors_against_fp64

    scale = q.shape[-1] ** -0.5
    order, schedule_seed = schedule
    run = dict(schedule=order, schedule_seed=schedule_seed, check_races=check_races)
    out, lse, launches = kernels_on_cpu.forward(q, k, v, scale, dropout_p, seed, offset, **run)
    assert launches == 1
    for deterministic in (False, True):
        dq, dk, dv, launches = kernels_on_cpu.backward(
            q, k, v, out, lse, g, scale, dropout_p, seed, offset, deterministic, **run)
        assert launches == backward_launches(deterministic)
        errors = errors_against_fp64(q, k, v, g, scale, dropout_p, seed=seed, offset=offset,
                                     results=dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv))
        assert set(errors) == {"out", "lse", "dq", "dk", "dv"}
        for name, c in errors.items():
            assert c.error <= c.bound, (f"{name} (deterministic={deterministic}): error "
                                        f"{c.error:.3g} > bound {c.bound:.3g}")


@pytest.mark.parametrize("dtype, D, T, dropout_p, schedule, strided", [
    pytest.param(*case, CPU_RUN_SCHEDULES[i % 3], strided,
                 id=f"{str(case[0])[6:]}-D{case[1]}-T{case[2]}-p{case[3]:g}-"
                    f"{CPU_RUN_SCHEDULES[i % 3][0]}{'-strided' if strided else ''}")
    for i, case in enumerate(TENSOR_CORE_CASES)
    for strided in [i % 3 == 0 and case[2] < 1000]])
@pytest.mark.slow
def test_tensor_core_kernels_run_on_cpu_match_fp64(kernels_on_cpu, cpu_extension, dtype, D, T,
                                                   dropout_p, schedule, strided):
    """csrc/attention_mma.cuh's kernels themselves, with mma.sync, ldmatrix and cp.async as the
    PTX ISA defines them lane by lane: out, lse, dq, dk, dv against float64 by
    errors_against_fp64's rule (FlashAttention's); reads past an input or between its rows
    give NaN, writes outside an output and races fail the call. Launches: the forward; Dr,
    dK/dV and dQ's cast (atomics) or the deterministic dQ kernel."""
    gen = torch.Generator().manual_seed(D + T)
    B, H = (2, 2 if T < 255 else 1) if strided else (1, 1 if T == 1000 else 2)
    if strided:  # the model's views: (B, T, 3, H, D) -> q, k, v (B, H, T, D) with row stride 3HD
        qkv = torch.randn(B, T, 3, H, D, generator=gen).to(dtype)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        g = torch.randn(B, T, H, 2 * D, generator=gen).to(dtype)[..., :D].transpose(1, 2)
        assert q.stride(2) == 3 * H * D and (T == 1 or not (q.is_contiguous() or g.is_contiguous()))
    else:
        q, k, v, g = (torch.randn(B, H, T, D, generator=gen).to(dtype) for _ in range(4))
    run_on_cpu_against_fp64(kernels_on_cpu, q, k, v, g, dropout_p, 1234 + T, 56 + D, schedule,
                            lambda deterministic: 3, check_races=T < 1000)


def test_the_tensor_core_kernels_shared_memory_is_what_unsupported_checks(kernels_on_cpu):
    from fastgpt.ops.cuda_attention import TENSOR_CORE_D128_SHARED_BYTES
    assert kernels_on_cpu.tensor_core_shared_bytes(128) == TENSOR_CORE_D128_SHARED_BYTES


@pytest.mark.parametrize("static_bytes", [0, 1024])
@pytest.mark.parametrize("dynamic_bytes", [48 * 1024 - 1, 48 * 1024, 48 * 1024 + 1])
def test_the_launch_opts_in_when_static_and_dynamic_shared_memory_pass_48_kib(
        kernels_on_cpu, static_bytes, dynamic_bytes):
    """csrc/attention_common.cuh's rule, which CudaLaunch applies with the kernel's static
    size from cudaFuncGetAttributes: the driver refuses a block whose static + dynamic
    shared memory passes 48 KiB unless the kernel's MaxDynamicSharedMemorySize allows the
    dynamic part (sm_90 adds 1 KiB of static to every kernel with shared memory: the D = 64
    bf16 forward's 48 KiB launch needs the opt-in there)."""
    needed = kernels_on_cpu.dynamic_shared_memory_opt_in(static_bytes, dynamic_bytes)
    over = static_bytes + dynamic_bytes > 48 * 1024
    assert needed == (dynamic_bytes if over else 0)
    assert (needed > 0) == ((static_bytes, dynamic_bytes) != (0, 48 * 1024 - 1)
                            and (static_bytes, dynamic_bytes) != (0, 48 * 1024))
