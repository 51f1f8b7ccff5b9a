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
// Backward, FlashAttention-2's: (1) attention_backward_dr_kernel: Dr = rowsum(dO * O) in
// fp32, and the fp32 dQ accumulator zeroed; (2) attention_backward_dkdv_mma_kernel: a block
// per 64-key tile, a warp per 16 keys, walking the query tiles from the diagonal on with the
// transposed products S^T = K Q^T and dP^T = V dO^T, so that P^T and dS^T land in the
// accumulators as the A operands of dV += P^T dO and dK += dS^T Q (dK, dV in registers for
// the whole walk); dQ += dS K through dS^T in shared memory, by fp32 atomicAdd; (3)
// attention_backward_dq_convert_kernel casts the accumulator to dQ's dtype. Or, the
// deterministic backward: attention_backward_dq_mma_kernel in the forward's layout
// (a block per 64-query tile, S, dP, dS and dQ in registers), no atomics.
//
// Dropout: one Philox call per 4 keys of a row (dropout_keep4), made by the lanes in turn and
// the bits exchanged by shuffles (2 per tile in the row layout, 4 in the transposed one).
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

// The K/V tile of keys first.. into buffer `buffer` (0 or 1) of k_s and v_s (each two buffers
// of kMmaKeys x D): cp.async, not committed.
template <int D, int kThreads, typename Elem>
__device__ __forceinline__ void copy_kv_tile_async(Elem* k_s, Elem* v_s, int buffer,
                                                   const Elem* k_head, int64_t k_row_stride,
                                                   const Elem* v_head, int64_t v_row_stride,
                                                   int64_t first, int64_t T) {
  copy_tile_async<D, kMmaKeys, kThreads>(k_s + buffer * kMmaKeys * D, k_head, k_row_stride,
                                         first, T);
  copy_tile_async<D, kMmaKeys, kThreads>(v_s + buffer * kMmaKeys * D, v_head, v_row_stride,
                                         first, T);
}

// The K/V tiles 0..tiles - 1 of one head through the two buffers of k_s and v_s (tile 0
// already in buffer 0, visible to all): visit(k0, K tile, V tile) for the tile of keys k0..
// runs while the next tile is copied into the other buffer by cp.async; one __syncthreads
// per tile. Index: k0's type (the forward's int saves registers; keys < 2^31, the host
// checks).
template <int D, int kThreads, typename Index, typename Elem, typename Visit>
__device__ __forceinline__ void stream_kv_tiles(Elem* k_s, Elem* v_s, const Elem* k_head,
                                                int64_t k_row_stride, const Elem* v_head,
                                                int64_t v_row_stride, int tiles, int64_t T,
                                                const Visit& visit) {
  for (int tile = 0; tile < tiles; ++tile) {
    const Index k0 = static_cast<Index>(tile) * kMmaKeys;
    const Elem* k_t = k_s + (tile % 2) * kMmaKeys * D;
    const Elem* v_t = v_s + (tile % 2) * kMmaKeys * D;
    if (tile + 1 < tiles) {  // into the other buffer (free: see the barrier below)
      copy_kv_tile_async<D, kThreads>(k_s, v_s, (tile + 1) % 2, k_head, k_row_stride, v_head,
                                      v_row_stride, k0 + kMmaKeys, T);
      cp_async_commit();
    }
    visit(k0, k_t, v_t);
    if (tile + 1 < tiles) {
      cp_async_wait<0>();
      __syncthreads();  // the next tile visible to all; this one consumed by all
    }
  }
}

// The warp's A fragment of rows row0..row0 + 15, columns 16 kk..16 kk + 15 of a tile
// (D-element rows, swizzled): lane l gives row row0 + l % 16, chunk 2 kk + l / 16.
template <int D, typename Elem>
__device__ __forceinline__ void load_a_fragment(uint32_t (&a)[4], const Elem* tile, int row0,
                                                int kk) {
  const int lane = threadIdx.x % 32;
  ldmatrix<4, false>(a, tile + swizzled<D>(row0 + lane % 16, 2 * kk + lane / 16));
}

// All D / 16 of them (the forward keeps Q's).
template <int D, typename Elem>
__device__ __forceinline__ void load_a_fragments(uint32_t (&a)[D / 16][4], const Elem* tile,
                                                 int row0) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) load_a_fragment<D>(a[kk], tile, row0, kk);
}

