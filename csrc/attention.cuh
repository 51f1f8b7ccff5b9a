// Causal attention on the GPU, the host code that picks the kernels, their grids, shared
// memory and inputs' layouts: FlashAttention-2's forward and backward, whose kernels are
// attention_fp32.cuh's (version 1, fp32 on the CUDA cores, the correctness anchor) and
// attention_mma.cuh's (version 3, bf16/fp16 on the tensor cores, mma.sync; the fp32 backward
// shares its Dr kernel). (Version 2, WMMA with the scores and output in shared memory, was
// removed when version 3 replaced it: see git history before 'Attention v3 backward'.)
// attention.cu checks the inputs, launches on the current CUDA stream and registers the ops;
// tests/cuda_on_cpu/ compiles this very file for the CPU, each CUDA thread a fiber, so that
// CI runs these kernels too.
#pragma once

#include "attention_fp32.cuh"
#include "attention_mma.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>
#include <type_traits>

namespace fastgpt {
namespace {

DropoutArgs dropout_args(double dropout_p, int64_t seed, int64_t offset) {
  return {static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
          dropout_threshold(dropout_p), static_cast<float>(1.0 / (1.0 - dropout_p)),
          dropout_p > 0.0};
}

// f(std::integral_constant<int, D>{}) for the runtime head dim D (32, 64 or 128).
template <typename F>
void with_head_dim(int64_t D, F&& f) {
  if (D == 32) f(std::integral_constant<int, 32>{});
  else if (D == 64) f(std::integral_constant<int, 64>{});
  else f(std::integral_constant<int, 128>{});
}

// f(Elem{}) for the 16-bit dtypes: the CUDA type behind at::BFloat16 / at::Half.
template <typename F>
void with_16bit_type(at::ScalarType dtype, F&& f) {
  if (dtype == at::kBFloat16) f(__nv_bfloat16{});
  else f(__half{});
}

template <typename Elem>
Elem* ptr(const at::Tensor& t) {
  return reinterpret_cast<Elem*>(t.data_ptr());
}

// What the kernels read an input (B, H, T, D) as: the fp32 kernels, contiguous; the
// tensor-core ones, the tensor itself if its last dimension is contiguous and every row
// starts 16 bytes aligned (cp.async copies 16 bytes; e.g. the model's q, k, v, views of one
// qkv projection), else an aligned contiguous copy.
at::Tensor kernel_layout(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat) return t.contiguous();
  bool aligned = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int dim = 0; dim < 3; ++dim) {  // a dimension of size 1 has no stride to speak of
    aligned = aligned && (t.size(dim) == 1 || t.stride(dim) % 8 == 0);
  }
  return aligned ? t : t.clone(at::MemoryFormat::Contiguous);
}

// Where t's (batch, head) rows are: t is (B, H, T, D) with its last dimension contiguous.
HeadLayout layout_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.size(1)};
}

dim3 grid_of(int64_t batch_heads, int64_t T, int64_t tile) {
  return dim3(static_cast<unsigned>(batch_heads), static_cast<unsigned>((T + tile - 1) / tile));
}

}  // namespace

// What one head dim's launches read and write: checked q, k, v (and grad_out) of shape (B, H,
// T, D), with their last dimension contiguous and 16-byte aligned rows (the fp32 kernels:
// contiguous); out (B, H, T, D) contiguous, lse (B, H, T) fp32; in the backward dr = rowsum(dO
// * O) (B, H, T) fp32, dq (q's dtype; fp32 dQ is its own atomic accumulator), dq_accum (fp32,
// for the atomics of the 16-bit backward; undefined otherwise), dk, dv: contiguous.
struct AttentionForward {
  at::Tensor q, k, v, out, lse;
  float scale;
  DropoutArgs dropout;
};
struct AttentionBackward {
  at::Tensor q, k, v, grad_out, out, lse, dr, dq, dq_accum, dk, dv;
  float scale;
  DropoutArgs dropout;
  bool deterministic;
};

