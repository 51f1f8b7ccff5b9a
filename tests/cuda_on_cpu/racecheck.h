// Racecheck for the CPU run: what compute-sanitizer's racecheck does on a GPU, for the kernels
// that cuda_on_cpu.h runs as fibers.
//
// How it sees every access: the module is compiled with g++'s -fsanitize=thread, which makes
// the compiler call __tsan_read4(address), __tsan_write8(address), ... before every load and
// store, and __tsan_atomic32_fetch_add(...) in place of every atomic; no ThreadSanitizer
// runtime is linked: the functions at the end of this file are that runtime. They do the
// atomics (plainly: one OS thread runs every fiber) and, while a kernel runs, look the
// address up among the watched regions: the block's shared memory (dynamic, and the static
// __shared__ arrays, which cuda_on_cpu.h places in one linker section) and the global
// buffers a test registers with watch(). Everything else (fiber stacks: the registers of a
// GPU thread; the emulator's own state) is ignored.
//
// Shadow state, for every byte of a watched region: the last write and the last two reads,
// each as (thread, __syncthreads epoch, __syncwarp epoch). Two accesses by different threads
// are ordered when a __syncthreads lies between them (the later one's block epoch is
// higher), or when they are lanes of one warp and a __syncwarp lies between them; accesses of
// different blocks of one launch are never ordered (kernel launches are: the shadow starts
// empty at each launch). A hazard is two unordered accesses of one byte, at least one a
// write, neither an atomic. Warp collectives that only exchange values (shuffles, mma,
// ldmatrix) order nothing, as on a GPU.
//
// Approximations: two reads per byte are remembered (a third concurrent reader may hide a
// hazard with the write that follows); ldmatrix is seen as each lane reading the elements it
// receives (the lanes that give the row addresses are not charged); a cp.async as its
// thread's write of the destination both when it starts and when its wait_group completes;
// mixed atomic and plain accesses of one byte are not checked.
#pragma once

#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#define CUDA_ON_CPU_UNWATCHED __attribute__((no_sanitize("thread"), visibility("hidden")))