// acc (16 x kCols fp32, C layout) = A B^T, where a_step(kk, a) puts A's fragment of k-step kk
// (columns 16 kk..) in a, and B^T = rows b_row0.. of a tile (D-element rows, swizzled): K for
// S = Q K^T, Q for S^T = K Q^T. Lane l gives B row b_row0 + 16 np + 8 (l / 16) + l % 8,
// chunk 2 kk + (l / 8) % 2.
template <typename Elem, int D, int kCols, typename AStep>
__device__ __forceinline__ void a_by_rows(float (&acc)[kCols / 8][4], const AStep& a_step,
                                          const Elem* b, int b_row0) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int n = 0; n < kCols / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    a_step(kk, a);
#pragma unroll
    for (int np = 0; np < kCols / 16; ++np) {
      uint32_t f[4];
      ldmatrix<4, false>(f, b + swizzled<D>(b_row0 + 16 * np + 8 * (lane / 16) + lane % 8,
                                            2 * kk + (lane / 8) % 2));
      const uint32_t b0[2] = {f[0], f[1]}, b1[2] = {f[2], f[3]};
      mma_m16n8k16<Elem>(acc[2 * np], a, b0);
      mma_m16n8k16<Elem>(acc[2 * np + 1], a, b1);
    }
  }
}

// a_by_rows with A's fragments kept in registers (the forward's Q, loaded once).
template <typename Elem, int D, int kCols>
__device__ __forceinline__ void fragments_by_rows(float (&acc)[kCols / 8][4],
                                                  const uint32_t (&a)[D / 16][4], const Elem* b,
                                                  int b_row0) {
  a_by_rows<Elem, D, kCols>(acc, [&](int kk, uint32_t (&a_k)[4]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) a_k[i] = a[kk][i];
  }, b, b_row0);
}

// a_by_rows with A = rows a_row0..a_row0 + 15 of a tile, its fragment loaded one k-step at a
// time (4 registers live, not D / 4: for the kernels short of registers).
template <typename Elem, int D, int kCols>
__device__ __forceinline__ void rows_by_rows(float (&acc)[kCols / 8][4], const Elem* a,
                                             int a_row0, const Elem* b, int b_row0) {
  a_by_rows<Elem, D, kCols>(acc, [&](int kk, uint32_t (&a_k)[4]) {
    load_a_fragment<D>(a_k, a, a_row0, kk);
  }, b, b_row0);
}

// acc (16 x kN fp32, C layout) += P B: P (16 x kK) from fp32 accumulators (C layout: those of
// k-step kk are P's n-tiles 2 kk and 2 kk + 1, repacked as its A fragment), B = rows
// b_row0.. (kK of them) of a tile of D-element rows, swizzled, columns 8 c0.. (kN of them):
// V for O += P V, dO for dV += P^T dO, Q for dK += dS^T Q, K for dQ += dS K. Lane l gives
// B row b_row0 + 16 kk + 8 ((l / 8) % 2) + l % 8, chunk c0 + 2 dp + l / 16 (.trans).
template <typename Elem, int D, int kK, int kN = D>
__device__ __forceinline__ void add_accumulators_by_rows(float (&acc)[kN / 8][4],
                                                         const float (&p)[kK / 8][4],
                                                         const Elem* b, int b_row0, int c0 = 0) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    const uint32_t a[4] = {pack2<Elem>(p[2 * kk][0], p[2 * kk][1]),
                           pack2<Elem>(p[2 * kk][2], p[2 * kk][3]),
                           pack2<Elem>(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                           pack2<Elem>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int dp = 0; dp < kN / 16; ++dp) {
      uint32_t f[4];
      ldmatrix<4, true>(f, b + swizzled<D>(b_row0 + 16 * kk + 8 * ((lane / 8) % 2) + lane % 8,
                                           c0 + 2 * dp + lane / 16));
      const uint32_t b0[2] = {f[0], f[1]}, b1[2] = {f[2], f[3]};
      mma_m16n8k16<Elem>(acc[2 * dp], a, b0);
      mma_m16n8k16<Elem>(acc[2 * dp + 1], a, b1);
    }
  }
}

