// The warp-level tensor-core and copy instructions the bf16/fp16 attention kernels use, as
// PTX (sm_80 and later): mma.sync m16n8k16 with fp32 accumulation, ldmatrix (x1/x2/x4, with
// .trans) and cp.async with commit/wait groups. The CPU run (tests/cuda_on_cpu/) defines
// FASTGPT_WARP_PRIMITIVES_ON_CPU and supplies functions of the same names that follow the
// PTX ISA lane by lane, so that a fragment-layout mistake fails on the CPU too.
//
// Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16"), for lane l of a warp, with
// g = l / 4 (the group) and t = l % 4 (the thread in the group); a register holds two 16-bit
// elements, the lower column (or k) in its low half:
//   A (16 x 16, row major): a[0] = A(g, 2t..2t+1), a[1] = A(g+8, 2t..), a[2] = A(g, 2t+8..),
//                           a[3] = A(g+8, 2t+8..);
//   B (16 x 8, "col"):      b[0] = B(2t..2t+1, g), b[1] = B(2t+8..2t+9, g);
//   C, D (16 x 8, fp32):    c[0], c[1] = C(g, 2t), C(g, 2t+1); c[2], c[3] = C(g+8, 2t..).
// ldmatrix .x4: lanes 8i..8i+7 give the addresses of rows 0..7 of 8x8 matrix i (16 bytes
// each, 16-byte aligned, in shared memory); lane l receives r[i] = matrix i's (row g,
// columns 2t..2t+1), or with .trans its (rows 2t..2t+1, column g). .x2 takes lanes 0..15's
// addresses, .x1 lanes 0..7's.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace fastgpt {

// Two fp32 values as one register of two 16-bit elements, `low` in the low half.
template <typename Elem>
__device__ __forceinline__ uint32_t pack2(float low, float high) {
  uint32_t lo, hi;
  if constexpr (std::is_same_v<Elem, __nv_bfloat16>) {
    lo = __bfloat16_as_ushort(__float2bfloat16(low));
    hi = __bfloat16_as_ushort(__float2bfloat16(high));
  } else {
    lo = __half_as_ushort(__float2half(low));
    hi = __half_as_ushort(__float2half(high));
  }
  return lo | (hi << 16);
}

#ifndef FASTGPT_WARP_PRIMITIVES_ON_CPU

// acc (16 x 8 fp32, C layout) += a (16 x 16, A layout) * b (16 x 8, B layout).
template <typename Elem>
__device__ __forceinline__ void mma_m16n8k16(float (&acc)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<Elem, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    static_assert(std::is_same_v<Elem, __half>, "mma_m16n8k16: bf16 or fp16");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// r[i] = this lane's part of 8x8 matrix i (of kMatrices = 1, 2 or 4), whose rows' addresses
// the lanes give in `row` (see above); kTrans: of its transpose.
template <int kMatrices, bool kTrans>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[kMatrices], const void* row) {
  const uint32_t address = shared_address(row);
  if constexpr (kMatrices == 4 && !kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
  } else if constexpr (kMatrices == 4) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
  } else if constexpr (kMatrices == 2 && !kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(address));
  } else if constexpr (kMatrices == 2) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(address));
  } else if constexpr (!kTrans) {
    static_assert(kMatrices == 1, "ldmatrix: 1, 2 or 4 matrices");
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0]) : "r"(address));
  } else {
    static_assert(kMatrices == 1, "ldmatrix: 1, 2 or 4 matrices");
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0]) : "r"(address));
  }
}

// Starts copying 16 bytes from global `src` to shared `dst` (both 16-byte aligned), or 16
// zero bytes if !from_src (src is then not read). The copy lands at the cp_async_wait that
// covers the group it was committed in.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool from_src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :: "r"(shared_address(dst)), "l"(src), "r"(from_src ? 16 : 0));
}

// Closes the group of the copies this thread started since the last commit.
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::);
}

// Waits until at most kPending of this thread's committed groups are still in flight (their
// copies are visible to this thread; a __syncthreads makes them visible to the others).
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" :: "n"(kPending) : "memory");
}

#endif  // FASTGPT_WARP_PRIMITIVES_ON_CPU

}  // namespace fastgpt
