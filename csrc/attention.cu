// Causal attention on the GPU, the entry points: input checks, then attention.cuh's kernels
// launched on the current CUDA stream; registered as fastgpt::attention_forward (q, k, v ->
// out, lse) and fastgpt::attention_backward (-> dq, dk, dv), which
// fastgpt/ops/cuda_attention.py wraps.
#include "attention.cuh"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

namespace fastgpt {
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
    TORCH_CHECK(t->is_contiguous(), "attention: q, k, v must be contiguous");
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

// The tensor-core kernels read 16-byte vectors: a tensor whose storage offset breaks that
// alignment is copied (a fresh allocation is aligned).
at::Tensor aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone();
}

// kernel<<<grid, threads, shared_bytes>>>(args...) on the current stream; shared memory past
// the default 48 KiB is opted into first.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, int threads, int shared_bytes, Args... args) {
  if (shared_bytes > 48 * 1024) {
    int device = 0, available = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(
        cudaDeviceGetAttribute(&available, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    TORCH_CHECK(shared_bytes <= available, "attention: this head dim needs ", shared_bytes,
                " bytes of shared memory per block in bf16/fp16; this GPU offers ", available,
                " (use fp32 or the reference backend)");
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        shared_bytes));
  }
  kernel<<<grid, threads, shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// launch as the callable that attention.cuh's attention_*_launches take.
constexpr auto kLaunch = [](auto kernel, dim3 grid, int threads, int shared_bytes,
                            auto... args) { launch(kernel, grid, threads, shared_bytes, args...); };

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, double scale,
                                                          double dropout_p, int64_t seed,
                                                          int64_t offset) {
  check_attention_inputs(q, k, v, dropout_p);
  const c10::cuda::CUDAGuard guard(q.device());
  return attention_forward_launches(kLaunch, aligned16(q), aligned16(k), aligned16(v), scale,
                                    dropout_p, seed, offset);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& grad_out, double scale, double dropout_p,
    int64_t seed, int64_t offset, bool deterministic) {
  check_attention_inputs(q, k, v, dropout_p);
  for (const at::Tensor* t : {&out, &grad_out}) {
    TORCH_CHECK(t->sizes() == q.sizes() && t->scalar_type() == q.scalar_type() &&
                    t->device() == q.device() && t->is_contiguous(),
                "attention_backward: out and grad_out must be contiguous, of q's shape, dtype "
                "and device, got ", t->sizes(), " ", t->scalar_type(), " on ", t->device());
  }
  TORCH_CHECK(lse.sizes() == q.sizes().slice(0, 3) && lse.scalar_type() == at::kFloat &&
                  lse.device() == q.device() && lse.is_contiguous(),
              "attention_backward: lse must be contiguous float32 (B, H, T) on q's device, got ",
              lse.sizes(), " ", lse.scalar_type(), " on ", lse.device());
  const c10::cuda::CUDAGuard guard(q.device());
  return attention_backward_launches(kLaunch, aligned16(q), aligned16(k), aligned16(v), out, lse,
                                     aligned16(grad_out), scale, dropout_p, seed, offset,
                                     deterministic);
}

}  // namespace fastgpt

TORCH_LIBRARY_IMPL(fastgpt, CUDA, m) {
  m.impl("attention_forward", &fastgpt::attention_forward_cuda);
  m.impl("attention_backward", &fastgpt::attention_backward_cuda);
}
