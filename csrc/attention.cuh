// Causal attention on the GPU, the kernels and the host code that picks and sizes them:
// FlashAttention-2's forward and backward, tile loop for tile loop as fastgpt/ops/reference.py's
// tiled_attention_forward/backward (which the CPU tests prove). attention.cu checks the inputs,
// launches on the current CUDA stream and registers the ops; tests/cuda_on_cpu/ compiles this
// very file for the CPU, each CUDA thread a fiber, so that CI runs these kernels too.
//
// Version 1, fp32 on the CUDA cores (the correctness anchor). Forward: a block takes kRows
// consecutive query rows of one (batch, head), one warp per row, and streams the K/V tiles
// of kKeys = 32 keys up to its last row's diagonal through shared memory. In a tile, lane j
// scores key j against the warp's row; the warp keeps the running max m and sum l of
// exp(s - m); each lane holds D / 32 of the row's output accumulator and adds p_j * v_j with
// p_j broadcast from lane j. Output = acc / l and lse = m + log l (fp32) per row.
// Version 3, bf16/fp16 on the tensor cores (mma.sync): attention_mma.cuh; the fp32 backward
// shares its Dr kernel. (Version 2, WMMA with the scores and output in shared memory, was
// removed when version 3 replaced it: see git history before 'Attention v3 backward'.)
// Dropout in both: the decision for probability (bh, row, key) is csrc/philox.h's
// dropout_keep(seed, offset, bh * T + row, key, T), so the backward (and the test mode)
// regenerates it; l and lse sum the undropped probabilities.
#pragma once

#include "attention_common.cuh"
#include "attention_mma.cuh"
#include "philox.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

