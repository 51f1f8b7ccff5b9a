// CUDA on the CPU, just enough of it to run csrc/'s kernels (attention.cuh, adamw.cuh)
// unchanged: so that CI, which has no GPU, executes the very index arithmetic, tiling,
// synchronisation and tensor-core data flow that the GPU runs, against the tiled Python twin, the
// explicit reference and torch.optim.AdamW.
//
// Model: blocks run one after another; a block's threads are fibers (fiber_switch.h) on one OS
// thread, each running until it waits at a barrier, so a barrier that not every thread
// reaches (a divergent __syncthreads or warp collective) is reported as a deadlock instead
// of hanging. The order is a Schedule: blocks forward, reversed or shuffled, and within a
// block the fibers resumed in ascending order, or in an order rotated or reshuffled after
// every barrier (seeded), so that a result that depends on the order shows. Shared memory
// (the dynamic buffer, and the static __shared__ arrays, which live in one linker section) is
// filled with 0xFF bytes (NaN in fp32, bf16 and fp16) before each block, so a read of shared
// memory nothing wrote shows up. Racecheck (racecheck.h) watches every access of shared
// memory and of the global buffers a test names, and reports two threads touching a byte
// with no barrier between them, as compute-sanitizer's racecheck does on a GPU.
// Warp collectives: __shfl_*_sync and __syncwarp wait for the warp's 32 lanes. csrc/mma.cuh's
// PTX instructions (at the end of this file), lane by lane as the PTX ISA defines them:
// mma.sync m16n8k16 takes each A and B element from the lane that holds it on a GPU (a
// layout mistake computes a wrong product), as fp32 sums of the exact products; ldmatrix
// reads each lane's elements from the rows whose addresses the ISA's lanes give; cp.async
// data lands at the wait_group that covers it, its destination reading 0xFF until then.
//
// Not modelled: the memory model beyond barrier epochs (no reordering of one thread's own
// accesses, no visibility delays), bank conflicts, timing. Include this before the kernels;
// compile with -std=c++20 -fsanitize=thread (racecheck's access hooks; see racecheck.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>

#include "fiber_switch.h"
#include "racecheck.h"

#include <atomic>
#include <bit>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

// The CUDA keywords, for the C++ compiler (CUDA's headers give some of them attributes that
// g++ does not know).
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// one block at a time: a static is its shared memory; all of them in one section, so that
// racecheck and the 0xFF fill know where they are
#define __shared__ static __attribute__((section("cuda_on_cpu_shared")))
#define FASTGPT_DYNAMIC_SHARED(name) unsigned char* name = cuda_on_cpu::dynamic_shared_memory()

inline uint3 threadIdx, blockIdx;  // the running fiber's, set by the scheduler
inline dim3 blockDim, gridDim;

// The static __shared__ arrays' section (the linker defines these; weak: a module may have none).
extern "C" __attribute__((weak)) unsigned char __start_cuda_on_cpu_shared[];
extern "C" __attribute__((weak)) unsigned char __stop_cuda_on_cpu_shared[];

template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }  // CUDA's device min / max
template <typename T>
inline T max(T a, T b) { return a < b ? b : a; }

