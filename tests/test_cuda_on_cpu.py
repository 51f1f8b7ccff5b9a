"""The CPU run of the CUDA kernels (tests/cuda_on_cpu/): its racecheck finds planted races and
passes their fixed twins; the kernels give the same bits under every schedule (blocks
forward, reversed, shuffled; fibers resumed in rotated or reshuffled order after each
barrier), dQ by atomics within its stated bound; and csrc/adamw.cuh's kernel itself, with its
multi-tensor bookkeeping, runs against torch.optim.AdamW and the CPU build.

Tolerances: the AdamW kernel and the CPU build (csrc/adamw_cpu.cpp) run the same fp32
arithmetic (csrc/adamw_math.h) compiled for the same CPU: bit for bit. Against
torch.optim.AdamW, fp32: 1e-6 of each tensor's largest entry (tests/test_adamw.py's module
docstring: the paths differ where a compiler fuses a multiply-add). Attention: the bounds of
errors_against_fp64 (fastgpt/ops/cuda_attention.py states each one's reason)."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

from fastgpt.optim import AdamW

SCHEDULES = [("forward", 0), ("reversed", 0), ("shuffled", 1), ("shuffled", 2)]
SCHEDULE_IDS = [f"{order}{seed or ''}" for order, seed in SCHEDULES]


# --- racecheck -----------------------------------------------------------------------------------

# (planted kernel, what racecheck must say of it): each kernel misses one barrier (or atomic)
PLANTED = {
    # each thread writes its cell and reads the other warp's: a missing __syncthreads
    "cells_across_warps": (r"racecheck: cells_across_warps: (read|write) by block \(\d, 0, 0\) "
                           r"thread \d+ and (read|write) by block \(\d, 0, 0\) thread \d+ of "
                           r"__shared__ cells_across_warps::cells at byte \d+"),
    # each lane writes its cell and reads its neighbour lane's: a missing __syncwarp
    "cells_across_lanes": (r"racecheck: cells_across_lanes: (read|write) by block \(\d, 0, 0\) "
                           r"thread \d+ and (read|write) by block \(\d, 0, 0\) thread \d+ of "
                           r"dynamic shared memory at byte \d+"),
    # every block writes out[threadIdx.x]: a cross-block write (the fix: atomicAdd)
    "write_across_blocks": (r"racecheck: write_across_blocks: write by block \(\d, 0, 0\) "
                            r"thread (\d+) and write by block \(\d, 0, 0\) thread \1 of out at "
                            r"byte \d+"),
    # a warp overwrites cells the other still reads: the second __syncthreads is missing
    "reuse_without_second_barrier": (r"racecheck: reuse_without_second_barrier: (read|write) by "
                                     r"block \(\d, 0, 0\) thread \d+ and (read|write) by block "
                                     r"\(\d, 0, 0\) thread \d+ of __shared__ "
                                     r"reuse_without_second_barrier::cells at byte \d+"),
    # clears the buffer it copies from: an input written
    "clears_its_input": (r"racecheck: clears_its_input: write by block \(\d, 0, 0\) thread \d+ "
                         r"to in at byte \d+, which the kernel may only read"),
    # atomicAdd into its input: atomics never race, but an input takes no writes
    "adds_to_its_input": (r"racecheck: adds_to_its_input: write by block \(\d, 0, 0\) thread "
                          r"\d+ to in at byte \d+, which the kernel may only read"),
    # one float past the dynamic shared memory the launch asked for
    "writes_past_its_shared_memory": (r"racecheck: writes_past_its_shared_memory: write by block "
                                      r"\(\d, 0, 0\) thread 63 to the bytes past the launch's "
                                      r"dynamic shared memory at byte 0, which the kernel may "
                                      r"only read"),
    # cp.async: a thread reads the other warp's copied chunk after its own wait_group, with
    # no __syncthreads (a wait makes the copies visible to their own thread only)
    "copies_read_without_barrier": (r"racecheck: copies_read_without_barrier: (read|write) by "
                                    r"block \(\d, 0, 0\) thread \d+ and (read|write) by block "
                                    r"\(\d, 0, 0\) thread \d+ of dynamic shared memory"),
    # cp.async into cells the other warp still reads (the copy may land at once)
    "copies_over_cells_still_read": (r"racecheck: copies_over_cells_still_read: read by block "
                                     r"\(\d, 0, 0\) thread \d+ and write by block \(\d, 0, 0\) "
                                     r"thread \d+ of dynamic shared memory"),
    # cp.async copies left in flight at the kernel's end
    "never_waits": r"thread \d+: ended with cp.async copies it never waited for",
}


def fixed_result(kernel: str, blocks: int) -> torch.Tensor:
    """What the fixed twin of each planted kernel computes."""
    t = torch.arange(64, dtype=torch.float32)
    per_block = {"cells_across_warps": (t + 32) % 64, "cells_across_lanes": t.long() ^ 1,
                 "reuse_without_second_barrier": 63 - t}
    if kernel == "write_across_blocks":
        return torch.cat([torch.full((64,), float(blocks)), torch.zeros(64 * (blocks - 1))])
    if kernel == "clears_its_input":
        return torch.arange(64 * blocks, dtype=torch.float32)
    if kernel in ("adds_to_its_input", "writes_past_its_shared_memory"):
        return torch.ones(64 * blocks)
    if kernel == "never_waits":
        return torch.zeros(64 * blocks)
    if kernel in ("copies_read_without_barrier", "copies_over_cells_still_read",
                  "reads_before_the_wait"):  # the chunk in[64 b + 4 (t % 16)..] of block b
        return torch.cat([64 * b + 4 * (t % 16) for b in range(blocks)])
    return per_block[kernel].float().repeat(blocks)


@pytest.mark.parametrize("order, seed", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("kernel", sorted(PLANTED))
def test_racecheck_reports_each_planted_race_and_passes_its_fix(kernels_on_cpu, kernel, order,
                                                                seed):
    with pytest.raises(RuntimeError, match=PLANTED[kernel]):
        kernels_on_cpu.planted(kernel, False, 2, order, seed)
    out = kernels_on_cpu.planted(kernel, True, 2, order, seed)
    assert torch.equal(out, fixed_result(kernel, 2))


def test_the_report_names_both_threads_and_the_byte(kernels_on_cpu):
    # forward order: thread 0 writes cells[0] and reads cells[32] before thread 32 writes it
    with pytest.raises(RuntimeError) as raised:
        kernels_on_cpu.planted("cells_across_warps", False, 1)
    first = str(raised.value).splitlines()[0]
    assert first == ("racecheck: cells_across_warps: read by block (0, 0, 0) thread 0 and write "
                     "by block (0, 0, 0) thread 32 of __shared__ cells_across_warps::cells at "
                     "byte 128, with no barrier between them")


def test_the_schedules_resume_the_fibers_in_other_orders(kernels_on_cpu):
    # which thread of a racing pair comes first depends on the order the fibers run in
    firsts = set()
    for order, seed in SCHEDULES:
        with pytest.raises(RuntimeError) as raised:
            kernels_on_cpu.planted("cells_across_lanes", False, 1, order, seed)
        firsts.add(str(raised.value).splitlines()[0])
    assert len(firsts) == len(SCHEDULES), firsts


def test_the_schedules_reorder_the_fibers_after_each_barrier(kernels_on_cpu):
    """The order threads pass the point after each of two barriers (recorded with an atomic
    counter). The last to arrive at a barrier runs on first; then the scheduler resumes the
    others in its order: ascending (forward), the initial descending order rotated by one
    per barrier (reversed), reshuffled (shuffled)."""
    def orders(order, seed):
        out = kernels_on_cpu.planted("arrival_order", True, 2, order, seed).long().tolist()
        return out[:64], out[64:]

    first, second = orders("forward", 0)
    assert first == [63] + list(range(63))  # 63 arrived last at the first barrier
    assert second == [62] + list(range(62)) + [63]  # 62 at the second (first's last)
    first, second = orders("reversed", 0)
    assert first == [0] + list(range(62, 0, -1)) + [63]  # 63..0 rotated once: 62..0, 63
    assert second == [63] + list(range(61, -1, -1)) + [62]  # rotated twice: 61..0, 63, 62
    first, second = orders("shuffled", 3)
    assert sorted(first) == sorted(second) == list(range(64))
    # resumed in a new order: the rest of `second` is not `first`'s order without its head
    assert second[1:] != [t for t in first if t != second[0]]


def test_each_launch_starts_with_an_empty_shadow(kernels_on_cpu):
    # thread t writes out[t], then in the next launch thread 63 - t does: ordered by the
    # launch boundary, not a race
    out = kernels_on_cpu.planted("two_launches", True, 1)
    assert out.tolist() == [63.0 - j for j in range(64)]


def test_a_failed_call_leaves_nothing_for_the_next(kernels_on_cpu):
    with pytest.raises(RuntimeError):
        kernels_on_cpu.planted("cells_across_lanes", False, 1)
    kernels_on_cpu.planted("cells_across_lanes", True, 1)  # no stale hazards reported
    with pytest.raises(ValueError, match="schedule must be forward, reversed or shuffled"):
        kernels_on_cpu.planted("cells_across_lanes", True, 1, "backward", 0)


# --- the fiber switch ------------------------------------------------------------------------------

# Two fibers and the scheduler (main) take turns; fiber 0 rounds downward (fesetround sets the x87
# control word and MXCSR). Each records, after every resume, its rounding mode by the x87 control
# word (fegetround) and by MXCSR (the bits of an SSE float 1/3: ...AA downward, ...AB to
# nearest), and keeps eight running sums live across every switch (at -O2 in rbx, rbp, r12-r15 or
# the stack). Then a fiber throws and catches an exception through frames that were switched
# out and back in.
FIBER_SWITCH_PROGRAM = r"""
#include "fiber_switch.h"
#include <cfenv>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>
using namespace cuda_on_cpu;

