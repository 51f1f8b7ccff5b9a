// CUDA on the CPU, just enough of it to run csrc/attention.cuh's kernels unchanged: so that CI,
// which has no GPU, executes the very index arithmetic, tiling, synchronisation and WMMA
// data flow that the GPU runs, against the tiled Python twin and the explicit reference.
//
// Model: blocks run one after another; a block's threads are fibers (ucontext) on one OS
// thread, each running until it waits at a barrier, so the interleaving is deterministic and
// a barrier that not every thread reaches (a divergent __syncthreads or warp collective) is
// reported as a deadlock instead of hanging. __shared__ variables become statics (one block
// at a time owns them); the dynamic shared memory is filled with 0xFF bytes (NaN in fp32,
// bf16 and fp16) before each block, so a read of shared memory nothing wrote shows up.
// Warp collectives: __shfl_*_sync and __syncwarp wait for the warp's 32 lanes; a WMMA
// fragment holds the whole 16x16 tile in every lane (the kernels never index fragments), its
// loads wait for the warp, and lane 0 alone stores it, without a trailing wait: a lane that
// reads another lane's part of a stored tile without __syncwarp reads stale data, as on a GPU.
// Tensor-core products are fp32 sums of the 16-bit inputs' exact products.
//
// Not modelled: the memory model beyond this schedule (racecheck on a GPU covers it), bank
// conflicts, timing. Include this before the kernels; compile with -std=c++20.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <ucontext.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
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
#define __shared__ static  // one block at a time: a static is its shared memory
#define FASTGPT_DYNAMIC_SHARED(name) unsigned char* name = cuda_on_cpu::dynamic_shared_memory()

inline uint3 threadIdx, blockIdx;  // the running fiber's, set by the scheduler
inline dim3 blockDim, gridDim;

namespace cuda_on_cpu {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 256 * 1024;  // a fiber's stack: the kernels' arrays fit easily

struct Barrier {
  int expected = 0, arrived = 0;
  uint64_t generation = 0;
};

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  Barrier* waiting_on = nullptr;  // with the generation it waits to end
  uint64_t waiting_generation = 0;
  bool done = false;
};

// One block's fibers and their scheduler.
class Block {
 public:
  Block(int threads, size_t shared_bytes)
      : fibers_(threads), block_barrier_{threads, 0, 0}, warp_barriers_((threads + 31) / 32),
        shuffle_slots_((threads + 31) / 32), shared_(shared_bytes + 128) {
    if (threads % kWarpSize != 0) throw std::runtime_error("block size must be whole warps");
    for (Barrier& b : warp_barriers_) b.expected = kWarpSize;
    std::memset(shared_.data(), 0xFF, shared_.size());
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
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack.get();
      f.context.uc_stack.ss_size = kStackBytes;
      f.context.uc_link = &scheduler_;
      makecontext(&f.context, &Block::fiber_main, 0);
    }
    current_block() = this;
    int ran = 0;
    while (error_.empty()) {
      const int next = next_runnable(current_);
      if (next < 0) {
        if (!all_done()) error_ = deadlock_report();
        break;
      }
      current_ = next;
      threadIdx = make_uint3(static_cast<unsigned>(current_), 0, 0);
      swapcontext(&scheduler_, &fibers_[current_].context);
      ++ran;
    }
    current_block() = nullptr;
    if (!error_.empty()) throw std::runtime_error(error_);
  }

  void sync_threads() { wait(block_barrier_); }
  void sync_warp() { wait(warp_barriers_[current_ / kWarpSize]); }

  // Every lane offers `value`; returns lane `source`'s. Two slot sets alternate, so a lane
  // that runs ahead to the next shuffle cannot overwrite a value still to be read.
  float shuffle(float value, int source) {
    auto& slots = shuffle_slots_[current_ / kWarpSize];
    const int lane = current_ % kWarpSize;
    const int set = slots.calls[lane]++ % 2;
    slots.values[set][lane] = value;
    sync_warp();
    return slots.values[set][source % kWarpSize];
  }

  int lane() const { return current_ % kWarpSize; }
  unsigned char* shared() { return shared_.data(); }
  static Block*& current_block() {
    static Block* block = nullptr;
    return block;
  }

 private:
  struct ShuffleSlots {
    float values[2][kWarpSize];
    uint64_t calls[kWarpSize] = {};
  };

  static void fiber_main() {
    Block* block = current_block();
    try {
      block->body_(block->body_arg_);
    } catch (const std::exception& e) {
      block->error_ = "thread " + std::to_string(block->current_) + ": " + e.what();
    }
    block->fibers_[block->current_].done = true;
    // returning resumes uc_link, the scheduler
  }

  void wait(Barrier& barrier) {
    if (++barrier.arrived == barrier.expected) {
      barrier.arrived = 0;
      ++barrier.generation;  // releases the others; this fiber runs on
      return;
    }
    Fiber& self = fibers_[current_];
    self.waiting_on = &barrier;
    self.waiting_generation = barrier.generation;
    swapcontext(&self.context, &scheduler_);
    if (!error_.empty()) throw std::runtime_error("aborted");  // unwinds this fiber
  }

  bool runnable(const Fiber& f) const {
    if (f.done) return false;
    return f.waiting_on == nullptr || f.waiting_on->generation != f.waiting_generation;
  }

  int next_runnable(int after) {
    const int n = static_cast<int>(fibers_.size());
    for (int i = 1; i <= n; ++i) {
      const int t = (after + i) % n;
      if (runnable(fibers_[t])) {
        fibers_[t].waiting_on = nullptr;
        return t;
      }
    }
    return -1;
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
  std::vector<unsigned char> shared_;
  ucontext_t scheduler_;
  int current_ = -1;
  std::string error_;
  void (*body_)(void*) = nullptr;
  void* body_arg_ = nullptr;
};