namespace cuda_on_cpu {

constexpr int kWarpSize = 32;

// The emulator's own code that runs in a kernel thread (barriers, shuffles): not watched by
// racecheck (noipa: neither inlined into watched code nor cloned, which would drop the mark).
#define CUDA_ON_CPU_INTERNAL __attribute__((noipa, no_sanitize("thread")))
constexpr size_t kStackBytes = 256 * 1024;  // a fiber's stack: the kernels' arrays fit easily

// The order the scheduler runs blocks, and a block's fibers, in.
enum class Order { forward, reversed, shuffled };
struct Schedule {
  Order order = Order::forward;
  uint64_t seed = 0;
};
inline Schedule schedule;  // what launch() uses; the test modules set it per call

inline Order order_named(const std::string& name) {
  if (name == "forward") return Order::forward;
  if (name == "reversed") return Order::reversed;
  if (name == "shuffled") return Order::shuffled;
  throw std::invalid_argument("schedule must be forward, reversed or shuffled, not " + name);
}

// The shuffled schedule's generator (splitmix64) and a Fisher-Yates shuffle with Lemire's
// multiply-shift for the bound. A new order is drawn at every barrier, warp collectives
// included (each mma, ldmatrix, shuffle): std::shuffle over std::mt19937_64 (a division per
// element) took a tenth of a shuffled T = 1000 attention run.
class ScheduleRandom {
 public:
  explicit ScheduleRandom(uint64_t seed) : state_(seed) {}
  CUDA_ON_CPU_UNWATCHED uint64_t next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // uniform in [0, n) up to a bias of n / 2^32: n is a block's thread count
  CUDA_ON_CPU_UNWATCHED uint32_t below(uint32_t n) {
    return static_cast<uint32_t>((static_cast<uint64_t>(next() >> 32) * n) >> 32);
  }
  template <typename T>
  CUDA_ON_CPU_UNWATCHED void shuffle(std::vector<T>& items) {
    T* const data = items.data();  // plain loads and stores: no instrumented std:: call
    for (size_t i = items.size(); i > 1; --i) {
      const size_t j = below(static_cast<uint32_t>(i));
      const T item = data[i - 1];
      data[i - 1] = data[j];
      data[j] = item;
    }
  }

 private:
  uint64_t state_;
};

struct Barrier {
  int expected = 0, arrived = 0;
  uint64_t generation = 0;
};

// A cp.async copy in flight: its 16 bytes were read at the start and land at the wait.
struct AsyncCopy {
  unsigned char* dst;
  unsigned char data[16];
};

struct Fiber {
  FiberContext context;
  std::unique_ptr<char[]> stack;
  Barrier* waiting_on = nullptr;  // with the generation it waits to end
  uint64_t waiting_generation = 0;
  bool done = false;
  racecheck::Who who;  // its launch-wide id and the barriers it passed
  std::vector<AsyncCopy> open_copies;                 // cp.async since the last commit
  std::deque<std::vector<AsyncCopy>> copy_groups;     // committed, oldest first
};

// One block's fibers and their scheduler.
class Block {
 public:
  // `dynamic_shared` is 128-byte aligned, 0xFF-filled and watched by racecheck by the caller.
  Block(int threads, unsigned char* dynamic_shared, size_t shared_bytes, uint32_t block_linear,
        Schedule order)
      : fibers_(threads), block_barrier_{threads, 0, 0}, warp_barriers_((threads + 31) / 32),
        shuffle_slots_((threads + 31) / 32), exchange_slots_((threads + 31) / 32),
        shared_(dynamic_shared), shared_bytes_(shared_bytes), order_(threads),
        schedule_(order), random_(order.seed * 1000003u + block_linear) {
    if (threads % kWarpSize != 0) throw std::runtime_error("block size must be whole warps");
    for (Barrier& b : warp_barriers_) b.expected = kWarpSize;
    for (int t = 0; t < threads; ++t) {
      fibers_[t].who.thread = block_linear * static_cast<uint32_t>(threads) + t;
    }
    std::iota(order_.begin(), order_.end(), 0);
    if (schedule_.order == Order::reversed) std::reverse(order_.begin(), order_.end());
    if (schedule_.order == Order::shuffled) random_.shuffle(order_);
  }

  // Runs kernel() in every thread of the block (blockIdx set by the caller); throws on a
  // deadlock or an exception in a thread.
  template <typename Body>
  void run(Body& body) {
    body_ = [](void* b) { (*static_cast<Body*>(b))(); };
    body_arg_ = &body;
    for (size_t t = 0; t < fibers_.size(); ++t) {
      Fiber& f = fibers_[t];
      f.stack.reset(new char[kStackBytes]);
      fiber_start(f.context, f.stack.get(), kStackBytes, &Block::fiber_main);
    }
    current_block() = this;
    position_ = static_cast<int>(order_.size()) - 1;
    while (error_.empty()) {
      const int next = next_runnable();
      if (next < 0) {
        if (!all_done()) error_ = deadlock_report();
        break;
      }
      current_ = next;
      threadIdx = make_uint3(static_cast<unsigned>(current_), 0, 0);
      racecheck::State& watch = racecheck::state();
      watch.who = &fibers_[current_].who;
      watch.stack_begin = reinterpret_cast<uintptr_t>(fibers_[current_].stack.get());
      watch.stack_size = kStackBytes;
      fiber_switch(scheduler_, fibers_[current_].context);
      watch.who = nullptr;
    }
    current_block() = nullptr;
    if (!error_.empty()) throw std::runtime_error(error_);
  }