FiberContext scheduler, fibers[2];
volatile float one = 1, three = 3;
volatile uint64_t seed = 3;

void report(int who) {
  const float third = one / three;
  uint32_t bits;
  std::memcpy(&bits, &third, 4);
  std::printf("%d %s %08x\n", who, std::fegetround() == FE_DOWNWARD ? "down" : "nearest", bits);
}

template <int kWho>
void fiber() {
  if (kWho == 0) std::fesetround(FE_DOWNWARD);
  uint64_t s[8];
  for (int j = 0; j < 8; ++j) s[j] = seed + j + kWho;
  for (int i = 0; i < 3; ++i) {
    fiber_switch(fibers[kWho], scheduler);
    report(kWho);
    for (int j = 0; j < 8; ++j) s[j] = s[j] * (2 * j + 3) + i;
  }
  uint64_t sum = 0;
  for (int j = 0; j < 8; ++j) sum = sum * 31 + s[j];
  std::printf("%d sums %llu\n", kWho, static_cast<unsigned long long>(sum));
  try {
    fiber_switch(fibers[kWho], scheduler);
    throw std::runtime_error("thrown after a switch");
  } catch (const std::exception& e) {
    std::printf("%d caught %s\n", kWho, e.what());
  }
  fiber_switch(fibers[kWho], scheduler);
  __builtin_unreachable();
}

