// A launcher for adamw.cuh's and attention.cuh's launch code that launches nothing: it records
// each launch's kernel, block size and dynamic shared memory. The op fastgpt::kernel_launches
// (attention.cu) runs the launch code with it, so that bench/kernel_report.py takes the launch
// sizes from the build itself. Host code only; no GPU needed.
#pragma once

#include <vector_types.h>  // dim3

#include <vector>

namespace fastgpt {

struct LaunchRecord {
  const void* kernel;  // the kernel's host stub
  int threads;
  int shared_bytes;
};

// Called as CudaLaunch is: launch(kernel, grid, threads, shared_bytes, args...).
struct RecordLaunch {
  std::vector<LaunchRecord>* records;

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3, int threads, int shared_bytes,
                  Args...) const {
    records->push_back({reinterpret_cast<const void*>(kernel), threads, shared_bytes});
  }
};

// The launches of one AdamW step over fp32, bf16 and fp16 params (adamw.cu).
void record_adamw_launches(std::vector<LaunchRecord>& records);

}  // namespace fastgpt
