// Version 1 of the attention kernels, fp32 on the CUDA cores (the correctness anchor):
// FlashAttention-2's forward and backward, tile loop for tile loop as
// fastgpt/ops/reference.py's tiled_attention_forward/backward. attention.cuh picks and sizes
// their launches.
//
// Forward: a block takes kRows consecutive query rows of one (batch, head), one warp per row,
// and streams the K/V tiles of kKeys = 32 keys up to its last row's diagonal through shared
// memory. In a tile, lane j scores key j against the warp's row; the warp keeps the running
// max m and sum l of exp(s - m); each lane holds D / 32 of the row's output accumulator and
// adds p_j * v_j with p_j broadcast from lane j. Output = acc / l and lse = m + log l (fp32)
// per row. Dropout: the decision for probability (bh, row, key) is csrc/philox.h's
// dropout_keep(seed, offset, bh * T + row, key, T), so the backward (and the test mode)
// regenerates it; l and lse sum the undropped probabilities.
#pragma once

#include "attention_common.cuh"
#include "philox.h"

#include <cmath>
#include <cstdint>
#include <limits>

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

// The K/V tile of keys k0.. of one head (rows of D floats from k + base, v + base) into
// shared memory, zeros for keys >= T, by the block's kThreads threads. The arrays' rows are
// D or D + 1 long (+1: lane j reads row j without bank conflicts).
template <int D, int kThreads, int kKRow, int kVRow>
__device__ __forceinline__ void load_kv_tile(float (&k_tile)[kKeys][kKRow],
                                             float (&v_tile)[kKeys][kVRow],
                                             const float* __restrict__ k,
                                             const float* __restrict__ v, int64_t base,
                                             int64_t k0, int64_t T) {
  for (int idx = threadIdx.x; idx < kKeys * D; idx += kThreads) {
    const int j = idx / D, d = idx % D;
    const int64_t key = k0 + j;
    k_tile[j][d] = key < T ? k[base + key * D + d] : 0.0f;
    v_tile[j][d] = key < T ? v[base + key * D + d] : 0.0f;
  }
}

// Where a thread of the forward's layout works: block (bh, y) takes query rows y kRows..
// of head bh (elements base.. of the (B*H, T, D) tensors), warp w row y kRows + w. (A
// constructor: a function returning it cost the D = 128 dQ kernel 2 registers.)
struct QueryRows {
  int warp, lane;
  int64_t bh, first_row, row, last_row;  // last_row: the block's, at most T - 1
  int64_t base;
  bool active;                           // row < T (warp-uniform)

  __device__ __forceinline__ QueryRows(int64_t T, int D)
      : warp(threadIdx.x / 32), lane(threadIdx.x % 32), bh(blockIdx.x),
        first_row(static_cast<int64_t>(blockIdx.y) * kRows), row(first_row + warp),
        last_row((first_row + kRows < T ? first_row + kRows : T) - 1), base(bh * T * D),
        active(row < T) {}
};

// The forward's tile walk: the K/V tiles of keys k0 = 0, kKeys, .. up to the block's last
// row, each loaded into k_tile and v_tile by the whole block, and visit(k0) run by each warp
// whose row sees a key of the tile (tiles wholly in the future: never loaded).
template <int D, int kKRow, int kVRow, typename Visit>
__device__ __forceinline__ void for_each_kv_tile(const QueryRows& r,
                                                 float (&k_tile)[kKeys][kKRow],
                                                 float (&v_tile)[kKeys][kVRow],
                                                 const float* __restrict__ k,
                                                 const float* __restrict__ v, int64_t T,
                                                 const Visit& visit) {
  for (int64_t k0 = 0; k0 <= r.last_row; k0 += kKeys) {
    __syncthreads();  // the previous tile is consumed (and the rows written, the first time)
    load_kv_tile<D, kRows * 32>(k_tile, v_tile, k, v, r.base, k0, T);
    __syncthreads();
    if (r.active && k0 <= r.row) visit(k0);
  }
}

