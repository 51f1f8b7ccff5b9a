// What the attention kernels of every version share: the dynamic shared memory's
// declaration, the rule for opting in to more of it, and the dropout arguments of one call.
#pragma once

#include <cstdint>

// The block's dynamic shared memory, 128-byte aligned (a macro: the CPU emulation supplies its
// own).
#ifndef FASTGPT_DYNAMIC_SHARED
#define FASTGPT_DYNAMIC_SHARED(name) extern __shared__ __align__(128) unsigned char name[]
#endif

namespace fastgpt {

// The shared memory a block may use without opting in, static and dynamic together (every
// GPU since Volta); past it a launch fails unless the kernel's
// cudaFuncAttributeMaxDynamicSharedMemorySize allows its dynamic part.
constexpr int kDefaultSharedMemoryPerBlock = 48 * 1024;

// The cudaFuncAttributeMaxDynamicSharedMemorySize a kernel with `static_bytes` of static
// shared memory needs for a launch with `dynamic_bytes` of dynamic shared memory; 0 when the
// default suffices. (On sm_90 ptxas gives every kernel that uses shared memory 1 KiB of
// static: a 48 KiB dynamic launch is then over the default.)
inline int dynamic_shared_memory_opt_in(int static_bytes, int dynamic_bytes) {
  return static_bytes + dynamic_bytes > kDefaultSharedMemoryPerBlock ? dynamic_bytes : 0;
}

namespace {

constexpr unsigned kFullMask = 0xffffffffu;

// One call's dropout (csrc/philox.h): the probabilities of row bh * T + i are kept or
// dropped by dropout_keep4 / dropout_keep.
struct DropoutArgs {
  uint64_t seed, offset;
  uint32_t threshold;  // a probability is kept when its Philox word is >= this
  float keep_scale;    // 1 / (1 - p)
  bool enabled;
};

}  // namespace
}  // namespace fastgpt