  // __syncthreads and __syncwarp: barriers that also order memory (a new racecheck epoch).
  CUDA_ON_CPU_INTERNAL void sync_threads() {
    wait(block_barrier_);
    ++fibers_[current_].who.block_epoch;
  }
  CUDA_ON_CPU_INTERNAL void sync_warp() {
    wait_for_warp();
    ++fibers_[current_].who.warp_epoch;
  }
  // A warp collective that exchanges values (shuffles, mma, ldmatrix): waits for the warp, orders no
  // memory.
  CUDA_ON_CPU_INTERNAL void wait_for_warp() { wait(warp_barriers_[current_ / kWarpSize]); }

  // Every lane offers `value`; returns lane `source`'s. Two slot sets alternate, so a lane
  // that runs ahead to the next shuffle cannot overwrite a value still to be read.
  CUDA_ON_CPU_INTERNAL float shuffle(float value, int source) {
    auto& slots = shuffle_slots_[current_ / kWarpSize];
    const int lane = current_ % kWarpSize;
    const int set = slots.calls[lane]++ % 2;
    slots.values[set][lane] = value;
    wait_for_warp();
    return slots.values[set][source % kWarpSize];
  }

  // Every lane offers n <= kExchangeWords words; returns the warp's offers, lane l's at
  // [l * kExchangeWords, ...). Alternating slot sets, as for shuffle.
  static constexpr int kExchangeWords = 6;
  CUDA_ON_CPU_INTERNAL const uint64_t* exchange(const uint64_t* offer, int n) {
    auto& slots = exchange_slots_[current_ / kWarpSize];
    const int lane = current_ % kWarpSize;
    const int set = slots.calls[lane]++ % 2;
    std::memcpy(slots.words[set][lane], offer, n * sizeof(uint64_t));
    wait_for_warp();
    return &slots.words[set][0][0];
  }

  // Whether [p, p + bytes) lies in the block's shared memory (dynamic or static).
  bool in_shared(const void* p, size_t bytes) const {
    const auto* c = static_cast<const unsigned char*>(p);
    const bool dynamic = c >= shared_ && c + bytes <= shared_ + shared_bytes_;
    const bool statics = c >= __start_cuda_on_cpu_shared && c + bytes <= __stop_cuda_on_cpu_shared;
    return dynamic || statics;
  }

  // cp.async as the PTX ISA has it, for the running thread: the source is read now, the
  // destination's 16 bytes are set to 0xFF now (a read before the wait sees NaN; racecheck
  // sees a write by this thread, so another thread still reading the old data races with
  // it) and take the data at the cp_async_wait that covers the copy's group (racecheck: a
  // write then, which the other threads must not read before a __syncthreads).
  CUDA_ON_CPU_INTERNAL void cp_async(void* dst, const void* src, bool from_src) {
    const auto where = [](const void* p) { return std::to_string(reinterpret_cast<uintptr_t>(p)); };
    if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || !in_shared(dst, 16)) {
      throw std::runtime_error("cp.async: destination " + where(dst) +
                               " is not 16 aligned bytes of shared memory");
    }
    AsyncCopy copy{static_cast<unsigned char*>(dst), {}};
    if (from_src) {
      if (reinterpret_cast<uintptr_t>(src) % 16 != 0) {
        throw std::runtime_error("cp.async: source " + where(src) + " is not 16-byte aligned");
      }
      racecheck::access(src, 16, false);
      std::memcpy(copy.data, src, 16);
    }
    racecheck::access(dst, 16, true);
    std::memset(dst, 0xFF, 16);
    fibers_[current_].open_copies.push_back(copy);
  }
  CUDA_ON_CPU_INTERNAL void cp_async_commit() {
    Fiber& f = fibers_[current_];
    f.copy_groups.push_back(std::move(f.open_copies));
    f.open_copies.clear();
  }
  CUDA_ON_CPU_INTERNAL void cp_async_wait(int pending) {
    Fiber& f = fibers_[current_];
    while (static_cast<int>(f.copy_groups.size()) > pending) {
      for (const AsyncCopy& copy : f.copy_groups.front()) {
        racecheck::access(copy.dst, 16, true);
        std::memcpy(copy.dst, copy.data, 16);
      }
      f.copy_groups.pop_front();
    }
  }