namespace cuda_on_cpu::racecheck {

// The thread that runs now: its id in the launch (block * threads per block + thread) and
// the barriers it has passed. Each fiber holds one; the scheduler points `who` at it.
struct Who {
  uint32_t thread = 0;
  uint32_t block_epoch = 0;  // __syncthreads passed
  uint32_t warp_epoch = 0;   // __syncwarp passed
};

// An access, packed: bit 63 set = present; thread 23 bits, block epoch 20, warp epoch 20.
constexpr int kThreadBits = 23, kEpochBits = 20;
constexpr uint64_t kPresent = uint64_t{1} << 63;

CUDA_ON_CPU_UNWATCHED inline uint64_t pack(const Who& who);  // below: it needs the State
CUDA_ON_CPU_UNWATCHED inline uint32_t thread_of(uint64_t a) { return (a >> (2 * kEpochBits)) & ((1u << kThreadBits) - 1); }
CUDA_ON_CPU_UNWATCHED inline uint32_t block_epoch_of(uint64_t a) { return (a >> kEpochBits) & ((1u << kEpochBits) - 1); }
CUDA_ON_CPU_UNWATCHED inline uint32_t warp_epoch_of(uint64_t a) { return a & ((1u << kEpochBits) - 1); }

struct Shadow {
  uint64_t write = 0, read = 0, older_read = 0;
};

struct Region {
  uintptr_t begin = 0, end = 0;
  std::string name;
  bool shared = false;     // shared memory: the shadow starts empty with each block
  bool read_only = false;  // an input: a write to it is an error, no shadow kept
  std::unique_ptr<Shadow, void (*)(void*)> shadow{nullptr, &std::free};
  uintptr_t touched_begin = UINTPTR_MAX, touched_end = 0;  // the shadow bytes in use
};

struct Hazard {
  const void* kernel;
  std::string region;
  uintptr_t region_begin;
  size_t offset;
  bool first_is_write, second_is_write;
  uint32_t first_thread, second_thread;  // launch-wide ids
  bool to_read_only = false;             // a write to a read-only region (one thread)
};

// A watched region as the hot path sees it: plain data (the check is compiled without
// instrumentation, and GCC will not inline instrumented library code into it).
struct Span {
  uintptr_t begin, end;
  Shadow* shadow;  // null: read only
  Region* region;
};

struct State {
  bool enabled = true;
  Who* who = nullptr;  // non-null while a kernel thread runs
  uintptr_t stack_begin = 0, stack_size = 0;  // its fiber's stack (its registers): not watched
  const void* kernel = nullptr;
  unsigned threads_per_block = 1;
  unsigned grid[3] = {1, 1, 1};
  std::vector<Region> regions;  // sorted by begin, disjoint
  std::vector<Span> spans;       // the same, for the hot path: spans_data[0, spans_count)
  const Span* spans_data = nullptr;
  size_t spans_count = 0;
  // find's last answers: a span, and a gap between spans (memory nobody watches that lies
  // between watched buffers: the block's own state, the hooks' callers' data)
  const Span* last_span = nullptr;
  uintptr_t last_gap_begin = 0, last_gap_end = 0;
  uintptr_t low = UINTPTR_MAX, high = 0;
  std::vector<Hazard> hazards;  // the first kMaxHazards
  size_t hazard_count = 0;
  // What went wrong inside a hook, which may not throw (GCC declares the __tsan_* calls
  // nothrow): the launcher throws it once the block's fibers have returned.
  const char* error = nullptr;
};
constexpr size_t kMaxHazards = 8;

__attribute__((visibility("hidden"))) inline State global_state;  // one OS thread runs every kernel of this module
inline State& state() { return global_state; }

CUDA_ON_CPU_UNWATCHED inline uint64_t pack(const Who& who) {
  if (who.thread >> kThreadBits || who.block_epoch >> kEpochBits || who.warp_epoch >> kEpochBits) {
    global_state.error = "racecheck: launch or barrier count too large to track";
    return 0;  // an access that orders nothing: the launch fails anyway
  }
  return kPresent | (uint64_t{who.thread} << (2 * kEpochBits)) |
         (uint64_t{who.block_epoch} << kEpochBits) | who.warp_epoch;
}

inline void update_bounds(State& s) {
  s.low = UINTPTR_MAX;
  s.high = 0;
  s.spans.clear();
  for (Region& r : s.regions) {
    s.low = std::min(s.low, r.begin);
    s.high = std::max(s.high, r.end);
    s.spans.push_back({r.begin, r.end, r.shadow.get(), &r});
  }
  s.spans_data = s.spans.data();
  s.spans_count = s.spans.size();
  s.last_span = nullptr;
  s.last_gap_begin = s.last_gap_end = 0;
}

// Watches [begin, begin + bytes) under `name` (a global buffer, unless `shared`).
inline void watch(const void* begin, size_t bytes, std::string name, bool shared = false,
                  bool read_only = false) {
  if (bytes == 0) return;
  State& s = state();
  Region r;
  r.begin = reinterpret_cast<uintptr_t>(begin);
  r.end = r.begin + bytes;
  r.name = std::move(name);
  r.shared = shared;
  r.read_only = read_only;
  if (!read_only) {
    // calloc: untouched pages of a large shadow cost nothing
    r.shadow.reset(static_cast<Shadow*>(std::calloc(bytes, sizeof(Shadow))));
    if (!r.shadow) throw std::runtime_error("racecheck: no memory for the shadow of " + r.name);
  }
  auto at = std::lower_bound(s.regions.begin(), s.regions.end(), r.begin,
                             [](const Region& x, uintptr_t b) { return x.begin < b; });
  if ((at != s.regions.end() && at->begin < r.end) ||
      (at != s.regions.begin() && std::prev(at)->end > r.begin)) {
    throw std::runtime_error("racecheck: " + r.name + " overlaps a watched region");
  }
  s.regions.insert(at, std::move(r));
  update_bounds(s);
}

inline void unwatch(const void* begin) {
  State& s = state();
  const auto b = reinterpret_cast<uintptr_t>(begin);
  s.regions.erase(std::remove_if(s.regions.begin(), s.regions.end(),
                                 [b](const Region& r) { return r.begin == b; }),
                  s.regions.end());
  update_bounds(s);
}

inline void clear_shadow(Region& r) {
  if (r.shadow && r.touched_begin < r.touched_end) {
    std::memset(r.shadow.get() + (r.touched_begin - r.begin), 0,
                (r.touched_end - r.touched_begin) * sizeof(Shadow));
  }
  r.touched_begin = UINTPTR_MAX;
  r.touched_end = 0;
}

// A launch starts (global shadows empty: the previous launches are ordered before it), and a
// block starts (shared shadows empty).
inline void begin_launch(const void* kernel, unsigned threads_per_block, const unsigned grid[3]) {
  State& s = state();
  s.kernel = kernel;
  s.threads_per_block = threads_per_block;
  std::copy(grid, grid + 3, s.grid);
  for (Region& r : s.regions) clear_shadow(r);
}

inline void begin_block() {
  for (Region& r : state().regions) {
    if (r.shared) clear_shadow(r);
  }
}

// --- the check ---------------------------------------------------------------------------------

// Whether `earlier` (an access recorded in the shadow) is ordered before an access by `now`.
CUDA_ON_CPU_UNWATCHED inline bool ordered(uint64_t earlier, const Who& now, unsigned per_block) {
  if (!(earlier & kPresent)) return true;
  const uint32_t thread = thread_of(earlier);
  if (thread == now.thread) return true;  // program order
  if (thread / per_block != now.thread / per_block) return false;  // another block
  if (block_epoch_of(earlier) < now.block_epoch) return true;
  const bool same_warp = thread / 32 == now.thread / 32;  // blocks are whole warps
  return same_warp && warp_epoch_of(earlier) < now.warp_epoch;
}

// The hazards go to a std::vector: a call kept out of the hot path (and its instrumented
// memory accesses are not a kernel's: the caller has cleared `who`).
__attribute__((noinline)) inline void record(State& s, Hazard hazard) noexcept {
  try {
    if (s.hazards.size() < kMaxHazards) s.hazards.push_back(std::move(hazard));
  } catch (...) {
    s.error = "racecheck: out of memory for its report";
  }
}

CUDA_ON_CPU_UNWATCHED inline void report(State& s, const Span& span, uintptr_t address,
                                         uint64_t earlier, bool earlier_is_write,
                                         const Who& now, bool now_is_write,
                                         bool to_read_only = false) {
  if (s.hazard_count++ >= kMaxHazards) return;
  Who* const who = s.who;
  s.who = nullptr;
  record(s, {s.kernel, span.region->name, span.begin, address - span.begin, earlier_is_write,
             now_is_write, thread_of(earlier), now.thread, to_read_only});
  s.who = who;
}

// The span holding `address`, or null: the last answers if they hold it (the binary
// search's mispredicted branches were most of a racechecked run's time in the checks), else
// by binary search.
CUDA_ON_CPU_UNWATCHED inline const Span* find(State& s, uintptr_t address) {
  const Span* last = s.last_span;
  if (last != nullptr && address - last->begin < last->end - last->begin) return last;
  if (address - s.last_gap_begin < s.last_gap_end - s.last_gap_begin) return nullptr;
  size_t low = 0, high = s.spans_count;  // the answer is the last span with begin <= address
  while (low < high) {
    const size_t mid = (low + high) / 2;
    if (s.spans_data[mid].begin <= address) low = mid + 1;
    else high = mid;
  }
  const Span* span = low == 0 ? nullptr : &s.spans_data[low - 1];
  if (span == nullptr || address >= span->end) {  // in the gap after span (before the first)
    s.last_gap_begin = span == nullptr ? 0 : span->end;
    s.last_gap_end = low < s.spans_count ? s.spans_data[low].begin : UINTPTR_MAX;
    return nullptr;
  }
  s.last_span = span;
  return span;
}


// An access that may touch a watched region, against the shadow (out of line: see access).
__attribute__((noinline)) CUDA_ON_CPU_UNWATCHED inline void check_access(State& s, uintptr_t begin,
                                                                       size_t size, bool write) {
  const Who now = *s.who;
  const uint64_t mine = pack(now);
  const unsigned per_block = s.threads_per_block;
  bool reported = false;  // one report per access (its first racy byte)
  for (uintptr_t a = begin; a < begin + size;) {
    const Span* span = find(s, a);
    if (span == nullptr) {
      ++a;
      continue;
    }
    const uintptr_t stop = begin + size < span->end ? begin + size : span->end;
    if (span->shadow == nullptr) {  // read only
      if (write && !reported) {
        report(s, *span, a, mine, true, now, true, true);
        reported = true;
      }
      a = stop;
      continue;
    }
    Region& region = *span->region;
    if (a < region.touched_begin) region.touched_begin = a;
    if (stop > region.touched_end) region.touched_end = stop;
    for (; a < stop; ++a) {
      Shadow& sh = span->shadow[a - span->begin];
      if (!reported && !ordered(sh.write, now, per_block)) {
        report(s, *span, a, sh.write, true, now, write);
        reported = true;
      }
      if (write) {
        if (!reported && !ordered(sh.read, now, per_block)) {
          report(s, *span, a, sh.read, false, now, true);
          reported = true;
        } else if (!reported && !ordered(sh.older_read, now, per_block)) {
          report(s, *span, a, sh.older_read, false, now, true);
          reported = true;
        }
        sh.write = mine;
      } else if (ordered(sh.read, now, per_block)) {  // absent, this thread's, or stale
        sh.read = mine;
      } else if (ordered(sh.older_read, now, per_block)) {
        sh.older_read = sh.read;
        sh.read = mine;
      } else {  // both concurrent with this read: one is forgotten, a foreign block's last
        if (thread_of(sh.read) / per_block != now.thread / per_block) sh.older_read = sh.read;
        sh.read = mine;
      }
    }
  }
}

// Every instrumented load and store comes here (the hooks below). Most stop at its first
// tests (no kernel running, races not checked, a register, memory nobody watches): those are
// inlined into the hooks, the rest is check_access's. A profile of a T = 1000 attention case
// had a fifth of its time in this function's prologue when it was one out-of-line function.
__attribute__((always_inline)) CUDA_ON_CPU_UNWATCHED inline void access(const volatile void* pointer,
                                                                      size_t size, bool write) {
  State& s = global_state;
  if (s.who == nullptr || !s.enabled) return;
  const auto begin = reinterpret_cast<uintptr_t>(pointer);
  if (begin - s.stack_begin < s.stack_size) return;  // most accesses: registers
  if (begin >= s.high || begin + size <= s.low) return;
  check_access(s, begin, size, write);
}

// An atomic that writes: not checked for races, but a read-only region may not take it.
CUDA_ON_CPU_UNWATCHED inline void atomic_write(const volatile void* pointer) {
  State& s = global_state;
  if (s.who == nullptr || !s.enabled) return;
  const auto address = reinterpret_cast<uintptr_t>(pointer);
  if (address - s.stack_begin < s.stack_size || address >= s.high || address < s.low) return;
  const Span* span = find(s, address);
  if (span != nullptr && span->shadow == nullptr) {
    const uint64_t mine = pack(*s.who);
    report(s, *span, address, mine, true, *s.who, true, true);
  }
}

// --- the report --------------------------------------------------------------------------------

// The function or object at `address` in this module and where it starts, from the module's
// ELF symbol table (the kernels are static functions: dladdr alone knows only exported
// symbols).
struct Symbol {
  std::string name = "?";
  uintptr_t start = 0;
};

inline Symbol symbol_at(const void* address) {
  Dl_info info{};
  if (dladdr(address, &info) == 0 || info.dli_fname == nullptr) return {};
  std::ifstream file(info.dli_fname, std::ios::binary);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(file)),
                                std::istreambuf_iterator<char>());
  if (bytes.size() < sizeof(Elf64_Ehdr)) return {};
  const auto* header = reinterpret_cast<const Elf64_Ehdr*>(bytes.data());
  const auto* sections = reinterpret_cast<const Elf64_Shdr*>(bytes.data() + header->e_shoff);
  const auto base = reinterpret_cast<uintptr_t>(info.dli_fbase);
  const uintptr_t wanted = reinterpret_cast<uintptr_t>(address) - base;
  for (int i = 0; i < header->e_shnum; ++i) {
    if (sections[i].sh_type != SHT_SYMTAB) continue;
    const auto* symbols = reinterpret_cast<const Elf64_Sym*>(bytes.data() + sections[i].sh_offset);
    const char* names = bytes.data() + sections[sections[i].sh_link].sh_offset;
    for (size_t k = 0; k < sections[i].sh_size / sizeof(Elf64_Sym); ++k) {
      const Elf64_Sym& sym = symbols[k];
      const int type = ELF64_ST_TYPE(sym.st_info);
      if ((type != STT_FUNC && type != STT_OBJECT) || sym.st_name == 0) continue;
      if (wanted < sym.st_value || wanted >= sym.st_value + std::max<uint64_t>(sym.st_size, 1)) {
        continue;
      }
      const char* mangled = names + sym.st_name;
      int status = 0;
      std::unique_ptr<char, void (*)(void*)> plain(
          abi::__cxa_demangle(mangled, nullptr, nullptr, &status), &std::free);
      std::string name = status == 0 ? plain.get() : mangled;
      for (const std::string noise : {"(anonymous namespace)::", "fastgpt::"}) {
        for (size_t at; (at = name.find(noise)) != std::string::npos;) name.erase(at, noise.size());
      }
      return {name, base + sym.st_value};
    }
  }
  return {};
}

