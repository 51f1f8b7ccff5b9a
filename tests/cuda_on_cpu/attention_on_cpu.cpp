// csrc/attention.cuh compiled for the CPU (through cuda_on_cpu.h) as a Python module: the
// kernels and their dispatch (attention_forward_launches / attention_backward_launches) exactly
// as attention.cu runs them on a GPU, with CPU tensors. tests/test_attention.py builds it.
//
// Every input sits in a larger buffer whose elements past its end are NaN: a kernel that reads
// past an input's end (and uses what it read) turns its results into NaN.
#include "cuda_on_cpu.h"

#include "attention.cuh"

#include <torch/extension.h>

#include <tuple>

namespace {

constexpr int64_t kGuard = 4096;  // NaN elements past each input's end

// t's values in the first t.numel() elements of a NaN-filled buffer (so: contiguous, and
// 16-byte aligned as a fresh allocation is).
at::Tensor guarded_copy(const at::Tensor& t) {
  at::Tensor buffer = at::full({t.numel() + kGuard}, NAN, t.options());
  at::Tensor view = buffer.narrow(0, 0, t.numel()).view(t.sizes());
  view.copy_(t);
  return view;
}

// The launcher given to attention.cuh: runs each kernel on the CPU and counts the launches.
struct CpuLaunch {
  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, int threads, int shared_bytes,
                  Args... args) const {
    ++launches;
    cuda_on_cpu::launch(kernel, grid, threads, shared_bytes, args...);
  }
  mutable int launches = 0;
};

std::tuple<at::Tensor, at::Tensor, int> forward(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, double scale,
                                                double dropout_p, int64_t seed, int64_t offset) {
  CpuLaunch launch;
  auto [out, lse] = fastgpt::attention_forward_launches(launch, guarded_copy(q), guarded_copy(k),
                                                        guarded_copy(v), scale, dropout_p, seed,
                                                        offset);
  return {out, lse, launch.launches};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, int> backward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& grad_out, double scale, double dropout_p,
    int64_t seed, int64_t offset, bool deterministic) {
  CpuLaunch launch;
  auto [dq, dk, dv] = fastgpt::attention_backward_launches(
      launch, guarded_copy(q), guarded_copy(k), guarded_copy(v), guarded_copy(out),
      guarded_copy(lse), guarded_copy(grad_out), scale, dropout_p, seed, offset, deterministic);
  return {dq, dk, dv, launch.launches};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "csrc/attention.cuh's CUDA kernels run on the CPU (tests only)";
  m.def("forward", &forward, "(out, lse, kernel launches) of attention_forward_launches");
  m.def("backward", &backward, "(dq, dk, dv, kernel launches) of attention_backward_launches");
}