  CUDA_ON_CPU_INTERNAL int lane() const { return current_ % kWarpSize; }
  unsigned char* shared() { return shared_; }
  static Block*& current_block() {
    static Block* block = nullptr;
    return block;
  }

 private:
  struct ShuffleSlots {
    float values[2][kWarpSize];
    uint64_t calls[kWarpSize] = {};
  };
  struct ExchangeSlots {
    uint64_t words[2][kWarpSize][kExchangeWords];
    uint64_t calls[kWarpSize] = {};
  };

  // A fiber's entry: runs the kernel, then switches back to the scheduler for good.
  static void fiber_main() {
    Block* block = current_block();
    try {
      block->body_(block->body_arg_);
    } catch (const std::exception& e) {
      block->error_ = "thread " + std::to_string(block->current_) + ": " + e.what();
    }
    Fiber& self = block->fibers_[block->current_];
    if (block->error_.empty() && (!self.open_copies.empty() || !self.copy_groups.empty())) {
      block->error_ = "thread " + std::to_string(block->current_) +
                      ": ended with cp.async copies it never waited for";
    }
    self.done = true;
    fiber_switch(self.context, block->scheduler_);
    __builtin_unreachable();  // never resumed
  }

  CUDA_ON_CPU_INTERNAL void wait(Barrier& barrier) {
    if (++barrier.arrived == barrier.expected) {
      barrier.arrived = 0;
      ++barrier.generation;  // releases the others; this fiber runs on
      reorder();
      return;
    }
    Fiber& self = fibers_[current_];
    self.waiting_on = &barrier;
    self.waiting_generation = barrier.generation;
    fiber_switch(self.context, scheduler_);
    if (!error_.empty()) throw std::runtime_error("aborted");  // unwinds this fiber
  }

  CUDA_ON_CPU_INTERNAL bool runnable(const Fiber& f) const {
    if (f.done) return false;
    return f.waiting_on == nullptr || f.waiting_on->generation != f.waiting_generation;
  }

  // The next runnable fiber after the current one in order_, cyclically.
  CUDA_ON_CPU_INTERNAL int next_runnable() {
    const int n = static_cast<int>(order_.size());
    for (int i = 1; i <= n; ++i) {
      const int at = (position_ + i) % n;
      const int t = order_[at];
      if (runnable(fibers_[t])) {
        fibers_[t].waiting_on = nullptr;
        position_ = at;
        return t;
      }
    }
    return -1;
  }

  // After a barrier released its waiters: the schedule's next order, scanned from its start.
  CUDA_ON_CPU_INTERNAL void reorder() {
    if (schedule_.order == Order::reversed) std::rotate(order_.begin(), order_.begin() + 1, order_.end());
    if (schedule_.order == Order::shuffled) random_.shuffle(order_);
    position_ = static_cast<int>(order_.size()) - 1;
  }

  bool all_done() const {
    for (const Fiber& f : fibers_) {
      if (!f.done) return false;
    }
    return true;
  }

  std::string deadlock_report() const {
    std::string waiting;
    int done = 0, at_block = 0, at_warp = 0;
    for (const Fiber& f : fibers_) {
      if (f.done) ++done;
      else if (f.waiting_on == &block_barrier_) ++at_block;
      else ++at_warp;
    }
    return "deadlock in block (" + std::to_string(blockIdx.x) + ", " +
           std::to_string(blockIdx.y) + "): " + std::to_string(done) + " threads finished, " +
           std::to_string(at_block) + " wait at __syncthreads, " + std::to_string(at_warp) +
           " at a warp collective";
  }