// A function's name without its parameter list(s): "f<T>(int)::x" -> "f<T>::x".
inline std::string without_parameters(const std::string& name) {
  std::string out;
  int angle = 0, paren = 0;
  for (const char c : name) {
    if (c == '<') ++angle;
    if (c == '>') --angle;
    if (c == '(' && angle == 0) ++paren;
    if (paren == 0) out += c;
    if (c == ')' && angle == 0) --paren;
  }
  return out;
}

inline std::string kernel_name(const void* kernel) {
  return without_parameters(symbol_at(kernel).name);
}

inline std::string thread_name(uint32_t thread) {
  const State& s = state();
  const uint32_t block = thread / s.threads_per_block;
  return "block (" + std::to_string(block % s.grid[0]) + ", " +
         std::to_string(block / s.grid[0] % s.grid[1]) + ", " +
         std::to_string(block / (s.grid[0] * s.grid[1])) + ") thread " +
         std::to_string(thread % s.threads_per_block);
}

// The hazards found since the last call, one line each ("" if none), with buffers named by
// `rename` (address -> name) where given; clears them.
template <typename Rename>
std::string take_report(Rename rename) {
  State& s = state();
  std::string text;
  for (const Hazard& h : s.hazards) {
    const std::string given = rename(h.region_begin);
    std::string buffer = given.empty() ? h.region : given;
    size_t offset = h.offset;
    if (h.region == "static shared memory") {  // name the __shared__ array
      const Symbol array = symbol_at(reinterpret_cast<const void*>(h.region_begin + h.offset));
      buffer = "__shared__ " + without_parameters(array.name);
      offset = h.region_begin + h.offset - array.start;
    }
    const auto kind = [](bool write) { return write ? "write" : "read"; };
    if (h.to_read_only) {
      text += "racecheck: " + kernel_name(h.kernel) + ": write by " +
              thread_name(h.second_thread) + " to " + buffer + " at byte " +
              std::to_string(offset) + ", which the kernel may only read\n";
      continue;
    }
    text += "racecheck: " + kernel_name(h.kernel) + ": " + kind(h.first_is_write) + " by " +
            thread_name(h.first_thread) + " and " + kind(h.second_is_write) + " by " +
            thread_name(h.second_thread) + " of " + buffer + " at byte " +
            std::to_string(offset) + ", with no barrier between them\n";
  }
  if (s.hazard_count > s.hazards.size()) {
    text += "racecheck: " + std::to_string(s.hazard_count - s.hazards.size()) + " more\n";
  }
  s.hazards.clear();
  s.hazard_count = 0;
  return text;
}

