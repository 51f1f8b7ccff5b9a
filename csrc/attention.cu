// Causal attention on the GPU, the entry points: input checks, then attention.cuh's kernels
// launched on the current CUDA stream; registered as fastgpt::attention_forward (q, k, v ->
// out, lse) and fastgpt::attention_backward (-> dq, dk, dv), which
// fastgpt/ops/cuda_attention.py wraps; and fastgpt::kernel_launches, the sizes of every launch
// of the extension (bench/kernel_report.py). The kernels themselves are compiled in
// attention_d32.cu, attention_d64.cu and attention_d128.cu.
#include "attention_launch.cuh"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <dlfcn.h>
#include <torch/library.h>

#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

namespace fastgpt {

FASTGPT_ATTENTION_HEAD_DIM(extern template, 32)
FASTGPT_ATTENTION_HEAD_DIM(extern template, 64)
FASTGPT_ATTENTION_HEAD_DIM(extern template, 128)

void allow_dynamic_shared_memory(const void* kernel, int device, int bytes) {
  struct Allowed {
    int static_bytes = -1;  // cudaFuncGetAttributes' sharedSizeBytes, once asked
    int dynamic_bytes = 0;  // the largest dynamic size checked (and set, where needed)
  };
  static std::mutex mutex;
  static std::map<int, int> available;                         // device -> opt-in maximum
  static std::map<std::pair<const void*, int>, Allowed> kernels;  // (kernel, device)
  const std::lock_guard<std::mutex> lock(mutex);
  Allowed& allowed = kernels[{kernel, device}];
  if (bytes <= allowed.dynamic_bytes) return;
  if (allowed.static_bytes < 0) {
    cudaFuncAttributes attributes;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    allowed.static_bytes = static_cast<int>(attributes.sharedSizeBytes);
  }
  const int opt_in = dynamic_shared_memory_opt_in(allowed.static_bytes, bytes);
  if (opt_in > 0) {
    auto found = available.find(device);
    if (found == available.end()) {
      int optin = 0;
      C10_CUDA_CHECK(
          cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
      found = available.emplace(device, optin).first;
    }
    TORCH_CHECK(allowed.static_bytes + bytes <= found->second, "attention: this head dim needs ",
                allowed.static_bytes + bytes, " bytes of shared memory per block in bf16/fp16; "
                "this GPU offers ", found->second, " (use fp32 or the reference backend)");
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, opt_in));
  }
  allowed.dynamic_bytes = bytes;
}

namespace {

void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            double dropout_p) {
  TORCH_CHECK(q.dim() == 4, "attention: q, k, v must be (B, H, T, D), got q of shape ",
              q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "attention: q, k, v must have the same shape, got ", q.sizes(), ", ", k.sizes(),
              ", ", v.sizes());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "attention: q, k, v must be float32, bfloat16 or float16, got ", dtype);
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->is_cuda() && t->device() == q.device(),
                "attention: q, k, v must be on one CUDA device, got ", t->device());
    TORCH_CHECK(t->scalar_type() == dtype, "attention: q, k, v must have one dtype, got ", dtype,
                " and ", t->scalar_type());
  }
  const int64_t D = q.size(3);
  TORCH_CHECK(D == 32 || D == 64 || D == 128, "attention: head dim must be 32, 64 or 128, got ",
              D);
  TORCH_CHECK(q.size(2) >= 1 && q.size(0) * q.size(1) >= 1,
              "attention: B, H and T must be at least 1, got ", q.sizes());
  TORCH_CHECK(q.size(0) * q.size(1) <= std::numeric_limits<int32_t>::max() &&
                  (q.size(2) + kRows - 1) / kRows <= 65535,
              "attention: B*H must be below 2^31 and T at most ", 65535 * kRows, ", got ",
              q.sizes());
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "attention: dropout_p must be in [0, 1), got ",
              dropout_p);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, double scale,
                                                          double dropout_p, int64_t seed,
                                                          int64_t offset) {
  check_attention_inputs(q, k, v, dropout_p);
  const c10::cuda::CUDAGuard guard(q.device());
  return attention_forward_launches(CudaLaunch{q.get_device()}, q, k, v, scale, dropout_p, seed,
                                    offset);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& grad_out, double scale, double dropout_p,
    int64_t seed, int64_t offset, bool deterministic) {
  check_attention_inputs(q, k, v, dropout_p);
  for (const at::Tensor* t : {&out, &grad_out}) {
    TORCH_CHECK(t->sizes() == q.sizes() && t->scalar_type() == q.scalar_type() &&
                    t->device() == q.device(),
                "attention_backward: out and grad_out must be of q's shape, dtype and device, "
                "got ", t->sizes(), " ", t->scalar_type(), " on ", t->device());
  }
  TORCH_CHECK(lse.sizes() == q.sizes().slice(0, 3) && lse.scalar_type() == at::kFloat &&
                  lse.device() == q.device(),
              "attention_backward: lse must be float32 (B, H, T) on q's device, got ",
              lse.sizes(), " ", lse.scalar_type(), " on ", lse.device());
  const c10::cuda::CUDAGuard guard(q.device());
  return attention_backward_launches(CudaLaunch{q.get_device()}, q, k, v, out, lse, grad_out,
                                     scale, dropout_p, seed, offset, deterministic);
}

// (kernels, threads, shared_bytes) of every launch the launch code makes: adamw_step over
// fp32, bf16 and fp16 params, and attention's forward and both backwards for each dtype and
// head dim, run with RecordLaunch on tiny CPU tensors (nothing is launched: no GPU needed).
// A kernel is given as its host stub's offset in this library, which the library's symbol
// table names (bench/kernel_report.py reads it with nm).
std::tuple<std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>> kernel_launches() {
  std::vector<LaunchRecord> records;
  record_adamw_launches(records);
  const RecordLaunch record{&records};
  for (const auto dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (const int64_t D : {32, 64, 128}) {
      const at::Tensor x = at::zeros({1, 1, 1, D}, at::TensorOptions().dtype(dtype));
      const at::Tensor lse = at::zeros({1, 1, 1});
      attention_forward_launches(record, x, x, x, 1.0, 0.0, 0, 0);
      for (const bool deterministic : {false, true}) {
        attention_backward_launches(record, x, x, x, x, lse, x, 1.0, 0.0, 0, 0, deterministic);
      }
    }
  }
  std::vector<int64_t> kernels, threads, shared_bytes;
  for (const LaunchRecord& r : records) {
    Dl_info info;
    TORCH_CHECK(dladdr(r.kernel, &info) != 0, "kernel_launches: dladdr found no library");
    kernels.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(r.kernel) -
                                           reinterpret_cast<uintptr_t>(info.dli_fbase)));
    threads.push_back(r.threads);
    shared_bytes.push_back(r.shared_bytes);
  }
  return {kernels, threads, shared_bytes};
}

}  // namespace fastgpt

TORCH_LIBRARY_FRAGMENT(fastgpt, m) {
  m.def("kernel_launches() -> (int[] kernels, int[] threads, int[] shared_bytes)",
        &fastgpt::kernel_launches);
}

TORCH_LIBRARY_IMPL(fastgpt, CUDA, m) {
  m.impl("attention_forward", &fastgpt::attention_forward_cuda);
  m.impl("attention_backward", &fastgpt::attention_backward_cuda);
}
