// What the attention kernels of every version share: the dynamic shared memory's
// declaration and the dropout arguments of one call.
#pragma once

#include <cstdint>

// The block's dynamic shared memory, 128-byte aligned (a macro: the CPU emulation supplies its
// own).
#ifndef FASTGPT_DYNAMIC_SHARED
#define FASTGPT_DYNAMIC_SHARED(name) extern __shared__ __align__(128) unsigned char name[]
#endif

namespace fastgpt {
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
