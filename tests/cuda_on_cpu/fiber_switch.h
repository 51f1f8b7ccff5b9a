// The fiber switch of cuda_on_cpu.h: start a function on a stack of its own, and switch from
// one stack to another, on one OS thread.
//
// glibc's swapcontext also saves and restores the signal mask, a system call per switch (13-15%
// of an emulator run). On x86-64 the switch here makes none: what the System V ABI has a callee
// keep (rbx, rbp, r12-r15, and MXCSR and the x87 control word: each fiber keeps its own
// rounding mode, as under swapcontext) is pushed onto the stack being left, its stack pointer
// saved, and the same popped from the stack switched to, whose return address takes up that
// fiber where it left off. Other architectures (aarch64 too: no machine here to test a
// hand-written one on) keep ucontext.
#pragma once

#include <cstddef>
#include <cstdint>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace cuda_on_cpu {

#if defined(__x86_64__)

// A fiber not running: where its stack pointer was when it switched away.
struct FiberContext {
  void* stack_pointer = nullptr;
};

// Saves the callee-saved state on the running stack and its stack pointer to *save, then takes
// up the stack at `load` (saved by an earlier switch, or made by fiber_start) and returns there.
// noipa: every caller takes it for an unknown function, which may read and write any memory.
__attribute__((naked, noipa, no_sanitize("thread"))) inline void fiber_switch_stacks(
    void** /*save: rdi*/, void* /*load: rsi*/) {
  asm(R"(
    pushq %rbp
    pushq %rbx
    pushq %r15
    pushq %r14
    pushq %r13
    pushq %r12
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r12
    popq %r13
    popq %r14
    popq %r15
    popq %rbx
    popq %rbp
    ret
  )");
}

// Makes `to` start entry() on [stack, stack + bytes) at its first switch; entry() must never
// return (it ends by switching away for good). The stack is laid out as fiber_switch_stacks
// leaves one: the MXCSR and x87 control word (the caller's now), six zero registers (rbp = 0
// ends a frame-pointer backtrace), entry's address to return to, then a zero return address
// for entry itself, where an unwinder stops (no exception unwinds past entry). At entry's first
// instruction rsp + 8 is 16-byte aligned, as after a call.
inline void fiber_start(FiberContext& to, char* stack, size_t bytes, void (*entry)()) {
  auto top = (reinterpret_cast<uintptr_t>(stack) + bytes) / 16 * 16;
  auto* frame = reinterpret_cast<uint64_t*>(top) - 9;
  uint32_t mxcsr;
  uint16_t x87_control;
  asm("stmxcsr %0\n\tfnstcw %1" : "=m"(mxcsr), "=m"(x87_control));
  frame[0] = mxcsr | static_cast<uint64_t>(x87_control) << 32;
  for (int i = 1; i <= 6; ++i) frame[i] = 0;  // r12, r13, r14, r15, rbx, rbp
  frame[7] = reinterpret_cast<uintptr_t>(entry);
  frame[8] = 0;
  to.stack_pointer = frame;
}

// Suspends the running fiber into `from` and resumes `to`.
inline void fiber_switch(FiberContext& from, const FiberContext& to) {
  fiber_switch_stacks(&from.stack_pointer, to.stack_pointer);
}

#else  // ucontext

struct FiberContext {
  ucontext_t context;
};

inline void fiber_start(FiberContext& to, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&to.context);
  to.context.uc_stack.ss_sp = stack;
  to.context.uc_stack.ss_size = bytes;
  to.context.uc_link = nullptr;  // entry never returns
  makecontext(&to.context, entry, 0);
}

inline void fiber_switch(FiberContext& from, const FiberContext& to) {
  swapcontext(&from.context, &to.context);
}

#endif

}  // namespace cuda_on_cpu