int main() {
  static char stacks[2][64 * 1024];
  fiber_start(fibers[0], stacks[0], sizeof(stacks[0]), fiber<0>);
  fiber_start(fibers[1], stacks[1], sizeof(stacks[1]), fiber<1>);
  for (int turn = 0; turn < 10; ++turn) {
    fiber_switch(scheduler, fibers[turn % 2]);
    if (turn % 2 == 0) report(2);
  }
}
"""


def test_the_fiber_switch_keeps_each_fiber_s_registers_and_rounding_mode(tmp_path):
    """tests/cuda_on_cpu/fiber_switch.h alone, in a program of its own (compiled in about a
    second, without torch's headers)."""
    source = tmp_path / "fiber_switch_test.cpp"
    source.write_text(FIBER_SWITCH_PROGRAM)
    program = tmp_path / "fiber_switch_test"
    here = Path(__file__).resolve().parent / "cuda_on_cpu"
    subprocess.run([os.environ.get("CXX", "c++"), "-O2", "-std=c++20", f"-I{here}", str(source),
                    "-o", str(program)], check=True)
    lines = subprocess.run([str(program)], capture_output=True, text=True,
                           check=True).stdout.splitlines()

    def sums(who):  # the fiber's computation without the switches
        s = [3 + j + who for j in range(8)]
        for i in range(3):
            s = [(s[j] * (2 * j + 3) + i) % 2 ** 64 for j in range(8)]
        total = 0
        for value in s:
            total = (total * 31 + value) % 2 ** 64
        return total

    down, nearest = "down 3eaaaaaa", "nearest 3eaaaaab"
    assert lines == [f"2 {nearest}",  # fiber 0 started, fiber 1 started
                     f"0 {down}", f"2 {nearest}", f"1 {nearest}",
                     f"0 {down}", f"2 {nearest}", f"1 {nearest}",
                     f"0 {down}", f"0 sums {sums(0)}", f"2 {nearest}",
                     f"1 {nearest}", f"1 sums {sums(1)}",
                     "0 caught thrown after a switch", f"2 {nearest}",
                     "1 caught thrown after a switch"]


# --- attention under schedules -------------------------------------------------------------------

# one case per kernel family and dtype: fp32 with a last 32-key tile of one row (T = 65);
# bf16 with two forward blocks of 128 rows, four double-buffered K/V tiles and four dK/dV
# blocks (T = 200); fp16 with a last 64-key tile and 128-row block of one row (T = 129)
ATTENTION_CASES = [(torch.float32, 32, 65), (torch.bfloat16, 64, 200), (torch.float16, 32, 129)]


@pytest.mark.parametrize("dtype, D, T", ATTENTION_CASES,
                         ids=[f"{str(d)[6:]}-D{D}-T{T}" for d, D, T in ATTENTION_CASES])
@pytest.mark.slow
def test_attention_gives_the_same_bits_under_every_schedule(kernels_on_cpu, cpu_extension,
                                                            dtype, D, T):
    """out, lse, dk, dv and the deterministic dq: bit for bit in every schedule; dq by atomics
    (its sums' order follows the blocks') within errors_against_fp64's bound in each."""
    from fastgpt.ops.cuda_attention import errors_against_fp64

    gen = torch.Generator().manual_seed(T + D)
    q, k, v, g = (torch.randn(1, 2, T, D, generator=gen).to(dtype) for _ in range(4))
    args = (D ** -0.5, 0.1, 7, 3)  # scale, dropout, seed, offset
    runs = {}
    for order, seed in SCHEDULES[:3]:
        out, lse, _ = kernels_on_cpu.forward(q, k, v, *args, schedule=order, schedule_seed=seed)
        exact = kernels_on_cpu.backward(q, k, v, out, lse, g, *args, True, schedule=order,
                                        schedule_seed=seed)[:3]
        atomic = kernels_on_cpu.backward(q, k, v, out, lse, g, *args, False, schedule=order,
                                         schedule_seed=seed)[:3]
        runs[order, seed] = (out, lse, *exact, *atomic)
        errors = errors_against_fp64(q, k, v, g, args[0], args[1], seed=args[2],
                                     offset=args[3], results=dict(out=out, lse=lse, dq=atomic[0],
                                                                  dk=atomic[1], dv=atomic[2]))
        assert errors["dq"].error <= errors["dq"].bound, (order, seed, errors["dq"])
    first = runs[SCHEDULES[0]]
    names = ("out", "lse", "dq", "dk", "dv", "dq (atomics)", "dk (atomics)", "dv (atomics)")
    for schedule, run in runs.items():
        for name, want, got in zip(names, first, run):
            if name != "dq (atomics)":
                assert torch.equal(got, want), f"{name} differs in schedule {schedule}"
    if dtype == torch.float32:  # the blocks did run in other orders: fp32 dq keeps the sums' last bits
        assert any(not torch.equal(run[5], first[5]) for run in runs.values())


# --- the AdamW kernel ----------------------------------------------------------------------------

def adamw_state(sizes, dtype, seed, misaligned=()):
    """Params (each its own storage, offset 1 element if its index is in `misaligned`), grads,
    and fp32 moments after a few steps' worth of values."""
    gen = torch.Generator().manual_seed(seed)
    params, grads, exp_avgs, exp_avg_sqs = [], [], [], []
    for i, n in enumerate(sizes):
        offset = 1 if i in misaligned else 0
        params.append(torch.randn(n + offset, generator=gen).to(dtype)[offset:])
        grads.append(torch.randn(n + offset, generator=gen).to(dtype)[offset:])
        exp_avgs.append(0.1 * torch.randn(n, generator=gen))
        exp_avg_sqs.append(0.01 * torch.rand(n, generator=gen))
    return params, grads, exp_avgs, exp_avg_sqs


def clone_all(state):
    return [[t.clone() for t in ts] for ts in state]


HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=7)


