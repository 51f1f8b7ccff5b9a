// The fused AdamW step: its arguments (AdamWStep) and the declarations shared by the CPU
// loop, the CUDA kernel and the bindings. Schema (registered in bindings.cpp):
//   fastgpt::adamw_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs,
//       Tensor(c!)[] exp_avg_sqs, float lr, float beta1, float beta2, float eps,
//       float weight_decay, int step, Tensor? grad_scale, Tensor? lr_tensor,
//       Tensor? step_tensor) -> ()
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fastgpt {

// One step's arguments, as the schema gives them. params and grads: float32, bfloat16 or
// float16 (the same dtype per tensor pair); exp_avgs, exp_avg_sqs: float32; all contiguous,
// on one device. grad_scale: an optional one-element float32 tensor on that device
// multiplying every gradient (clipping) so the step needs no host sync. lr_tensor /
// step_tensor: optional one-element float32 tensors on that device that replace lr / step
// (the step count after this step), read by the kernel, so that a captured CUDA graph
// replays with the current values.
struct AdamWStep {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs;
  double lr, beta1, beta2, eps, weight_decay;
  int64_t step;
  std::optional<at::Tensor> grad_scale, lr_tensor, step_tensor;
};

// Fails with a one-line message unless the tensors are as AdamWStep says, on device_type.
void check_adamw_inputs(const AdamWStep& s, c10::DeviceType device_type);

void adamw_step_cpu(const AdamWStep& s);   // adamw_cpu.cpp
void adamw_step_cuda(const AdamWStep& s);  // adamw.cu

// The op on one device: the schema's arguments gathered into an AdamWStep, checked, and
// given to impl (bindings.cpp registers <adamw_step_cpu, CPU>, adamw.cu the CUDA one).
template <void (*impl)(const AdamWStep&), c10::DeviceType kDevice>
void adamw_step_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, double lr, double beta1, double beta2,
                   double eps, double weight_decay, int64_t step,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& lr_tensor,
                   const std::optional<at::Tensor>& step_tensor) {
  const AdamWStep s{params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps,
                    weight_decay, step, grad_scale, lr_tensor, step_tensor};
  check_adamw_inputs(s, kDevice);
  impl(s);
}

}  // namespace fastgpt
