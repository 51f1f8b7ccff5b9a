"""What the compiler made, checked without a GPU (issue 16, parts 4 to 6): the Triton
kernels of every self-check launch compiled ahead of time for sm_80 and sm_90
(bench/triton_aot.py), the built extension's SASS, and bench/kernel_report.py's
parsing and occupancy rules.

Cost on a 2-core CPU: the Triton compiles about 10 s (a subprocess, 16 compiles), the
extension's disassembly about 10 s, the rest about 2 s; the CUDA build itself is the
session's cuda_build fixture (conftest.py), shared with tests/test_adamw.py.
"""

import importlib
import importlib.metadata
import re
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from fastgpt.ops import triton_ce
from helpers import require_or_skip

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
try:
    kernel_report = importlib.import_module("kernel_report")
    triton_aot = importlib.import_module("triton_aot")
finally:
    sys.path.remove(str(BENCH))

ARCHS = (90, 80)


# --- fixtures -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tools():
    """(cuobjdump, nvdisasm): skipped without them, failed in CI (require_or_skip)."""
    cuobjdump, nvdisasm = kernel_report.find_tool("cuobjdump"), kernel_report.find_tool("nvdisasm")
    if not (cuobjdump and nvdisasm):
        require_or_skip("needs cuobjdump and nvdisasm: pip install -e '.[test]' (the "
                        "nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm packages)")
    return cuobjdump, nvdisasm


@pytest.fixture(scope="module")
def triton_records(tmp_path_factory, triton_cache):
    """Every self-check launch compiled for sm_90 and sm_80, in a process without the
    interpreter, with the tests' Triton cache (conftest.py: a kernel changed since the last
    run compiles anew)."""
    work = tmp_path_factory.mktemp("triton_aot")
    return triton_aot.compile_in_subprocess(work / "cubins", ARCHS, cache_dir=triton_cache)


@pytest.fixture(scope="module")
def triton_kernels(triton_records, tools):
    return kernel_report.triton_kernels(triton_records, *tools)


@pytest.fixture(scope="module")
def launch_sizes(cuda_build):
    """{demangled kernel: (threads, dynamic shared bytes)} from the built extension."""
    return kernel_report.launch_sizes(cuda_build.library)


@pytest.fixture(scope="module")
def extension_kernels(cuda_build, tools, launch_sizes):
    """{arch: the built extension's kernels}."""
    return {arch: kernel_report.extension_kernels(cuda_build.library, arch, tools[0],
                                                  launch_sizes)
            for arch in ARCHS}


# --- the Triton kernels (part 4) ------------------------------------------------------

def _summary(launch):
    """What decides a launch's compiled code, minus the block sizes that differ between the
    interpreter and a GPU (BLOCK_ROWS, BLOCK: the interpreter's are larger): the kernel,
    each argument's dtype and shape or value, the other constexprs and num_warps."""
    args = tuple((str(a.dtype), tuple(a.shape)) if isinstance(a, torch.Tensor) else a
                 for a in launch.args)
    options = tuple(sorted((k, v) for k, v in launch.options.items()
                           if k not in ("BLOCK_ROWS", "BLOCK")))
    return launch.kernel.fn.__name__, args, options


def test_the_aot_launches_are_those_self_check_makes(monkeypatch):
    """self_check_launches() (what is compiled ahead of time) against the launches a run of
    self_check records: a case or a launch added to one but not the other fails here."""
    recorded = []
    run = triton_ce.KernelLaunch.run
    monkeypatch.setattr(triton_ce.KernelLaunch, "run",
                        lambda self: recorded.append(_summary(self)) or run(self))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    triton_ce.self_check(device)
    expected = [_summary(launch) for _, launch in triton_ce.self_check_launches()]
    assert len(expected) == 2 * len(triton_ce.SELF_CHECK_CASES)
    assert Counter(recorded) == Counter(expected)


@pytest.mark.slow
def test_every_self_check_launch_compiles_for_sm80_and_sm90_without_spills(
        triton_kernels, triton_records):
    labels = [label for label, _ in triton_aot.aot_launches()]
    assert sorted((r["label"], r["arch"]) for r in triton_records) == sorted(
        (label, arch) for label in labels for arch in ARCHS)
    for k in triton_kernels:
        print(f"sm_{k.arch} {k.name:22} {k.origin:48} regs {k.regs:3} "
              f"smem {k.static_smem + k.dynamic_smem:6} B  {k.occupancy.fraction:.0%}")
        # a spill is a store to local memory: none in the cubin's frame or its code
        assert k.local == 0 and k.mix["LDL"] == 0 and k.mix["STL"] == 0, k
        # 255: the most a thread can have; a count of 0 would mean a parse went wrong
        assert 0 < k.regs <= 255, k
        assert k.occupancy.blocks >= 1, k


