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
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "attention: dropout_p must be in [0, 1), got ",
              dropout_p);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(const at::Tensor& q,
                                                          const at::Tensor& k,
                                                          const at::Tensor& v, double scale,
                                                          double dropout_p, int64_t seed,
                                                          int64_t offset) {
  check_attention_inputs(q, k, v, dropout_p);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t batch_heads = q.size(0) * q.size(1), T = q.size(2), D = q.size(3);
  const int64_t row_blocks = (T + kRows - 1) / kRows;
  TORCH_CHECK(batch_heads <= std::numeric_limits<int32_t>::max() && row_blocks <= 65535,
              "attention: B*H must be below 2^31 and T at most ", 65535 * kRows, ", got ",
              q.sizes());
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({q.size(0), q.size(1), T}, q.options());
  const DropoutArgs dropout{static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
                            dropout_threshold(dropout_p),
                            static_cast<float>(1.0 / (1.0 - dropout_p)), dropout_p > 0.0};
  const dim3 grid(static_cast<unsigned>(batch_heads), static_cast<unsigned>(row_blocks));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto args = std::make_tuple(q.data_ptr<float>(), k.data_ptr<float>(),
                                    v.data_ptr<float>(), out.data_ptr<float>(),
                                    lse.data_ptr<float>(), T, static_cast<float>(scale), dropout);
  auto launch = [&](auto kernel) {
    std::apply([&](auto... a) { kernel<<<grid, kRows * 32, 0, stream>>>(a...); }, args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (D == 32) launch(attention_forward_fp32_kernel<32>);
  else if (D == 64) launch(attention_forward_fp32_kernel<64>);
  else launch(attention_forward_fp32_kernel<128>);
  return {out, lse};
}

}  // namespace fastgpt

TORCH_LIBRARY_IMPL(fastgpt, CUDA, m) {
  m.impl("attention_forward", &fastgpt::attention_forward_cuda);
}
