// The attention kernels for head dim 128 (fp32, bf16, fp16; forward and backward), compiled
// in a translation unit of their own: see attention_launch.cuh.
#include "attention_launch.cuh"

namespace fastgpt {
FASTGPT_ATTENTION_HEAD_DIM(template, 128)
}  // namespace fastgpt