// Dropout bits of a tile in the row layout (rows[r] = the lane's rows g and g + 8, keys k0 +
// 8n + 2t + e % 2 in its n-tile n): keep[r] bit 4n + 2 (t % 2) + e % 2 says whether (rows[r],
// that key) is kept. Lane t of a quad decides keys k0 + 8n + 4 (t % 2) .. + 3 of row
// rows[t / 2] for each n (nibble n of `mine`): one Philox call per 4 keys.
template <int kKeyTiles, typename Row>
__device__ __forceinline__ void row_dropout_bits(uint32_t (&keep)[2], const DropoutArgs& dropout,
                                                 int64_t bh, int64_t T, const Row (&rows)[2],
                                                 int64_t k0) {
  static_assert(kKeyTiles <= 8, "one nibble per n-tile in 32 bits");
  const int lane = threadIdx.x % 32, t = lane % 4;
  const int64_t row_index = bh * T + (t < 2 ? rows[0] : rows[1]);  // not rows[t / 2]: a
  uint32_t mine = 0;                                                // dynamic index
#pragma unroll
  for (int n = 0; n < kKeyTiles; ++n) {
    mine |= dropout_keep4(dropout.seed, dropout.offset, row_index, (k0 + 8 * n) / 4 + t % 2, T,
                          dropout.threshold) << (4 * n);
  }
  const int quad = lane & ~3;
  keep[0] = __shfl_sync(kFullMask, mine, quad + t / 2);
  keep[1] = __shfl_sync(kFullMask, mine, quad + 2 + t / 2);
}

// Whether element (n, e) of a row-layout tile is kept (see row_dropout_bits).
__device__ __forceinline__ bool row_kept(const uint32_t (&keep)[2], int n, int e) {
  const int t = threadIdx.x % 4;
  return (keep[e / 2] >> (4 * n + 2 * (t % 2) + e % 2)) & 1u;
}

// Dropout bits of a tile in the transposed layout (the lane's keys key0 + g and key0 + g + 8
// as rows, query rows q0 + 8n + 2t + e % 2 as columns): keep[e] bit 4n + g % 4 says whether
// element (n, e) is kept. Lane l decides keys key0 + 4 (l / 8) .. + 3 of query row q0 + 8n +
// l % 8 for each n; the lane holding (key, query) takes the bits from lane 8 (key / 4) + its
// column, for its 4 (key, column) pairs.
template <int kQueryTiles>
__device__ __forceinline__ void transposed_dropout_bits(uint32_t (&keep)[4],
                                                        const DropoutArgs& dropout, int64_t bh,
                                                        int64_t T, int64_t key0, int64_t q0) {
  static_assert(kQueryTiles <= 8, "one nibble per n-tile in 32 bits");
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  uint32_t mine = 0;
#pragma unroll
  for (int n = 0; n < kQueryTiles; ++n) {
    mine |= dropout_keep4(dropout.seed, dropout.offset, bh * T + q0 + 8 * n + lane % 8,
                          key0 / 4 + lane / 8, T, dropout.threshold) << (4 * n);
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    keep[e] = __shfl_sync(kFullMask, mine, 8 * (g / 4 + 2 * (e / 2)) + 2 * t + e % 2);
  }
}

// Stores rows row0 + g (+ 8) of a 16 x D fp32 accumulator (C layout) times `factor` as Elem
// into a (rows, D) contiguous head `dst`, rows < T only: 4-byte stores.
template <typename Elem, int D>
__device__ __forceinline__ void store_rows(Elem* dst, const float (&acc)[D / 8][4], int64_t row0,
                                           int64_t T, const float (&factor)[2]) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = row0 + g + 8 * r;
    if (row >= T) continue;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      *reinterpret_cast<uint32_t*>(dst + row * D + 8 * n + 2 * t) =
          pack2<Elem>(acc[n][2 * r] * factor[r], acc[n][2 * r + 1] * factor[r]);
    }
  }
}

template <typename Elem, int D>
constexpr int forward_mma_smem() {  // Q, K x 2, V x 2
  return (kMmaRows + 4 * kMmaKeys) * D * sizeof(Elem);
}

// q, k, v: (B, H, T, D) 16-bit with the given layouts (16-byte aligned rows); out: (B*H, T,
// D) contiguous; lse: (B*H, T) fp32. grid: (B*H, ceil(T / kMmaRows)); block: kMmaWarps * 32;
// shared: forward_mma_smem<Elem, D>().
template <typename Elem, int D>
__global__ void __launch_bounds__(kMmaWarps * 32, D <= 64 ? 2 : 1)
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
  copy_kv_tile_async<D, kThreads>(k_s, v_s, 0, k_head, k_layout.row_stride, v_head,
                                  v_layout.row_stride, 0, T);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  uint32_t q_frag[kSteps][4];  // the warp's 16 rows of Q, loaded once
  load_a_fragments<D>(q_frag, q_s, warp * 16);

  // rows and keys fit in 32 bits (T < 2^31; the host checks): fewer registers than int64
  const int first_row = static_cast<int>(q0) + warp * 16;
  const int rows[2] = {first_row + g, first_row + g + 8};  // this lane's rows
  const float scale_log2 = scale * kLog2e;  // scores in log2 units: exp2f(s - m)
  float o[kDTiles][4];