def adamw_call(fn, state, grad_scale=None, lr_tensor=None, step_tensor=None, **schedule):
    h = HYPER
    return fn(*state, h["lr"], h["beta1"], h["beta2"], h["eps"], h["weight_decay"], h["step"],
              grad_scale, lr_tensor, step_tensor, **schedule)


# (sizes, misaligned indices): tails of every length mod 4, a chunk's edges (65536), several
# chunks, aligned and unaligned tensors side by side, and a few million elements
ADAMW_CASES = {
    "tiny": ([1, 2, 3, 4, 5, 7], {1, 4}),
    "chunk-edges": ([65535, 65536, 65537, 3], {2}),
    "many-chunks": ([5 * 65536 + 13, 100_003], {1}),
    "millions": ([3_000_017, 1_000_000], {0}),
}


# every case in fp32; the 16-bit params (fp32 state) on all but the largest (the bookkeeping
# does not depend on the dtype)
ADAMW_RUNS = [(case, dtype) for case in sorted(ADAMW_CASES)
              for dtype in (torch.float32, torch.bfloat16, torch.float16)
              if case != "millions" or dtype == torch.float32]


@pytest.mark.parametrize("case, dtype", ADAMW_RUNS,
                         ids=[f"{case}-{str(dtype)[6:]}" for case, dtype in ADAMW_RUNS])
