// The AdamW step on the CPU: the same per-element update as the CUDA kernel
// (adamw_math.h), so that CI can test the GPU's arithmetic against torch.optim.AdamW.
#include "adamw.h"
#include "adamw_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

namespace fastgpt {

void adamw_step_cpu(const AdamWStep& s) {
  // Tensor-held lr / step (the capturable path) replace the plain ones; all in double.
  const double lr = s.lr_tensor ? static_cast<double>(s.lr_tensor->item<float>()) : s.lr;
  const double step = s.step_tensor ? static_cast<double>(s.step_tensor->item<float>())
                                    : static_cast<double>(s.step);
  const AdamWScalars scalars =
      adamw_scalars<double>(lr, s.beta1, s.beta2, s.eps, s.weight_decay, step);
  const float scale = s.grad_scale.has_value() ? s.grad_scale->item<float>() : 1.0f;
  for (size_t t = 0; t < s.params.size(); ++t) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.params[t].scalar_type(),
                                    "adamw_step_cpu", [&] {
      scalar_t* p = s.params[t].data_ptr<scalar_t>();
      const scalar_t* g = s.grads[t].data_ptr<scalar_t>();
      float* m = s.exp_avgs[t].data_ptr<float>();
      float* v = s.exp_avg_sqs[t].data_ptr<float>();
      at::parallel_for(0, s.params[t].numel(), 2048, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          float p_i = static_cast<float>(p[i]);
          adamw_update(p_i, static_cast<float>(g[i]) * scale, m[i], v[i], scalars);
          p[i] = static_cast<scalar_t>(p_i);
        }
      });
    });
  }
}

}  // namespace fastgpt
