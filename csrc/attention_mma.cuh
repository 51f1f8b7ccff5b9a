// Version 3 of the bf16/fp16 attention kernels: FlashAttention-2's algorithm with every tile
// product on mma.sync m16n8k16 (csrc/mma.cuh, fp32 accumulation) and the scores,
// probabilities, output accumulator, row max and row sum in registers.
//
// Forward: a block takes kMmaRows = 128 consecutive query rows of one (batch, head), the
// heaviest causal tiles first; each of its 8 warps owns 16 rows. Q's tile is copied to shared
// memory once and each warp keeps its rows as A fragments. K/V tiles of kMmaKeys = 64 keys
// stream through two shared buffers by cp.async: tile j + 1 is in flight while tile j is
// used, one __syncthreads per tile. Per tile a warp computes S = Q K^T (ldmatrix from K's
// rows), masks the causal future, updates its rows' running max (quad shuffles) and the
// accumulator's scale, and adds P V with the S accumulators repacked as the A operand
// (ldmatrix.trans from V's rows): nothing goes through shared memory but K and V. Tiles are
// stored swizzled (see swizzled()) so that ldmatrix and cp.async touch each bank group once.
//
// Dropout: one Philox call per 4 keys of a row (dropout_keep4); a quad's 4 lanes each make
// one call per 8-key column block and exchange the bits by two shuffles per tile.
#pragma once

#include "attention_common.cuh"
#include "mma.cuh"
#include "philox.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

