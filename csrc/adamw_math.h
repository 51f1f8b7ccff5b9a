// The AdamW update of one element, shared by the CUDA kernel (adamw.cu) and the CPU loop
// (adamw_cpu.cpp), so that the CPU build tests the very arithmetic the GPU runs.
// Mirrors torch.optim.AdamW (single-tensor path), element by element:
//   p <- p * (1 - lr * wd)
//   m <- m + (1 - beta1) * (g - m)              (torch's lerp for a weight below 0.5)
//   v <- v * beta2 + (1 - beta2) * g * g
//   p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTGPT_HD __host__ __device__ __forceinline__
#else
#define FASTGPT_HD inline
#endif

namespace fastgpt {

// Per-step constants, computed once on the host in double precision (as torch does with
// its Python-float scalars) and rounded to float.
struct AdamWScalars {
  float decay;                  // 1 - lr * weight_decay
  float one_minus_beta1;        // 1 - beta1
  float beta2;
  float one_minus_beta2;        // 1 - beta2
  float neg_step_size;          // -lr / (1 - beta1^step)
  float bias_correction2_sqrt;  // sqrt(1 - beta2^step)
  float eps;
};

inline AdamWScalars adamw_scalars(double lr, double beta1, double beta2, double eps,
                                  double weight_decay, int64_t step) {
  AdamWScalars s;
  s.decay = static_cast<float>(1.0 - lr * weight_decay);
  s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.neg_step_size = static_cast<float>(-lr / (1.0 - std::pow(beta1, static_cast<double>(step))));
  s.bias_correction2_sqrt =
      static_cast<float>(std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step))));
  s.eps = static_cast<float>(eps);
  return s;
}

// One element: p, m, v updated in place; g already scaled by any gradient clipping.
FASTGPT_HD void adamw_update(float& p, float g, float& m, float& v, const AdamWScalars& s) {
  p = p * s.decay;
  m = m + s.one_minus_beta1 * (g - m);
  v = v * s.beta2 + s.one_minus_beta2 * g * g;
  const float denom = sqrtf(v) / s.bias_correction2_sqrt + s.eps;
  p = p + s.neg_step_size * (m / denom);
}

}  // namespace fastgpt
