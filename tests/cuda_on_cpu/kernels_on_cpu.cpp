// csrc/'s CUDA kernels compiled for the CPU (through cuda_on_cpu.h) as a Python module: the
// attention kernels and their dispatch (attention_forward_launches /
// attention_backward_launches) and the AdamW kernel and its (adamw_step_launches), exactly as
// the GPU build runs them, with CPU tensors; and the emulator's own tests (red zones, planted
// races). tests/conftest.py builds it (kernels_on_cpu); tests/test_cuda_on_cpu.py and
// tests/test_attention.py use it.
//
// Every call runs under racecheck (racecheck.h) in the schedule it names, and fails with the
// hazards found. Inputs are copied into buffers whose bytes past the end are NaN (a kernel
// that reads past an input's end and uses it turns its results into NaN) and watched as read
// only (a write to an input fails the call); every buffer allocated during the call has red
// zones (red_zones.h), so a write outside one fails the call too.
#include "cuda_on_cpu.h"

#include "adamw.cuh"
#include "attention.cuh"
#include "mma.cuh"
#include "red_zones.h"

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace {

using cuda_on_cpu::RedZoneScope;
namespace racecheck = cuda_on_cpu::racecheck;

// One call's settings: the schedule, racecheck on, nothing left from an earlier call.
class CallScope {
 public:
  CallScope(const std::string& schedule, int64_t seed, bool check_races = true) {
    cuda_on_cpu::schedule = {cuda_on_cpu::order_named(schedule), static_cast<uint64_t>(seed)};
    racecheck::take_report();
    racecheck::state().enabled = check_races;
  }
  ~CallScope() {
    cuda_on_cpu::schedule = {};
    racecheck::state().enabled = true;
    racecheck::take_report();
  }
  // Fails with racecheck's report, buffers named from `names` (data pointer -> name).
  void check_races(const std::map<const void*, std::string>& names) const {
    const std::string report = racecheck::take_report([&](uintptr_t address) {
      const auto at = names.find(reinterpret_cast<const void*>(address));
      return at == names.end() ? std::string() : at->second;
    });
    TORCH_CHECK(report.empty(), report.substr(0, report.size() - 1));
  }
};

// A region that racecheck watches while this lives.
class Watched {
 public:
  Watched(const at::Tensor& t, std::string name, bool read_only)
      : begin_(t.nbytes() > 0 ? t.data_ptr() : nullptr) {
    if (begin_ != nullptr) racecheck::watch(begin_, t.nbytes(), std::move(name), false, read_only);
  }
  ~Watched() {
    if (begin_ != nullptr) racecheck::unwatch(begin_);
  }
  Watched(const Watched&) = delete;
  Watched& operator=(const Watched&) = delete;

 private:
  const void* begin_;
};

constexpr int64_t kGuard = 4096;  // NaN elements past each input's end

// A contiguous copy of t in a NaN-filled buffer (allocated in the caller's RedZoneScope if
// there is one), at the same address modulo 16 as t (so the kernel takes the same vector or
// scalar path), with the buffer's bytes outside the copy watched as read only (a write
// there fails the call), and the copy itself too if read_only.
struct GuardedTensor {
  at::Tensor view;
  std::vector<std::unique_ptr<Watched>> watched;
};

GuardedTensor guarded_like(const at::Tensor& t, const std::string& name, bool read_only) {
  const int64_t elem = t.element_size();
  const int64_t pad = 16 / elem;  // room to match t's alignment
  at::Tensor buffer = at::full({t.numel() + pad + kGuard}, NAN, t.options());
  racecheck::unwatch(buffer.data_ptr());  // a red-zone allocator's watch: replaced by these
  const int64_t misalignment = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16;
  TORCH_CHECK(misalignment % elem == 0, name, " is not aligned to its element size");
  const int64_t start = (misalignment - reinterpret_cast<uintptr_t>(buffer.data_ptr()) % 16 + 16) % 16 / elem;
  GuardedTensor g{buffer.narrow(0, start, t.numel()).view(t.sizes()), {}};
  g.view.copy_(t);
  g.watched.push_back(std::make_unique<Watched>(g.view, name, read_only));
  if (start > 0) {
    g.watched.push_back(std::make_unique<Watched>(buffer.narrow(0, 0, start),
                                                  "the bytes before " + name, true));
  }
  g.watched.push_back(std::make_unique<Watched>(
      buffer.narrow(0, start + t.numel(), buffer.numel() - start - t.numel()),
      "the bytes past " + name, true));
  return g;
}

// The same for an input read through its strides: a copy with t's sizes and strides (and its
// address modulo 16) in a NaN-filled buffer, all of it watched as read only, so that a kernel
// reading an element between t's rows or past its end gets NaN.
GuardedTensor guarded_strided(const at::Tensor& t, const std::string& name) {
  TORCH_CHECK(t.numel() > 0, name, " is empty");
  int64_t extent = 1;  // elements from the first to the last of t, inclusive
  for (int64_t d = 0; d < t.dim(); ++d) {
    TORCH_CHECK(t.stride(d) >= 0, name, " has a negative stride");
    extent += (t.size(d) - 1) * t.stride(d);
  }
  const int64_t elem = t.element_size();
  at::Tensor buffer = at::full({extent + 16 / elem + kGuard}, NAN, t.options());
  racecheck::unwatch(buffer.data_ptr());  // a red-zone allocator's watch: replaced by this one
  const int64_t misalignment = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16;
  TORCH_CHECK(misalignment % elem == 0, name, " is not aligned to its element size");
  const int64_t start = (misalignment - reinterpret_cast<uintptr_t>(buffer.data_ptr()) % 16 + 16) % 16 / elem;
  GuardedTensor g{buffer.as_strided(t.sizes(), t.strides(), start), {}};
  g.view.copy_(t);
  g.watched.push_back(std::make_unique<Watched>(buffer, name, true));
  return g;
}

// The launcher given to the kernels' dispatch: runs each kernel on the CPU and counts.
struct CpuLaunch {
  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, int threads, int shared_bytes,
                  Args... args) const {
    ++launches;
    cuda_on_cpu::launch(kernel, grid, threads, shared_bytes, args...);
  }
  mutable int launches = 0;
};