namespace fastgpt {
namespace {

constexpr int kRows = 4;   // query rows per block: one warp each
constexpr int kKeys = 32;  // keys per K/V tile: one lane each

__device__ __forceinline__ float warp_max(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

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
      const bool keep = dropout_keep(dropout.seed, dropout.offset, bh * T + row, key, T,
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
        const bool keep = dropout_keep(dropout.seed, dropout.offset, bh * T + row, key, T,
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
        const bool keep = dropout_keep(dropout.seed, dropout.offset, bh * T + row, key, T,
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

// --- host: which kernels, on what grid and shared memory ---

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

// f(Elem{}) for the 16-bit dtypes: the CUDA type behind at::BFloat16 / at::Half.
template <typename F>
void with_16bit_type(at::ScalarType dtype, F&& f) {
  if (dtype == at::kBFloat16) f(__nv_bfloat16{});
  else f(__half{});
}

template <typename Elem>
Elem* ptr(const at::Tensor& t) {
  return reinterpret_cast<Elem*>(t.data_ptr());
}

// What the kernels read an input (B, H, T, D) as: the fp32 kernels, contiguous; the
// tensor-core ones, the tensor itself if its last dimension is contiguous and every row
// starts 16 bytes aligned (cp.async copies 16 bytes; e.g. the model's q, k, v, views of one
// qkv projection), else an aligned contiguous copy.
at::Tensor kernel_layout(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat) return t.contiguous();
  bool aligned = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int dim = 0; dim < 3; ++dim) {  // a dimension of size 1 has no stride to speak of
    aligned = aligned && (t.size(dim) == 1 || t.stride(dim) % 8 == 0);
  }
  return aligned ? t : t.clone(at::MemoryFormat::Contiguous);
}

// Where t's (batch, head) rows are: t is (B, H, T, D) with its last dimension contiguous.
HeadLayout layout_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.size(1)};
}

dim3 grid_of(int64_t batch_heads, int64_t T, int64_t tile) {
  return dim3(static_cast<unsigned>(batch_heads), static_cast<unsigned>((T + tile - 1) / tile));
}

}  // namespace

// What one head dim's launches read and write: checked q, k, v (and grad_out) of shape (B, H,
// T, D), with their last dimension contiguous and 16-byte aligned rows (the fp32 kernels:
// contiguous); out (B, H, T, D) contiguous, lse (B, H, T) fp32; in the backward dr = rowsum(dO
// * O) (B, H, T) fp32, dq (q's dtype; fp32 dQ is its own atomic accumulator), dq_accum (fp32,
// for the atomics of the 16-bit backward; undefined otherwise), dk, dv: contiguous.
struct AttentionForward {
  at::Tensor q, k, v, out, lse;
  float scale;
  DropoutArgs dropout;
};
struct AttentionBackward {
  at::Tensor q, k, v, grad_out, out, lse, dr, dq, dq_accum, dk, dv;
  float scale;
  DropoutArgs dropout;
  bool deterministic;
};

// The launches for head dim D, each kernel run as launch(kernel, grid, threads,
// shared_bytes, args...). Templates with external linkage: the GPU build instantiates each
// head dim in a translation unit of its own (attention_d32.cu, ...), so that they compile
// in parallel; the CPU emulation instantiates them in its one file.
template <int D, typename Launch>
void attention_forward_head_dim(const Launch& launch, const AttentionForward& a) {
  const int64_t batch_heads = a.q.size(0) * a.q.size(1), T = a.q.size(2);
  if (a.q.scalar_type() == at::kFloat) {
    launch(attention_forward_fp32_kernel<D>, grid_of(batch_heads, T, kRows), kRows * 32, 0,
           ptr<const float>(a.q), ptr<const float>(a.k), ptr<const float>(a.v),
           ptr<float>(a.out), ptr<float>(a.lse), T, a.scale, a.dropout);
    return;
  }
  with_16bit_type(a.q.scalar_type(), [&](auto elem) {
    using Elem = decltype(elem);
    launch(attention_forward_mma_kernel<Elem, D>, grid_of(batch_heads, T, kMmaRows),
           kMmaWarps * 32, forward_mma_smem<Elem, D>(), ptr<const Elem>(a.q), layout_of(a.q),
           ptr<const Elem>(a.k), layout_of(a.k), ptr<const Elem>(a.v), layout_of(a.v),
           ptr<Elem>(a.out), ptr<float>(a.lse), T, a.scale, a.dropout);
  });
}

// Dr = rowsum(dO * O) and, for dQ by atomics, the fp32 accumulator zeroed: one launch.
template <typename Elem, int D, typename Launch>
void launch_dr(const Launch& launch, const AttentionBackward& a, float* dq_accum) {
  const int64_t rows = a.q.size(0) * a.q.size(1) * a.q.size(2);
  const int64_t threads = rows * (D / (16 / static_cast<int64_t>(sizeof(Elem))));
  launch(attention_backward_dr_kernel<Elem, D>,
         dim3(static_cast<unsigned>((threads + kDrThreads - 1) / kDrThreads)), kDrThreads, 0,
         ptr<const Elem>(a.grad_out), layout_of(a.grad_out), ptr<const Elem>(a.out),
         ptr<float>(a.dr), dq_accum, rows, a.q.size(2));
}

template <int D, typename Launch>
void attention_backward_head_dim(const Launch& launch, const AttentionBackward& a) {
  const int64_t batch_heads = a.q.size(0) * a.q.size(1), T = a.q.size(2);
  if (a.q.scalar_type() == at::kFloat) {
    float* dq_atomic = a.deterministic ? nullptr : ptr<float>(a.dq);
    launch_dr<float, D>(launch, a, dq_atomic);
    launch(attention_backward_dkdv_fp32_kernel<D>, grid_of(batch_heads, T, kKeys),
           kKeyWarps * 32, 0, ptr<const float>(a.q), ptr<const float>(a.k),
           ptr<const float>(a.v), ptr<const float>(a.grad_out), ptr<const float>(a.lse),
           ptr<const float>(a.dr), dq_atomic, ptr<float>(a.dk), ptr<float>(a.dv), T, a.scale,
           a.dropout);
    if (a.deterministic) {
      launch(attention_backward_dq_fp32_kernel<D>, grid_of(batch_heads, T, kRows), kRows * 32,
             0, ptr<const float>(a.q), ptr<const float>(a.k), ptr<const float>(a.v),
             ptr<const float>(a.grad_out), ptr<const float>(a.lse), ptr<const float>(a.dr),
             ptr<float>(a.dq), T, a.scale, a.dropout);
    }
    return;
  }
  with_16bit_type(a.q.scalar_type(), [&](auto elem) {
    using Elem = decltype(elem);
    float* dq_accum = a.deterministic ? nullptr : ptr<float>(a.dq_accum);
    launch_dr<Elem, D>(launch, a, dq_accum);
    launch(attention_backward_dkdv_mma_kernel<Elem, D>, grid_of(batch_heads, T, kBwdKeys),
           kBwdWarps * 32, backward_dkdv_mma_smem<Elem, D>(), ptr<const Elem>(a.q),
           layout_of(a.q), ptr<const Elem>(a.k), layout_of(a.k), ptr<const Elem>(a.v),
           layout_of(a.v), ptr<const Elem>(a.grad_out), layout_of(a.grad_out),
           ptr<const float>(a.lse), ptr<const float>(a.dr), dq_accum, ptr<Elem>(a.dk),
           ptr<Elem>(a.dv), T, a.scale, a.dropout);
    if (a.deterministic) {
      launch(attention_backward_dq_mma_kernel<Elem, D>, grid_of(batch_heads, T, kDqRows),
             kDqWarps * 32, backward_dq_mma_smem<Elem, D>(), ptr<const Elem>(a.q),
             layout_of(a.q), ptr<const Elem>(a.k), layout_of(a.k), ptr<const Elem>(a.v),
             layout_of(a.v), ptr<const Elem>(a.grad_out), layout_of(a.grad_out),
             ptr<const float>(a.lse), ptr<const float>(a.dr), ptr<Elem>(a.dq), T, a.scale,
             a.dropout);
    } else {
      const int64_t n = a.dq.numel();
      launch(attention_backward_dq_convert_kernel<Elem>,
             dim3(static_cast<unsigned>((n / 8 + kDrThreads - 1) / kDrThreads)), kDrThreads, 0,
             ptr<const float>(a.dq_accum), ptr<Elem>(a.dq), n);
    }
  });
}

// (out, lse) for checked q, k, v of shape (B, H, T, D), any strides (kernel_layout);
// launch(kernel, grid, threads, shared_bytes, args...) runs each kernel.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor> attention_forward_launches(
    const Launch& launch, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    double scale, double dropout_p, int64_t seed, int64_t offset) {
  const AttentionForward a{kernel_layout(q), kernel_layout(k), kernel_layout(v),
                           at::empty(q.sizes(), q.options()),
                           at::empty({q.size(0), q.size(1), q.size(2)},
                                     q.options().dtype(at::kFloat)),
                           static_cast<float>(scale), dropout_args(dropout_p, seed, offset)};
  with_head_dim(q.size(3), [&](auto head_dim) {
    attention_forward_head_dim<decltype(head_dim)::value>(launch, a);
  });
  return {a.out, a.lse};
}