// The launches for head dim D, each kernel run as launch(kernel, grid, threads,
// shared_bytes, args...). Templates with external linkage: the GPU build instantiates each
// head dim in a translation unit of its own (attention_d32.cu, ...), so that they compile
// in parallel; the CPU emulation instantiates them in its one file.
template <int D, typename Launch>
void attention_forward_head_dim(const Launch& launch, const AttentionForward& a) {
  const int64_t batch_heads = a.q.size(0) * a.q.size(1), T = a.q.size(2);
  if (a.q.scalar_type() == at::kFloat) {
    launch(attention_forward_fp32_kernel<D>, grid_of(batch_heads, T, kRows), kRows * 32, 0,
           ptr<const float>(a.q), ptr<const float>(a.k), ptr<const float>(a.v),
           ptr<float>(a.out), ptr<float>(a.lse), T, a.scale, a.dropout);
    return;
  }
  with_16bit_type(a.q.scalar_type(), [&](auto elem) {
    using Elem = decltype(elem);
    launch(attention_forward_mma_kernel<Elem, D>, grid_of(batch_heads, T, kMmaRows),
           kMmaWarps * 32, forward_mma_smem<Elem, D>(), ptr<const Elem>(a.q), layout_of(a.q),
           ptr<const Elem>(a.k), layout_of(a.k), ptr<const Elem>(a.v), layout_of(a.v),
           ptr<Elem>(a.out), ptr<float>(a.lse), T, a.scale, a.dropout);
  });
}

// Dr = rowsum(dO * O) and, for dQ by atomics, the fp32 accumulator zeroed: one launch.
template <typename Elem, int D, typename Launch>
void launch_dr(const Launch& launch, const AttentionBackward& a, float* dq_accum) {
  const int64_t rows = a.q.size(0) * a.q.size(1) * a.q.size(2);
  const int64_t threads = rows * (D / (16 / static_cast<int64_t>(sizeof(Elem))));
  launch(attention_backward_dr_kernel<Elem, D>,
         dim3(static_cast<unsigned>((threads + kDrThreads - 1) / kDrThreads)), kDrThreads, 0,
         ptr<const Elem>(a.grad_out), layout_of(a.grad_out), ptr<const Elem>(a.out),
         ptr<float>(a.dr), dq_accum, rows, a.q.size(2));
}

