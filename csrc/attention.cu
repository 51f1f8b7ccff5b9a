// Causal attention on the GPU, FlashAttention-2's forward, tile loop for tile loop as
// fastgpt/ops/reference.py's tiled_attention_forward (which the CPU tests prove):
// version 1, fp32 on the CUDA cores, the correctness anchor. (The backward, the bf16/fp16
// tensor-core versions and the op's wiring into fastgpt.ops come next; nothing calls this
// yet but the GPU tests.)
//
// A block takes kRows consecutive query rows of one (batch, head), one warp per row, and
// streams the K/V tiles of kKeys = 32 keys up to its last row's diagonal through shared
// memory. In a tile, lane j scores key j against the warp's row; the warp keeps the
// running max m and sum l of exp(s - m); each lane holds D / 32 of the row's output
// accumulator and adds p_j * v_j with p_j broadcast from lane j. Output = acc / l and
// lse = m + log l (fp32) per row. Dropout: the decision for probability (bh, row, key) is
// csrc/philox.h's, so the backward (and the test mode) can regenerate it.
#include "philox.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>

namespace fastgpt {
namespace {

constexpr int kRows = 4;   // query rows per block: one warp each
constexpr int kKeys = 32;  // keys per K/V tile: one lane each
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_max(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

struct DropoutArgs {
  uint64_t seed, offset;
  uint32_t threshold;  // a probability is kept when its Philox word is >= this
  float keep_scale;    // 1 / (1 - p)
  bool enabled;
};

// q, k, v, out: (B*H, T, D) contiguous fp32; lse: (B*H, T) fp32.
// grid: (B*H, ceil(T / kRows)); block: kRows * 32 threads.
template <int D>
__global__ void __launch_bounds__(kRows * 32)
attention_forward_fp32_kernel(const float* __restrict__ q, const float* __restrict__ k,
                              const float* __restrict__ v, float* __restrict__ out,
                              float* __restrict__ lse, int64_t T, float scale,
                              DropoutArgs dropout) {
  constexpr int kPerLane = D / 32;
  __shared__ float k_tile[kKeys][D + 1];  // +1: lane j reads row j, no bank conflicts
  __shared__ float v_tile[kKeys][D];
  __shared__ float q_rows[kRows][D];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.x;
  const int64_t first_row = static_cast<int64_t>(blockIdx.y) * kRows;
  const int64_t row = first_row + warp;
  const int64_t last_row = (first_row + kRows < T ? first_row + kRows : T) - 1;
  const bool active = row < T;  // warp-uniform
  const int64_t base = bh * T * D;

  if (active) {
    for (int d = lane; d < D; d += 32) q_rows[warp][d] = q[base + row * D + d];
  }
  float m = -std::numeric_limits<float>::infinity(), l = 0.0f;
  float acc[kPerLane];
#pragma unroll
  for (int c = 0; c < kPerLane; ++c) acc[c] = 0.0f;

  for (int64_t k0 = 0; k0 <= last_row; k0 += kKeys) {  // tiles wholly in the future: never
    __syncthreads();  // the previous tile is consumed (and q_rows written, the first time)
    for (int idx = threadIdx.x; idx < kKeys * D; idx += kRows * 32) {
      const int j = idx / D, d = idx % D;
      const int64_t key = k0 + j;
      k_tile[j][d] = key < T ? k[base + key * D + d] : 0.0f;
      v_tile[j][d] = key < T ? v[base + key * D + d] : 0.0f;
    }
    __syncthreads();
    if (!active || k0 > row) continue;  // this row sees no key of the tile

    const int64_t key = k0 + lane;
    const bool visible = key <= row;  // the causal mask (key < T follows from row < T)
    float s = -std::numeric_limits<float>::infinity();
    if (visible) {
      float dot = 0.0f;
#pragma unroll 8
      for (int d = 0; d < D; ++d) dot = fmaf(q_rows[warp][d], k_tile[lane][d], dot);
      s = dot * scale;
    }
    const float m_new = fmaxf(m, warp_max(s));  // finite: key k0 <= row is visible
    float p = visible ? expf(s - m_new) : 0.0f;
    const float correction = expf(m - m_new);   // 0 on the first tile (m = -inf)
    l = l * correction + warp_sum(p);
    if (dropout.enabled && visible) {  // on the normalised probabilities: l sums them all
      const bool keep = dropout_keep(dropout.seed, dropout.offset, (bh * T + row) * T + key,
                                     dropout.threshold);
      p = keep ? p * dropout.keep_scale : 0.0f;
    }
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) acc[c] *= correction;
    for (int j = 0; j < kKeys; ++j) {
      const float p_j = __shfl_sync(kFullMask, p, j);
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) acc[c] = fmaf(p_j, v_tile[j][lane + 32 * c], acc[c]);
    }
    m = m_new;
  }
  if (active) {
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) out[base + row * D + lane + 32 * c] = acc[c] / l;
    if (lane == 0) lse[bh * T + row] = m + logf(l);
  }
}

