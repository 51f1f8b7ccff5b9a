// csrc/attention.cuh compiled for the CPU (through cuda_on_cpu.h) as a Python module: the
// kernels and their dispatch (attention_forward_launches / attention_backward_launches) exactly
// as attention.cu runs them on a GPU, with CPU tensors. tests/test_attention.py builds it.
//
// Every input sits in a larger buffer whose elements past its end are NaN: a kernel that reads
// past an input's end (and uses what it read) turns its results into NaN. Every buffer the
// dispatch allocates (the outputs, dQ's accumulator) comes with red zones, canary bytes before
// and after it: a kernel that writes outside one changes them, and the call fails.
#include "cuda_on_cpu.h"

#include "attention.cuh"

#include <c10/core/CPUAllocator.h>
#include <torch/extension.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

namespace {

// --- red zones around the buffers the dispatch allocates --------------------------------------

constexpr size_t kRedZone = 64 * 1024;  // each side: more than a whole 64 x 128 fp32 tile
constexpr unsigned char kCanary = 0xA5;

// The CPU allocator while a RedZoneScope is open: each buffer sits between two red zones. A
// changed red zone is reported when the buffer is freed, or checked for by check_red_zones().
class RedZoneAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    const size_t total = (2 * kRedZone + nbytes + 63) / 64 * 64;
    auto* base = static_cast<unsigned char*>(std::aligned_alloc(64, total));
    TORCH_CHECK(base != nullptr, "RedZoneAllocator: out of memory for ", nbytes, " bytes");
    std::memset(base, kCanary, kRedZone);
    std::memset(base + kRedZone + nbytes, kCanary, total - kRedZone - nbytes);
    {
      std::lock_guard<std::mutex> lock(mutex());
      sizes()[base] = nbytes;
    }
    return {base + kRedZone, base, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // What was found wrong since the last call (and in the live buffers now); clears it.
  static std::string take_violations() {
    std::lock_guard<std::mutex> lock(mutex());
    for (const auto& [base, nbytes] : sizes()) record_if_changed(base, nbytes);
    std::string found;
    for (const std::string& v : violations()) found += (found.empty() ? "" : "; ") + v;
    violations().clear();
    return found;
  }

 private:
  static void release(void* context) {
    auto* base = static_cast<unsigned char*>(context);
    {
      std::lock_guard<std::mutex> lock(mutex());
      record_if_changed(base, sizes().at(base));
      sizes().erase(base);
    }
    std::free(base);
  }
  static void record_if_changed(const unsigned char* base, size_t nbytes) {
    const unsigned char* data = base + kRedZone;
    for (int64_t i = -static_cast<int64_t>(kRedZone); i < static_cast<int64_t>(kRedZone); ++i) {
      const int64_t at = i < 0 ? i : static_cast<int64_t>(nbytes) + i;
      if (data[at] != kCanary) {
        violations().push_back("a kernel wrote outside a " + std::to_string(nbytes) +
                               "-byte buffer, at byte " + std::to_string(at) + " of it");
        return;  // the first changed byte is enough
      }
    }
  }
  static std::mutex& mutex() { static std::mutex m; return m; }
  static std::map<const unsigned char*, size_t>& sizes() {
    static std::map<const unsigned char*, size_t> s;
    return s;
  }
  static std::vector<std::string>& violations() {
    static std::vector<std::string> v;
    return v;
  }
};

RedZoneAllocator red_zone_allocator;

// CPU tensors allocated while it is open get red zones; closing it restores the allocator.
class RedZoneScope {
 public:
  RedZoneScope() : previous_(c10::GetCPUAllocator()) {
    c10::SetCPUAllocator(&red_zone_allocator);
    TORCH_CHECK(c10::GetCPUAllocator() == &red_zone_allocator,
                "could not install the red-zone CPU allocator (one of higher priority is set)");
    RedZoneAllocator::take_violations();  // start clean
  }
  ~RedZoneScope() { c10::SetCPUAllocator(previous_); }
  // Fails, naming what was written where, if a red zone changed since the scope opened.
  void check() const {
    const std::string found = RedZoneAllocator::take_violations();
    TORCH_CHECK(found.empty(), found);
  }

 private:
  c10::Allocator* previous_;
};

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
  const at::Tensor q_in = guarded_copy(q), k_in = guarded_copy(k), v_in = guarded_copy(v);
  RedZoneScope red_zones;
  auto [out, lse] = fastgpt::attention_forward_launches(launch, q_in, k_in, v_in, scale,
                                                        dropout_p, seed, offset);
  red_zones.check();
  return {out, lse, launch.launches};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, int> backward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& grad_out, double scale, double dropout_p,
    int64_t seed, int64_t offset, bool deterministic) {
  CpuLaunch launch;
  const at::Tensor q_in = guarded_copy(q), k_in = guarded_copy(k), v_in = guarded_copy(v);
  const at::Tensor out_in = guarded_copy(out), lse_in = guarded_copy(lse);
  const at::Tensor grad_out_in = guarded_copy(grad_out);
  RedZoneScope red_zones;
  auto [dq, dk, dv] = fastgpt::attention_backward_launches(
      launch, q_in, k_in, v_in, out_in, lse_in, grad_out_in, scale, dropout_p, seed, offset,
      deterministic);
  red_zones.check();
  return {dq, dk, dv, launch.launches};
}

// The red zones' own test: a one-thread kernel writes out[index] of an n-element buffer
// allocated inside the scope.
__global__ void write_one_element(float* out, int64_t index) { out[index] = 1.0f; }

at::Tensor write_one(int64_t n, int64_t index) {
  RedZoneScope red_zones;
  at::Tensor out = at::zeros({n});
  cuda_on_cpu::launch(write_one_element, dim3(1), 32, 0, out.data_ptr<float>(), index);
  red_zones.check();
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "csrc/attention.cuh's CUDA kernels run on the CPU (tests only)";
  m.def("forward", &forward, "(out, lse, kernel launches) of attention_forward_launches");
  m.def("backward", &backward, "(dq, dk, dv, kernel launches) of attention_backward_launches");
  m.def("write_one", &write_one, "a kernel writes element index of an n-element buffer");
}
