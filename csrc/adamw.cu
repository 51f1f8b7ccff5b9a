// The fused AdamW step on the GPU: input checks, the launcher (the current stream, each
// launch checked) and the op's CUDA registration. The kernel: adamw.cuh.
#include "adamw.h"
#include "adamw.cuh"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace fastgpt {
namespace {

// kernel<<<grid, threads, shared_bytes>>>(args...) on the current stream, checked.
struct AdamWCudaLaunch {
  cudaStream_t stream;

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, int threads, int shared_bytes,
                  Args... args) const {
    kernel<<<grid, threads, shared_bytes, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

void adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, double lr, double beta1, double beta2,
                     double eps, double weight_decay, int64_t step,
                     const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& lr_tensor,
                     const std::optional<at::Tensor>& step_tensor) {
  check_adamw_inputs(params, grads, exp_avgs, exp_avg_sqs, grad_scale, lr_tensor, step_tensor,
                     c10::DeviceType::CUDA);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  adamw_step_launches(AdamWCudaLaunch{c10::cuda::getCurrentCUDAStream()}, params, grads,
                      exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, step,
                      grad_scale, lr_tensor, step_tensor);
}

}  // namespace fastgpt

TORCH_LIBRARY_IMPL(fastgpt, CUDA, m) { m.impl("adamw_step", &fastgpt::adamw_step_cuda); }