#pragma unroll
  for (int n = 0; n < kDTiles; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY};  // running max of the scaled scores (log2 units)
  float l[2] = {0.0f, 0.0f};            // this lane's part of the running sum

  stream_kv_tiles<D, kThreads, int>(k_s, v_s, k_head, k_layout.row_stride, v_head,
                                    v_layout.row_stride, tiles, T,
                                    [&](int k0, const Elem* k_t, const Elem* v_t) {
    if (k0 <= first_row + 15) {  // warp-uniform: some key of the tile is in a row's past
      uint32_t keep[2] = {0, 0};  // first, while S's registers are free
      if (dropout.enabled) row_dropout_bits<kKeyTiles>(keep, dropout, bh, T, rows, k0);
      float s[kKeyTiles][4];
      fragments_by_rows<Elem, D, kMmaKeys>(s, q_frag, k_t, 0);  // S = Q K^T
      // scale; the causal mask where the tile reaches past the warp's first row
      const bool diagonal = k0 + kMmaKeys - 1 > first_row;
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = k0 + 8 * n + 2 * t + e % 2;
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
          if (dropout.enabled) {
            s[n][e] = row_kept(keep, n, e) ? s[n][e] * dropout.keep_scale : 0.0f;
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
      add_accumulators_by_rows<Elem, D, kMmaKeys>(o, s, v_t, 0);  // O += P V
    }
  });

  // out = O / l, lse = m ln 2 + ln l, for the rows < T
  float inv_l[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(kFullMask, l[r], 1);
    l[r] += __shfl_xor_sync(kFullMask, l[r], 2);
    inv_l[r] = 1.0f / l[r];
    if (t == 0 && rows[r] < T) lse[bh * T + rows[r]] = m[r] * kLn2 + logf(l[r]);
  }
  store_rows<Elem, D>(out + bh * T * D, o, first_row, T, inv_l);
}

// --- the backward ---

__device__ __forceinline__ float as_float(float x) { return x; }
__device__ __forceinline__ float as_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float as_float(__nv_bfloat16 x) { return __bfloat162float(x); }

constexpr int kDrThreads = 256;

// dr[bh * T + row] = sum_d dO[row, d] O[row, d] (fp32) for the B*H*T rows, and (dq_accum not
// null) the fp32 accumulator dq_accum (B*H, T, D) zeroed. A 16-byte chunk of a row per
// thread, the row's D / kPerChunk lanes summed by shuffles.
// grad_out: (B, H, T, D) with its layout; out: (B*H, T, D) contiguous; both Elem (fp32, bf16,
// fp16). grid: ceil(B*H*T * D / kPerChunk / kDrThreads); block: kDrThreads.
template <typename Elem, int D>
__global__ void __launch_bounds__(kDrThreads)
attention_backward_dr_kernel(const Elem* __restrict__ grad_out, HeadLayout grad_out_layout,
                             const Elem* __restrict__ out, float* __restrict__ dr,
                             float* __restrict__ dq_accum, int64_t rows, int64_t T) {
  constexpr int kPerChunk = 16 / sizeof(Elem);
  constexpr int kLanesPerRow = D / kPerChunk;  // 4 .. 32: a power of two dividing 32
  const int64_t index = static_cast<int64_t>(blockIdx.x) * kDrThreads + threadIdx.x;
  const int64_t row = index / kLanesPerRow;
  const int c = static_cast<int>(index % kLanesPerRow) * kPerChunk;
  float sum = 0.0f;
  if (row < rows) {
    const int64_t bh = row / T, r = row % T;
    const int4 go = *reinterpret_cast<const int4*>(
        grad_out + grad_out_layout.offset(bh) + r * grad_out_layout.row_stride + c);
    const int4 o = *reinterpret_cast<const int4*>(out + row * D + c);
    const Elem* go_e = reinterpret_cast<const Elem*>(&go);
    const Elem* o_e = reinterpret_cast<const Elem*>(&o);
#pragma unroll
    for (int i = 0; i < kPerChunk; ++i) sum = fmaf(as_float(go_e[i]), as_float(o_e[i]), sum);
    if (dq_accum != nullptr) {
      const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
      for (int i = 0; i < kPerChunk; i += 4) {
        *reinterpret_cast<float4*>(dq_accum + row * D + c + i) = zero;
      }
    }
  }
#pragma unroll
  for (int offset = kLanesPerRow / 2; offset > 0; offset /= 2) {
    sum += __shfl_xor_sync(kFullMask, sum, offset);
  }
  if (row < rows && c == 0) dr[row] = sum;
}

