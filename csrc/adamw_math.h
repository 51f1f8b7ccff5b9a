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

#include "host_device.h"

using std::pow;
using std::sqrt;


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

// Computed in double (as torch does with its Python-float scalars), on the host, or on the
// device when lr and step live in GPU memory (a CUDA-graph-capturable step).
template <typename Real>
FASTGPT_HD AdamWScalars adamw_scalars(Real lr, Real beta1, Real beta2, Real eps,
                                      Real weight_decay, Real step) {
  AdamWScalars s;
  s.decay = static_cast<float>(Real(1) - lr * weight_decay);
  s.one_minus_beta1 = static_cast<float>(Real(1) - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(Real(1) - beta2);
  s.neg_step_size = static_cast<float>(-lr / (Real(1) - pow(beta1, step)));
  s.bias_correction2_sqrt = static_cast<float>(sqrt(Real(1) - pow(beta2, step)));
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