  std::vector<Fiber> fibers_;
  Barrier block_barrier_;
  std::vector<Barrier> warp_barriers_;
  std::vector<ShuffleSlots> shuffle_slots_;
  std::vector<ExchangeSlots> exchange_slots_;
  unsigned char* shared_;
  size_t shared_bytes_;
  std::vector<int> order_;  // the fibers in the order they are resumed
  int position_ = 0;        // the current fiber's place in order_
  Schedule schedule_;
  ScheduleRandom random_;
  FiberContext scheduler_;
  int current_ = -1;
  std::string error_;
  void (*body_)(void*) = nullptr;
  void* body_arg_ = nullptr;
};

inline unsigned char* dynamic_shared_memory() { return Block::current_block()->shared(); }

// kernel<<<grid, threads, shared_bytes>>>(args...), block by block in the order `schedule`
// says. Racecheck's findings stay for the caller (racecheck::take_report), which can name the
// buffers.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, int threads, int shared_bytes, Args... args) {
  gridDim = grid;
  blockDim = dim3(threads);
  const unsigned grid_sizes[3] = {grid.x, grid.y, grid.z};
  racecheck::begin_launch(reinterpret_cast<const void*>(kernel), threads, grid_sizes);
  // dynamic shared memory, 128-byte aligned as the kernels declare it, then a guard that a
  // kernel may not write (racecheck) and reads as NaN; and the statics
  constexpr size_t kSharedGuard = 1024;
  std::vector<unsigned char> dynamic(static_cast<size_t>(shared_bytes) + 128 + kSharedGuard);
  unsigned char* shared = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(dynamic.data()) + 127) / 128 * 128);
  const size_t static_bytes = __stop_cuda_on_cpu_shared - __start_cuda_on_cpu_shared;
  struct Unwatch {
    const void *a, *b, *c;
    ~Unwatch() { racecheck::unwatch(a); racecheck::unwatch(b); racecheck::unwatch(c); }
  } unwatch{shared, shared + shared_bytes, __start_cuda_on_cpu_shared};
  racecheck::watch(shared, shared_bytes, "dynamic shared memory", true);
  racecheck::watch(shared + shared_bytes, kSharedGuard,
                   "the bytes past the launch's dynamic shared memory", true, true);
  racecheck::watch(__start_cuda_on_cpu_shared, static_bytes, "static shared memory", true);

  std::vector<uint32_t> blocks(static_cast<size_t>(grid.x) * grid.y * grid.z);
  std::iota(blocks.begin(), blocks.end(), 0u);
  if (schedule.order == Order::reversed) std::reverse(blocks.begin(), blocks.end());
  if (schedule.order == Order::shuffled) {
    std::shuffle(blocks.begin(), blocks.end(), std::mt19937_64(schedule.seed));
  }
  for (const uint32_t b : blocks) {
    blockIdx = make_uint3(b % grid.x, b / grid.x % grid.y, b / (grid.x * grid.y));
    std::memset(shared, 0xFF, static_cast<size_t>(shared_bytes) + kSharedGuard);
    if (static_bytes > 0) std::memset(__start_cuda_on_cpu_shared, 0xFF, static_bytes);
    racecheck::begin_block();
    Block block(threads, shared, static_cast<size_t>(shared_bytes), b, schedule);
    auto body = [&] { kernel(args...); };
    block.run(body);
    if (const char* error = racecheck::state().error) {
      racecheck::state().error = nullptr;
      throw std::runtime_error(error);
    }
  }
}

}  // namespace cuda_on_cpu

// --- the device functions the kernels call ---

inline void __syncthreads() { cuda_on_cpu::Block::current_block()->sync_threads(); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) throw std::runtime_error("__syncwarp: only full warps are modelled");
  cuda_on_cpu::Block::current_block()->sync_warp();
}

inline float __shfl_sync(unsigned mask, float value, int source_lane) {
  if (mask != 0xffffffffu) throw std::runtime_error("__shfl_sync: only full warps are modelled");
  return cuda_on_cpu::Block::current_block()->shuffle(value, source_lane);
}