// dq (n elements, Elem) = dq_accum (fp32): 8 elements per thread (n % 8 == 0).
// grid: ceil(n / 8 / kDrThreads); block: kDrThreads.
template <typename Elem>
__global__ void __launch_bounds__(kDrThreads)
attention_backward_dq_convert_kernel(const float* __restrict__ dq_accum, Elem* __restrict__ dq,
                                     int64_t n) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * kDrThreads + threadIdx.x) * 8;
  if (i >= n) return;
  const float4 a = *reinterpret_cast<const float4*>(dq_accum + i);
  const float4 b = *reinterpret_cast<const float4*>(dq_accum + i + 4);
  const uint4 packed = make_uint4(pack2<Elem>(a.x, a.y), pack2<Elem>(a.z, a.w),
                                  pack2<Elem>(b.x, b.y), pack2<Elem>(b.z, b.w));
  *reinterpret_cast<uint4*>(dq + i) = packed;
}

constexpr int kBwdWarps = 4;
constexpr int kBwdKeys = 16 * kBwdWarps;  // keys per dK/dV block: 16 per warp
// The query rows per step of the dK/dV walk (D = 128: fewer, for registers).
template <int D>
constexpr int backward_query_rows() {
  return D <= 64 ? 64 : 32;
}

// K, V; Q and dO double-buffered; dS^T (keys x queries); lse and Dr double-buffered
template <typename Elem, int D>
constexpr int backward_dkdv_mma_smem() {
  return (2 * kBwdKeys * D + (4 * D + kBwdKeys) * backward_query_rows<D>()) * sizeof(Elem) +
         4 * backward_query_rows<D>() * sizeof(float);
}