def test_the_adamw_kernel_equals_the_cpu_build_bit_for_bit(kernels_on_cpu, cpu_extension,
                                                           case, dtype):
    """Every element of every tensor updated once, by the vector path where the tensor is
    16-byte aligned and the scalar path where not (and for the tails), under racecheck."""
    sizes, misaligned = ADAMW_CASES[case]
    state = adamw_state(sizes, dtype, seed=len(sizes), misaligned=misaligned)
    ours, theirs = clone_all(state), clone_all(state)
    launches = adamw_call(kernels_on_cpu.adamw_step, ours)
    adamw_call(torch.ops.fastgpt.adamw_step, theirs)
    assert launches == 1
    for kind, got_list, want_list in zip(("param", "grad", "exp_avg", "exp_avg_sq"), ours, theirs):
        for i, (got, want) in enumerate(zip(got_list, want_list)):
            assert torch.equal(got, want), f"{kind} {i} (size {sizes[i]}) differs"
    assert not torch.equal(ours[2][-1], state[2][-1])  # it did step


def test_the_adamw_kernel_matches_torch_adamw_in_fp32(kernels_on_cpu):
    sizes = [1, 3, 17, 1000, 65537]
    params = [torch.randn(n) for n in sizes]
    ref = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.AdamW(ref, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]),
                            eps=HYPER["eps"], weight_decay=HYPER["weight_decay"], foreach=False)
    exp_avgs = [torch.zeros(n) for n in sizes]
    exp_avg_sqs = [torch.zeros(n) for n in sizes]
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 4):
        grads = [torch.randn(n, generator=gen) for n in sizes]
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        opt.step()
        kernels_on_cpu.adamw_step(params, grads, exp_avgs, exp_avg_sqs, HYPER["lr"],
                                  HYPER["beta1"], HYPER["beta2"], HYPER["eps"],
                                  HYPER["weight_decay"], step)
    for i, (p, q) in enumerate(zip(params, ref)):
        for got, want in ((p, q.detach()), (exp_avgs[i], opt.state[q]["exp_avg"]),
                          (exp_avg_sqs[i], opt.state[q]["exp_avg_sq"])):
            error = (got - want).abs().max().item()
            assert error <= 1e-6 * want.abs().max().item(), (i, error)


@pytest.mark.slow
def test_adamw_288_tensors_take_eight_launches_of_36(kernels_on_cpu, cpu_extension):
    sizes = [1 + 37 * i for i in range(288)]
    state = adamw_state(sizes, torch.float32, seed=3, misaligned=set(range(0, 288, 7)))
    ours, theirs = clone_all(state), clone_all(state)
    assert adamw_call(kernels_on_cpu.adamw_step, ours) == 8  # 288 / 36 (35 a launch: 9)
    adamw_call(torch.ops.fastgpt.adamw_step, theirs)
    for got, want in zip(ours[0] + ours[2] + ours[3], theirs[0] + theirs[2] + theirs[3]):
        assert torch.equal(got, want)