// --- attention ---------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, int> attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
    double dropout_p, int64_t seed, int64_t offset, const std::string& schedule,
    int64_t schedule_seed, bool check_races) {
  CallScope call(schedule, schedule_seed, check_races);
  CpuLaunch launch;
  const GuardedTensor q_in = guarded_strided(q, "q"), k_in = guarded_strided(k, "k"),
                      v_in = guarded_strided(v, "v");
  RedZoneScope red_zones;
  auto [out, lse] = fastgpt::attention_forward_launches(launch, q_in.view, k_in.view, v_in.view,
                                                        scale, dropout_p, seed, offset);
  red_zones.check();
  call.check_races({{out.data_ptr(), "out"}, {lse.data_ptr(), "lse"}});
  return {out, lse, launch.launches};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, int> attention_backward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& grad_out, double scale, double dropout_p,
    int64_t seed, int64_t offset, bool deterministic, const std::string& schedule,
    int64_t schedule_seed, bool check_races) {
  CallScope call(schedule, schedule_seed, check_races);
  CpuLaunch launch;
  const GuardedTensor q_in = guarded_strided(q, "q"), k_in = guarded_strided(k, "k"),
                      v_in = guarded_strided(v, "v"), out_in = guarded_strided(out, "out"),
                      lse_in = guarded_strided(lse, "lse"),
                      grad_out_in = guarded_strided(grad_out, "grad_out");
  RedZoneScope red_zones;
  auto [dq, dk, dv] = fastgpt::attention_backward_launches(
      launch, q_in.view, k_in.view, v_in.view, out_in.view, lse_in.view, grad_out_in.view, scale,
      dropout_p, seed, offset, deterministic);
  red_zones.check();
  call.check_races({{dq.data_ptr(), "dq"}, {dk.data_ptr(), "dk"}, {dv.data_ptr(), "dv"}});
  return {dq, dk, dv, launch.launches};
}

// --- AdamW ---------------------------------------------------------------------------------------

