#!/usr/bin/env python
"""Mutation checks: do the tests fail when a one-line bug is put into the code?

Each entry of MUTATIONS is a file, a pattern that must occur in it exactly once, its
replacement (the bug) and the tests that should catch it. For each, this script puts the
bug into a scratch copy of the repository (the working tree's files as `git ls-files`
lists them, or a commit's with --rev), runs the tests there with `python -m pytest -x -q`
and reports the mutation caught (a test failed) or missed (they passed). One scratch copy
serves every entry: the mutated file is restored after each.

The copy is what gets tested: pytest runs with the copy as its working directory and first
on PYTHONPATH (so `import fastgpt` is the copy's, which is checked before anything runs,
as is that the unmutated tests pass there), with --basetemp inside the copy, and with the
C++ builds' cache (the CPU extension, the CUDA kernels run on the CPU: tests/conftest.py's
cached_build, keyed by the sources' contents) beside it, so that a mutated source is
compiled afresh and the mutants' builds go with the scratch copy. FASTGPT_REQUIRE_KERNELS=1
is set: a test skipped for a missing toolchain would make every mutation look missed.

A mutation counts as caught only if a test failed; if the tests only errored (e.g. the
mutated C++ did not compile), or pytest could not run them, the entry is broken: reported,
and the exit status is 1, as for a missed mutation or a pattern not found exactly once.

    python tests/mutate.py               # every entry (33/33 caught, about 20 min on 2 cores)
    python tests/mutate.py --list        # the entries, and whether each pattern is found
    python tests/mutate.py --only NAME   # some entries
    python tests/mutate.py --quick       # the quick subset (4 entries, about 2 minutes)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str           # relative to the repository root
    pattern: str        # must occur exactly once in the file
    replacement: str
    tests: tuple        # pytest arguments: node ids, files, "-k", "expression"
    bug: str            # what the mutation breaks, in words
    quick: bool = False  # in the --quick subset


ATTENTION_ON_CPU = ("tests/test_attention.py", "-k", "run_on_cpu")
CE_MATCHES = ("tests/test_cross_entropy.py", "-k", "matches_torch and dtype0")  # fp32
CE_SMOOTHING = ("tests/test_cross_entropy.py", "-k", "ignore_index_and_label_smoothing")
ADAMW = ("tests/test_adamw.py", "-k", "not cuda_build")  # not the nvcc build (minutes)
LINEAR_CE_MATCHES = ("tests/test_linear_cross_entropy.py", "-k", "match_the_composition")
ADAMW_KERNEL = ("tests/test_cuda_on_cpu.py", "-k", "adamw")  # csrc/adamw.cuh run on the CPU
# (every AdamW test there has "adamw" in its name)
RACECHECK = ("tests/test_cuda_on_cpu.py", "-k", "attention")  # the kernels under racecheck
EMULATOR = ("tests/test_cuda_on_cpu.py", "-k", "not adamw and not attention")  # its own tests
RESUME = ("tests/test_train.py", "-k",
          "resume_gives_the_same_losses or keeps_the_best_val_loss")

MUTATIONS = [
    # --- the three that issue 16 found missed, then its weak tests' ------------------------
    Mutation("attention-tc-lse", "csrc/attention_mma.cuh",
             "if (t == 0 && rows[r] < T) lse[bh * T + rows[r]] = m[r] * kLn2 + logf(l[r]);",
             "if (t == 0 && rows[r] < T) lse[bh * T + rows[r]] = m[r] * kLn2 + logf(l[r]) + 2e-4f;",
             ATTENTION_ON_CPU, "the tensor-core forward's lse off by 2e-4"),
    Mutation("attention-fp32-lse", "csrc/attention_fp32.cuh",
             "if (lane == 0) lse[r.bh * T + r.row] = m + logf(l);",
             "if (lane == 0) lse[r.bh * T + r.row] = m + logf(l) + 5e-5f;",
             ATTENTION_ON_CPU, "the fp32 forward's lse off by 5e-5"),
    Mutation("attention-tc-deterministic-dq-last-tile", "csrc/attention_mma.cuh",
             "  const int tiles = static_cast<int>((q_end - 1) / kMmaKeys) + 1;\n"
             "  const Elem* k_head = k + k_layout.offset(bh);\n"
             "  const Elem* v_head = v + v_layout.offset(bh);\n\n"
             "  copy_tile_async<D, kDqRows, kThreads>",
             "  const int tiles = static_cast<int>((q_end - 1) / kMmaKeys);\n"
             "  const Elem* k_head = k + k_layout.offset(bh);\n"
             "  const Elem* v_head = v + v_layout.offset(bh);\n\n"
             "  copy_tile_async<D, kDqRows, kThreads>",
             ATTENTION_ON_CPU,
             "the tensor-core deterministic dQ skips the last K/V tile"),
    Mutation("reference-deterministic-dq-tiles", "fastgpt/ops/reference.py",
             "for k0 in range(0, q1, block_k):\n",
             "for k0 in range(0, q0 + 1, block_k):\n",
             ("tests/test_attention.py", "-k", "tiled_forward_and_backward"),
             "the tiled algorithm's deterministic dQ misses K/V tiles past the Q tile's first "
             "row (a test compared it only with the atomic path, in the same order)",
             quick=True),
    Mutation("model-loss-ignores-backend", "fastgpt/model.py",
             "reduction=reduction, backend=backend)",
             "reduction=reduction, backend=None)",
             ("tests/test_model.py", "-k", "backend"),
             "GPT.loss drops the backend asked for (a test compared the reference with auto, "
             "the reference too on a CPU)", quick=True),
    Mutation("linear-ce-weight-grad-from-the-first-chunk", "fastgpt/ops/triton_linear_ce.py",
             "_add_product(grad_weight, grad.t(), h)",
             "_add_product(grad_weight, grad.t(), hidden[:end - start])",
             LINEAR_CE_MATCHES,
             "version 1 multiplies every chunk's logit gradient by the first chunk's hidden "
             "rows"),
    Mutation("linear-ce-none-scales-by-the-first-rows", "fastgpt/ops/triton_linear_ce.py",
             "grad_scale[start:end] if per_row_scale else grad_scale",
             "grad_scale[:end - start] if per_row_scale else grad_scale",
             LINEAR_CE_MATCHES,
             "reduction='none': the backward scales each chunk by the first chunk's "
             "grad_output (the bug Liger's fused version shipped, issue 1298)"),
    Mutation("linear-ce-chunks-sized-from-n-alone", "fastgpt/ops/triton_linear_ce.py",
             "rows = max(n_rows, vocab) * d // vocab",
             "rows = n_rows * d",
             ("tests/test_linear_cross_entropy.py", "-k", "chunk_rows or allocates"),
             "a chunk's logits grow with N (the whole (N, V) logits at once)"),
    Mutation("linear-ce-v2-skips-the-target-tile",
             "fastgpt/ops/experimental/linear_cross_entropy_v2.py",
             "tl.max(tl.maximum(p, is_target.to(tl.float32)))",
             "tl.max(p)",
             ("tests/test_linear_cross_entropy.py", "-k", "version_2"),
             "version 2's filter skips a tile holding a row's target (its -1 lost)"),
    Mutation("adamw-schema-drops-the-mutation", "csrc/bindings.cpp",
             '"adamw_step(Tensor(a!)[] params, ',
             '"adamw_step(Tensor[] params, ',
             ("tests/test_adamw.py", "-k", "torch_compile"),
             "adamw_step's schema no longer says it writes params (what torch.compile's "
             "functionalization orders the graph by; the fake's test asserted nothing)"),
    Mutation("verify-adamw-rows", "csrc/adamw_math.h",
             "m = m + s.one_minus_beta1 * (g - m);",
             "m = m + s.one_minus_beta2 * (g - m);",
             ("tests/test_verify.py", "-k", "passes"),
             "the fused AdamW's first moment takes beta2's weight: verify's AdamW rows "
             "must run (and fail) whatever ran before them"),
    Mutation("cli-sample-ignores-seed", "fastgpt/cli.py",
             "seed=args.seed,", "seed=1337,",
             ("tests/test_cli.py", "-k", "end_to_end"),
             "fastgpt sample ignores --seed (the test checked only the echoed prompt)"),
    # --- the Triton cross-entropy (fastgpt/ops/triton_ce.py) ---------------------------------
    Mutation("ce-online-softmax-no-rescale", "fastgpt/ops/triton_ce.py",
             "d = d * tl.exp(m - shift) + tl.sum(",
             "d = d + tl.sum(",
             CE_MATCHES, "the vocab loop's running sum is not rescaled when the max grows",
             quick=True),
    Mutation("ce-smoothing-gradient", "fastgpt/ops/triton_ce.py",
             "g -= label_smoothing / n_cols",
             "g -= label_smoothing / (n_cols - 1)",
             CE_SMOOTHING, "label smoothing's gradient spreads over V - 1 classes"),
    Mutation("ce-ignore-index-fixed", "fastgpt/ops/triton_ce.py",
             "valid = row_in & (targets != ignore_index)",
             "valid = row_in & (targets != -100)",
             CE_SMOOTHING, "rows are ignored only for the default ignore_index -100"),
    Mutation("ce-scale-not-applied", "fastgpt/ops/triton_ce.py",
             "(g * scale).to(grad_ptr.dtype.element_ty)",
             "g.to(grad_ptr.dtype.element_ty)",
             CE_MATCHES, "the backward of mean/sum ignores grad_output"),
    # --- the AdamW arithmetic (csrc/adamw_math.h, csrc/adamw_cpu.cpp) ------------------------
    Mutation("adamw-bias-correction", "csrc/adamw_math.h",
             "-lr / (Real(1) - pow(beta1, step))",
             "-lr / (Real(1) - pow(beta1, step + Real(1)))",
             ADAMW, "the first moment's bias correction one step ahead"),
    Mutation("adamw-weight-decay", "csrc/adamw_math.h",
             "s.decay = static_cast<float>(Real(1) - lr * weight_decay);",
             "s.decay = static_cast<float>(Real(1) - weight_decay);",
             ADAMW, "weight decay not scaled by the learning rate"),
    Mutation("adamw-grad-scale", "csrc/adamw_cpu.cpp",
             "static_cast<float>(g[i]) * scale,",
             "static_cast<float>(g[i]),",
             ADAMW, "the clipping scale is not applied to the gradient"),
    Mutation("adamw-bias-correction2", "csrc/adamw_math.h",
             "const float denom = sqrtf(v) / s.bias_correction2_sqrt + s.eps;",
             "const float denom = sqrtf(v) + s.eps;",
             ADAMW, "the second moment's bias correction dropped"),
    # --- csrc/attention_fp32.cuh, run on the CPU ---------------------------------------------
    Mutation("attention-fp32-causal-mask", "csrc/attention_fp32.cuh",
             "const bool visible = key <= r.row;",
             "const bool visible = key <= r.row + 1;",
             ATTENTION_ON_CPU, "the fp32 forward lets each row see the next key"),
    Mutation("attention-tc-dropout-scale", "csrc/attention_mma.cuh",
             "p_dropped = kept ? p * dropout.keep_scale : 0.0f;",
             "p_dropped = kept ? p : 0.0f;",
             ATTENTION_ON_CPU, "the tensor-core backward's dV forgets dropout's 1/(1-p)"),
    Mutation("attention-fp32-dq-atomic-scale", "csrc/attention_fp32.cuh",
             "atomicAdd(&dq[base + row * D + lane + 32 * c], dq_part[c] * scale);",
             "atomicAdd(&dq[base + row * D + lane + 32 * c], dq_part[c]);",
             ATTENTION_ON_CPU, "the fp32 backward's atomic dQ misses the softmax scale"),
    Mutation("attention-tc-forward-correction", "csrc/attention_mma.cuh",
             "        o[n][2] *= correction[1];\n",
             "",
             ATTENTION_ON_CPU,
             "the tensor-core forward does not rescale one of a row's accumulator elements"),
    # --- the mma.sync forward's fragments, mask and dropout (csrc/attention_mma.cuh) ---------
    Mutation("attention-mma-k-fragment-rows", "csrc/attention_mma.cuh",
             "ldmatrix<4, false>(f, b + swizzled<D>(b_row0 + 16 * np + 8 * (lane / 16) + lane % 8,",
             "ldmatrix<4, false>(f, b + swizzled<D>(b_row0 + 16 * np + 8 * ((lane / 8) % 2) + lane % 8,",
             ATTENTION_ON_CPU, "S = Q K^T (and S^T, dP, dP^T) take B's rows for the wrong n-tile"),
    Mutation("attention-mma-copy-unswizzled", "csrc/attention_mma.cuh",
             "cp_async_16(tile + swizzled<D>(r, c), head",
             "cp_async_16(tile + r * D + c * 8, head",
             ATTENTION_ON_CPU, "tiles copied unswizzled but read swizzled"),
    Mutation("attention-mma-swizzle-bank-conflicts", "csrc/attention_mma.cuh",
             "const int f = kChunks >= 8 ? row % 8 : (row / 2) % 4;",
             "const int f = kChunks >= 8 ? row % 8 : row % 4;",
             ("tests/test_warp_primitives.py", "-k", "swizzle"),
             "D = 32 tiles swizzled so that ldmatrix's 8 rows share bank groups"),
    Mutation("attention-mma-causal-mask", "csrc/attention_mma.cuh",
             "s[n][e] = diagonal && key > rows[e / 2] ? -INFINITY : s[n][e] * scale_log2;",
             "s[n][e] = diagonal && key >= rows[e / 2] ? -INFINITY : s[n][e] * scale_log2;",
             ATTENTION_ON_CPU, "the mma.sync forward hides each row's own key"),
    Mutation("attention-mma-dropout-bits", "csrc/attention_mma.cuh",
             "return (keep[e / 2] >> (4 * n + 2 * (t % 2) + e % 2)) & 1u;",
             "return (keep[e / 2] >> (4 * n + 2 * (t / 2) + e % 2)) & 1u;",
             ATTENTION_ON_CPU, "lanes take another lane's dropout bits"),
    Mutation("attention-mma-backward-dropout-bits", "csrc/attention_mma.cuh",
             "const bool kept = (keep[e] >> (4 * n + g % 4)) & 1u;",
             "const bool kept = (keep[e] >> (4 * n + (g + 1) % 4)) & 1u;",
             ATTENTION_ON_CPU, "dK/dV take the dropout bits of the next key"),
    Mutation("attention-mma-backward-lse-units", "csrc/attention_mma.cuh",
             "if (threadIdx.x < kQ) return row < T ? lse[bh * T + row] * kLog2e : INFINITY;",
             "if (threadIdx.x < kQ) return row < T ? lse[bh * T + row] : INFINITY;",
             ATTENTION_ON_CPU, "dK/dV recompute P with lse in nats against scores in log2 units"),
    Mutation("attention-mma-dq-ds-fragment", "csrc/attention_mma.cuh",
             "2 * rg + (lane / 8) % 2));",
             "2 * rg + lane / 16));",
             ATTENTION_ON_CPU, "dQ reads dS^T's fragments with rows and columns swapped"),
    Mutation("attention-mma-deterministic-dq-diagonal", "csrc/attention_mma.cuh",
             "          const bool future = diagonal && key > rows[e / 2];\n"
             "          const float p = future ? 0.0f : exp2f(s[n][e] * scale_log2 - row_lse[e / 2]);",
             "          const bool future = diagonal && key >= rows[e / 2];\n"
             "          const float p = future ? 0.0f : exp2f(s[n][e] * scale_log2 - row_lse[e / 2]);",
             ATTENTION_ON_CPU, "the deterministic dQ drops each row's own key"),
    Mutation("attention-dr-kernel-reduction", "csrc/attention_mma.cuh",
             "for (int offset = kLanesPerRow / 2; offset > 0; offset /= 2) {",
             "for (int offset = kLanesPerRow / 4; offset > 0; offset /= 2) {",
             ATTENTION_ON_CPU, "Dr sums only half of each row"),
    # --- csrc/adamw.cuh's kernel and bookkeeping, run on the CPU -----------------------------
    Mutation("adamw-kernel-vector-path-over-the-tail", "csrc/adamw.cuh",
             "const int64_t vec_end = start + (end - start) / kVec * kVec;",
             "const int64_t vec_end = start + (end - start + kVec - 1) / kVec * kVec;",
             ADAMW_KERNEL, "the vector path runs past a chunk's or tensor's end"),
    Mutation("adamw-kernel-vector-stride", "csrc/adamw.cuh",
             "i += static_cast<int64_t>(kThreads) * kVec) {",
             "i += static_cast<int64_t>(kThreads)) {",
             ADAMW_KERNEL, "threads' vectors overlap: elements updated several times"),
    Mutation("adamw-kernel-scalar-path-unscaled", "csrc/adamw.cuh",
             "adamw_update(p_i, static_cast<float>(g[i]) * scale, m_i, v_i, scalars);",
             "adamw_update(p_i, static_cast<float>(g[i]), m_i, v_i, scalars);",
             ADAMW_KERNEL, "unaligned tensors and tails ignore the clipping scale"),
    Mutation("adamw-kernel-cut-tensor-size", "csrc/adamw.cuh",
             "          args.sizes[0] = args.sizes[slot];\n",
             "",
             ADAMW_KERNEL, "a tensor cut between launches continues with another's size"),
    # --- races, found by racecheck in the CPU run ---------------------------------------------
    Mutation("attention-tc-forward-no-barrier-after-loads", "csrc/attention_mma.cuh",
             "      __syncthreads();  // the next tile visible to all; this one consumed by all",
             "      // the next tile visible to all; this one consumed by all",
             RACECHECK, "warps read K/V tiles other threads' copies may not have landed in"),
    Mutation("attention-mma-wait-only-for-older-copies", "csrc/attention_mma.cuh",
             "      cp_async_wait<0>();\n      __syncthreads();  // the next tile visible to all; this one consumed",
             "      cp_async_wait<1>();\n      __syncthreads();  // the next tile visible to all; this one consumed",
             ATTENTION_ON_CPU, "the next K/V tile is used before its copies land"),
    Mutation("attention-mma-dq-no-barrier-before-ds", "csrc/attention_mma.cuh",
             "      __syncthreads();  // every warp's rows of dS^T\n",
             "",
             RACECHECK, "warps read other warps' rows of dS^T before they are written"),
    Mutation("attention-fp32-forward-no-barrier-after-loads", "csrc/attention_fp32.cuh",
             "    __syncthreads();\n    if (r.active && k0 <= r.row) visit(k0);",
             "    if (r.active && k0 <= r.row) visit(k0);",
             RACECHECK, "the fp32 forward (and deterministic dQ) reads K/V tiles before every "
             "thread has stored its part"),
    # --- the emulator itself (tests/cuda_on_cpu/) ------------------------------------------
    Mutation("emulator-no-reorder-after-barriers", "tests/cuda_on_cpu/cuda_on_cpu.h",
             "if (schedule_.order == Order::reversed) std::rotate(",
             "if (false) std::rotate(",
             EMULATOR, "the reversed schedule resumes fibers in one order throughout"),
    Mutation("racecheck-syncwarp-orders-nothing", "tests/cuda_on_cpu/cuda_on_cpu.h",
             "    ++fibers_[current_].who.warp_epoch;\n",
             "",
             EMULATOR, "racecheck takes __syncwarp for no barrier (false reports)"),
    Mutation("racecheck-skips-the-last-write", "tests/cuda_on_cpu/racecheck.h",
             "      if (!reported && !ordered(sh.write, now, per_block)) {",
             "      if (false) {",
             EMULATOR, "racecheck misses hazards with the last write (read or write after it)"),
    # --- resume (fastgpt/train.py, checkpoint.py, data.py) -----------------------------------
    Mutation("resume-rng-not-restored", "fastgpt/checkpoint.py",
             '    torch.set_rng_state(mine["torch"])\n',
             '    pass\n',
             RESUME, "a resumed run draws fresh dropout masks", quick=True),
    Mutation("resume-data-position", "fastgpt/data.py",
             'for _ in range(state["batch"]):',
             'for _ in range(state["batch"] - 1):',
             RESUME, "a resumed run repeats the last batch it had taken"),
    Mutation("resume-optimizer-state", "fastgpt/checkpoint.py",
             'optimizer.load_state_dict(checkpoint["optimizer"])',
             'optimizer.state_dict()',
             RESUME, "a resumed run restarts AdamW's moments"),
]


def working_tree_files() -> list[str]:
    """The working tree's files as git sees them: tracked and untracked-but-not-ignored
    (deleted ones left out)."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    return sorted({n for n in names if n and (ROOT / n).is_file()})


