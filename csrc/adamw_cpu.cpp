// The AdamW step on the CPU: the same per-element update as the CUDA kernel
// (adamw_math.h), so that CI can test the GPU's arithmetic against torch.optim.AdamW.
#include "adamw.h"
#include "adamw_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

namespace fastgpt {

void adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, double lr, double beta1, double beta2,
                    double eps, double weight_decay, int64_t step,
                    const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& lr_tensor,
                    const std::optional<at::Tensor>& step_tensor) {
  check_adamw_inputs(params, grads, exp_avgs, exp_avg_sqs, grad_scale, lr_tensor, step_tensor,
                     c10::DeviceType::CPU);
  // Tensor-held lr / step (the capturable path) replace the plain ones; all in double.
  const double lr_value = lr_tensor ? static_cast<double>(lr_tensor->item<float>()) : lr;
  const double step_value = step_tensor ? static_cast<double>(step_tensor->item<float>())
                                        : static_cast<double>(step);
  const AdamWScalars scalars =
      adamw_scalars<double>(lr_value, beta1, beta2, eps, weight_decay, step_value);
  const float scale = grad_scale.has_value() ? grad_scale->item<float>() : 1.0f;
  for (size_t t = 0; t < params.size(); ++t) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[t].scalar_type(),
                                    "adamw_step_cpu", [&] {
      scalar_t* p = params[t].data_ptr<scalar_t>();
      const scalar_t* g = grads[t].data_ptr<scalar_t>();
      float* m = exp_avgs[t].data_ptr<float>();
      float* v = exp_avg_sqs[t].data_ptr<float>();
      at::parallel_for(0, params[t].numel(), 2048, [&](int64_t begin, int64_t end) {
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