// fastgpt::adamw_step's launches on the CPU; updates params, exp_avgs and exp_avg_sqs in
// place and returns the number of kernel launches. check_races=false for sizes whose shadow
// would not fit in memory (24 bytes per byte written).
int adamw_step(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
               std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> exp_avg_sqs,
               double lr, double beta1, double beta2, double eps, double weight_decay,
               int64_t step, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& lr_tensor,
               const std::optional<at::Tensor>& step_tensor, const std::string& schedule,
               int64_t schedule_seed, bool check_races) {
  CallScope call(schedule, schedule_seed, check_races);
  CpuLaunch launch;
  std::vector<GuardedTensor> guarded;
  std::vector<at::Tensor> p, g, m, v;
  std::optional<GuardedTensor> scale, lr_in, step_in;
  int launches = 0;
  {
    RedZoneScope red_zones;
    for (size_t t = 0; t < params.size(); ++t) {
      const std::string i = "[" + std::to_string(t) + "]";
      guarded.push_back(guarded_like(params[t], "params" + i, false));
      p.push_back(guarded.back().view);
      guarded.push_back(guarded_like(grads[t], "grads" + i, true));
      g.push_back(guarded.back().view);
      guarded.push_back(guarded_like(exp_avgs[t], "exp_avgs" + i, false));
      m.push_back(guarded.back().view);
      guarded.push_back(guarded_like(exp_avg_sqs[t], "exp_avg_sqs" + i, false));
      v.push_back(guarded.back().view);
    }
    if (grad_scale) scale = guarded_like(*grad_scale, "grad_scale", true);
    if (lr_tensor) lr_in = guarded_like(*lr_tensor, "lr_tensor", true);
    if (step_tensor) step_in = guarded_like(*step_tensor, "step_tensor", true);
    const auto view = [](const std::optional<GuardedTensor>& x) {
      return x ? std::optional<at::Tensor>(x->view) : std::nullopt;
    };
    launches = fastgpt::adamw_step_launches(
        launch, {p, g, m, v, lr, beta1, beta2, eps, weight_decay, step, view(scale),
                 view(lr_in), view(step_in)});
    call.check_races({});
    red_zones.check();
  }
  for (size_t t = 0; t < params.size(); ++t) {
    params[t].copy_(p[t]);
    exp_avgs[t].copy_(m[t]);
    exp_avg_sqs[t].copy_(v[t]);
  }
  return launches;
}

// --- the emulator's own tests ---------------------------------------------------------------------

// The red zones: a one-thread kernel writes out[index] of an n-element buffer.
__global__ void write_one_element(float* out, int64_t index) { out[index] = 1.0f; }

at::Tensor write_one(int64_t n, int64_t index) {
  CallScope call("forward", 0);
  RedZoneScope red_zones;
  at::Tensor out = at::zeros({n});
  cuda_on_cpu::launch(write_one_element, dim3(1), 32, 0, out.data_ptr<float>(), index);
  red_zones.check();
  return out;
}

// Races planted for racecheck to find, each with its fixed twin. 64 threads: two warps.
// Each thread writes its cell and reads another warp's: needs a __syncthreads between.
__global__ void cells_across_warps(float* out, bool sync) {
  __shared__ float cells[64];
  cells[threadIdx.x] = static_cast<float>(threadIdx.x);
  if (sync) __syncthreads();
  out[blockIdx.x * 64 + threadIdx.x] = cells[(threadIdx.x + 32) % 64];
}

// Each lane writes its cell and reads its neighbour lane's: needs a __syncwarp between.
__global__ void cells_across_lanes(float* out, bool sync) {
  FASTGPT_DYNAMIC_SHARED(smem);
  float* cells = reinterpret_cast<float*>(smem);
  cells[threadIdx.x] = static_cast<float>(threadIdx.x);
  if (sync) __syncwarp();
  out[blockIdx.x * 64 + threadIdx.x] = cells[threadIdx.x ^ 1];
}

// Every block writes out[threadIdx.x]: a race unless each adds by atomicAdd.
__global__ void write_across_blocks(float* out, bool atomic) {
  if (atomic) {
    atomicAdd(&out[threadIdx.x], 1.0f);
  } else {
    out[threadIdx.x] = 1.0f;
  }
}

