// The fused AdamW step on the GPU: the launcher (the current stream, each launch checked)
// and the op's CUDA registration. The kernel: adamw.cuh.
#include "adamw.h"
#include "adamw.cuh"
#include "launch_record.cuh"

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

void adamw_step_cuda(const AdamWStep& s) {
  if (s.params.empty()) return;
  const c10::cuda::CUDAGuard guard(s.params[0].device());
  adamw_step_launches(AdamWCudaLaunch{c10::cuda::getCurrentCUDAStream()}, s);
}

void record_adamw_launches(std::vector<LaunchRecord>& records) {
  std::vector<at::Tensor> params;
  for (const auto dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    params.push_back(at::zeros({1}, at::TensorOptions().dtype(dtype)));
  }
  const std::vector<at::Tensor> moments(params.size(), at::zeros({1}));
  adamw_step_launches(RecordLaunch{&records}, {params, params, moments, moments, 1e-3, 0.9,
                                               0.999, 1e-8, 0.0, 1, {}, {}, {}});
}

}  // namespace fastgpt

TORCH_LIBRARY_IMPL(fastgpt, CUDA, m) {
  m.impl("adamw_step",
         &fastgpt::adamw_step_op<fastgpt::adamw_step_cuda, c10::DeviceType::CUDA>);
}