namespace fastgpt {
namespace {

constexpr int kMmaKeys = 64;               // keys per K/V tile
constexpr int kMmaWarps = 8;               // forward: warps per block, 16 query rows each
constexpr int kMmaRows = 16 * kMmaWarps;   // forward: query rows per block
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Where one (batch, head)'s rows are: element (row, d) of head bh at
// base + offset(bh) + row * row_stride + d (strides in elements; d contiguous).
struct HeadLayout {
  int64_t batch_stride, head_stride, row_stride;
  int64_t heads;
  __device__ __forceinline__ int64_t offset(int64_t bh) const {
    return (bh / heads) * batch_stride + (bh % heads) * head_stride;
  }
};

// Element offset of 16-byte chunk `chunk` of row `row` in a tile of rows of D 16-bit
// elements, swizzled: the chunk is stored at chunk ^ f(row), with f such that any 8
// consecutive rows' chunk c lie in 8 different 16-byte bank groups (ldmatrix reads one chunk
// of 8 rows at once; unswizzled, rows 128 bytes apart would all hit the same banks).
template <int D>
__host__ __device__ __forceinline__ int swizzled(int row, int chunk) {
  constexpr int kChunks = D / 8;
  const int f = kChunks >= 8 ? row % 8 : (row / 2) % 4;  // D = 32: two rows per 128 bytes
  return row * D + (chunk ^ f) * 8;
}

// tile (kTileRows x D, swizzled) <- rows first.. of one head (`head` points at its row 0),
// zeros for rows >= T: cp.async by each of the block's kThreads threads, not committed.
template <int D, int kTileRows, int kThreads, typename Elem>
__device__ __forceinline__ void copy_tile_async(Elem* tile, const Elem* head, int64_t row_stride,
                                                int64_t first, int64_t T) {
  constexpr int kChunks = D / 8;
  static_assert(kTileRows * kChunks % kThreads == 0, "whole chunks per thread");
#pragma unroll
  for (int i = 0; i < kTileRows * kChunks / kThreads; ++i) {
    const int idx = threadIdx.x + i * kThreads;
    const int r = idx / kChunks, c = idx % kChunks;
    const int64_t row = first + r;
    const bool inside = row < T;
    cp_async_16(tile + swizzled<D>(r, c), head + (inside ? row : 0) * row_stride + c * 8, inside);
  }
}

template <typename Elem, int D>
constexpr int forward_mma_smem() {
  return (kMmaRows + 4 * kMmaKeys) * D * static_cast<int>(sizeof(Elem));  // Q, K x 2, V x 2
}

// q, k, v: (B, H, T, D) 16-bit with the given layouts (16-byte aligned rows); out: (B*H, T,
// D) contiguous; lse: (B*H, T) fp32. grid: (B*H, ceil(T / kMmaRows)); block: kMmaWarps * 32;
// shared: forward_mma_smem<Elem, D>().
template <typename Elem, int D>
__global__ void __launch_bounds__(kMmaWarps * 32, 1)
attention_forward_mma_kernel(const Elem* __restrict__ q, HeadLayout q_layout,
                             const Elem* __restrict__ k, HeadLayout k_layout,
                             const Elem* __restrict__ v, HeadLayout v_layout,
                             Elem* __restrict__ out, float* __restrict__ lse, int64_t T,
                             float scale, DropoutArgs dropout) {
  constexpr int kThreads = kMmaWarps * 32;
  constexpr int kSteps = D / 16;           // k-steps of S = Q K^T
  constexpr int kDTiles = D / 8;           // n-tiles of O
  constexpr int kKeyTiles = kMmaKeys / 8;  // n-tiles of S
  FASTGPT_DYNAMIC_SHARED(smem);
  Elem* q_s = reinterpret_cast<Elem*>(smem);
  Elem* k_s = q_s + kMmaRows * D;  // two buffers of kMmaKeys x D
  Elem* v_s = k_s + 2 * kMmaKeys * D;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t bh = blockIdx.x;
  const int64_t q0 = (static_cast<int64_t>(gridDim.y) - 1 - blockIdx.y) * kMmaRows;
  const int64_t q_end = q0 + kMmaRows < T ? q0 + kMmaRows : T;
  const int tiles = static_cast<int>((q_end - 1) / kMmaKeys) + 1;  // up to the diagonal
  const Elem* k_head = k + k_layout.offset(bh);
  const Elem* v_head = v + v_layout.offset(bh);

  copy_tile_async<D, kMmaRows, kThreads>(q_s, q + q_layout.offset(bh), q_layout.row_stride, q0,
                                         T);
  copy_tile_async<D, kMmaKeys, kThreads>(k_s, k_head, k_layout.row_stride, 0, T);
  copy_tile_async<D, kMmaKeys, kThreads>(v_s, v_head, v_layout.row_stride, 0, T);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  // the warp's 16 rows of Q as A fragments (lane l gives row l % 16, columns 8 (l / 16)..)
  uint32_t q_frag[kSteps][4];
#pragma unroll
  for (int kk = 0; kk < kSteps; ++kk) {
    ldmatrix<4, false>(q_frag[kk], q_s + swizzled<D>(warp * 16 + lane % 16, 2 * kk + lane / 16));
  }

  const int64_t first_row = q0 + warp * 16;
  const int64_t rows[2] = {first_row + g, first_row + g + 8};  // this lane's rows
  const float scale_log2 = scale * kLog2e;  // scores in log2 units: exp2f(s - m)
  float o[kDTiles][4];
#pragma unroll
  for (int n = 0; n < kDTiles; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY};  // running max of the scaled scores (log2 units)
  float l[2] = {0.0f, 0.0f};            // this lane's part of the running sum

  for (int tile = 0; tile < tiles; ++tile) {
    const int64_t k0 = static_cast<int64_t>(tile) * kMmaKeys;
    const Elem* k_t = k_s + (tile % 2) * kMmaKeys * D;
    const Elem* v_t = v_s + (tile % 2) * kMmaKeys * D;
    if (tile + 1 < tiles) {  // the next tile into the other buffer (free: see the barrier below)
      copy_tile_async<D, kMmaKeys, kThreads>(k_s + ((tile + 1) % 2) * kMmaKeys * D, k_head,
                                             k_layout.row_stride, k0 + kMmaKeys, T);
      copy_tile_async<D, kMmaKeys, kThreads>(v_s + ((tile + 1) % 2) * kMmaKeys * D, v_head,
                                             v_layout.row_stride, k0 + kMmaKeys, T);
      cp_async_commit();
    }
    if (k0 <= first_row + 15) {  // warp-uniform: some key of the tile is in a row's past
      // dropout bits first, while S's registers are free: lane t of a quad decides keys
      // k0 + 8n + 4 (t % 2) .. + 3 of row rows[t / 2] for each n (nibble n of `mine`); lane
      // t holds columns 2t, 2t + 1 of both rows, so it takes keep[r] from lane t / 2 (row 0)
      // and 2 + t / 2 (row 1) of its quad
      uint32_t keep[2] = {0, 0};
      if (dropout.enabled) {
        const int64_t row_index = bh * T + (t < 2 ? rows[0] : rows[1]);  // no dynamic index:
        uint32_t mine = 0;                                                  // rows[] in registers
#pragma unroll
        for (int n = 0; n < kKeyTiles; ++n) {
          mine |= dropout_keep4(dropout.seed, dropout.offset, row_index,
                                (k0 + 8 * n) / 4 + t % 2, T, dropout.threshold) << (4 * n);
        }
        const int quad = lane & ~3;
        keep[0] = __shfl_sync(kFullMask, mine, quad + t / 2);
        keep[1] = __shfl_sync(kFullMask, mine, quad + 2 + t / 2);
      }
      // S = Q K^T: lane l gives K row 16 np + 8 (l / 16) + l % 8, chunk 2 kk + (l / 8) % 2
      float s[kKeyTiles][4];
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < kSteps; ++kk) {
#pragma unroll
        for (int np = 0; np < kKeyTiles / 2; ++np) {
          uint32_t b[4];
          ldmatrix<4, false>(b, k_t + swizzled<D>(16 * np + 8 * (lane / 16) + lane % 8,
                                                  2 * kk + (lane / 8) % 2));
          const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
          mma_m16n8k16<Elem>(s[2 * np], q_frag[kk], b0);
          mma_m16n8k16<Elem>(s[2 * np + 1], q_frag[kk], b1);
        }
      }
      // scale; the causal mask where the tile reaches past the warp's first row
      const bool diagonal = k0 + kMmaKeys - 1 > first_row;
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t key = k0 + 8 * n + 2 * t + e % 2;
          s[n][e] = diagonal && key > rows[e / 2] ? -INFINITY : s[n][e] * scale_log2;
        }
      }
      // the rows' new max (each row's 64 scores lie in its quad's 4 lanes) and the rescale;
      // finite: key 0 of tile 0 is in every row's past
      float correction[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = m[r];
#pragma unroll
        for (int n = 0; n < kKeyTiles; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
        correction[r] = exp2f(m[r] - mx);  // 0 on the first tile (m = -inf)
        m[r] = mx;
        l[r] *= correction[r];
      }
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[n][e] = exp2f(s[n][e] - m[e / 2]);  // masked: exp2(-inf) = 0
          l[e / 2] += s[n][e];                  // l sums the undropped probabilities
        }
      }
      if (dropout.enabled) {
#pragma unroll
        for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const bool kept = (keep[e / 2] >> (4 * n + 2 * (t % 2) + e % 2)) & 1u;
            s[n][e] = kept ? s[n][e] * dropout.keep_scale : 0.0f;
          }
        }
      }
