"""Fused causal attention: the CUDA kernels of csrc/attention.cu as an autograd Function.

The forward saves only q, k, v, the output and one fp32 log-sum-exp per row; the backward
recomputes the probabilities from them (FlashAttention-2). Dropout is decided by Philox
keyed by (seed, offset), drawn per call from torch's CPU generator as a CPU tensor (so
torch.manual_seed and a checkpoint's RNG state reproduce it, with no device sync, and
torch.compile draws it inside the graph) and regenerated identically in the backward;
`dropout_mask` rebuilds the very mask of a call for tests.

Inputs: q, k, v (B, H, T, D), all float32 (the CUDA-core kernels) or all bfloat16 / float16
(the tensor-core kernels), D in {32, 64, 128}, any B, H and T >= 1, on one CUDA device, any
strides: the tensor-core kernels read q, k, v and grad_out through their strides when the
last dimension is contiguous and rows start 16-byte aligned (the model's transposed views of
its qkv projection are), and copy them otherwise (csrc/attention.cuh's kernel_layout).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

HEAD_DIMS = (32, 64, 128)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_T = 65535 * 4  # the fp32 kernels' grid: 65,535 blocks of 4 rows per (batch, head)
# The shared memory of the largest bf16/fp16 kernel at head dim 128 (csrc/attention_mma.cuh:
# the forward's and the deterministic dQ's, 96 KiB; tests/test_attention.py checks it against
# the kernels' own sizes). A100/H100 offer 163/227 KiB per block, RTX 30/40 cards 99 KiB.
TENSOR_CORE_D128_SHARED_BYTES = 98304


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the kernels cannot take these inputs (None: they can)."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        return (f"q, k, v must share one (B, H, T, D) shape, got {tuple(q.shape)}, "
                f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        return f"q, k, v must all be float32, bfloat16 or float16, got {q.dtype}, {k.dtype}, {v.dtype}"
    if q.shape[-1] not in HEAD_DIMS:
        return f"the head dim must be 32, 64 or 128, got {q.shape[-1]}"
    if q.shape[-2] < 1 or q.numel() == 0:
        return f"B, H and T must be at least 1, got {tuple(q.shape)}"
    if q.shape[-2] > MAX_T:
        return f"T must be at most {MAX_T}, got {q.shape[-2]}"
    if not (q.device == k.device == v.device) or q.device.type != "cuda":
        return f"q, k, v must be on one CUDA device, got {q.device}, {k.device}, {v.device}"
    if q.dtype != torch.float32 and q.shape[-1] == 128:
        available = torch.cuda.get_device_properties(q.device).shared_memory_per_block_optin
        if available < TENSOR_CORE_D128_SHARED_BYTES:
            return (f"head dim 128 in {q.dtype} needs {TENSOR_CORE_D128_SHARED_BYTES} bytes of "
                    f"shared memory per block; this GPU offers {available}")
    return None


def draw_seed() -> torch.Tensor:
    """A fresh (seed, offset) for one call's dropout: an int64 (2,) CPU tensor."""
    return torch.randint(0, 2 ** 62, (2,))


def dropout_mask(shape: torch.Size | tuple, seed: int, offset: int, dropout_p: float,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """The keep-mask (B, H, T, T) bool that the kernels apply for (seed, offset): csrc/philox.h
    run on the CPU (fastgpt::attention_dropout_mask), for tests against the reference."""
    B, H, T = shape[0], shape[1], shape[2]
    keep = torch.ops.fastgpt.attention_dropout_mask(seed, offset, B * H, T, dropout_p)
    return keep.view(B, H, T, T).to(device)


# The kernels' ops take the dropout (seed, offset) as host integers. These wrappers take
# them as a CPU tensor and read it on the host, inside the op: torch.compile then traces
# the attention through their fakes, the seed drawn in the graph, with no graph break and
# no specialisation on the seed's value.

@torch.library.custom_op("fastgpt::attention_forward_seeded", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                dropout_p: float, seed_offset: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    seed, offset = seed_offset.tolist()
    return torch.ops.fastgpt.attention_forward(q, k, v, scale, dropout_p, seed, offset)


@_forward_op.register_fake
def _(q, k, v, scale, dropout_p, seed_offset):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("fastgpt::attention_backward_seeded", mutates_args=())
def _backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, grad_out: torch.Tensor, scale: float, dropout_p: float,
                 seed_offset: torch.Tensor, deterministic: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seed, offset = seed_offset.tolist()
    return torch.ops.fastgpt.attention_backward(q, k, v, out, lse, grad_out, scale, dropout_p,
                                                seed, offset, deterministic)


@_backward_op.register_fake
def _(q, k, v, out, lse, grad_out, scale, dropout_p, seed_offset, deterministic):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


class FusedCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale: float, dropout_p: float, deterministic: bool,
                seed_offset: torch.Tensor):
        out, lse = _forward_op(q, k, v, scale, dropout_p, seed_offset)
        ctx.save_for_backward(q, k, v, out, lse, seed_offset)
        ctx.args = (scale, dropout_p, deterministic)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse, seed_offset = ctx.saved_tensors
        scale, dropout_p, deterministic = ctx.args
        dq, dk, dv = _backward_op(q, k, v, out, lse, grad_out, scale, dropout_p,
                                  seed_offset, deterministic)
        return dq, dk, dv, None, None, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              dropout_p: float = 0.0, deterministic: bool = False,
              seed: int | None = None, offset: int = 0) -> torch.Tensor:
    """Causal attention through the kernels: (B, H, T, D) -> (B, H, T, D) in q's dtype.
    seed None draws one (draw_seed) when dropout_p > 0."""
    if seed is not None:
        seed_offset = torch.tensor([seed, offset], dtype=torch.int64)
    elif dropout_p > 0.0:
        seed_offset = draw_seed()
    else:
        seed_offset = torch.zeros(2, dtype=torch.int64)
    return FusedCausalAttention.apply(q, k, v, float(scale), float(dropout_p),
                                      bool(deterministic), seed_offset)


