// How the GPU build launches attention.cuh's kernels (CudaLaunch), and the head dims it
// instantiates in translation units of their own: attention_d32.cu, attention_d64.cu and
// attention_d128.cu each compile one head dim's kernels (the long part of the build), so
// that ninja and nvcc compile them in parallel; attention.cu declares them extern.
#pragma once

#include "attention.cuh"
#include "launch_record.cuh"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

namespace fastgpt {

// Lets `kernel` use `bytes` of dynamic shared memory on `device`: opts in when its static
// and dynamic shared memory together pass the default 48 KiB (dynamic_shared_memory_opt_in),
// or fails saying the GPU has too little. Queries the kernel's static size and sets the
// attribute once per kernel and device: each costs host time that a launch should not pay
// every call.
void allow_dynamic_shared_memory(const void* kernel, int device, int bytes);

// kernel<<<grid, threads, shared_bytes>>>(args...) on `device`'s current stream (the
// caller has made `device` current), with the launch checked.
struct CudaLaunch {
  int device;

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, int threads, int shared_bytes,
                  Args... args) const {
    if (shared_bytes > 0) {
      allow_dynamic_shared_memory(reinterpret_cast<const void*>(kernel), device, shared_bytes);
    }
    kernel<<<grid, threads, shared_bytes, c10::cuda::getCurrentCUDAStream(device)>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// FASTGPT_ATTENTION_HEAD_DIM(template, 32) in its own file; (extern template, 32) in
// attention.cu, so that it does not compile them again. Each head dim's launch code with
// CudaLaunch, and with RecordLaunch (launch_record.cuh: the same launches, recorded).
#define FASTGPT_ATTENTION_HEAD_DIM_WITH(KIND, D, LAUNCH)                                     \
  KIND void attention_forward_head_dim<D, LAUNCH>(const LAUNCH&, const AttentionForward&);   \
  KIND void attention_backward_head_dim<D, LAUNCH>(const LAUNCH&, const AttentionBackward&);
#define FASTGPT_ATTENTION_HEAD_DIM(KIND, D)               \
  FASTGPT_ATTENTION_HEAD_DIM_WITH(KIND, D, CudaLaunch)    \
  FASTGPT_ATTENTION_HEAD_DIM_WITH(KIND, D, RecordLaunch)

}  // namespace fastgpt