// The backward, FlashAttention-2's, as tiled_attention_backward runs it. Dr = rowsum(dO * O)
// per row comes in precomputed (fp32). One block per K/V tile of kKeys keys; warp w owns
// kKeysPerWarp of them and walks every query row that can see its first key: lanes split
// the head dim, so s = q.k and dp = dO.v are warp sums; then P = exp(s - lse),
// dS = P * (dP - Dr) (dropped as in the forward), dV += P dO and dK += dS q in registers,
// and the row's dQ += dS k * scale goes to the fp32 dq with atomicAdd, unless dq is null
// (the deterministic backward computes dQ in its own kernel below).
constexpr int kKeyWarps = 4;
constexpr int kKeysPerWarp = kKeys / kKeyWarps;

// q, k, v, grad_out, dk, dv: (B*H, T, D) fp32; lse, dr: (B*H, T) fp32; dq: (B*H, T, D)
// fp32 zeroed, or null. grid: (B*H, ceil(T / kKeys)); block: kKeyWarps * 32 threads.
template <int D>
__global__ void __launch_bounds__(kKeyWarps * 32)
attention_backward_dkdv_fp32_kernel(const float* __restrict__ q, const float* __restrict__ k,
                                    const float* __restrict__ v,
                                    const float* __restrict__ grad_out,
                                    const float* __restrict__ lse, const float* __restrict__ dr,
                                    float* __restrict__ dq, float* __restrict__ dk,
                                    float* __restrict__ dv, int64_t T, float scale,
                                    DropoutArgs dropout) {
  constexpr int kPerLane = D / 32;
  __shared__ float k_tile[kKeys][D];  // lane reads column lane + 32c of one row: no conflicts
  __shared__ float v_tile[kKeys][D];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.x;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kKeys;
  const int64_t base = bh * T * D;
  for (int idx = threadIdx.x; idx < kKeys * D; idx += kKeyWarps * 32) {
    const int j = idx / D, d = idx % D;
    const int64_t key = k0 + j;
    k_tile[j][d] = key < T ? k[base + key * D + d] : 0.0f;
    v_tile[j][d] = key < T ? v[base + key * D + d] : 0.0f;
  }
  __syncthreads();

  const int64_t first_key = k0 + warp * kKeysPerWarp;  // the warp's keys: first_key + jj
  float dk_acc[kKeysPerWarp][kPerLane], dv_acc[kKeysPerWarp][kPerLane];
#pragma unroll
  for (int jj = 0; jj < kKeysPerWarp; ++jj) {
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) dk_acc[jj][c] = dv_acc[jj][c] = 0.0f;
  }
  for (int64_t row = first_key; row < T; ++row) {  // earlier rows see none of its keys
    float q_row[kPerLane], do_row[kPerLane], dq_part[kPerLane];
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) {
      q_row[c] = q[base + row * D + lane + 32 * c];
      do_row[c] = grad_out[base + row * D + lane + 32 * c];
      dq_part[c] = 0.0f;
    }
    const float row_lse = lse[bh * T + row], row_dr = dr[bh * T + row];
#pragma unroll
    for (int jj = 0; jj < kKeysPerWarp; ++jj) {
      const int j = warp * kKeysPerWarp + jj;
      const int64_t key = first_key + jj;
      if (key > row) continue;  // the causal mask, warp-uniform (and key < T follows)
      float s = 0.0f, dp = 0.0f;
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) {
        s = fmaf(q_row[c], k_tile[j][lane + 32 * c], s);
        dp = fmaf(do_row[c], v_tile[j][lane + 32 * c], dp);
      }
      const float p = expf(warp_sum(s) * scale - row_lse);
      dp = warp_sum(dp);
      float p_dropped = p;
      if (dropout.enabled) {
        const bool keep = dropout_keep(dropout.seed, dropout.offset, (bh * T + row) * T + key,
                                       dropout.threshold);
        p_dropped = keep ? p * dropout.keep_scale : 0.0f;
        dp = keep ? dp * dropout.keep_scale : 0.0f;
      }
      const float ds = p * (dp - row_dr);
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) {
        dv_acc[jj][c] = fmaf(p_dropped, do_row[c], dv_acc[jj][c]);
        dk_acc[jj][c] = fmaf(ds, q_row[c], dk_acc[jj][c]);
        dq_part[c] = fmaf(ds, k_tile[j][lane + 32 * c], dq_part[c]);
      }
    }
    if (dq != nullptr) {
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) {
        atomicAdd(&dq[base + row * D + lane + 32 * c], dq_part[c] * scale);
      }
    }
  }