inline unsigned char* dynamic_shared_memory() {
  // 128-byte aligned, as the kernels declare it
  const auto address = reinterpret_cast<uintptr_t>(Block::current_block()->shared());
  return reinterpret_cast<unsigned char*>((address + 127) / 128 * 128);
}

// kernel<<<grid, threads, shared_bytes>>>(args...), block by block.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, int threads, int shared_bytes, Args... args) {
  gridDim = grid;
  blockDim = dim3(threads);
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = make_uint3(x, y, z);
        Block block(threads, static_cast<size_t>(shared_bytes));
        auto body = [&] { kernel(args...); };
        block.run(body);
      }
    }
  }
}

inline float to_float(float x) { return x; }
inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
inline float to_float(__half x) { return __half2float(x); }

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

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

// The whole 16x16 tile in every lane.
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "only 16x16x16 is modelled");
  static constexpr int num_elements = 256;
  T x[256];
};

template <typename Use, typename T, typename Layout>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, float value) {
  for (T& e : f.x) e = static_cast<T>(value);
}

// matrix_a / matrix_b: element (i, j) at p[i * ld + j] (row_major) or p[j * ld + i].
template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ld) {
  __syncwarp();  // a warp collective: every lane's earlier writes are in
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      f.x[i * 16 + j] = std::is_same_v<Layout, row_major> ? p[i * ld + j] : p[j * ld + i];
    }
  }
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p,
                             unsigned ld, layout_t layout) {
  __syncwarp();
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      f.x[i * 16 + j] = layout == mem_row_major ? p[i * ld + j] : p[j * ld + i];
    }
  }
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ld, layout_t layout) {
  __syncwarp();
  if (cuda_on_cpu::Block::current_block()->lane() != 0) return;
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      (layout == mem_row_major ? p[i * ld + j] : p[j * ld + i]) = f.x[i * 16 + j];
    }
  }
}

// d = a b + c, fp32 sums of exact products (d may be c).
template <typename T, typename LayoutA, typename LayoutB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
              const fragment<matrix_a, 16, 16, 16, T, LayoutA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LayoutB>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  float result[256];
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      float sum = c.x[i * 16 + j];
      for (int k = 0; k < 16; ++k) {
        sum += cuda_on_cpu::to_float(a.x[i * 16 + k]) * cuda_on_cpu::to_float(b.x[k * 16 + j]);
      }
      result[i * 16 + j] = sum;
    }
  }
  std::memcpy(d.x, result, sizeof(result));
}

}  // namespace nvcuda::wmma