template <int D, typename Launch>
void attention_backward_head_dim(const Launch& launch, const AttentionBackward& a) {
  const int64_t batch_heads = a.q.size(0) * a.q.size(1), T = a.q.size(2);
  if (a.q.scalar_type() == at::kFloat) {
    float* dq_atomic = a.deterministic ? nullptr : ptr<float>(a.dq);
    launch_dr<float, D>(launch, a, dq_atomic);
    launch(attention_backward_dkdv_fp32_kernel<D>, grid_of(batch_heads, T, kKeys),
           kKeyWarps * 32, 0, ptr<const float>(a.q), ptr<const float>(a.k),
           ptr<const float>(a.v), ptr<const float>(a.grad_out), ptr<const float>(a.lse),
           ptr<const float>(a.dr), dq_atomic, ptr<float>(a.dk), ptr<float>(a.dv), T, a.scale,
           a.dropout);
    if (a.deterministic) {
      launch(attention_backward_dq_fp32_kernel<D>, grid_of(batch_heads, T, kRows), kRows * 32,
             0, ptr<const float>(a.q), ptr<const float>(a.k), ptr<const float>(a.v),
             ptr<const float>(a.grad_out), ptr<const float>(a.lse), ptr<const float>(a.dr),
             ptr<float>(a.dq), T, a.scale, a.dropout);
    }
    return;
  }
  with_16bit_type(a.q.scalar_type(), [&](auto elem) {
    using Elem = decltype(elem);
    float* dq_accum = a.deterministic ? nullptr : ptr<float>(a.dq_accum);
    launch_dr<Elem, D>(launch, a, dq_accum);
    launch(attention_backward_dkdv_mma_kernel<Elem, D>, grid_of(batch_heads, T, kBwdKeys),
           kBwdWarps * 32, backward_dkdv_mma_smem<Elem, D>(), ptr<const Elem>(a.q),
           layout_of(a.q), ptr<const Elem>(a.k), layout_of(a.k), ptr<const Elem>(a.v),
           layout_of(a.v), ptr<const Elem>(a.grad_out), layout_of(a.grad_out),
           ptr<const float>(a.lse), ptr<const float>(a.dr), dq_accum, ptr<Elem>(a.dk),
           ptr<Elem>(a.dv), T, a.scale, a.dropout);
    if (a.deterministic) {
      launch(attention_backward_dq_mma_kernel<Elem, D>, grid_of(batch_heads, T, kDqRows),
             kDqWarps * 32, backward_dq_mma_smem<Elem, D>(), ptr<const Elem>(a.q),
             layout_of(a.q), ptr<const Elem>(a.k), layout_of(a.k), ptr<const Elem>(a.v),
             layout_of(a.v), ptr<const Elem>(a.grad_out), layout_of(a.grad_out),
             ptr<const float>(a.lse), ptr<const float>(a.dr), ptr<Elem>(a.dq), T, a.scale,
             a.dropout);
    } else {
      const int64_t n = a.dq.numel();
      launch(attention_backward_dq_convert_kernel<Elem>,
             dim3(static_cast<unsigned>((n / 8 + kDrThreads - 1) / kDrThreads)), kDrThreads, 0,
             ptr<const float>(a.dq_accum), ptr<Elem>(a.dq), n);
    }
  });
}

// (out, lse) for checked q, k, v of shape (B, H, T, D), any strides (kernel_layout);
// launch(kernel, grid, threads, shared_bytes, args...) runs each kernel.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor> attention_forward_launches(
    const Launch& launch, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    double scale, double dropout_p, int64_t seed, int64_t offset) {
  const AttentionForward a{kernel_layout(q), kernel_layout(k), kernel_layout(v),
                           at::empty(q.sizes(), q.options()),
                           at::empty({q.size(0), q.size(1), q.size(2)},
                                     q.options().dtype(at::kFloat)),
                           static_cast<float>(scale), dropout_args(dropout_p, seed, offset)};
  with_head_dim(q.size(3), [&](auto head_dim) {
    attention_forward_head_dim<decltype(head_dim)::value>(launch, a);
  });
  return {a.out, a.lse};
}

// (dq, dk, dv) for checked inputs as above, out and grad_out of q's shape and dtype, lse
// (B, H, T) fp32; dQ by atomics unless deterministic.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_launches(
    const Launch& launch, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& grad_out, double scale,
    double dropout_p, int64_t seed, int64_t offset, bool deterministic) {
  const auto f32 = q.options().dtype(at::kFloat);
  const bool fp32 = q.scalar_type() == at::kFloat;
  const AttentionBackward a{
      kernel_layout(q), kernel_layout(k), kernel_layout(v), kernel_layout(grad_out),
      out.contiguous(), lse.contiguous(),
      at::empty({q.size(0), q.size(1), q.size(2)}, f32),  // dr
      at::empty(q.sizes(), q.options()),                  // dq (zeroed by the Dr kernel if fp32 atomics)
      fp32 || deterministic ? at::Tensor() : at::empty(q.sizes(), f32),  // dq_accum
      at::empty(q.sizes(), q.options()), at::empty(q.sizes(), q.options()),
      static_cast<float>(scale), dropout_args(dropout_p, seed, offset), deterministic};
  with_head_dim(q.size(3), [&](auto head_dim) {
    attention_backward_head_dim<decltype(head_dim)::value>(launch, a);
  });
  return {a.dq, a.dk, a.dv};
}

}  // namespace fastgpt
