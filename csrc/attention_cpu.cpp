// CPU implementations of the attention helpers that the CUDA kernels share through
// headers, so that CI tests their arithmetic: the Philox generator and the dropout mask.
#include "philox.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace fastgpt {

std::vector<int64_t> philox4x32_10_cpu(int64_t c0, int64_t c1, int64_t c2, int64_t c3,
                                       int64_t k0, int64_t k1) {
  const Uint4 r = philox4x32_10(Uint4{static_cast<uint32_t>(c0), static_cast<uint32_t>(c1),
                                      static_cast<uint32_t>(c2), static_cast<uint32_t>(c3)},
                                static_cast<uint32_t>(k0), static_cast<uint32_t>(k1));
  return {r.x, r.y, r.z, r.w};
}

at::Tensor attention_dropout_mask_cpu(int64_t seed, int64_t offset, int64_t batch_heads,
                                      int64_t seq_len, double p) {
  TORCH_CHECK(batch_heads >= 1 && seq_len >= 1, "attention_dropout_mask: batch_heads and "
              "seq_len must be at least 1, got ", batch_heads, " and ", seq_len);
  TORCH_CHECK(p >= 0.0 && p < 1.0, "attention_dropout_mask: p must be in [0, 1), got ", p);
  at::Tensor keep = at::empty({batch_heads, seq_len, seq_len}, at::kBool);
  bool* out = keep.data_ptr<bool>();
  const uint32_t threshold = dropout_threshold(p);
  for (int64_t row = 0; row < batch_heads * seq_len; ++row) {
    for (int64_t group = 0; group < (seq_len + 3) / 4; ++group) {
      const uint32_t bits = dropout_keep4(static_cast<uint64_t>(seed),
                                          static_cast<uint64_t>(offset), row, group, seq_len,
                                          threshold);
      for (int64_t key = 4 * group; key < 4 * group + 4 && key < seq_len; ++key) {
        out[row * seq_len + key] = (bits >> (key % 4)) & 1u;
      }
    }
  }
  return keep;
}

}  // namespace fastgpt