inline float __shfl_xor_sync(unsigned mask, float value, int lane_mask) {
  if (mask != 0xffffffffu) {
    throw std::runtime_error("__shfl_xor_sync: only full warps are modelled");
  }
  auto* block = cuda_on_cpu::Block::current_block();
  return block->shuffle(value, block->lane() ^ lane_mask);
}

inline float atomicAdd(float* address, float value) {
  return std::atomic_ref<float>(*address).fetch_add(value);
}

// 32-bit integer shuffles, through the float ones (the bits travel unchanged).
inline unsigned __shfl_sync(unsigned mask, unsigned value, int source_lane) {
  return std::bit_cast<unsigned>(__shfl_sync(mask, std::bit_cast<float>(value), source_lane));
}
inline unsigned __shfl_xor_sync(unsigned mask, unsigned value, int lane_mask) {
  return std::bit_cast<unsigned>(__shfl_xor_sync(mask, std::bit_cast<float>(value), lane_mask));
}

// --- csrc/mma.cuh's PTX instructions, lane by lane as the PTX ISA defines them ---
//
// mma.sync m16n8k16: every lane offers its A and B registers to the warp and computes its
// own four C elements from the lanes that hold each A and B element on a GPU, so a kernel
// whose fragments are laid out wrongly computes a wrong product here. ldmatrix: every lane
// offers its row address; each lane reads only the elements it receives (racecheck sees
// those bytes read by it). cp.async: see Block::cp_async.
#define FASTGPT_WARP_PRIMITIVES_ON_CPU

namespace cuda_on_cpu {

// (Inlined into the no_sanitize code that calls them: no CUDA_ON_CPU_INTERNAL, whose noipa
// would make every conversion a call.)
__attribute__((no_sanitize("thread"), always_inline)) inline float element_to_float(
    uint16_t bits, __nv_bfloat16) {
  const uint32_t word = static_cast<uint32_t>(bits) << 16;
  float f;
  __builtin_memcpy(&f, &word, sizeof(f));
  return f;
}
// IEEE binary16 -> binary32, exactly (what __half2float computes)
__attribute__((no_sanitize("thread"))) inline float half_bits_to_float(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits >> 15) << 31;
  const uint32_t exponent = (bits >> 10) & 0x1F;
  const uint32_t mantissa = bits & 0x3FF;
  if (exponent == 0) {  // zero, subnormal: mantissa * 2^-24, exact in fp32
    const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
    return sign ? -magnitude : magnitude;
  }
  // normal: rebias the exponent (15 -> 127); inf and NaN keep the all-ones exponent
  const uint32_t word = sign | (exponent == 0x1F ? 0xFFu : exponent + 112) << 23 | mantissa << 13;
  float f;
  __builtin_memcpy(&f, &word, sizeof(f));
  return f;
}
// half_bits_to_float of every bit pattern, made when the module loads: mma_m16n8k16 converts
// 64 elements per lane and call, a fifth of a T = 1000 attention run's time by arithmetic.
inline const std::vector<float> half_to_float_table = [] {
  std::vector<float> table(1 << 16);
  for (uint32_t bits = 0; bits < table.size(); ++bits) table[bits] = half_bits_to_float(bits);
  return table;
}();
__attribute__((no_sanitize("thread"), always_inline)) inline float element_to_float(
    uint16_t bits, __half) {
  return half_to_float_table.data()[bits];
}

// The 16-bit element `half` (0: low) of 32-bit register word.
__attribute__((no_sanitize("thread"), always_inline)) inline uint16_t half_of(uint64_t word,
                                                                               int half) {
  return static_cast<uint16_t>(word >> (16 * half));
}

// A row address that ldmatrix may take, or an exception naming the lane that gave it.
CUDA_ON_CPU_INTERNAL inline const uint16_t* ldmatrix_row(uint64_t address, int lane) {
  const void* row = reinterpret_cast<const void*>(address);
  if (address % 16 != 0 || !Block::current_block()->in_shared(row, 16)) {
    throw std::runtime_error("ldmatrix: lane " + std::to_string(lane) + "'s row address " +
                             std::to_string(address) +
                             " is not 16 aligned bytes of shared memory");
  }
  return static_cast<const uint16_t*>(row);
}

