// The fused AdamW step's kernel and the host code that fills its launches: multi-tensor
// apply, as torch's MultiTensorApply.cuh (each block updates one 64K-element chunk of one
// tensor; the tensors' addresses and the block -> (tensor, chunk) map travel in the kernel
// arguments, under 4 KB). adamw.cu launches it on the GPU; tests/cuda_on_cpu/ compiles this
// very file for the CPU, each CUDA thread a fiber, so that CI runs the kernel too.
// fp32 maths (adamw_math.h); bf16/fp16 params with fp32 optimizer state; the gradient
// clipping scale is read on the device, so the step needs no host sync.
#pragma once

#include "adamw.h"
#include "adamw_math.h"

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace fastgpt {
namespace {

constexpr int kMaxTensors = 36;   // 4 lists x 36 pointers + sizes + block map < 4 KB
constexpr int kMaxBlocks = 320;
constexpr int64_t kChunk = 65536;
constexpr int kThreads = 512;

constexpr int kVec = 4;  // elements per vector access

template <typename T>
struct alignas(sizeof(T) * kVec) Vec {
  T x[kVec];
};

__device__ __forceinline__ bool aligned(const void* pointer, size_t bytes) {
  return reinterpret_cast<uintptr_t>(pointer) % bytes == 0;
}

template <typename T>
struct AdamWLaunch {
  T* params[kMaxTensors];
  const T* grads[kMaxTensors];
  float* exp_avgs[kMaxTensors];
  float* exp_avg_sqs[kMaxTensors];
  int64_t sizes[kMaxTensors];
  unsigned char block_tensor[kMaxBlocks];
  int block_chunk[kMaxBlocks];
};

// The per-step constants come from the host, or (a capturable step) are computed by each
// block from lr and step read in GPU memory.
struct StepConstants {
  AdamWScalars host;
  const float* lr;    // nullptr: host.* hold the values
  const float* step;  // nullptr: host.* hold the values
  double lr_value, beta1, beta2, eps, weight_decay, step_value;
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(const AdamWLaunch<T> args, const StepConstants constants,
                 const float* __restrict__ grad_scale) {
  AdamWScalars scalars = constants.host;
  if (constants.lr != nullptr || constants.step != nullptr) {
    // in double, as the host does: 1 / (1 - beta2^t) magnifies fp32 rounding ~1000x early on
    scalars = adamw_scalars<double>(
        constants.lr != nullptr ? static_cast<double>(*constants.lr) : constants.lr_value,
        constants.beta1, constants.beta2, constants.eps, constants.weight_decay,
        constants.step != nullptr ? static_cast<double>(*constants.step) : constants.step_value);
  }
  const int t = args.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(args.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(args.sizes[t], start + kChunk);
  const float scale = grad_scale != nullptr ? *grad_scale : 1.0f;
  T* __restrict__ p = args.params[t];
  const T* __restrict__ g = args.grads[t];
  float* __restrict__ m = args.exp_avgs[t];
  float* __restrict__ v = args.exp_avg_sqs[t];

  // Vector path: kVec elements per thread and access (16 bytes of fp32 state, 16 or 8 bytes
  // of params), when every base address allows it (chunks start at multiples of kVec).
  int64_t scalar_from = start;
  if (aligned(p, sizeof(Vec<T>)) && aligned(g, sizeof(Vec<T>)) && aligned(m, sizeof(Vec<float>)) &&
      aligned(v, sizeof(Vec<float>))) {
    const int64_t vec_end = start + (end - start) / kVec * kVec;
    for (int64_t i = start + static_cast<int64_t>(threadIdx.x) * kVec; i < vec_end;
         i += static_cast<int64_t>(kThreads) * kVec) {
      Vec<T> p_v = *reinterpret_cast<const Vec<T>*>(p + i);
      const Vec<T> g_v = *reinterpret_cast<const Vec<T>*>(g + i);
      Vec<float> m_v = *reinterpret_cast<const Vec<float>*>(m + i);
      Vec<float> v_v = *reinterpret_cast<const Vec<float>*>(v + i);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        float p_k = static_cast<float>(p_v.x[k]);
        adamw_update(p_k, static_cast<float>(g_v.x[k]) * scale, m_v.x[k], v_v.x[k], scalars);
        p_v.x[k] = static_cast<T>(p_k);
      }
      *reinterpret_cast<Vec<T>*>(p + i) = p_v;
      *reinterpret_cast<Vec<float>*>(m + i) = m_v;
      *reinterpret_cast<Vec<float>*>(v + i) = v_v;
    }
    scalar_from = vec_end;
  }
  // Scalar path: unaligned tensors, and the last (end - start) % kVec elements.
  for (int64_t i = scalar_from + threadIdx.x; i < end; i += kThreads) {
    float p_i = static_cast<float>(p[i]);
    float m_i = m[i];
    float v_i = v[i];
    adamw_update(p_i, static_cast<float>(g[i]) * scale, m_i, v_i, scalars);
    p[i] = static_cast<T>(p_i);
    m[i] = m_i;
    v[i] = v_i;
  }
}

// Fills launches tensor by tensor, chunk by chunk, and launches whenever the blocks or the
// tensor slots run out; a tensor cut between two launches continues in slot 0 of the next.
template <typename T, typename Launch>
int launch_all(const Launch& launch, const std::vector<int64_t>& indices, const AdamWStep& s,
               const StepConstants& scalars, const float* grad_scale) {
  int launches = 0;
  AdamWLaunch<T> args;
  int slot = 0, blocks = 0;
  for (const int64_t t : indices) {
    const int64_t n = s.params[t].numel();
    if (n == 0) continue;
    args.params[slot] = s.params[t].data_ptr<T>();
    args.grads[slot] = s.grads[t].data_ptr<T>();
    args.exp_avgs[slot] = s.exp_avgs[t].data_ptr<float>();
    args.exp_avg_sqs[slot] = s.exp_avg_sqs[t].data_ptr<float>();
    args.sizes[slot] = n;
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      args.block_tensor[blocks] = static_cast<unsigned char>(slot);
      args.block_chunk[blocks] = static_cast<int>(c);
      ++blocks;
      const bool last_chunk = c == chunks - 1;
      if (blocks == kMaxBlocks || (last_chunk && slot + 1 == kMaxTensors)) {
        launch(adamw_kernel<T>, dim3(blocks), kThreads, 0, args, scalars, grad_scale);
        ++launches;
        blocks = 0;
        if (last_chunk) {
          slot = -1;  // this tensor is done: the next one takes slot 0
        } else {      // the rest of this tensor moves to slot 0
          args.params[0] = args.params[slot];
          args.grads[0] = args.grads[slot];
          args.exp_avgs[0] = args.exp_avgs[slot];
          args.exp_avg_sqs[0] = args.exp_avg_sqs[slot];
          args.sizes[0] = args.sizes[slot];
          slot = 0;
        }
      }
    }
    ++slot;
  }
  if (blocks > 0) {
    launch(adamw_kernel<T>, dim3(blocks), kThreads, 0, args, scalars, grad_scale);
    ++launches;
  }
  return launches;
}

static_assert(sizeof(AdamWLaunch<float>) + sizeof(StepConstants) + sizeof(void*) <= 4096,
              "kernel arguments must fit in 4 KB");

}  // namespace

// The step's launches: the per-step constants, then one group of launches per parameter
// dtype (fp32, bf16, fp16), each kernel run as launch(kernel, grid, threads, shared_bytes,
// args...) (the GPU's AdamWCudaLaunch in adamw.cu, the CPU emulator's in
// tests/cuda_on_cpu/). Inputs are checked by the caller. Returns the number of kernel
// launches.
template <typename Launch>
int adamw_step_launches(const Launch& launch, const AdamWStep& s) {
  StepConstants scalars;
  scalars.host = adamw_scalars<double>(s.lr, s.beta1, s.beta2, s.eps, s.weight_decay,
                                       static_cast<double>(s.step));
  scalars.lr = s.lr_tensor.has_value() ? s.lr_tensor->data_ptr<float>() : nullptr;
  scalars.step = s.step_tensor.has_value() ? s.step_tensor->data_ptr<float>() : nullptr;
  scalars.lr_value = s.lr;
  scalars.beta1 = s.beta1;
  scalars.beta2 = s.beta2;
  scalars.eps = s.eps;
  scalars.weight_decay = s.weight_decay;
  scalars.step_value = static_cast<double>(s.step);
  const float* scale = s.grad_scale.has_value() ? s.grad_scale->data_ptr<float>() : nullptr;
  int launches = 0;
  const auto launch_dtype = [&](auto element, at::ScalarType dtype) {
    std::vector<int64_t> indices;
    for (size_t t = 0; t < s.params.size(); ++t) {
      if (s.params[t].scalar_type() == dtype) indices.push_back(static_cast<int64_t>(t));
    }
    if (!indices.empty()) {
      launches += launch_all<decltype(element)>(launch, indices, s, scalars, scale);
    }
  };
  launch_dtype(float{}, at::kFloat);
  launch_dtype(at::BFloat16{}, at::kBFloat16);
  launch_dtype(at::Half{}, at::kHalf);
  return launches;
}

}  // namespace fastgpt