def make_copy(scratch: Path, rev: str | None) -> Path:
    copy = scratch / "repo"
    if rev:
        archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=ROOT,
                                 capture_output=True, check=True).stdout
        copy.mkdir()
        subprocess.run(["tar", "-x", "-C", str(copy)], input=archive, check=True)
    else:
        for name in working_tree_files():
            target = copy / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target)
    return copy


def environment(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy)] + ([env["PYTHONPATH"]]
                                                      if env.get("PYTHONPATH") else []))
    env["FASTGPT_REQUIRE_KERNELS"] = "1"
    env["FASTGPT_TEST_BUILD_CACHE"] = str(copy.parent / "builds")
    env.setdefault("CUDA_HOME", "/usr/local/cuda")
    env.pop("FASTGPT_BACKEND", None)
    return env


def check_the_copy_is_imported(copy: Path, env: dict[str, str]) -> None:
    """fastgpt, its C++ sources and the tests' helpers must come from the copy."""
    code = ("import fastgpt, fastgpt.ops.extension as e; "
            "print(fastgpt.__file__); print(e.CSRC)")
    lines = subprocess.run([sys.executable, "-c", code], cwd=copy, env=env, check=True,
                           capture_output=True, text=True).stdout.split()
    for line in lines:
        if not Path(line).resolve().is_relative_to(copy.resolve()):
            raise SystemExit(f"mutate: {line} is not in the scratch copy {copy}: the tests "
                             f"would not see the mutations")