// acc[c] += sum_j x_j tile[j][lane + 32 c], x_j being lane j's x: a row of weights (one per
// key of the tile) times the tile.
template <int D, int kRow>
__device__ __forceinline__ void add_weighted_rows(float (&acc)[D / 32], float x,
                                                  const float (&tile)[kKeys][kRow], int lane) {
  for (int j = 0; j < kKeys; ++j) {
    const float x_j = __shfl_sync(kFullMask, x, j);
#pragma unroll
    for (int c = 0; c < D / 32; ++c) acc[c] = fmaf(x_j, tile[j][lane + 32 * c], acc[c]);
  }
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

  const QueryRows r(T, D);
  const int warp = r.warp, lane = r.lane;
  if (r.active) {
    for (int d = lane; d < D; d += 32) q_rows[warp][d] = q[r.base + r.row * D + d];
  }
  float m = -std::numeric_limits<float>::infinity(), l = 0.0f;
  float acc[kPerLane];
#pragma unroll
  for (int c = 0; c < kPerLane; ++c) acc[c] = 0.0f;

  for_each_kv_tile<D>(r, k_tile, v_tile, k, v, T, [&](int64_t k0) {
    const int64_t key = k0 + lane;
    const bool visible = key <= r.row;  // the causal mask (key < T follows from row < T)
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
      const bool keep = dropout_keep(dropout.seed, dropout.offset, r.bh * T + r.row, key, T,
                                     dropout.threshold);
      p = keep ? p * dropout.keep_scale : 0.0f;
    }
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) acc[c] *= correction;
    add_weighted_rows<D>(acc, p, v_tile, lane);
    m = m_new;
  });
  if (r.active) {
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) out[r.base + r.row * D + lane + 32 * c] = acc[c] / l;
    if (lane == 0) lse[r.bh * T + r.row] = m + logf(l);
  }
}

// The backward, FlashAttention-2's, as tiled_attention_backward runs it. Dr = rowsum(dO * O)
// per row comes in precomputed (fp32; attention_mma.cuh's Dr kernel). One block per K/V
// tile of kKeys keys; warp w owns kKeysPerWarp of them and walks every query row that can
// see its first key: lanes split the head dim, so s = q.k and dp = dO.v are warp sums; then
// P = exp(s - lse), dS = P * (dP - Dr) (dropped as in the forward), dV += P dO and
// dK += dS q in registers, and the row's dQ += dS k * scale goes to the fp32 dq with
// atomicAdd, unless dq is null (the deterministic backward computes dQ in its own kernel
// below).
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
  load_kv_tile<D, kKeyWarps * 32>(k_tile, v_tile, k, v, base, k0, T);
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

  const QueryRows r(T, D);
  const int warp = r.warp, lane = r.lane;
  float row_lse = 0.0f, row_dr = 0.0f;
  if (r.active) {
    for (int d = lane; d < D; d += 32) {
      q_rows[warp][d] = q[r.base + r.row * D + d];
      do_rows[warp][d] = grad_out[r.base + r.row * D + d];
    }
    row_lse = lse[r.bh * T + r.row];
    row_dr = dr[r.bh * T + r.row];
  }
  float acc[kPerLane];
#pragma unroll
  for (int c = 0; c < kPerLane; ++c) acc[c] = 0.0f;

  for_each_kv_tile<D>(r, k_tile, v_tile, k, v, T, [&](int64_t k0) {
    const int64_t key = k0 + lane;
    float ds = 0.0f;
    if (key <= r.row) {  // the causal mask
      float s = 0.0f, dp = 0.0f;
#pragma unroll 8
      for (int d = 0; d < D; ++d) {
        s = fmaf(q_rows[warp][d], k_tile[lane][d], s);
        dp = fmaf(do_rows[warp][d], v_tile[lane][d], dp);
      }
      const float p = expf(s * scale - row_lse);
      if (dropout.enabled) {
        const bool keep = dropout_keep(dropout.seed, dropout.offset, r.bh * T + r.row, key, T,
                                       dropout.threshold);
        dp = keep ? dp * dropout.keep_scale : 0.0f;
      }
      ds = p * (dp - row_dr);
    }
    add_weighted_rows<D>(acc, ds, k_tile, lane);
  });
  if (r.active) {
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) dq[r.base + r.row * D + lane + 32 * c] = acc[c] * scale;
  }
}

}  // namespace
}  // namespace fastgpt