inline std::string take_report() {
  return take_report([](uintptr_t) { return std::string(); });
}

}  // namespace cuda_on_cpu::racecheck

// --- the ThreadSanitizer calls that -fsanitize=thread compiles in --------------------------------

extern "C" {

// __tsan_<kind>read<size> and __tsan_<kind>write<size>, kind: plain, unaligned_, volatile_.
#define CUDA_ON_CPU_READ_WRITE(kind, size)                                                       \
  CUDA_ON_CPU_UNWATCHED void __tsan_##kind##read##size(void* p) {                                \
    cuda_on_cpu::racecheck::access(p, size, false);                                              \
  }                                                                                              \
  CUDA_ON_CPU_UNWATCHED void __tsan_##kind##write##size(void* p) {                               \
    cuda_on_cpu::racecheck::access(p, size, true);                                               \
  }
#define CUDA_ON_CPU_ACCESS(size)                                                                 \
  CUDA_ON_CPU_READ_WRITE(, size)                                                                 \
  CUDA_ON_CPU_READ_WRITE(unaligned_, size)                                                       \
  CUDA_ON_CPU_READ_WRITE(volatile_, size)
CUDA_ON_CPU_ACCESS(1)
CUDA_ON_CPU_ACCESS(2)
CUDA_ON_CPU_ACCESS(4)
CUDA_ON_CPU_ACCESS(8)
CUDA_ON_CPU_ACCESS(16)
#undef CUDA_ON_CPU_ACCESS
#undef CUDA_ON_CPU_READ_WRITE