#pragma unroll
  for (int jj = 0; jj < kKeysPerWarp; ++jj) {
    const int64_t key = first_key + jj;
    if (key >= T) break;
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) {
      dk[base + key * D + lane + 32 * c] = dk_acc[jj][c] * scale;
      dv[base + key * D + lane + 32 * c] = dv_acc[jj][c];
    }
  }
}

// dQ without atomics (the deterministic backward): the forward's layout, one warp per query
// row, lane j on key j of each 32-key tile up to the diagonal, P and dS recomputed;
// dQ = sum_j dS_j k_j * scale, each row's sum in one fixed order.
// grid: (B*H, ceil(T / kRows)); block: kRows * 32 threads.
template <int D>
__global__ void __launch_bounds__(kRows * 32)
attention_backward_dq_fp32_kernel(const float* __restrict__ q, const float* __restrict__ k,
                                  const float* __restrict__ v,
                                  const float* __restrict__ grad_out,
                                  const float* __restrict__ lse, const float* __restrict__ dr,
                                  float* __restrict__ dq, int64_t T, float scale,
                                  DropoutArgs dropout) {
  constexpr int kPerLane = D / 32;
  __shared__ float k_tile[kKeys][D + 1];  // +1: lane j reads row j, no bank conflicts
  __shared__ float v_tile[kKeys][D + 1];
  __shared__ float q_rows[kRows][D];
  __shared__ float do_rows[kRows][D];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.x;
  const int64_t first_row = static_cast<int64_t>(blockIdx.y) * kRows;
  const int64_t row = first_row + warp;
  const int64_t last_row = (first_row + kRows < T ? first_row + kRows : T) - 1;
  const bool active = row < T;  // warp-uniform
  const int64_t base = bh * T * D;

  float row_lse = 0.0f, row_dr = 0.0f;
  if (active) {
    for (int d = lane; d < D; d += 32) {
      q_rows[warp][d] = q[base + row * D + d];
      do_rows[warp][d] = grad_out[base + row * D + d];
    }
    row_lse = lse[bh * T + row];
    row_dr = dr[bh * T + row];
  }
  float acc[kPerLane];
#pragma unroll
  for (int c = 0; c < kPerLane; ++c) acc[c] = 0.0f;

  for (int64_t k0 = 0; k0 <= last_row; k0 += kKeys) {
    __syncthreads();  // the previous tile is consumed (and the rows written, the first time)
    for (int idx = threadIdx.x; idx < kKeys * D; idx += kRows * 32) {
      const int j = idx / D, d = idx % D;
      const int64_t key = k0 + j;
      k_tile[j][d] = key < T ? k[base + key * D + d] : 0.0f;
      v_tile[j][d] = key < T ? v[base + key * D + d] : 0.0f;
    }
    __syncthreads();
    if (!active || k0 > row) continue;

    const int64_t key = k0 + lane;
    float ds = 0.0f;
    if (key <= row) {  // the causal mask
      float s = 0.0f, dp = 0.0f;
#pragma unroll 8
      for (int d = 0; d < D; ++d) {
        s = fmaf(q_rows[warp][d], k_tile[lane][d], s);
        dp = fmaf(do_rows[warp][d], v_tile[lane][d], dp);
      }
      const float p = expf(s * scale - row_lse);
      if (dropout.enabled) {
        const bool keep = dropout_keep(dropout.seed, dropout.offset, (bh * T + row) * T + key,
                                       dropout.threshold);
        dp = keep ? dp * dropout.keep_scale : 0.0f;
      }
      ds = p * (dp - row_dr);
    }
    for (int j = 0; j < kKeys; ++j) {
      const float ds_j = __shfl_sync(kFullMask, ds, j);
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) acc[c] = fmaf(ds_j, k_tile[j][lane + 32 * c], acc[c]);
    }
  }
  if (active) {
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) dq[base + row * D + lane + 32 * c] = acc[c] * scale;
  }
}

void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            double dropout_p) {
  TORCH_CHECK(q.dim() == 4, "attention: q, k, v must be (B, H, T, D), got q of shape ",
              q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "attention: q, k, v must have the same shape, got ", q.sizes(), ", ", k.sizes(),
              ", ", v.sizes());
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->is_cuda() && t->device() == q.device(),
                "attention: q, k, v must be on one CUDA device, got ", t->device());
    TORCH_CHECK(t->scalar_type() == at::kFloat,
                "attention: this kernel takes float32 q, k, v, got ", t->scalar_type());
    TORCH_CHECK(t->is_contiguous(), "attention: q, k, v must be contiguous");
  }
  const int64_t D = q.size(3);
  TORCH_CHECK(D == 32 || D == 64 || D == 128, "attention: head dim must be 32, 64 or 128, got ",
              D);
  TORCH_CHECK(q.size(2) >= 1 && q.size(0) * q.size(1) >= 1,
              "attention: B, H and T must be at least 1, got ", q.sizes());
  TORCH_CHECK(q.size(0) * q.size(1) <= std::numeric_limits<int32_t>::max() &&
                  (q.size(2) + kRows - 1) / kRows <= 65535,
              "attention: B*H must be below 2^31 and T at most ", 65535 * kRows, ", got ",
              q.sizes());
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "attention: dropout_p must be in [0, 1), got ",
              dropout_p);
}