// dK, dV and (dq_accum not null) dQ by fp32 atomicAdd into dq_accum (zeroed), scale
// included. q, k, v, grad_out: (B, H, T, D) with their layouts; lse, dr: (B*H, T) fp32;
// dk, dv: (B*H, T, D) contiguous. grid: (B*H, ceil(T / kBwdKeys)), the first key tiles (the
// heaviest: every query row sees them) first; block: kBwdWarps * 32; shared:
// backward_dkdv_mma_smem<Elem, D>().
template <typename Elem, int D>
__global__ void __launch_bounds__(kBwdWarps * 32, 1)
attention_backward_dkdv_mma_kernel(const Elem* __restrict__ q, HeadLayout q_layout,
                                   const Elem* __restrict__ k, HeadLayout k_layout,
                                   const Elem* __restrict__ v, HeadLayout v_layout,
                                   const Elem* __restrict__ grad_out, HeadLayout grad_out_layout,
                                   const float* __restrict__ lse, const float* __restrict__ dr,
                                   float* __restrict__ dq_accum, Elem* __restrict__ dk,
                                   Elem* __restrict__ dv, int64_t T, float scale,
                                   DropoutArgs dropout) {
  constexpr int kThreads = kBwdWarps * 32;
  constexpr int kQ = backward_query_rows<D>();
  constexpr int kQTiles = kQ / 8;              // n-tiles of S^T and dP^T
  constexpr int kRowGroups = kQ / 16;          // dQ: 16-row groups of the query tile ...
  constexpr int kColSplits = kBwdWarps / kRowGroups;  // ... times column slices: a warp each
  constexpr int kDqCols = D / kColSplits;
  static_assert(2 * kQ <= kThreads, "a thread per lse and Dr value");
  FASTGPT_DYNAMIC_SHARED(smem);
  Elem* k_s = reinterpret_cast<Elem*>(smem);
  Elem* v_s = k_s + kBwdKeys * D;
  Elem* q_s = v_s + kBwdKeys * D;    // 2 buffers of kQ x D
  Elem* do_s = q_s + 2 * kQ * D;     // 2 buffers of kQ x D
  Elem* ds_s = do_s + 2 * kQ * D;    // dS^T: kBwdKeys x kQ, swizzled rows of kQ elements
  // lse (log2 units) and Dr of the tile's query rows, 2 buffers of [lse (kQ), Dr (kQ)]
  float* lse_s = reinterpret_cast<float*>(ds_s + kBwdKeys * kQ);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t bh = blockIdx.x;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kBwdKeys;
  const int64_t q_begin = k0 / kQ * kQ;  // query tiles before it see none of the keys
  const int tiles = static_cast<int>((T - q_begin + kQ - 1) / kQ);
  const Elem* q_head = q + q_layout.offset(bh);
  const Elem* do_head = grad_out + grad_out_layout.offset(bh);
  // thread i < kQ loads lse of query row i of a tile, kQ <= i < 2 kQ its Dr
  const auto lse_or_dr = [&](int64_t q0) {
    const int64_t row = q0 + threadIdx.x % kQ;
    if (threadIdx.x < kQ) return row < T ? lse[bh * T + row] * kLog2e : INFINITY;  // P = 0
    return row < T ? dr[bh * T + row] : 0.0f;
  };

  copy_tile_async<D, kBwdKeys, kThreads>(k_s, k + k_layout.offset(bh), k_layout.row_stride, k0,
                                         T);
  copy_tile_async<D, kBwdKeys, kThreads>(v_s, v + v_layout.offset(bh), v_layout.row_stride, k0,
                                         T);
  copy_tile_async<D, kQ, kThreads>(q_s, q_head, q_layout.row_stride, q_begin, T);
  copy_tile_async<D, kQ, kThreads>(do_s, do_head, grad_out_layout.row_stride, q_begin, T);
  cp_async_commit();
  if (threadIdx.x < 2 * kQ) lse_s[threadIdx.x] = lse_or_dr(q_begin);
  cp_async_wait<0>();
  __syncthreads();

  const int64_t key0 = k0 + warp * 16;  // the warp's keys: key0 + g, key0 + g + 8
  const int64_t keys[2] = {key0 + g, key0 + g + 8};
  const float scale_log2 = scale * kLog2e;
  float dk_acc[D / 8][4], dv_acc[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk_acc[n][e] = dv_acc[n][e] = 0.0f;
  }

  for (int tile = 0; tile < tiles; ++tile) {
    const int64_t q0 = q_begin + static_cast<int64_t>(tile) * kQ;
    const int buf = tile % 2;
    const Elem* q_t = q_s + buf * kQ * D;
    const Elem* do_t = do_s + buf * kQ * D;
    const float* lse_t = lse_s + buf * 2 * kQ;
    const float* dr_t = lse_t + kQ;
    float next = 0.0f;  // this thread's lse or Dr of the next tile, stored after the products
    if (tile + 1 < tiles) {
      copy_tile_async<D, kQ, kThreads>(q_s + (1 - buf) * kQ * D, q_head, q_layout.row_stride,
                                       q0 + kQ, T);
      copy_tile_async<D, kQ, kThreads>(do_s + (1 - buf) * kQ * D, do_head,
                                       grad_out_layout.row_stride, q0 + kQ, T);
      cp_async_commit();
      if (threadIdx.x < 2 * kQ) next = lse_or_dr(q0 + kQ);
    }
    if (q0 + kQ - 1 >= key0) {  // warp-uniform: some query row sees one of the warp's keys
      uint32_t keep[4] = {0, 0, 0, 0};
      if (dropout.enabled) transposed_dropout_bits<kQTiles>(keep, dropout, bh, T, key0, q0);
      float s[kQTiles][4], dp[kQTiles][4];
      rows_by_rows<Elem, D, kQ>(s, k_s, warp * 16, q_t, 0);    // S^T = K Q^T
      rows_by_rows<Elem, D, kQ>(dp, v_s, warp * 16, do_t, 0);  // dP^T = V dO^T
      const bool diagonal = q0 < key0 + 15;  // some (key, query) pair in the query's future
#pragma unroll
      for (int n = 0; n < kQTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = 8 * n + 2 * t + e % 2;  // query row q0 + col
          const bool future = diagonal && keys[e / 2] > q0 + col;
          const float p = future ? 0.0f : exp2f(s[n][e] * scale_log2 - lse_t[col]);
          float p_dropped = p, dp_dropped = dp[n][e];
          if (dropout.enabled) {
            const bool kept = (keep[e] >> (4 * n + g % 4)) & 1u;
            p_dropped = kept ? p * dropout.keep_scale : 0.0f;
            dp_dropped = kept ? dp_dropped * dropout.keep_scale : 0.0f;
          }
          s[n][e] = p_dropped;                    // P^T, dropped
          dp[n][e] = p * (dp_dropped - dr_t[col]);  // dS^T
        }
      }
      add_accumulators_by_rows<Elem, D, kQ>(dv_acc, s, do_t, 0);  // dV += P^T dO
      add_accumulators_by_rows<Elem, D, kQ>(dk_acc, dp, q_t, 0);  // dK += dS^T Q
      if (dq_accum != nullptr) {  // dS^T's rows of the warp's keys, for dQ below
#pragma unroll
        for (int n = 0; n < kQTiles; ++n) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            *reinterpret_cast<uint32_t*>(ds_s + swizzled<kQ>(warp * 16 + g + 8 * r, n) + 2 * t) =
                pack2<Elem>(dp[n][2 * r], dp[n][2 * r + 1]);
          }
        }
      }
    } else if (dq_accum != nullptr) {  // no query row sees these keys: dS^T = 0
#pragma unroll
      for (int n = 0; n < kQTiles; ++n) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          *reinterpret_cast<uint32_t*>(ds_s + swizzled<kQ>(warp * 16 + g + 8 * r, n) + 2 * t) = 0;
        }
      }
    }
    if (dq_accum != nullptr) {
      __syncthreads();  // every warp's rows of dS^T
      // dQ (query rows 16 rg.., columns c0..c0 + kDqCols) += dS K: dS's A fragment from dS^T
      // by ldmatrix.trans (lane l gives dS^T row 16 kk + 8 (l / 16) + l % 8, chunk 2 rg +
      // (l / 8) % 2), K by ldmatrix.trans from its rows
      const int rg = warp % kRowGroups, c0 = (warp / kRowGroups) * kDqCols;
      float dq[kDqCols / 8][4];
#pragma unroll
      for (int n = 0; n < kDqCols / 8; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < kBwdKeys / 16; ++kk) {
        uint32_t a[4];
        ldmatrix<4, true>(a, ds_s + swizzled<kQ>(16 * kk + 8 * (lane / 16) + lane % 8,
                                                 2 * rg + (lane / 8) % 2));
#pragma unroll
        for (int dp2 = 0; dp2 < kDqCols / 16; ++dp2) {
          uint32_t f[4];
          ldmatrix<4, true>(f, k_s + swizzled<D>(16 * kk + 8 * ((lane / 8) % 2) + lane % 8,
                                                 c0 / 8 + 2 * dp2 + lane / 16));
          const uint32_t b0[2] = {f[0], f[1]}, b1[2] = {f[2], f[3]};
          mma_m16n8k16<Elem>(dq[2 * dp2], a, b0);
          mma_m16n8k16<Elem>(dq[2 * dp2 + 1], a, b1);
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t row = q0 + 16 * rg + g + 8 * r;
        if (row >= T) continue;
        float* dst = dq_accum + (bh * T + row) * D + c0 + 2 * t;
#pragma unroll
        for (int n = 0; n < kDqCols / 8; ++n) {
          atomicAdd(dst + 8 * n, dq[n][2 * r] * scale);
          atomicAdd(dst + 8 * n + 1, dq[n][2 * r + 1] * scale);
        }
      }
    }
    if (tile + 1 < tiles) {
      if (threadIdx.x < 2 * kQ) lse_s[(1 - buf) * 2 * kQ + threadIdx.x] = next;
      cp_async_wait<0>();
      __syncthreads();  // the next tile visible to all; this one (and dS^T) consumed by all
    }
  }
  const float dk_factor[2] = {scale, scale}, dv_factor[2] = {1.0f, 1.0f};
  store_rows<Elem, D>(dk + bh * T * D, dk_acc, key0, T, dk_factor);
  store_rows<Elem, D>(dv + bh * T * D, dv_acc, key0, T, dv_factor);
}

