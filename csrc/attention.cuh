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
// Version 2, bf16/fp16 on the tensor cores: further down.
// Dropout in both: the decision for probability (bh, row, key) is csrc/philox.h's
// dropout_keep(seed, offset, bh * T + row, key, T), so the backward (and the test mode)
// regenerates it; l and lse sum the undropped probabilities.
#pragma once

#include "attention_common.cuh"
#include "attention_mma.cuh"
#include "philox.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

namespace fastgpt {
namespace {

using namespace nvcuda;

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

// --- version 2: bf16 / fp16 inputs on the tensor cores (WMMA 16x16x16, fp32 accumulation) ---
//
// The same tile loops with kTile = 64 query rows and 64 keys per tile, 4 warps per block,
// each warp on 16 rows. Products run on the tensor cores through WMMA fragments from shared
// memory; the softmax and its gradient run on fp32 copies of the score tiles, a pair of lanes
// per row (32 columns each). The forward's output accumulator lives in shared memory as
// fp32, rescaled by the lanes when the row max grows, then loaded into a fragment for
// O += P V. Rows past T are loaded as zeros, see no keys in the backward (P = 0) and are
// never stored.
constexpr int kTile = 64;       // query rows per block, and keys per K/V tile
constexpr int kTcWarps = kTile / 16;
constexpr int kPad = 8;         // 16-bit tiles: row stride D + 8 elements (16 bytes)
constexpr int kLdScores = kTile + 4;  // fp32 score tiles' row stride
constexpr int kLdProbs = kTile + kPad;

using FragAcc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
template <typename Elem, typename Layout>
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, Elem, Layout>;
template <typename Elem, typename Layout>
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, Elem, Layout>;

__device__ __forceinline__ float to_elem(float x, float) { return x; }
__device__ __forceinline__ __half to_elem(float x, __half) { return __float2half(x); }
__device__ __forceinline__ __nv_bfloat16 to_elem(float x, __nv_bfloat16) {
  return __float2bfloat16(x);
}

// How many of the 32 columns from key0 on a row sees: clamp(row - key0 + 1, 0, 32).
__device__ __forceinline__ int columns_seen(int64_t row, int64_t key0) {
  const int64_t n = row - key0 + 1;
  return n < 0 ? 0 : (n > 32 ? 32 : static_cast<int>(n));
}

// tile (kTile x D, row stride D + kPad) = rows first.. of src (T x D), zeros past T.
// 16-byte vectors: src's base is 16-byte aligned (the host makes sure) and D % 8 == 0.
template <int D, typename Elem>
__device__ __forceinline__ void load_tile(Elem* tile, const Elem* src, int64_t first, int64_t T) {
  constexpr int kVectors = D / 8;
  for (int idx = threadIdx.x; idx < kTile * kVectors; idx += kTcWarps * 32) {
    const int r = idx / kVectors, c = (idx % kVectors) * 8;
    const int64_t row = first + r;
    int4 value = make_int4(0, 0, 0, 0);
    if (row < T) value = *reinterpret_cast<const int4*>(src + row * D + c);
    *reinterpret_cast<int4*>(tile + r * (D + kPad) + c) = value;
  }
}

// One warp: out (16 x kTile fp32, stride kLdScores) = a (16 x D) @ b^T, b (kTile x D); both
// 16-bit with stride D + kPad.
template <int D, typename Elem>
__device__ __forceinline__ void warp_a_bt(float* out, const Elem* a, const Elem* b) {
  constexpr int ld = D + kPad;
#pragma unroll 1  // one accumulator live at a time: registers are the limit, not issue
  for (int n = 0; n < kTile / 16; ++n) {
    FragAcc acc;
    wmma::fill_fragment(acc, 0.0f);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      FragA<Elem, wmma::row_major> fa;
      FragB<Elem, wmma::col_major> fb;  // b^T: element (d, key) at b[key * ld + d]
      wmma::load_matrix_sync(fa, a + kk * 16, ld);
      wmma::load_matrix_sync(fb, b + n * 16 * ld + kk * 16, ld);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(out + n * 16, acc, kLdScores, wmma::mem_row_major);
  }
}

// One warp: acc[nd] += a (16 x kTile) @ b (kTile x D), for the 16-column slices nd of D.
// ALayout col_major reads a^T: a's element (m, k) at a_ptr[k * lda + m].
template <int D, typename ALayout, typename Elem>
__device__ __forceinline__ void warp_acc_ab(FragAcc (&acc)[D / 16], const Elem* a, int lda,
                                            const Elem* b) {
  constexpr int ld = D + kPad;
#pragma unroll 1  // one A fragment live at a time
  for (int kk = 0; kk < kTile / 16; ++kk) {
    FragA<Elem, ALayout> fa;
    const Elem* a_k;
    if constexpr (std::is_same_v<ALayout, wmma::row_major>) a_k = a + kk * 16;
    else a_k = a + kk * 16 * lda;
    wmma::load_matrix_sync(fa, a_k, lda);
#pragma unroll
    for (int nd = 0; nd < D / 16; ++nd) {
      FragB<Elem, wmma::row_major> fb;
      wmma::load_matrix_sync(fb, b + kk * 16 * ld + nd * 16, ld);
      wmma::mma_sync(acc[nd], fa, fb, acc[nd]);
    }
  }
}

// One warp: global[(first + r) * D + col0 + c] = acc(r, c) * factor for the rows < T, through
// `scratch` (16 x 16 fp32, stride kLdScores, the warp's own), with atomicAdd if kAtomic.
template <int D, bool kAtomic, typename Out>
__device__ __forceinline__ void warp_store_16x16(Out* global, const FragAcc& acc, float* scratch,
                                                 int64_t first, int col0, int64_t T,
                                                 float factor) {
  const int lane = threadIdx.x % 32;
  wmma::store_matrix_sync(scratch, acc, kLdScores, wmma::mem_row_major);
  __syncwarp();
  for (int e = lane; e < 256; e += 32) {
    const int r = e / 16, c = e % 16;
    const int64_t row = first + r;
    if (row >= T) continue;
    const float value = scratch[r * kLdScores + c] * factor;
    if constexpr (kAtomic) atomicAdd(&global[row * D + col0 + c], value);
    else global[row * D + col0 + c] = to_elem(value, Out());
  }
  __syncwarp();  // scratch is reused next
}

// The backward's elementwise step for this lane's row and 32 columns of a tile (the first
// `visible` in the row's past; 0 for rows past T): from the scores s and dP = dO v^T (fp32),
// P = exp(s * scale - lse), the dropped P and dP, and dS = P * (dP - Dr); writes the dropped
// P (if p_row) and dS. Dropout: row row_index (bh * T + row) of T keys, column 0 = key key0.
template <typename Elem>
__device__ __forceinline__ void softmax_grad_row(const float* s_row, const float* dp_row,
                                                 Elem* p_row, Elem* ds_row, int visible,
                                                 float row_lse, float row_dr, int64_t row_index,
                                                 int64_t key0, int64_t T,
                                                 float scale, DropoutArgs dropout) {
#pragma unroll 4
  for (int c = 0; c < 32; ++c) {
    const float p = c < visible ? expf(s_row[c] * scale - row_lse) : 0.0f;
    float p_dropped = p, dp = dp_row[c];
    if (dropout.enabled && c < visible) {
      const bool keep = dropout_keep(dropout.seed, dropout.offset, row_index, key0 + c, T,
                                     dropout.threshold);
      p_dropped = keep ? p * dropout.keep_scale : 0.0f;
      dp = keep ? dp * dropout.keep_scale : 0.0f;
    }
    if (p_row != nullptr) p_row[c] = to_elem(p_dropped, Elem());
    ds_row[c] = to_elem(p * (dp - row_dr), Elem());
  }
}

template <typename Elem, int D>
constexpr int backward_tc_smem() {
  return 4 * kTile * (D + kPad) * sizeof(Elem) + 2 * kTile * kLdScores * sizeof(float) +
         2 * kTile * kLdProbs * sizeof(Elem) + 2 * kTile * sizeof(float);
}

// dK, dV (and dQ by fp32 atomicAdd unless dq is null): one block per K/V tile of kTile
// keys, walking the Q tiles from the diagonal on. Warp w computes S and dP for Q rows
// 16w.., then (after the block has every row's P and dS) dV += P^T dO and dK += dS^T Q for
// keys 16w.. in fragments, and dQ += dS K for its Q rows.
// q, k, v, grad_out, dk, dv: (B*H, T, D) 16-bit; lse, dr: (B*H, T) fp32; dq: fp32, zeroed.
// grid: (B*H, ceil(T / kTile)); block: kTcWarps * 32; shared: backward_tc_smem<Elem, D>().
template <typename Elem, int D>
__global__ void __launch_bounds__(kTcWarps * 32, 1)
attention_backward_dkdv_tc_kernel(const Elem* __restrict__ q, const Elem* __restrict__ k,
                                  const Elem* __restrict__ v, const Elem* __restrict__ grad_out,
                                  const float* __restrict__ lse, const float* __restrict__ dr,
                                  float* __restrict__ dq, Elem* __restrict__ dk,
                                  Elem* __restrict__ dv, int64_t T, float scale,
                                  DropoutArgs dropout) {
  constexpr int ld = D + kPad;
  FASTGPT_DYNAMIC_SHARED(smem);
  Elem* k_s = reinterpret_cast<Elem*>(smem);
  Elem* v_s = k_s + kTile * ld;
  Elem* q_s = v_s + kTile * ld;
  Elem* do_s = q_s + kTile * ld;
  float* s_s = reinterpret_cast<float*>(do_s + kTile * ld);
  float* dp_s = s_s + kTile * kLdScores;
  Elem* p_s = reinterpret_cast<Elem*>(dp_s + kTile * kLdScores);
  Elem* ds_s = p_s + kTile * kLdProbs;
  float* lse_s = reinterpret_cast<float*>(ds_s + kTile * kLdProbs);
  float* dr_s = lse_s + kTile;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.x, base = bh * T * D;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int r = warp * 16 + lane / 2, half = lane % 2;
  float* scratch = s_s + warp * 16 * kLdScores;  // the warp's own rows of s_s

  load_tile<D>(k_s, k + base, k0, T);
  load_tile<D>(v_s, v + base, k0, T);
  FragAcc dk_acc[D / 16], dv_acc[D / 16];
#pragma unroll
  for (int nd = 0; nd < D / 16; ++nd) {
    wmma::fill_fragment(dk_acc[nd], 0.0f);
    wmma::fill_fragment(dv_acc[nd], 0.0f);
  }
  for (int64_t q0 = k0; q0 < T; q0 += kTile) {  // Q tiles before k0 see none of its keys
    __syncthreads();  // the previous Q tile is consumed (and k_s, v_s written, the first time)
    load_tile<D>(q_s, q + base, q0, T);
    load_tile<D>(do_s, grad_out + base, q0, T);
    if (threadIdx.x < kTile) {
      const int64_t row = q0 + threadIdx.x;
      lse_s[threadIdx.x] = row < T ? lse[bh * T + row] : 0.0f;
      dr_s[threadIdx.x] = row < T ? dr[bh * T + row] : 0.0f;
    }
    __syncthreads();
    warp_a_bt<D>(s_s + warp * 16 * kLdScores, q_s + warp * 16 * ld, k_s);
    warp_a_bt<D>(dp_s + warp * 16 * kLdScores, do_s + warp * 16 * ld, v_s);
    __syncwarp();
    const int64_t row = q0 + r;
    softmax_grad_row(s_s + r * kLdScores + half * 32, dp_s + r * kLdScores + half * 32,
                     p_s + r * kLdProbs + half * 32, ds_s + r * kLdProbs + half * 32,
                     row < T ? columns_seen(row, k0 + half * 32) : 0, lse_s[r], dr_s[r],
                     bh * T + row, k0 + half * 32, T, scale, dropout);
    __syncthreads();  // every Q row's P and dS, for the key rows' products
    // keys 16w..: dV += P^T dO, dK += dS^T Q (col_major reads of P and dS give the transposes)
    warp_acc_ab<D, wmma::col_major>(dv_acc, p_s + warp * 16, kLdProbs, do_s);
    warp_acc_ab<D, wmma::col_major>(dk_acc, ds_s + warp * 16, kLdProbs, q_s);
    if (dq != nullptr) {  // Q rows 16w..: dQ += dS K * scale, a 16-column slice at a time
      for (int nd = 0; nd < D / 16; ++nd) {  // (one accumulator: dK and dV hold the registers)
        FragAcc dq_acc;
        wmma::fill_fragment(dq_acc, 0.0f);
#pragma unroll
        for (int kk = 0; kk < kTile / 16; ++kk) {
          FragA<Elem, wmma::row_major> fa;
          FragB<Elem, wmma::row_major> fb;
          wmma::load_matrix_sync(fa, ds_s + warp * 16 * kLdProbs + kk * 16, kLdProbs);
          wmma::load_matrix_sync(fb, k_s + kk * 16 * ld + nd * 16, ld);
          wmma::mma_sync(dq_acc, fa, fb, dq_acc);
        }
        warp_store_16x16<D, true>(dq + base, dq_acc, scratch, q0 + warp * 16, nd * 16, T, scale);
      }
    }
  }
#pragma unroll
  for (int nd = 0; nd < D / 16; ++nd) {
    warp_store_16x16<D, false>(dk + base, dk_acc[nd], scratch, k0 + warp * 16, nd * 16, T, scale);
    warp_store_16x16<D, false>(dv + base, dv_acc[nd], scratch, k0 + warp * 16, nd * 16, T, 1.0f);
  }
}

// dQ without atomics (the deterministic backward): one block per Q tile, walking the K/V
// tiles up to the diagonal, P and dS recomputed; dQ in fragments, stored once.
// grid: (B*H, ceil(T / kTile)); block: kTcWarps * 32; shared: backward_tc_smem<Elem, D>().
template <typename Elem, int D>
__global__ void __launch_bounds__(kTcWarps * 32, 1)
attention_backward_dq_tc_kernel(const Elem* __restrict__ q, const Elem* __restrict__ k,
                                const Elem* __restrict__ v, const Elem* __restrict__ grad_out,
                                const float* __restrict__ lse, const float* __restrict__ dr,
                                float* __restrict__ dq, int64_t T, float scale,
                                DropoutArgs dropout) {
  constexpr int ld = D + kPad;
  FASTGPT_DYNAMIC_SHARED(smem);
  Elem* k_s = reinterpret_cast<Elem*>(smem);
  Elem* v_s = k_s + kTile * ld;
  Elem* q_s = v_s + kTile * ld;
  Elem* do_s = q_s + kTile * ld;
  float* s_s = reinterpret_cast<float*>(do_s + kTile * ld);
  float* dp_s = s_s + kTile * kLdScores;
  Elem* ds_s = reinterpret_cast<Elem*>(dp_s + kTile * kLdScores);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.x, base = bh * T * D;
  const int64_t q0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t q_last = (q0 + kTile < T ? q0 + kTile : T) - 1;
  const int r = warp * 16 + lane / 2, half = lane % 2;
  const int64_t row = q0 + r;
  const float row_lse = row < T ? lse[bh * T + row] : 0.0f;
  const float row_dr = row < T ? dr[bh * T + row] : 0.0f;

  load_tile<D>(q_s, q + base, q0, T);
  load_tile<D>(do_s, grad_out + base, q0, T);
  FragAcc dq_acc[D / 16];
#pragma unroll
  for (int nd = 0; nd < D / 16; ++nd) wmma::fill_fragment(dq_acc[nd], 0.0f);
  for (int64_t k0 = 0; k0 <= q_last; k0 += kTile) {
    __syncthreads();
    load_tile<D>(k_s, k + base, k0, T);
    load_tile<D>(v_s, v + base, k0, T);
    __syncthreads();
    warp_a_bt<D>(s_s + warp * 16 * kLdScores, q_s + warp * 16 * ld, k_s);
    warp_a_bt<D>(dp_s + warp * 16 * kLdScores, do_s + warp * 16 * ld, v_s);
    __syncwarp();
    softmax_grad_row(s_s + r * kLdScores + half * 32, dp_s + r * kLdScores + half * 32,
                     static_cast<Elem*>(nullptr), ds_s + r * kLdProbs + half * 32,
                     row < T ? columns_seen(row, k0 + half * 32) : 0, row_lse, row_dr,
                     bh * T + row, k0 + half * 32, T, scale, dropout);
    __syncwarp();
    warp_acc_ab<D, wmma::row_major>(dq_acc, ds_s + warp * 16 * kLdProbs, kLdProbs, k_s);
  }
#pragma unroll
  for (int nd = 0; nd < D / 16; ++nd) {
    warp_store_16x16<D, false>(dq + base, dq_acc[nd], s_s + warp * 16 * kLdScores, q0 + warp * 16,
                               nd * 16, T, scale);
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

// Where t's (batch, head) rows are: t is (B, H, T, D) with its last dimension contiguous.
HeadLayout layout_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.size(1)};
}

dim3 grid_of(int64_t batch_heads, int64_t T, int64_t tile) {
  return dim3(static_cast<unsigned>(batch_heads), static_cast<unsigned>((T + tile - 1) / tile));
}

}  // namespace

// What one head dim's launches read and write: checked, contiguous, 16-byte aligned q, k,
// v (and grad_out) of shape (B, H, T, D); out, lse (B, H, T) fp32; dr = rowsum(dO * O)
// (B, H, T) fp32; dq fp32 (zeroed for the atomics unless deterministic), dk, dv.
struct AttentionForward {
  at::Tensor q, k, v, out, lse;
  float scale;
  DropoutArgs dropout;
};
struct AttentionBackward {
  at::Tensor q, k, v, grad_out, lse, dr, dq, dk, dv;
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

template <int D, typename Launch>
void attention_backward_head_dim(const Launch& launch, const AttentionBackward& a) {
  const int64_t batch_heads = a.q.size(0) * a.q.size(1), T = a.q.size(2);
  float* dq_atomic = a.deterministic ? nullptr : ptr<float>(a.dq);
  if (a.q.scalar_type() == at::kFloat) {
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
    const int shared_bytes = backward_tc_smem<Elem, D>();
    launch(attention_backward_dkdv_tc_kernel<Elem, D>, grid_of(batch_heads, T, kTile),
           kTcWarps * 32, shared_bytes, ptr<const Elem>(a.q), ptr<const Elem>(a.k),
           ptr<const Elem>(a.v), ptr<const Elem>(a.grad_out), ptr<const float>(a.lse),
           ptr<const float>(a.dr), dq_atomic, ptr<Elem>(a.dk), ptr<Elem>(a.dv), T, a.scale,
           a.dropout);
    if (a.deterministic) {
      launch(attention_backward_dq_tc_kernel<Elem, D>, grid_of(batch_heads, T, kTile),
             kTcWarps * 32, shared_bytes, ptr<const Elem>(a.q), ptr<const Elem>(a.k),
             ptr<const Elem>(a.v), ptr<const Elem>(a.grad_out), ptr<const float>(a.lse),
             ptr<const float>(a.dr), ptr<float>(a.dq), T, a.scale, a.dropout);
    }
  });
}

// (out, lse) for checked, contiguous, 16-byte aligned q, k, v of shape (B, H, T, D);
// launch(kernel, grid, threads, shared_bytes, args...) runs each kernel.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor> attention_forward_launches(
    const Launch& launch, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    double scale, double dropout_p, int64_t seed, int64_t offset) {
  const AttentionForward a{q, k, v, at::empty_like(q),
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
  const AttentionBackward a{
      q, k, v, grad_out, lse,
      (grad_out.to(at::kFloat) * out.to(at::kFloat)).sum(-1),  // dr: (B, H, T)
      deterministic ? at::empty(q.sizes(), f32) : at::zeros(q.sizes(), f32),
      at::empty_like(k), at::empty_like(v), static_cast<float>(scale),
      dropout_args(dropout_p, seed, offset), deterministic};
  with_head_dim(q.size(3), [&](auto head_dim) {
    attention_backward_head_dim<decltype(head_dim)::value>(launch, a);
  });
  return {a.dq.to(q.scalar_type()), a.dk, a.dv};
}

}  // namespace fastgpt
