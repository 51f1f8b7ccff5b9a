// The fused AdamW step: declarations shared by the CPU loop, the CUDA kernel and the
// bindings. Schema (registered in bindings.cpp):
//   fastgpt::adamw_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs,
//       Tensor(c!)[] exp_avg_sqs, float lr, float beta1, float beta2, float eps,
//       float weight_decay, int step, Tensor? grad_scale, Tensor? lr_tensor,
//       Tensor? step_tensor) -> ()
// params and grads: float32, bfloat16 or float16 (the same dtype per tensor pair);
// exp_avgs, exp_avg_sqs: float32; all contiguous, on one device. grad_scale: an optional
// one-element float32 tensor on that device multiplying every gradient (clipping) so the
// step needs no host sync. lr_tensor / step_tensor: optional one-element float32 tensors on
// that device that replace lr / step (the step count after this step), read by the kernel,
// so that a captured CUDA graph replays with the current values.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fastgpt {

void check_adamw_inputs(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& lr_tensor,
                        const std::optional<at::Tensor>& step_tensor,
                        c10::DeviceType device_type);

void adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, double lr, double beta1, double beta2,
                    double eps, double weight_decay, int64_t step,
                    const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& lr_tensor,
                    const std::optional<at::Tensor>& step_tensor);

void adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, double lr, double beta1, double beta2,
                     double eps, double weight_decay, int64_t step,
                     const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& lr_tensor,
                     const std::optional<at::Tensor>& step_tensor);

}  // namespace fastgpt