@pytest.mark.slow
def test_scale_kernel_moves_128_bits_a_thread_when_n_is_divisible_by_16(triton_kernels):
    """Part 6: the branch on the scalar lets the bounds mask alone decide the vector width.
    The self-check's bf16 V=512 and fp32 V=5000 gradients (n = 3072, 30000) qualify."""
    vectorisable = [k for k in triton_kernels
                    if k.name == "_scale_kernel" and "n: i32 D" in k.specialization]
    assert len(vectorisable) == 2 * len(ARCHS)
    for k in vectorisable:
        assert k.mix["LDG.128"] >= 1 and k.mix["STG.128"] >= 1, k
        # the one 32-bit load is the scale; every gradient access is a vector
        assert k.mix["LDG.32"] == 1 and k.mix["LDG<32"] == 0, k
        assert k.mix["STG.32"] == 0 and k.mix["STG<32"] == 0, k


@pytest.mark.slow
def test_linear_cross_entropy_version_2_uses_tensor_cores_and_atomics(triton_kernels):
    """Issue 18: in bf16 (GPT-2's shape) version 2 multiplies its hidden x weight tiles on
    the tensor cores (HMMA; sm_90's HGMMA counted with it), forward and backward; in fp32
    (the chapter's shape) its dots are IEEE fp32, as torch's matmul, not tf32, so the CUDA
    cores do them. Both backwards add their gradient tiles with atomics."""
    v2 = [k for k in triton_kernels if "linear CE v2" in k.origin]
    assert len(v2) == 4 * len(ARCHS)
    for k in v2:
        if "bfloat16" in k.origin:
            assert k.mix["HMMA"] > 0, k
        if "backward" in k.origin:
            assert k.mix["atomics"] > 0, k


# --- the extension (part 5) -----------------------------------------------------------

@pytest.mark.slow
def test_no_kernel_of_the_extension_uses_local_memory(extension_kernels):
    for arch, kernels in extension_kernels.items():
        names = {k.name for k in kernels}
        # the kernels that training runs are all there (a parse that lost them would pass)
        assert {"adamw_kernel<fp32>", "adamw_kernel<bf16>", "adamw_kernel<fp16>"} <= names
        assert sum("attention" in name for name in names) >= 3 * 3 * 3, names
        for k in kernels:
            assert k.local == 0 and k.mix["LDL"] == 0 and k.mix["STL"] == 0, (arch, k)


@pytest.mark.slow
def test_adamw_aligned_path_uses_128_bit_global_loads(extension_kernels):
    """The vector path reads 4 elements a thread: m and v (fp32 state) as one 128-bit load
    each; params and grads as 128 bits (fp32) or 64 bits (bf16, fp16)."""
    for arch, kernels in extension_kernels.items():
        adamw = {k.name: k.mix for k in kernels if k.name.startswith("adamw_kernel<")}
        assert adamw["adamw_kernel<fp32>"]["LDG.128"] >= 4, (arch, adamw)
        assert adamw["adamw_kernel<fp32>"]["STG.128"] >= 3, (arch, adamw)  # p, m, v
        for half in ("bf16", "fp16"):
            mix = adamw[f"adamw_kernel<{half}>"]
            assert mix["LDG.128"] >= 2 and mix["LDG.64"] >= 2, (arch, half, mix)
            assert mix["STG.128"] >= 2 and mix["STG.64"] >= 1, (arch, half, mix)


@pytest.mark.slow
def test_tensor_core_attention_kernels_use_mma_ldmatrix_and_cp_async(extension_kernels):
    """Issue 17: every bf16 and fp16 attention kernel of csrc/attention_mma.cuh (the forward,
    dK/dV, the deterministic dQ; 3 head dims) issues HMMA, loads its tiles with LDSM
    (ldmatrix) and copies them with LDGSTS (cp.async), and has no generic-address load
    (LD.E: what WMMA's bf16 tiles compiled to before) anywhere; and the D = 64 forward keeps
    at least 8 warps resident per SM (the occupancy rules of kernel_report.occupancy)."""
    for arch, kernels in extension_kernels.items():
        mma = {k.name: k for k in kernels if "attention" in k.name and "_mma_kernel<" in k.name}
        want = {f"attention_{part}_mma_kernel<{dtype}, {D}>"
                for part in ("forward", "backward_dkdv", "backward_dq")
                for dtype in ("bf16", "fp16") for D in (32, 64, 128)}
        assert set(mma) == want, (arch, sorted(mma))
        for name, k in mma.items():
            assert k.mix["HMMA"] > 0 and k.mix["LDSM"] > 0 and k.mix["LDGSTS"] > 0, (arch, name, k.mix)
            assert k.mix["LD.E"] == 0 and k.mix["MOVM"] == 0, (arch, name, k.mix)
        for dtype in ("bf16", "fp16"):
            forward = mma[f"attention_forward_mma_kernel<{dtype}, 64>"]
            assert forward.occupancy.warps >= 8, (arch, forward.occupancy)