CUDA_ON_CPU_UNWATCHED void __tsan_read_range(void* p, unsigned long size) {
  cuda_on_cpu::racecheck::access(p, size, false);
}
CUDA_ON_CPU_UNWATCHED void __tsan_write_range(void* p, unsigned long size) {
  cuda_on_cpu::racecheck::access(p, size, true);
}
CUDA_ON_CPU_UNWATCHED void __tsan_init() {}
CUDA_ON_CPU_UNWATCHED void __tsan_func_entry(void*) {}
CUDA_ON_CPU_UNWATCHED void __tsan_func_exit() {}
CUDA_ON_CPU_UNWATCHED void __tsan_vptr_update(void**, void*) {}
CUDA_ON_CPU_UNWATCHED void __tsan_vptr_read(void**) {}
CUDA_ON_CPU_UNWATCHED void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
CUDA_ON_CPU_UNWATCHED void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }

// The atomics themselves, sequentially consistent whatever order was asked (stronger is
// correct); not checked for races (atomics never race): a read-modify-write `name` by the
// builtin `builtin`, a compare-exchange `strength`, and the rest.
#define CUDA_ON_CPU_ATOMIC_RMW(bits, type, name, builtin)                                       \
  CUDA_ON_CPU_UNWATCHED type __tsan_atomic##bits##_##name(volatile type* a, type v, int) {      \
    cuda_on_cpu::racecheck::atomic_write(a);                                                     \
    return builtin(a, v, __ATOMIC_SEQ_CST);                                                      \
  }