constexpr int kDqWarps = 4;
constexpr int kDqRows = 16 * kDqWarps;  // query rows per deterministic dQ block

template <typename Elem, int D>
constexpr int backward_dq_mma_smem() {  // Q, dO, K x 2, V x 2
  return (2 * kDqRows + 4 * kMmaKeys) * D * sizeof(Elem);
}

// dQ without atomics (the deterministic backward): the forward's layout, a block per
// kDqRows query rows walking the K/V tiles up to the diagonal; S = Q K^T, dP = dO V^T,
// dS = P (dP - Dr) and dQ += dS K in registers (Q's and dO's fragments reloaded from shared
// memory per tile: kept, they would not fit in the registers at D = 128); dq (B*H, T, D) contiguous Elem, stored
// once. grid: (B*H, ceil(T / kDqRows)), heaviest first; block: kDqWarps * 32; shared:
// backward_dq_mma_smem<Elem, D>().
template <typename Elem, int D>
__global__ void __launch_bounds__(kDqWarps * 32, 1)
attention_backward_dq_mma_kernel(const Elem* __restrict__ q, HeadLayout q_layout,
                                 const Elem* __restrict__ k, HeadLayout k_layout,
                                 const Elem* __restrict__ v, HeadLayout v_layout,
                                 const Elem* __restrict__ grad_out, HeadLayout grad_out_layout,
                                 const float* __restrict__ lse, const float* __restrict__ dr,
                                 Elem* __restrict__ dq, int64_t T, float scale,
                                 DropoutArgs dropout) {
  constexpr int kThreads = kDqWarps * 32;
  constexpr int kKeys = D <= 64 ? kMmaKeys : kMmaKeys / 2;  // per step (D = 128: registers)
  constexpr int kKeyTiles = kKeys / 8;
  FASTGPT_DYNAMIC_SHARED(smem);
  Elem* q_s = reinterpret_cast<Elem*>(smem);
  Elem* do_s = q_s + kDqRows * D;
  Elem* k_s = do_s + kDqRows * D;  // two buffers of kMmaKeys x D
  Elem* v_s = k_s + 2 * kMmaKeys * D;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t bh = blockIdx.x;
  const int64_t q0 = (static_cast<int64_t>(gridDim.y) - 1 - blockIdx.y) * kDqRows;
  const int64_t q_end = q0 + kDqRows < T ? q0 + kDqRows : T;
  const int tiles = static_cast<int>((q_end - 1) / kMmaKeys) + 1;
  const Elem* k_head = k + k_layout.offset(bh);
  const Elem* v_head = v + v_layout.offset(bh);

  copy_tile_async<D, kDqRows, kThreads>(q_s, q + q_layout.offset(bh), q_layout.row_stride, q0, T);
  copy_tile_async<D, kDqRows, kThreads>(do_s, grad_out + grad_out_layout.offset(bh),
                                        grad_out_layout.row_stride, q0, T);
  copy_kv_tile_async<D, kThreads>(k_s, v_s, 0, k_head, k_layout.row_stride, v_head,
                                  v_layout.row_stride, 0, T);
  cp_async_commit();
  const int64_t first_row = q0 + warp * 16;
  const int64_t rows[2] = {first_row + g, first_row + g + 8};
  float row_lse[2], row_dr[2];  // lse in log2 units; rows past T: P = 0
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_lse[r] = rows[r] < T ? lse[bh * T + rows[r]] * kLog2e : INFINITY;
    row_dr[r] = rows[r] < T ? dr[bh * T + rows[r]] : 0.0f;
  }
  cp_async_wait<0>();
  __syncthreads();

  const float scale_log2 = scale * kLog2e;
  float dq_acc[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) dq_acc[n][0] = dq_acc[n][1] = dq_acc[n][2] = dq_acc[n][3] = 0.0f;
  stream_kv_tiles<D, kThreads, int64_t>(k_s, v_s, k_head, k_layout.row_stride, v_head,
                                        v_layout.row_stride, tiles, T,
                                        [&](int64_t k0, const Elem* k_t, const Elem* v_t) {
#pragma unroll
    for (int part = 0; part < kMmaKeys / kKeys; ++part) {  // the tile kKeys keys at a time
      const int64_t key0 = k0 + part * kKeys;
      if (key0 > first_row + 15) break;  // warp-uniform: these keys are in every row's future
      uint32_t keep[2] = {0, 0};
      if (dropout.enabled) row_dropout_bits<kKeyTiles>(keep, dropout, bh, T, rows, key0);
      float s[kKeyTiles][4], dp[kKeyTiles][4];
      rows_by_rows<Elem, D, kKeys>(s, q_s, warp * 16, k_t, part * kKeys);    // S = Q K^T
      rows_by_rows<Elem, D, kKeys>(dp, do_s, warp * 16, v_t, part * kKeys);  // dP = dO V^T
      const bool diagonal = key0 + kKeys - 1 > first_row;
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t key = key0 + 8 * n + 2 * t + e % 2;
          const bool future = diagonal && key > rows[e / 2];
          const float p = future ? 0.0f : exp2f(s[n][e] * scale_log2 - row_lse[e / 2]);
          float dp_dropped = dp[n][e];
          if (dropout.enabled) dp_dropped = row_kept(keep, n, e) ? dp_dropped * dropout.keep_scale : 0.0f;
          s[n][e] = p * (dp_dropped - row_dr[e / 2]);  // dS
        }
      }
      add_accumulators_by_rows<Elem, D, kKeys>(dq_acc, s, k_t, part * kKeys);  // dQ += dS K
    }
  });
  const float factor[2] = {scale, scale};
  store_rows<Elem, D>(dq + bh * T * D, dq_acc, first_row, T, factor);
}

}  // namespace
}  // namespace fastgpt