def test_adamw_mixed_dtypes_launch_per_dtype(kernels_on_cpu, cpu_extension):
    state = [[], [], [], []]
    for i, dtype in enumerate([torch.float32, torch.bfloat16, torch.float16, torch.bfloat16]):
        part = adamw_state([100 + i], dtype, seed=i)
        for lists, tensors in zip(state, part):
            lists.extend(tensors)
    ours, theirs = clone_all(state), clone_all(state)
    assert adamw_call(kernels_on_cpu.adamw_step, ours) == 3  # one per dtype
    adamw_call(torch.ops.fastgpt.adamw_step, theirs)
    for got, want in zip(ours[0] + ours[2] + ours[3], theirs[0] + theirs[2] + theirs[3]):
        assert torch.equal(got, want)


def test_adamw_clipping_scale_and_lr_and_step_read_from_memory(kernels_on_cpu, cpu_extension):
    """The capturable path: grad_scale, lr and step as one-element tensors the kernel reads."""
    state = adamw_state([1000, 33], torch.float32, seed=5, misaligned={1})
    ours, theirs, plain = clone_all(state), clone_all(state), clone_all(state)
    tensors = dict(grad_scale=torch.tensor([0.25]), lr_tensor=torch.tensor([2e-3]),
                   step_tensor=torch.tensor([11.0]))
    adamw_call(kernels_on_cpu.adamw_step, ours, **tensors)
    adamw_call(torch.ops.fastgpt.adamw_step, theirs, **tensors)
    adamw_call(kernels_on_cpu.adamw_step, plain)
    for kind in (0, 2, 3):  # params, exp_avgs, exp_avg_sqs
        for got, want, without in zip(ours[kind], theirs[kind], plain[kind]):
            assert torch.equal(got, want)
            assert not torch.equal(got, without)  # the tensors were read


@pytest.mark.parametrize("order, seed", SCHEDULES[1:], ids=SCHEDULE_IDS[1:])
def test_the_adamw_kernel_gives_the_same_bits_under_every_schedule(kernels_on_cpu, order, seed):
    state = adamw_state([65537, 1000, 5], torch.bfloat16, seed=9, misaligned={1})
    first, other = clone_all(state), clone_all(state)
    adamw_call(kernels_on_cpu.adamw_step, first)
    adamw_call(kernels_on_cpu.adamw_step, other, schedule=order, schedule_seed=seed)
    for got, want in zip(other[0] + other[2] + other[3], first[0] + first[2] + first[3]):
        assert torch.equal(got, want)


def test_adamw_a_tensor_cut_between_two_launches(kernels_on_cpu, cpu_extension):
    """20 one-chunk tensors, then one of 301 chunks: the 320-block limit cuts it, and the
    rest continues in slot 0 of the next launch. Without racecheck: its shadow (24 bytes per
    byte written) would take 5.7 GB; the cases above run the same kernel under it."""
    sizes = [1000] * 20 + [300 * 65536 + 5] + [1000] * 3
    state = adamw_state(sizes, torch.float32, seed=11)
    ours, theirs = clone_all(state), clone_all(state)
    launches = adamw_call(kernels_on_cpu.adamw_step, ours, check_races=False)
    assert launches == 2  # 320 blocks, then the cut tensor's last 1 + 3 more
    adamw_call(torch.ops.fastgpt.adamw_step, theirs)
    for got, want in zip(ours[0] + ours[2] + ours[3], theirs[0] + theirs[2] + theirs[3]):
        assert torch.equal(got, want)


def test_the_fused_adamw_optimizer_steps_like_the_kernel(kernels_on_cpu, cpu_extension):
    """fastgpt.optim.AdamW's fused backend on CPU tensors and the kernel on the same state:
    the optimizer's bookkeeping (step counts, per-group hyperparameters) feeds the kernel."""
    params = [torch.nn.Parameter(torch.randn(n)) for n in (10, 70000)]
    copies = [p.detach().clone() for p in params]
    opt = AdamW(params, lr=1e-3, weight_decay=0.1, backend="fused")
    gen = torch.Generator().manual_seed(1)
    exp_avgs = [torch.zeros_like(c) for c in copies]
    exp_avg_sqs = [torch.zeros_like(c) for c in copies]
    for step in range(1, 3):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        kernels_on_cpu.adamw_step(copies, grads, exp_avgs, exp_avg_sqs, 1e-3, 0.9, 0.999, 1e-8,
                                  0.1, step)
    for p, c in zip(params, copies):
        assert torch.equal(p.detach(), c)