#define CUDA_ON_CPU_ATOMIC_CAS(bits, type, strength)                                             \
  CUDA_ON_CPU_UNWATCHED int __tsan_atomic##bits##_compare_exchange_##strength(                   \
      volatile type* a, type* expected, type v, int, int) {                                      \
    cuda_on_cpu::racecheck::atomic_write(a);                                                     \
    return __atomic_compare_exchange_n(a, expected, v, false, __ATOMIC_SEQ_CST,                  \
                                       __ATOMIC_SEQ_CST);                                        \
  }
#define CUDA_ON_CPU_ATOMICS(bits, type)                                                          \
  CUDA_ON_CPU_UNWATCHED type __tsan_atomic##bits##_load(const volatile type* a, int) {           \
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                 \
  }                                                                                              \
  CUDA_ON_CPU_UNWATCHED void __tsan_atomic##bits##_store(volatile type* a, type v, int) {        \
    cuda_on_cpu::racecheck::atomic_write(a);                                                     \
    __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                                    \
  }                                                                                              \
  CUDA_ON_CPU_ATOMIC_RMW(bits, type, exchange, __atomic_exchange_n)                              \
  CUDA_ON_CPU_ATOMIC_RMW(bits, type, fetch_add, __atomic_fetch_add)                              \
  CUDA_ON_CPU_ATOMIC_RMW(bits, type, fetch_sub, __atomic_fetch_sub)                              \
  CUDA_ON_CPU_ATOMIC_RMW(bits, type, fetch_and, __atomic_fetch_and)                              \
  CUDA_ON_CPU_ATOMIC_RMW(bits, type, fetch_or, __atomic_fetch_or)                                \
  CUDA_ON_CPU_ATOMIC_RMW(bits, type, fetch_xor, __atomic_fetch_xor)                              \
  CUDA_ON_CPU_ATOMIC_RMW(bits, type, fetch_nand, __atomic_fetch_nand)                            \
  CUDA_ON_CPU_ATOMIC_CAS(bits, type, strong)                                                     \
  CUDA_ON_CPU_ATOMIC_CAS(bits, type, weak)                                                       \
  CUDA_ON_CPU_UNWATCHED type __tsan_atomic##bits##_compare_exchange_val(                         \
      volatile type* a, type expected, type v, int, int) {                                       \
    cuda_on_cpu::racecheck::atomic_write(a);                                                     \
    __atomic_compare_exchange_n(a, &expected, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);     \
    return expected;                                                                             \
  }
CUDA_ON_CPU_ATOMICS(8, char)
CUDA_ON_CPU_ATOMICS(16, short)
CUDA_ON_CPU_ATOMICS(32, int)
CUDA_ON_CPU_ATOMICS(64, long)
#undef CUDA_ON_CPU_ATOMICS
#undef CUDA_ON_CPU_ATOMIC_CAS
#undef CUDA_ON_CPU_ATOMIC_RMW

}  // extern "C"
