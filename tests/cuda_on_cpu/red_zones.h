// Red zones for the CPU run: while a RedZoneScope is open, every CPU tensor allocated sits
// between two 64 KiB runs of canary bytes; a kernel that writes outside its buffer changes
// them, and the scope's check() (or the buffer's release) says where. Each such buffer is
// also watched by racecheck while it lives (named by its size until the caller names it).
#pragma once

#include "racecheck.h"

#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace cuda_on_cpu {

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
    try {
      racecheck::watch(base + kRedZone, nbytes, "a " + std::to_string(nbytes) + "-byte buffer");
    } catch (...) {
      std::free(base);
      throw;
    }
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
    racecheck::unwatch(base + kRedZone);
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

inline RedZoneAllocator red_zone_allocator;

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

}  // namespace cuda_on_cpu