@pytest.mark.slow
def test_launch_sizes_come_from_the_builds_launch_code(launch_sizes):
    """Issue 27: the threads and dynamic shared memory of every launch, as the extension's
    launch code asks for them (fastgpt::kernel_launches), against the tiles worked by hand:
    Q, K and V tiles of 16-bit elements, K and V (and the dK/dV walk's Q and dO)
    double-buffered."""
    sizes = {kernel_report.short_name(name): size for name, size in launch_sizes.items()}
    # the forward: 8 warps; Q (128 rows) and two K/V buffers of 64 rows, D = 64
    assert sizes["attention_forward_mma_kernel<bf16, 64>"] == (256, (128 + 4 * 64) * 64 * 2)
    # the deterministic dQ: 4 warps; Q and dO (64 rows each), two K/V buffers, D = 128
    assert sizes["attention_backward_dq_mma_kernel<fp16, 128>"] == (
        128, (2 * 64 + 4 * 64) * 128 * 2)
    # dK/dV at D = 32 walks 64 query rows a step: K, V (64 keys), two Q and dO buffers,
    # dS^T (64 x 64), then lse and Dr in fp32, two buffers of 64 each
    assert sizes["attention_backward_dkdv_mma_kernel<bf16, 32>"] == (
        128, (2 * 64 * 32 + 4 * 64 * 32 + 64 * 64) * 2 + 4 * 64 * 4)
    # ... and at D = 128, 32 query rows a step (registers)
    assert sizes["attention_backward_dkdv_mma_kernel<fp16, 128>"] == (
        128, (2 * 64 * 128 + 4 * 32 * 128 + 64 * 32) * 2 + 4 * 32 * 4)
    # static shared memory only: the fp32 kernels (4 warps), Dr, dQ's cast and AdamW
    assert sizes["attention_forward_fp32_kernel<128>"] == (128, 0)
    assert sizes["attention_backward_dr_kernel<fp32, 64>"] == (256, 0)
    assert sizes["attention_backward_dq_convert_kernel<bf16>"] == (256, 0)
    assert sizes["adamw_kernel<bf16>"] == (512, 0)


@pytest.mark.slow
def test_the_report_renders_every_kernel(extension_kernels, triton_kernels):
    extension = [k for kernels in extension_kernels.values() for k in kernels]
    for arch in ARCHS:
        text = kernel_report.render(arch, extension, triton_kernels, [], {"tools": "test"})
        rows = [line for line in text.splitlines() if line.startswith("| `")]
        mine = [k for k in extension + triton_kernels if k.arch == arch]
        assert len(rows) == 2 * len(mine)  # a resource row and an instruction-mix row each
        assert f"# What the compiler made: sm_{arch}" in text
    # sm_90 gives every kernel with shared memory 1 KiB of static: the D = 64 bf16 forward's
    # 48 KiB of dynamic shared memory is then past the default and needs the opt-in
    forward = next(k for k in extension if k.arch == 90 and k.dynamic_smem == 48 * 1024)
    assert forward.static_smem > 0
    assert kernel_report._total_smem(forward).endswith("(opt-in)")
    small = next(k for k in extension if 0 < k.static_smem + k.dynamic_smem <= 48 * 1024)
    assert "opt-in" not in kernel_report._total_smem(small)


def test_the_committed_report_lists_every_self_check_launch():
    text = (BENCH / "results" / "kernels-sm90.md").read_text()
    for label, _ in triton_aot.aot_launches():
        assert f"| {label} |" in text, f"{label}: rerun python bench/kernel_report.py"


def test_the_tool_packages_are_found_where_pip_put_them():
    """With the test extras installed, find_tool() gives the packages' binaries."""
    for tool, package in kernel_report.TOOL_PACKAGES.items():
        try:
            importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            require_or_skip(f"{package} is not installed (pip install -e '.[test]')")
        path = kernel_report.find_tool(tool)
        assert path and Path(path).name == tool and "site-packages" in path, path


# --- the report's parts, on known inputs ----------------------------------------------

