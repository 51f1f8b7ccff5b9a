// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): a
// counter-based generator, so any element's random number is a pure function of (seed,
// offset, index). The attention kernels use it for dropout and regenerate the very same
// mask in the backward; the CPU build runs the same code for the tests (which check it
// against Random123's known-answer vectors).
#pragma once

#include <cstdint>

#include "host_device.h"


namespace fastgpt {

struct Uint4 {
  uint32_t x, y, z, w;
};

// 10 rounds of Philox4x32 on counter c with key (k0, k1).
FASTGPT_HD Uint4 philox4x32_10(Uint4 c, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kMul0) * c.x;
    const uint64_t p1 = static_cast<uint64_t>(kMul1) * c.z;
    c = Uint4{static_cast<uint32_t>(p1 >> 32) ^ c.y ^ k0, static_cast<uint32_t>(p1),
              static_cast<uint32_t>(p0 >> 32) ^ c.w ^ k1, static_cast<uint32_t>(p0)};
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return c;
}

// Dropout of the (B*H, T, T) attention probabilities for the call keyed by (seed, offset):
// row `row_index` (= bh * T + i) takes ceil(T / 4) Philox blocks, one per 4 consecutive keys,
// and key j takes word j % 4 of the block for counter (row_index * ceil(T / 4) + j / 4,
// offset). A key is kept when its word is at least threshold = p * 2^32
// (dropout_threshold), i.e. with probability 1 - p. One Philox call decides 4 keys: the
// kernels use all 4 words.

// Bit w (w = 0..3) set: key 4 * group + w of the row is kept.
FASTGPT_HD uint32_t dropout_keep4(uint64_t seed, uint64_t offset, int64_t row_index,
                                  int64_t group, int64_t T, uint32_t threshold) {
  const uint64_t block = static_cast<uint64_t>(row_index) * static_cast<uint64_t>((T + 3) / 4) +
                         static_cast<uint64_t>(group);
  const Uint4 r = philox4x32_10(
      Uint4{static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
            static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)},
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return static_cast<uint32_t>(r.x >= threshold) | static_cast<uint32_t>(r.y >= threshold) << 1 |
         static_cast<uint32_t>(r.z >= threshold) << 2 | static_cast<uint32_t>(r.w >= threshold) << 3;
}

// Whether key `key` of row `row_index` is kept (the CUDA-core kernels: one key at a time).
FASTGPT_HD bool dropout_keep(uint64_t seed, uint64_t offset, int64_t row_index, int64_t key,
                             int64_t T, uint32_t threshold) {
  return (dropout_keep4(seed, offset, row_index, key / 4, T, threshold) >> (key % 4)) & 1u;
}

// p in [0, 1) -> the word threshold below which an element is dropped.
inline uint32_t dropout_threshold(double p) {
  return static_cast<uint32_t>(p * 4294967296.0);
}

}  // namespace fastgpt