DropoutArgs dropout_args(double dropout_p, int64_t seed, int64_t offset) {
  return {static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
          dropout_threshold(dropout_p), static_cast<float>(1.0 / (1.0 - dropout_p)),
          dropout_p > 0.0};
}

// f(std::integral_constant<int, D>{}) for the runtime head dim D (32, 64 or 128).
template <typename F>
void with_head_dim(int64_t D, F&& f) {
  if (D == 32) f(std::integral_constant<int, 32>{});
  else if (D == 64) f(std::integral_constant<int, 64>{});
  else f(std::integral_constant<int, 128>{});
}

template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, int threads, Args... args) {
  kernel<<<grid, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

dim3 grid_of(int64_t batch_heads, int64_t T, int64_t tile) {
  return dim3(static_cast<unsigned>(batch_heads), static_cast<unsigned>((T + tile - 1) / tile));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(const at::Tensor& q,
                                                          const at::Tensor& k,
                                                          const at::Tensor& v, double scale,
                                                          double dropout_p, int64_t seed,
                                                          int64_t offset) {
  check_attention_inputs(q, k, v, dropout_p);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t batch_heads = q.size(0) * q.size(1), T = q.size(2);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({q.size(0), q.size(1), T}, q.options().dtype(at::kFloat));
  with_head_dim(q.size(3), [&](auto head_dim) {
    launch(attention_forward_fp32_kernel<decltype(head_dim)::value>, grid_of(batch_heads, T, kRows),
           kRows * 32, q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
           out.data_ptr<float>(), lse.data_ptr<float>(), T, static_cast<float>(scale),
           dropout_args(dropout_p, seed, offset));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& grad_out, double scale, double dropout_p,
    int64_t seed, int64_t offset, bool deterministic) {
  check_attention_inputs(q, k, v, dropout_p);
  for (const at::Tensor* t : {&out, &grad_out}) {
    TORCH_CHECK(t->sizes() == q.sizes() && t->scalar_type() == q.scalar_type() &&
                    t->device() == q.device() && t->is_contiguous(),
                "attention_backward: out and grad_out must be contiguous, of q's shape, dtype "
                "and device, got ", t->sizes(), " ", t->scalar_type(), " on ", t->device());
  }
  TORCH_CHECK(lse.sizes() == q.sizes().slice(0, 3) && lse.scalar_type() == at::kFloat &&
                  lse.device() == q.device() && lse.is_contiguous(),
              "attention_backward: lse must be contiguous float32 (B, H, T) on q's device, got ",
              lse.sizes(), " ", lse.scalar_type(), " on ", lse.device());
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t batch_heads = q.size(0) * q.size(1), T = q.size(2);
  const at::Tensor dr = (grad_out.to(at::kFloat) * out.to(at::kFloat)).sum(-1);  // (B, H, T)
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dq = deterministic ? at::empty(q.sizes(), f32) : at::zeros(q.sizes(), f32);
  at::Tensor dk = at::empty_like(k), dv = at::empty_like(v);
  const DropoutArgs dropout = dropout_args(dropout_p, seed, offset);
  const float scale_f = static_cast<float>(scale);
  with_head_dim(q.size(3), [&](auto head_dim) {
    launch(attention_backward_dkdv_fp32_kernel<decltype(head_dim)::value>, grid_of(batch_heads, T, kKeys),
           kKeyWarps * 32, q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
           grad_out.data_ptr<float>(), lse.data_ptr<float>(), dr.data_ptr<float>(),
           deterministic ? nullptr : dq.data_ptr<float>(), dk.data_ptr<float>(),
           dv.data_ptr<float>(), T, scale_f, dropout);
    if (deterministic) {
      launch(attention_backward_dq_fp32_kernel<decltype(head_dim)::value>, grid_of(batch_heads, T, kRows),
             kRows * 32, q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
             grad_out.data_ptr<float>(), lse.data_ptr<float>(), dr.data_ptr<float>(),
             dq.data_ptr<float>(), T, scale_f, dropout);
    }
  });
  return {dq.to(q.scalar_type()), dk, dv};
}

}  // namespace fastgpt

TORCH_LIBRARY_IMPL(fastgpt, CUDA, m) {
  m.impl("attention_forward", &fastgpt::attention_forward_cuda);
  m.impl("attention_backward", &fastgpt::attention_backward_cuda);
}