CUDA_ON_CPU_INTERNAL inline uint32_t read_watched(const uint16_t* element) {
  racecheck::access(element, 2, false);
  return *element;
}

}  // namespace cuda_on_cpu

namespace fastgpt {

template <typename Elem>
CUDA_ON_CPU_INTERNAL void mma_m16n8k16(float (&acc)[4], const uint32_t (&a)[4],
                                       const uint32_t (&b)[2]) {
  using cuda_on_cpu::half_of;
  auto* const current = cuda_on_cpu::Block::current_block();
  const uint64_t offer[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  const uint64_t* warp = current->exchange(offer, 6);
  constexpr int W = cuda_on_cpu::Block::kExchangeWords;
  const int lane = current->lane(), g = lane / 4, t = lane % 4;
  // this lane's rows g, g + 8 of A and columns 2t, 2t + 1 of B, from the lanes that hold them
  float a_rows[2][16], b_cols[2][16];
#pragma GCC unroll 16
  for (int k = 0; k < 16; ++k) {  // unrolled: every index below but g's and t's a constant
#pragma GCC unroll 2
    for (int r = 0; r < 2; ++r) {
      // A(row, k): lane 4 (row % 8) + (k % 8) / 2, register (row / 8) + 2 (k / 8), half k % 2
      const int row = g + 8 * r;
      const uint64_t a_word = warp[(4 * (row % 8) + (k % 8) / 2) * W + row / 8 + 2 * (k / 8)];
      a_rows[r][k] = cuda_on_cpu::element_to_float(half_of(a_word, k % 2), Elem());
      // B(k, col): lane 4 col + (k % 8) / 2, register k / 8, half k % 2
      const int col = 2 * t + r;
      const uint64_t b_word = warp[(4 * col + (k % 8) / 2) * W + 4 + k / 8];
      b_cols[r][k] = cuda_on_cpu::element_to_float(half_of(b_word, k % 2), Elem());
    }
  }
#pragma GCC unroll 4
  for (int e = 0; e < 4; ++e) {  // C(g + 8 (e / 2), 2t + e % 2)
    float sum = acc[e];
#pragma GCC unroll 16
    for (int k = 0; k < 16; ++k) sum += a_rows[e / 2][k] * b_cols[e % 2][k];
    acc[e] = sum;
  }
}

template <int kMatrices, bool kTrans>
CUDA_ON_CPU_INTERNAL void ldmatrix(uint32_t (&r)[kMatrices], const void* row) {
  static_assert(kMatrices == 1 || kMatrices == 2 || kMatrices == 4, "1, 2 or 4 matrices");
  auto* const current = cuda_on_cpu::Block::current_block();
  const uint64_t offer = reinterpret_cast<uintptr_t>(row);
  const uint64_t* warp = current->exchange(&offer, 1);
  constexpr int W = cuda_on_cpu::Block::kExchangeWords;
  const int lane = current->lane(), g = lane / 4, t = lane % 4;
  for (int i = 0; i < kMatrices; ++i) {
    const auto row_of = [&](int j) {  // matrix i's row j, given by lane 8i + j
      return cuda_on_cpu::ldmatrix_row(warp[(8 * i + j) * W], 8 * i + j);
    };
    if constexpr (!kTrans) {  // (row g, columns 2t, 2t + 1)
      const uint16_t* p = row_of(g);
      r[i] = cuda_on_cpu::read_watched(p + 2 * t) | cuda_on_cpu::read_watched(p + 2 * t + 1) << 16;
    } else {  // (rows 2t, 2t + 1; column g)
      r[i] = cuda_on_cpu::read_watched(row_of(2 * t) + g) |
             cuda_on_cpu::read_watched(row_of(2 * t + 1) + g) << 16;
    }
  }
}

inline void cp_async_16(void* dst, const void* src, bool from_src) {
  cuda_on_cpu::Block::current_block()->cp_async(dst, src, from_src);
}
inline void cp_async_commit() { cuda_on_cpu::Block::current_block()->cp_async_commit(); }
template <int kPending>
inline void cp_async_wait() {
  cuda_on_cpu::Block::current_block()->cp_async_wait(kPending);
}

}  // namespace fastgpt