def test_occupancy_on_cases_worked_by_hand():
    """H100 (sm_90): 64 warps, 32 blocks, 65536 registers in 4 sub-partitions of 16384,
    allocated per warp in units of 256; 228 KiB of shared memory, 1 KiB reserved a block."""
    h100 = kernel_report.ARCHS[90]
    occupancy = kernel_report.occupancy
    # 256 threads of 32 registers: 8 warps a block; 1024 registers a warp, 16 warps per
    # sub-partition = 64 warps: the warp slots and the registers both allow 8 blocks
    o = occupancy(h100, 256, 32, 0)
    assert (o.blocks, o.warps, o.fraction, o.limit) == (8, 64, 1.0, "warps, registers")
    # 512 threads of 40 registers (adamw_kernel): 1280 a warp, 12 warps per sub-partition,
    # 48 per SM: 3 blocks of 16 warps = 75%
    o = occupancy(h100, 512, 40, 0)
    assert (o.blocks, o.warps, o.limit) == (3, 48, "registers")
    # 255 registers: 8160 a warp, rounded up to 8192: 2 warps per sub-partition, 8 an SM
    o = occupancy(h100, 128, 255, 0)
    assert (o.blocks, o.warps, o.fraction) == (2, 8, 0.125)
    # 32 threads of 16 registers: 64 warps would fit, the 32-block limit binds
    assert occupancy(h100, 32, 16, 0).blocks == 32
    assert occupancy(h100, 32, 16, 0).limit == "blocks"
    # 70 KiB of shared memory + 1 KiB reserved = 72704 B (a multiple of 128):
    # 233472 // 72704 = 3 blocks
    o = occupancy(h100, 128, 32, 70 * 1024)
    assert (o.blocks, o.limit) == (3, "shared memory")
    # 100 B of shared memory is allocated as 1152 B (1124 rounded up to 128): 202 blocks
    # by memory; 24 registers, 768 a warp: 21 warps per sub-partition, 21 blocks; so the
    # warp slots alone (16 blocks of 4 warps) bind
    assert occupancy(h100, 128, 24, 100).limit == "warps"
    # 227 KiB fits one block (the opt-in limit); a byte more does not
    assert occupancy(h100, 128, 32, 227 * 1024).blocks == 1
    assert occupancy(h100, 128, 32, 227 * 1024 + 1).limit == "does not fit"
    # an A100 has 164 KiB: the 70 KiB block fits twice (167936 // 72704)
    assert occupancy(kernel_report.ARCHS[80], 128, 32, 70 * 1024).blocks == 2


SASS_CUOBJDUMP = """
		Function : _Z6kernelPf
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;            /* 0x00000a00ff017b82 */
        /*0010*/              @!P0 LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;
        /*0020*/               @P1 LDG.E.LTC128B R8, desc[UR4][R2.64] ;
        /*0030*/                   LDG.E.U16 R9, desc[UR4][R2.64] ;
        /*0040*/                   LDSM.16.M88.4 R12, [R3] ;
        /*0050*/                   HMMA.16816.F32.BF16 R16, R12, R14, R16 ;
        /*0060*/                   LD.E R5, desc[UR4][R6.64] ;
        /*0070*/                   STL [R1], R5 ;
        /*0080*/                   RED.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R7 ;
        /*0090*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*00a0*/                   LDS.128 R20, [R3] ;
		Function : _Z5otherv
        /*0000*/                   EXIT ;
"""

SASS_NVDISASM = """
.text._scale_kernel:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0030*/                   LDG.E R39, desc[UR4][R2.64] ;
.L_x_1:
        /*0050*/              @!P0 EXIT ;
        /*0a70*/              @!P6 STG.E.128 desc[UR4][R6.64], R36 ;
"""


def test_instruction_mix_from_both_disassemblers():
    functions = kernel_report.opcodes_by_function(SASS_CUOBJDUMP)
    assert set(functions) == {"_Z6kernelPf", "_Z5otherv"}
    mix = kernel_report.instruction_mix(functions["_Z6kernelPf"])
    expected = {"LDG.128": 1, "LDG.32": 1, "LDG<32": 1, "LDSM": 1, "HMMA": 1, "LD.E": 1,
                "STL": 1, "atomics": 1, "BAR": 1, "LDS": 1}
    assert {k: v for k, v in mix.items() if v} == expected  # LTC128B is a hint, not 128 bits
    mix = kernel_report.instruction_mix(
        kernel_report.opcodes_by_function(SASS_NVDISASM)["_scale_kernel"])
    assert {k: v for k, v in mix.items() if v} == {"LDG.32": 1, "STG.128": 1}


def test_short_names():
    assert kernel_report.short_name(
        "void fastgpt::(anonymous namespace)::attention_forward_tc_kernel<__nv_bfloat16, 128>"
        "(__nv_bfloat16 const*, float*, long, float)") == "attention_forward_tc_kernel<bf16, 128>"
    assert kernel_report.short_name(
        "void fastgpt::(anonymous namespace)::adamw_kernel<c10::Half>(fastgpt::(anonymous "
        "namespace)::AdamWLaunch<c10::Half>, float const*)") == "adamw_kernel<fp16>"
    assert re.fullmatch(r"\w+", kernel_report.short_name("_scale_kernel"))