class Comparison(NamedTuple):
    error: float    # max |kernel - reference|
    bound: float    # what the error may be
    largest: float  # max |reference|


FP32_EPS = torch.finfo(torch.float32).eps  # 2^-23: fp32's spacing at 1


def masked_lse(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Each row's log-sum-exp of its scaled causal scores (B, H, T), in q's dtype: the
    lse the kernels save, computed plainly (float64 for the reference, float32 for
    torch's own computation)."""
    T = q.shape[-2]
    rows = torch.arange(T, device=q.device)
    scores = (q @ k.transpose(-2, -1)) * scale
    return torch.logsumexp(scores.masked_fill(rows[None, :] > rows[:, None], float("-inf")),
                           dim=-1)


def errors_against_fp64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        grad_out: torch.Tensor, scale: float, dropout_p: float = 0.0,
                        deterministic: bool = False, seed: int = 0, offset: int = 0,
                        attend=None, results: dict | None = None) -> dict[str, Comparison]:
    """{"out" | "lse" | "dq" | "dk" | "dv": Comparison} of the kernels against the reference
    in float64, with the kernels' own dropout mask for (seed, offset). What is judged:
    - by default, the kernels run here: out, dq, dk, dv through `attention` (the autograd
      Function), and lse from one more forward through the op;
    - attend: another attention(q, k, v) judged by the same rule (e.g. the op as users call
      it, or SDPA in a benchmark; no dropout): out, dq, dk, dv;
    - results: outputs already computed, {"out", "dq", "dk", "dv"} and optionally "lse"
      (e.g. the kernels run on the CPU by tests/cuda_on_cpu), the backward's computed from
      that "out": judged as they are.

    One rule, FlashAttention's, for every quantity: the error against float64 at most twice
    that of PyTorch's own computation in the precision the kernel computes it in (the
    reference run on the same inputs), plus a floor for what one computation may lose
    where the other happens to be exact. All scaled by max(largest, 1): the inputs are O(1),
    and where the exact result is 0 (dq, dk at T = 1) both sides are rounding noise of
    O(1) terms.
    - out, dq, dk, dv in bfloat16/float16: torch's own error in that dtype, plus one ulp
      of the dtype (the kernel rounds its result once; torch may round luckily on a small
      case).
    - out, dq, dk, dv in float32: torch's own fp32 error, plus 2 sqrt(T + D) fp32 ulps:
      each entry sums up to T terms (keys or query rows) built from dot products of D
      terms, and the kernels sum in long sequential chains (a row's dQ over every key
      tile, fmaf by fmaf) where torch's matmuls sum in blocks; rounding errors of such
      sums grow as sqrt(n) ulps. Measured on the CPU run (T <= 129): at most 12 ulps,
      against torch's 3.6 there (so twice torch's alone is not enough).
    - dq, dk besides: the exact effect of forming Dr = rowsum(dO * O) from the stored,
      rounded output (_stored_output_shift), which neither reference has.
    - lse (fp32 for every input dtype): torch's own fp32 logsumexp of the same inputs,
      plus 2 (max(|lse|, 1) + sqrt(T)) fp32 ulps: m + log(l) rounds at |lse|, and l sums
      up to T positive terms in another order (sqrt(T) ulps relative, i.e. absolute in
      log l). Measured on the CPU run: at most 1.2 ulps of max(|lse|, 1), as torch's own.
      An lse off by 5e-5 (80 ulps at |lse| ~ 5) fails it; the gradients hide it, P =
      exp(s - lse) moving by 5e-5 relative.
    """
    from fastgpt.ops.reference import causal_attention

    keep = dropout_mask(q.shape, seed, offset, dropout_p, q.device) if dropout_p else None

    def reference(*leaves):
        return causal_attention(*leaves, dropout_p=dropout_p, scale=scale, keep=keep)

    def run(fn, inputs) -> dict[str, torch.Tensor]:
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        with torch.enable_grad(), torch.autocast(q.device.type, enabled=False):
            out = fn(*leaves)
            out.backward(grad_out.to(out.dtype))
        return dict(zip(("out", "dq", "dk", "dv"), [out.detach()] + [t.grad for t in leaves]))

    exact = run(reference, [t.double() for t in (q, k, v)])
    exact["lse"] = masked_lse(q.double(), k.double(), scale)
    own = run(reference, (q, k, v))  # PyTorch's own computation in q's dtype
    own["lse"] = masked_lse(q.float(), k.float(), scale)
    if results is not None:
        kernel = dict(results)
    elif attend is not None:
        kernel = run(attend, (q, k, v))
    else:
        kernel = run(lambda *t: attention(*t, scale, dropout_p, deterministic, seed, offset),
                     (q, k, v))
        kernel["lse"] = torch.ops.fastgpt.attention_forward(q, k, v, scale, dropout_p, seed,
                                                            offset)[1]

    T, D = q.shape[-2], q.shape[-1]
    shift = _stored_output_shift(q, k, grad_out, scale, kernel["out"], exact)
    errors = {}
    for name in ("out", "lse", "dq", "dk", "dv"):
        if name not in kernel:
            continue
        want, got = exact[name], kernel[name]
        largest = want.abs().max().item()
        error = ((got.double() - want).abs().max().item() if got.shape == want.shape
                 else float("inf"))
        torch_error = (own[name].double() - want).abs().max().item()
        at = max(largest, 1.0)
        if name == "lse":
            floor = 2 * FP32_EPS * (at + math.sqrt(T))
        elif q.dtype == torch.float32:
            floor = 2 * FP32_EPS * math.sqrt(T + D) * at
        else:
            floor = torch.finfo(q.dtype).eps * at
        errors[name] = Comparison(error, 2 * torch_error + floor + shift.get(name, 0.0), largest)
    return errors


def _stored_output_shift(q, k, grad_out, scale, out, exact) -> dict[str, float]:
    """The largest change in dq and in dk that comes from the backward forming
    Dr = rowsum(dO * O) from the output the forward stored, rounded to q's dtype (as
    FlashAttention does), where the float64 reference has the exact O and torch's own
    backward never forms Dr (so twice its error does not cover it). dS = P (dP - Dr) moves
    by -P dDr, hence dq by -scale dDr (P K) and dk by -scale (P dDr)^T Q: computed here
    from `out`, the output the backward was given. Where the exact dq, dk are 0 (T = 1:
    one key) it is the kernels' whole error once the output is not exact in the dtype (with
    dropout, O = v / (1 - p): 0.013 in bf16 at D = 64, against an ulp of 0.0078)."""
    if out.shape != exact["out"].shape:
        return {}
    T = q.shape[-2]
    q64, k64 = q.double(), k.double()
    rows = torch.arange(T, device=q.device)
    scores = ((q64 @ k64.transpose(-2, -1)) * scale).masked_fill(
        rows[None, :] > rows[:, None], float("-inf"))
    probs = torch.exp(scores - exact["lse"][..., None])  # undropped, as dS takes them
    d_dr = (grad_out.double() * (out.double() - exact["out"])).sum(-1, keepdim=True)
    return {"dq": (scale * d_dr * (probs @ k64)).abs().max().item(),
            "dk": (scale * (probs * d_dr).transpose(-2, -1) @ q64).abs().max().item()}


def self_check(device: torch.device) -> None:
    """Run the forward and both backwards once on `device` for each dtype the kernels take,
    with dropout, against the reference (errors_against_fp64), so that "auto" never trains
    through a kernel that does not build or run right here. Raises RuntimeError saying what
    went wrong."""
    generator = torch.Generator().manual_seed(0)
    # T = 130: more than one 64-row tile and a remainder; every head dim
    cases = [(dtype, D, deterministic) for dtype in DTYPES for D in HEAD_DIMS
             for deterministic in (False, True)]
    for dtype, D, deterministic in cases:
        q, k, v, grad_out = (torch.randn(1, 2, 130, D, generator=generator).to(device, dtype)
                             for _ in range(4))
        if unsupported(q, k, v) is not None:  # e.g. D=128 in bf16 on a small-memory GPU
            continue
        errors = errors_against_fp64(q, k, v, grad_out, D ** -0.5, 0.1, deterministic, seed=3,
                                     offset=1)
        for name, c in errors.items():
            if not c.error <= c.bound:  # nan fails
                raise RuntimeError(f"{dtype} D={D} {name} (deterministic={deterministic}) "
                                   f"differs from the reference by {c.error:.3g} (bound "
                                   f"{c.bound:.3g})")