def run_tests(copy: Path, env: dict[str, str], tests: tuple, timeout: float
              ) -> tuple[str, float, str]:
    """("passed" | "failed" | "error", seconds, the output's tail). -n 0: in one process
    (under xdist, -x ends the run as interrupted, exit status 2, not as failed)."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-n", "0",
               f"--basetemp={copy.parent / 'pytest-tmp'}", *tests]
    started = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) \
            else (exc.stdout or "")
        return "error", time.perf_counter() - started, f"timed out after {timeout:.0f} s\n" + out[-2000:]
    seconds = time.perf_counter() - started
    output = result.stdout + result.stderr
    summary = next((line for line in reversed(result.stdout.splitlines())
                    if " in " in line and ("passed" in line or "failed" in line
                                           or "error" in line)), "")
    if result.returncode == 0 and " passed" in summary:
        return "passed", seconds, output[-2000:]
    if result.returncode == 1 and " failed" in summary:
        return "failed", seconds, output[-2000:]
    return "error", seconds, output[-3000:]


def pattern_count(copy_or_root: Path, m: Mutation) -> int:
    path = copy_or_root / m.file
    return path.read_text().count(m.pattern) if path.exists() else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutations")
    parser.add_argument("--quick", action="store_true", help="run the quick subset")
    parser.add_argument("--rev", help="copy this commit's files instead of the working tree "
                        "(e.g. HEAD: leaves uncommitted work out)")
    parser.add_argument("--timeout", type=float, default=1200,
                        help="seconds for one pytest run (default 1200)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy")
    args = parser.parse_args(argv)

    names = [m.name for m in MUTATIONS]
    assert len(set(names)) == len(names), "mutation names must be unique"
    chosen = MUTATIONS
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            parser.error(f"no mutation named {', '.join(unknown)} (see --list)")
        chosen = [m for m in MUTATIONS if m.name in args.only]
    if args.quick:
        chosen = [m for m in chosen if m.quick]

    if args.list:
        for m in chosen:
            count = pattern_count(ROOT, m)
            found = "" if count == 1 else f"   PATTERN FOUND {count} TIMES"
            print(f"{m.name:<42} {m.file:<28} {' '.join(m.tests)}{' [quick]' if m.quick else ''}"
                  f"{found}\n    {m.bug}")
        return 0

    scratch = Path(tempfile.mkdtemp(prefix="fastgpt-mutate-"))
    started = time.perf_counter()
    results = []
    try:
        copy = make_copy(scratch, args.rev)
        env = environment(copy)
        check_the_copy_is_imported(copy, env)
        print(f"mutate: {len(chosen)} mutation(s) in a copy of "
              f"{args.rev or 'the working tree'} at {copy}", flush=True)

        # the unmutated copy must pass each set of tests, or a failure says nothing
        for tests in dict.fromkeys(m.tests for m in chosen):
            outcome, seconds, output = run_tests(copy, env, tests, args.timeout)
            print(f"  baseline {' '.join(tests)}: {outcome} ({seconds:.0f} s)", flush=True)
            if outcome != "passed":
                print(output)
                print("mutate: the unmutated tests do not pass; nothing to conclude")
                return 1

        for m in chosen:
            path = copy / m.file
            original = path.read_text() if path.exists() else ""
            count = original.count(m.pattern)
            if count != 1:
                results.append((m, f"pattern found {count} times", 0.0))
                print(f"  {m.name:<42} PATTERN FOUND {count} TIMES in {m.file}", flush=True)
                continue
            path.write_text(original.replace(m.pattern, m.replacement))
            try:
                outcome, seconds, output = run_tests(copy, env, m.tests, args.timeout)
            finally:
                path.write_text(original)
            verdict = {"failed": "caught", "passed": "MISSED"}.get(outcome, "BROKEN")
            results.append((m, verdict, seconds))
            print(f"  {m.name:<42} {verdict:<7} {seconds:6.0f} s   {m.bug}", flush=True)
            if verdict == "BROKEN":
                print("    " + output.replace("\n", "\n    "))
    finally:
        if args.keep:
            print(f"mutate: scratch copy kept at {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    caught = sum(verdict == "caught" for _, verdict, _ in results)
    print(f"mutate: {caught}/{len(results)} caught in {time.perf_counter() - started:.0f} s")
    for m, verdict, _ in results:
        if verdict != "caught":
            print(f"  not caught: {m.name} ({verdict}): {m.bug}")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