// (dq, dk, dv) for checked inputs as above, out and grad_out of q's shape and dtype, lse
// (B, H, T) fp32; dQ by atomics unless deterministic.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_launches(
    const Launch& launch, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& grad_out, double scale,
    double dropout_p, int64_t seed, int64_t offset, bool deterministic) {
  const auto f32 = q.options().dtype(at::kFloat);
  const bool fp32 = q.scalar_type() == at::kFloat;
  const AttentionBackward a{
      kernel_layout(q), kernel_layout(k), kernel_layout(v), kernel_layout(grad_out),
      out.contiguous(), lse.contiguous(),
      at::empty({q.size(0), q.size(1), q.size(2)}, f32),  // dr
      at::empty(q.sizes(), q.options()),                  // dq (zeroed by the Dr kernel if fp32 atomics)
      fp32 || deterministic ? at::Tensor() : at::empty(q.sizes(), f32),  // dq_accum
      at::empty(q.sizes(), q.options()), at::empty(q.sizes(), q.options()),
      static_cast<float>(scale), dropout_args(dropout_p, seed, offset), deterministic};
  with_head_dim(q.size(3), [&](auto head_dim) {
    attention_backward_head_dim<decltype(head_dim)::value>(launch, a);
  });
  return {a.dq, a.dk, a.dv};
}

}  // namespace fastgpt