// Each thread writes its cell, then (after the barrier) reads the other warp's mirror cell;
// warp 0 then clears its own cells, which warp 1 may still be reading: needs a second
// __syncthreads (a __syncwarp would not do: the reader is in the other warp).
__global__ void reuse_without_second_barrier(float* out, bool sync) {
  __shared__ float cells[64];
  cells[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[blockIdx.x * 64 + threadIdx.x] = cells[63 - threadIdx.x];
  if (sync) __syncthreads();
  if (threadIdx.x < 32) cells[threadIdx.x] = 0.0f;
}

// atomicAdd into the buffer it may only read (the fix: into out).
__global__ void adds_to_its_input(float* out, float* in, bool fixed) {
  const int64_t i = blockIdx.x * 64 + threadIdx.x;
  atomicAdd(fixed ? &out[i] : &in[i], 1.0f);
}

// Writes one cell past the 64 floats of dynamic shared memory the launch gives it.
__global__ void writes_past_its_shared_memory(float* out, bool fixed) {
  FASTGPT_DYNAMIC_SHARED(smem);
  float* cells = reinterpret_cast<float*>(smem);
  cells[fixed ? threadIdx.x : threadIdx.x + 1] = 1.0f;
  __syncthreads();
  out[blockIdx.x * 64 + threadIdx.x] = cells[threadIdx.x];
}

// Records the order the threads pass the points after two barriers (the scheduler's, with
// one OS thread: an atomic counter gives each its place): out[0:64] after the first,
// out[64:128] after the second.
__global__ void arrival_order(float* out, bool) {
  if (blockIdx.x != 0) return;  // one block records (launched with two for out's 128 cells)
  __shared__ float next[2];
  if (threadIdx.x == 0) next[0] = next[1] = 0.0f;
  __syncthreads();
  out[static_cast<int>(atomicAdd(&next[0], 1.0f))] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[64 + static_cast<int>(atomicAdd(&next[1], 1.0f))] = static_cast<float>(threadIdx.x);
}

// Thread t writes out[t] in one launch and out[63 - t] in the next: ordered by the launch
// boundary (racecheck must start each launch with an empty shadow of global memory).
__global__ void write_one_cell(float* out, bool reversed) {
  out[reversed ? 63 - threadIdx.x : threadIdx.x] = static_cast<float>(threadIdx.x);
}

// Copies its input, and (unless fixed) clears it: a write to a buffer the kernel may only read.
__global__ void clears_its_input(float* out, float* in, bool fixed) {
  const int64_t i = blockIdx.x * 64 + threadIdx.x;
  out[i] = in[i];
  if (!fixed) in[i] = 0.0f;
}

// cp.async: each thread copies 16 bytes of `in` to shared memory and (unless fixed) reads
// them back before its wait_group: it must see the 0xFF fill (NaN), not the data.
__global__ void reads_before_the_wait(float* out, float* in, bool fixed) {
  FASTGPT_DYNAMIC_SHARED(smem);
  float* cells = reinterpret_cast<float*>(smem);
  const int t = threadIdx.x;
  fastgpt::cp_async_16(cells + 4 * t, in + blockIdx.x * 64 + 4 * (t % 16), true);
  fastgpt::cp_async_commit();
  if (fixed) fastgpt::cp_async_wait<0>();
  out[blockIdx.x * 64 + t] = cells[4 * t];
  if (!fixed) fastgpt::cp_async_wait<0>();
}

// Thread t's chunk of shared memory (4 floats) <- in[64 b + 4 ((t + shift) % 16)..] of block
// b, by cp.async, waited for.
__device__ void copy_chunk(float* cells, const float* in, int shift) {
  const int t = threadIdx.x;
  fastgpt::cp_async_16(cells + 4 * t, in + blockIdx.x * 64 + 4 * ((t + shift) % 16), true);
  fastgpt::cp_async_commit();
  fastgpt::cp_async_wait<0>();
}

// Each thread copies a chunk and waits for it; then reads the other warp's chunk: needs a
// __syncthreads between (the wait makes a copy visible to its own thread only).
__global__ void copies_read_without_barrier(float* out, float* in, bool fixed) {
  FASTGPT_DYNAMIC_SHARED(smem);
  float* cells = reinterpret_cast<float*>(smem);
  copy_chunk(cells, in, 0);
  if (fixed) __syncthreads();
  out[blockIdx.x * 64 + threadIdx.x] = cells[4 * ((threadIdx.x + 32) % 64)];
}

// Each thread reads the other warp's chunk, then starts the next copy into its own: needs
// a __syncthreads before the copy (the copy may land at once).
__global__ void copies_over_cells_still_read(float* out, float* in, bool fixed) {
  FASTGPT_DYNAMIC_SHARED(smem);
  float* cells = reinterpret_cast<float*>(smem);
  copy_chunk(cells, in, 0);
  __syncthreads();
  out[blockIdx.x * 64 + threadIdx.x] = cells[4 * ((threadIdx.x + 32) % 64)];
  if (fixed) __syncthreads();
  copy_chunk(cells, in, 1);
}

// Starts a copy and (unless fixed) never waits for it.
__global__ void never_waits(float* out, float* in, bool fixed) {
  FASTGPT_DYNAMIC_SHARED(smem);
  fastgpt::cp_async_16(smem + 16 * threadIdx.x, in + blockIdx.x * 64, true);
  fastgpt::cp_async_commit();
  if (fixed) fastgpt::cp_async_wait<0>();
  out[blockIdx.x * 64 + threadIdx.x] = 0.0f;
}

at::Tensor planted(const std::string& kernel, bool fixed, int64_t blocks,
                   const std::string& schedule, int64_t schedule_seed) {
  CallScope call(schedule, schedule_seed);
  at::Tensor out = at::zeros({blocks * 64});
  at::Tensor in = at::arange(blocks * 64, out.options());
  const Watched watch_out(out, "out", false), watch_in(in, "in", true);
  float* o = out.data_ptr<float>();
  const dim3 grid(static_cast<unsigned>(blocks));
  if (kernel == "cells_across_warps") {
    cuda_on_cpu::launch(cells_across_warps, grid, 64, 0, o, fixed);
  } else if (kernel == "cells_across_lanes") {
    cuda_on_cpu::launch(cells_across_lanes, grid, 64, 64 * 4, o, fixed);
  } else if (kernel == "write_across_blocks") {
    cuda_on_cpu::launch(write_across_blocks, grid, 64, 0, o, fixed);
  } else if (kernel == "adds_to_its_input") {
    cuda_on_cpu::launch(adds_to_its_input, grid, 64, 0, o, in.data_ptr<float>(), fixed);
  } else if (kernel == "writes_past_its_shared_memory") {
    cuda_on_cpu::launch(writes_past_its_shared_memory, grid, 64, 64 * 4, o, fixed);
  } else if (kernel == "arrival_order") {
    cuda_on_cpu::launch(arrival_order, grid, 64, 0, o, fixed);
  } else if (kernel == "two_launches") {
    cuda_on_cpu::launch(write_one_cell, grid, 64, 0, o, false);
    cuda_on_cpu::launch(write_one_cell, grid, 64, 0, o, true);
  } else if (kernel == "clears_its_input") {
    cuda_on_cpu::launch(clears_its_input, grid, 64, 0, o, in.data_ptr<float>(), fixed);
  } else if (kernel == "reads_before_the_wait") {
    cuda_on_cpu::launch(reads_before_the_wait, grid, 64, 64 * 16, o, in.data_ptr<float>(), fixed);
  } else if (kernel == "copies_read_without_barrier") {
    cuda_on_cpu::launch(copies_read_without_barrier, grid, 64, 64 * 16, o, in.data_ptr<float>(),
                        fixed);
  } else if (kernel == "copies_over_cells_still_read") {
    cuda_on_cpu::launch(copies_over_cells_still_read, grid, 64, 64 * 16, o,
                        in.data_ptr<float>(), fixed);
  } else if (kernel == "never_waits") {
    cuda_on_cpu::launch(never_waits, grid, 64, 64 * 16, o, in.data_ptr<float>(), fixed);
  } else if (kernel == "reuse_without_second_barrier") {
    cuda_on_cpu::launch(reuse_without_second_barrier, grid, 64, 0, o, fixed);
  } else {
    TORCH_CHECK(false, "no planted kernel ", kernel);
  }
  call.check_races({});
  return out;
}


// --- csrc/mma.cuh's instructions, one warp -------------------------------------------------------

// Each lane passes its registers (a: 4, b: 2 words; acc: 4 floats, updated) to one
// mma_m16n8k16, as given: the test lays them out by the PTX ISA's tables.
template <typename Elem>
__global__ void mma_lanes_kernel(const uint32_t* a, const uint32_t* b, float* acc) {
  const int lane = threadIdx.x;
  const uint32_t a_regs[4] = {a[4 * lane], a[4 * lane + 1], a[4 * lane + 2], a[4 * lane + 3]};
  const uint32_t b_regs[2] = {b[2 * lane], b[2 * lane + 1]};
  float c[4] = {acc[4 * lane], acc[4 * lane + 1], acc[4 * lane + 2], acc[4 * lane + 3]};
  fastgpt::mma_m16n8k16<Elem>(c, a_regs, b_regs);
  for (int e = 0; e < 4; ++e) acc[4 * lane + e] = c[e];
}

// acc (32 lanes x 4) after one mma_m16n8k16 of the lanes' registers a (32 x 4) and b (32 x 2),
// int32 bit patterns of pairs of `dtype` elements.
at::Tensor mma_lanes(const at::Tensor& a, const at::Tensor& b, const at::Tensor& acc,
                     const std::string& dtype) {
  CallScope call("forward", 0);
  TORCH_CHECK(a.sizes() == at::IntArrayRef({32, 4}) && b.sizes() == at::IntArrayRef({32, 2}) &&
              acc.sizes() == at::IntArrayRef({32, 4}), "mma_lanes: a (32, 4), b (32, 2), acc (32, 4)");
  at::Tensor a32 = a.to(at::kInt).contiguous(), b32 = b.to(at::kInt).contiguous();
  at::Tensor out = acc.to(at::kFloat).clone();
  const auto* a_ptr = reinterpret_cast<const uint32_t*>(a32.data_ptr());
  const auto* b_ptr = reinterpret_cast<const uint32_t*>(b32.data_ptr());
  if (dtype == "bfloat16") {
    cuda_on_cpu::launch(mma_lanes_kernel<__nv_bfloat16>, dim3(1), 32, 0, a_ptr, b_ptr,
                        out.data_ptr<float>());
  } else {
    TORCH_CHECK(dtype == "float16", "mma_lanes: dtype bfloat16 or float16");
    cuda_on_cpu::launch(mma_lanes_kernel<__half>, dim3(1), 32, 0, a_ptr, b_ptr,
                        out.data_ptr<float>());
  }
  call.check_races({});
  return out;
}

// Copies `tile` (rows x 8 16-bit elements) to shared memory, then each lane gives the row
// address tile_s + offsets[lane] (in elements) to one ldmatrix; returns the lanes' registers.
template <int kMatrices, bool kTrans>
__global__ void ldmatrix_lanes_kernel(const uint16_t* tile, int rows, const int32_t* offsets,
                                      uint32_t* out) {
  FASTGPT_DYNAMIC_SHARED(smem);
  auto* tile_s = reinterpret_cast<uint16_t*>(smem);
  for (int i = threadIdx.x; i < rows * 8; i += 32) tile_s[i] = tile[i];
  __syncwarp();
  uint32_t r[kMatrices];
  fastgpt::ldmatrix<kMatrices, kTrans>(r, tile_s + offsets[threadIdx.x]);
  for (int i = 0; i < kMatrices; ++i) out[threadIdx.x * kMatrices + i] = r[i];
}

at::Tensor ldmatrix_lanes(const at::Tensor& tile, const at::Tensor& offsets, int64_t matrices,
                          bool trans) {
  CallScope call("forward", 0);
  TORCH_CHECK(tile.dim() == 2 && tile.size(1) == 8 && tile.element_size() == 2,
              "ldmatrix_lanes: tile (rows, 8) of 16-bit elements");
  at::Tensor tile_c = tile.contiguous();
  at::Tensor offsets32 = offsets.to(at::kInt).contiguous();
  TORCH_CHECK(offsets32.numel() == 32, "ldmatrix_lanes: 32 offsets");
  at::Tensor out = at::zeros({32, matrices}, at::kInt);
  const auto* t = reinterpret_cast<const uint16_t*>(tile_c.data_ptr());
  const int rows = static_cast<int>(tile_c.size(0));
  const auto* o = offsets32.data_ptr<int32_t>();
  auto* r = reinterpret_cast<uint32_t*>(out.data_ptr());
  const int bytes = rows * 16;
  const auto run = [&](auto kernel) { cuda_on_cpu::launch(kernel, dim3(1), 32, bytes, t, rows, o, r); };
  if (matrices == 1) trans ? run(ldmatrix_lanes_kernel<1, true>) : run(ldmatrix_lanes_kernel<1, false>);
  else if (matrices == 2) trans ? run(ldmatrix_lanes_kernel<2, true>) : run(ldmatrix_lanes_kernel<2, false>);
  else if (matrices == 4) trans ? run(ldmatrix_lanes_kernel<4, true>) : run(ldmatrix_lanes_kernel<4, false>);
  else TORCH_CHECK(false, "ldmatrix_lanes: 1, 2 or 4 matrices");
  call.check_races({});
  return out;
}

// out (16 x 8 fp32) = a (16 x 16) @ b (16 x 8) the way the attention kernels compute
// products: a and b copied to shared memory by cp.async, A by ldmatrix.x4, B by
// ldmatrix.x2.trans from b's rows (kBRows: b holds B, like V) or by ldmatrix.x2 from b^T's
// rows (!kBRows: b holds B^T, 8 x 16, like K), one mma_m16n8k16, D stored by the C layout.
template <typename Elem, bool kBRows>
__global__ void product_kernel(const Elem* a, const Elem* b, float* out) {
  FASTGPT_DYNAMIC_SHARED(smem);
  Elem* a_s = reinterpret_cast<Elem*>(smem);  // 16 x 16
  Elem* b_s = a_s + 256;                      // 16 x 8 or 8 x 16
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  fastgpt::cp_async_16(a_s + 8 * lane, a + 8 * lane, true);  // 32 chunks of 8 elements
  if (lane < 16) fastgpt::cp_async_16(b_s + 8 * lane, b + 8 * lane, true);
  fastgpt::cp_async_commit();
  fastgpt::cp_async_wait<0>();
  __syncwarp();
  uint32_t a_regs[4], b_regs[2];
  // matrix i = lane / 8: rows (i % 2) * 8.., columns (i / 2) * 8..
  fastgpt::ldmatrix<4, false>(a_regs, a_s + (lane % 16) * 16 + (lane / 16) * 8);
  if constexpr (kBRows) {  // matrix i = (lane / 8) % 2: k rows 8i..8i+7 of B (16 x 8)
    fastgpt::ldmatrix<2, true>(b_regs, b_s + (lane % 16) * 8);
  } else {  // matrix i: B^T's rows n = 0..7, k columns 8i..8i+7
    fastgpt::ldmatrix<2, false>(b_regs, b_s + (lane % 8) * 16 + ((lane / 8) % 2) * 8);
  }
  float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  fastgpt::mma_m16n8k16<Elem>(c, a_regs, b_regs);
  out[g * 8 + 2 * t] = c[0];
  out[g * 8 + 2 * t + 1] = c[1];
  out[(g + 8) * 8 + 2 * t] = c[2];
  out[(g + 8) * 8 + 2 * t + 1] = c[3];
}

at::Tensor product(const at::Tensor& a, const at::Tensor& b, bool b_rows) {
  CallScope call("forward", 0);
  TORCH_CHECK(a.sizes() == at::IntArrayRef({16, 16}) && a.scalar_type() == b.scalar_type() &&
                  (a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf),
              "product: a (16, 16) bf16 or fp16, b of a's dtype");
  TORCH_CHECK(b.sizes() == (b_rows ? at::IntArrayRef({16, 8}) : at::IntArrayRef({8, 16})),
              "product: b (16, 8), or b^T (8, 16) if not b_rows");
  at::Tensor a_c = a.contiguous(), b_c = b.contiguous();
  at::Tensor out = at::zeros({16, 8});
  fastgpt::with_16bit_type(a.scalar_type(), [&](auto elem) {
    using Elem = decltype(elem);
    const auto run = [&](auto kernel) {
      cuda_on_cpu::launch(kernel, dim3(1), 32, 2 * 256 * 2, fastgpt::ptr<const Elem>(a_c),
                          fastgpt::ptr<const Elem>(b_c), out.data_ptr<float>());
    };
    if (b_rows) run(product_kernel<Elem, true>);
    else run(product_kernel<Elem, false>);
  });
  call.check_races({});
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "csrc/'s CUDA kernels run on the CPU under racecheck (tests only)";
  m.def("forward", &attention_forward,
        "(out, lse, kernel launches) of attention_forward_launches", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("scale"), py::arg("dropout_p"), py::arg("seed"), py::arg("offset"),
        py::arg("schedule") = "forward", py::arg("schedule_seed") = 0,
        py::arg("check_races") = true);
  m.def("backward", &attention_backward,
        "(dq, dk, dv, kernel launches) of attention_backward_launches", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("grad_out"),
        py::arg("scale"), py::arg("dropout_p"), py::arg("seed"), py::arg("offset"),
        py::arg("deterministic"), py::arg("schedule") = "forward",
        py::arg("schedule_seed") = 0, py::arg("check_races") = true);
  m.def("adamw_step", &adamw_step, "kernel launches of adamw_step_launches (updates in place)",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
        py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("step"), py::arg("grad_scale") = py::none(),
        py::arg("lr_tensor") = py::none(), py::arg("step_tensor") = py::none(),
        py::arg("schedule") = "forward", py::arg("schedule_seed") = 0,
        py::arg("check_races") = true);
  m.def("mma_lanes", &mma_lanes, "the lanes' accumulators after one mma_m16n8k16",
        py::arg("a"), py::arg("b"), py::arg("acc"), py::arg("dtype"));
  m.def("ldmatrix_lanes", &ldmatrix_lanes, "the lanes' registers after one ldmatrix",
        py::arg("tile"), py::arg("offsets"), py::arg("matrices"), py::arg("trans"));
  m.def("product", &product, "a @ b through cp.async, ldmatrix and mma_m16n8k16",
        py::arg("a"), py::arg("b"), py::arg("b_rows"));
  m.def("swizzled", [](int64_t D, int64_t row, int64_t chunk) {
    TORCH_CHECK(D == 32 || D == 64 || D == 128, "swizzled: D 32, 64 or 128");
    const int r = static_cast<int>(row), c = static_cast<int>(chunk);
    return D == 32 ? fastgpt::swizzled<32>(r, c) : D == 64 ? fastgpt::swizzled<64>(r, c)
                                                            : fastgpt::swizzled<128>(r, c);
  }, "csrc/attention_mma.cuh's swizzled<D>(row, chunk): an element offset in a tile",
        py::arg("D"), py::arg("row"), py::arg("chunk"));
  m.def("tensor_core_shared_bytes", [](int64_t D) {
    int bytes = 0;
    fastgpt::with_head_dim(D, [&](auto head_dim) {
      constexpr int d = decltype(head_dim)::value;
      bytes = std::max({fastgpt::forward_mma_smem<__nv_bfloat16, d>(),
                        fastgpt::backward_dkdv_mma_smem<__nv_bfloat16, d>(),
                        fastgpt::backward_dq_mma_smem<__nv_bfloat16, d>()});
    });
    return bytes;
  }, "the most dynamic shared memory a bf16/fp16 attention kernel of head dim D asks for",
        py::arg("D"));
  m.def("dynamic_shared_memory_opt_in", [](int64_t static_bytes, int64_t dynamic_bytes) {
    return fastgpt::dynamic_shared_memory_opt_in(static_cast<int>(static_bytes),
                                                 static_cast<int>(dynamic_bytes));
  }, "csrc/attention_common.cuh's rule: the MaxDynamicSharedMemorySize a launch needs (0: "
     "none)", py::arg("static_bytes"), py::arg("dynamic_bytes"));
  m.def("write_one", &write_one, "a kernel writes element index of an n-element buffer");
  m.def("planted", &planted, "runs a planted race (fixed=False) or its fixed twin",
        py::arg("kernel"), py::arg("fixed"), py::arg("blocks") = 1,
        py::arg("schedule") = "forward", py::arg("schedule_seed") = 0);
}