#pragma unroll
      for (int n = 0; n < kDTiles; ++n) {
        o[n][0] *= correction[0];
        o[n][1] *= correction[0];
        o[n][2] *= correction[1];
        o[n][3] *= correction[1];
      }
      // O += P V: P's A fragment for keys 16 kk.. is S's accumulators 2 kk and 2 kk + 1;
      // lane l gives V row 16 kk + 8 ((l / 8) % 2) + l % 8, chunk 2 dp + l / 16 (.trans)
#pragma unroll
      for (int kk = 0; kk < kMmaKeys / 16; ++kk) {
        const uint32_t a[4] = {pack2<Elem>(s[2 * kk][0], s[2 * kk][1]),
                               pack2<Elem>(s[2 * kk][2], s[2 * kk][3]),
                               pack2<Elem>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                               pack2<Elem>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t b[4];
          ldmatrix<4, true>(b, v_t + swizzled<D>(16 * kk + 8 * ((lane / 8) % 2) + lane % 8,
                                                 2 * dp + lane / 16));
          const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
          mma_m16n8k16<Elem>(o[2 * dp], a, b0);
          mma_m16n8k16<Elem>(o[2 * dp + 1], a, b1);
        }
      }
    }
    if (tile + 1 < tiles) {
      cp_async_wait<0>();
      __syncthreads();  // the next tile visible to all; this one consumed by all
    }
  }

  // out = O / l, lse = m ln 2 + ln l, for the rows < T
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(kFullMask, l[r], 1);
    l[r] += __shfl_xor_sync(kFullMask, l[r], 2);
  }
  Elem* out_head = out + bh * T * D;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (rows[r] >= T) continue;
    const float inv_l = 1.0f / l[r];
#pragma unroll
    for (int n = 0; n < kDTiles; ++n) {
      *reinterpret_cast<uint32_t*>(out_head + rows[r] * D + 8 * n + 2 * t) =
          pack2<Elem>(o[n][2 * r] * inv_l, o[n][2 * r + 1] * inv_l);
    }
    if (t == 0) lse[bh * T + rows[r]] = m[r] * kLn2 + logf(l[r]);
  }
}

}  // namespace
}  // namespace fastgpt
