"""What the compiler made: registers, shared memory, spills, occupancy and the instruction
mix of every GPU kernel, read from the binaries, without a GPU.

    python bench/kernel_report.py [--arch 90] [--arch 80] [--library PATH | --no-extension]
                                  [--out bench/results/kernels-sm90.md] [--json PATH]

The kernels: fastgpt._C's (csrc/, nvcc; built into build/kernel_report/ unless --library
names a built fastgpt_C_cuda*.so) and the Triton cross-entropy kernels of every launch that
triton_ce.self_check makes on a GPU, compiled ahead of time for each arch
(bench/triton_aot.py), plus a few launches that only this report compiles: _scale_kernel
before issue 16's fix, and the training launch at V = 50257 and 50304. Per kernel and arch:

- registers, local memory (the stack frame: spills live there) from `cuobjdump -res-usage`;
- static shared memory from the same; dynamic shared memory and threads per block from
  the launch: for csrc/, what the extension's own launch code asks for (launch_sizes(): the
  op fastgpt::kernel_launches, compiled into the build); for Triton, the compile's
  metadata.shared (Triton's shared memory is all dynamic) and num_warps * 32;
- theoretical occupancy by the CUDA occupancy rules (occupancy(), ARCHS);
- the instruction mix that decides speed (INSTRUCTION_CLASSES), counted in the SASS of
  `cuobjdump -sass` (the extension's fat binary) and `nvdisasm` (Triton's cubins). Counts
  are static: instructions in the code, not executed ones.

The tools: cuobjdump and nvdisasm from the nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm
packages (pip install -e ".[test]"), else the CUDA toolkit's, else the copies Triton ships.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


# --- the tools ------------------------------------------------------------------------

TOOL_PACKAGES = {"cuobjdump": "nvidia-cuda-cuobjdump", "nvdisasm": "nvidia-cuda-nvdisasm"}


def find_tool(name: str) -> str | None:
    """The path of cuobjdump or nvdisasm: the pip package's (TOOL_PACKAGES), else the CUDA
    toolkit's (CUDA_HOME/bin), else Triton's copy; None if there is none."""
    try:
        for file in importlib.metadata.files(TOOL_PACKAGES[name]) or ():
            if file.name == name and file.parent.name == "bin":
                path = str(file.locate())
                if os.access(path, os.X_OK):
                    return path
    except importlib.metadata.PackageNotFoundError:
        pass
    directories = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin"]
    try:
        import triton
        directories.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin")
    except ImportError:
        pass
    for directory in directories:
        if os.access(directory / name, os.X_OK):
            return str(directory / name)
    return None


def tool_version(path: str) -> str:
    """'release 13.5, V13.5.37' from `tool --version`."""
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release [\d.]+, V[\d.]+", out)
    return found.group(0) if found else "unknown version"


def run_tool(*command: str) -> str:
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


# --- reading binaries -----------------------------------------------------------------

def resource_usage(cuobjdump: str, binary: str, arch: int) -> dict[str, dict[str, int]]:
    """{mangled kernel name: {'REG': registers per thread, 'SHARED': static shared bytes,
    'LOCAL': local memory bytes per thread, 'STACK': ...}} of `binary`'s sm_<arch> code."""
    out = run_tool(cuobjdump, "-res-usage", "-arch", f"sm_{arch}", binary)
    usage, name = {}, None
    for line in out.splitlines():
        found = re.match(r"\s*Function (\S+):", line)
        if found:
            name = found.group(1)
        elif name and "REG:" in line:
            usage[name] = {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", line)}
            name = None
    return usage


def max_threads(cuobjdump: str, binary: str, arch: int) -> dict[str, int]:
    """{mangled kernel name: its __launch_bounds__ threads (EIATTR_MAX_THREADS)}."""
    out = run_tool(cuobjdump, "-elf", "-arch", f"sm_{arch}", binary)
    threads, name, attribute = {}, None, None
    for line in out.splitlines():
        found = re.match(r"\.nv\.info\.(\S+)$", line.strip())
        if found:
            name = found.group(1)
        elif "Attribute:" in line:
            attribute = line.split()[-1]
        elif attribute == "EIATTR_MAX_THREADS" and "Value:" in line and name:
            x, y, z = (int(v, 16) for v in line.split()[1:4])
            threads[name] = x * y * z
            attribute = None
    return threads


INSTRUCTION_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T\d]\s+)?([A-Z][A-Z0-9_.]*)")


def opcodes_by_function(sass: str) -> dict[str, Counter]:
    """{function name: Counter of full opcodes ('LDG.E.128.CONSTANT', ...)} of the SASS text
    of cuobjdump -sass (functions headed 'Function : name') or nvdisasm (headed
    '.text.name:')."""
    functions, current = {}, None
    for line in sass.splitlines():
        header = re.match(r"\s*Function : (\S+)", line) or re.match(r"\.text\.(\S+):$", line)
        if header:
            current = functions.setdefault(header.group(1), Counter())
            continue
        found = INSTRUCTION_LINE.search(line)
        if found and current is not None:
            current[found.group(1)] += 1
    return functions


def demangle(names: list[str]) -> dict[str, str]:
    """{mangled: demangled} by c++filt (binutils); the names unchanged if it is missing."""
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True,
                             text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return {name: name for name in names}
    return dict(zip(names, out))


TYPE_NAMES = {"__nv_bfloat16": "bf16", "c10::BFloat16": "bf16", "__half": "fp16",
              "c10::Half": "fp16", "float": "fp32", "double": "fp64"}


def short_name(demangled: str) -> str:
    """'attention_forward_tc_kernel<bf16, 128>' from 'void fastgpt::(anonymous namespace)::
    attention_forward_tc_kernel<__nv_bfloat16, 128>(...)'."""
    found = re.search(r"(\w+)(<[^()]*>)?\(", demangled)
    if not found:
        return demangled
    args = found.group(2) or ""
    for long, short in TYPE_NAMES.items():
        args = re.sub(rf"(?<![\w:]){re.escape(long)}(?!\w)", short, args)
    return found.group(1) + args


# --- the instruction mix --------------------------------------------------------------

def _width(opcode: str) -> int:
    """Bits moved per thread by a load or store opcode: LDG.E.128 -> 128, LDG.E.U16 -> 16,
    LDG.E -> 32 (cache hints such as LTC128B are not widths)."""
    parts = opcode.split(".")
    for bits in ("128", "64"):
        if bits in parts:
            return int(bits)
    if {"U16", "S16"} & set(parts):
        return 16
    if {"U8", "S8"} & set(parts):
        return 8
    return 32


def _is(op: str, *bases: str) -> bool:
    return op.split(".")[0] in bases


# (column, what it counts, opcode -> bool)
INSTRUCTION_CLASSES = [
    ("HMMA", "tensor-core matrix multiply-accumulate (HMMA; HGMMA, sm_90's warpgroup form)",
     lambda op: _is(op, "HMMA", "HGMMA")),
    ("LDSM", "tile loads from shared memory into tensor-core fragments (ldmatrix)",
     lambda op: _is(op, "LDSM")),
    ("MOVM", "in-register matrix transposes (what WMMA made of bf16 tiles not read by LDSM)",
     lambda op: _is(op, "MOVM")),
    ("LDG.128", "global loads, 128 bits a thread", lambda op: _is(op, "LDG") and _width(op) == 128),
    ("LDG.64", "global loads, 64 bits", lambda op: _is(op, "LDG") and _width(op) == 64),
    ("LDG.32", "global loads, 32 bits", lambda op: _is(op, "LDG") and _width(op) == 32),
    ("LDG<32", "global loads of 8 or 16 bits", lambda op: _is(op, "LDG") and _width(op) < 32),
    ("STG.128", "global stores, 128 bits a thread", lambda op: _is(op, "STG") and _width(op) == 128),
    ("STG.64", "global stores, 64 bits", lambda op: _is(op, "STG") and _width(op) == 64),
    ("STG.32", "global stores, 32 bits", lambda op: _is(op, "STG") and _width(op) == 32),
    ("STG<32", "global stores of 8 or 16 bits", lambda op: _is(op, "STG") and _width(op) < 32),
    ("LDGSTS", "asynchronous global-to-shared copies (cp.async)", lambda op: _is(op, "LDGSTS")),
    ("LD.E", "generic-address loads (the compiler could not tell global from shared)",
     lambda op: _is(op, "LD")),
    ("ST.E", "generic-address stores", lambda op: _is(op, "ST")),
    ("LDL", "local memory loads (spills, stack arrays)", lambda op: _is(op, "LDL")),
    ("STL", "local memory stores", lambda op: _is(op, "STL")),
    ("LDS", "shared memory loads (LDSM not included)", lambda op: _is(op, "LDS")),
    ("STS", "shared memory stores", lambda op: _is(op, "STS")),
    ("atomics", "atomics and reductions, global and shared (ATOM, ATOMG, ATOMS, RED, REDG)",
     lambda op: _is(op, "ATOM", "ATOMG", "ATOMS", "RED", "REDG")),
    ("BAR", "block barriers (__syncthreads)", lambda op: _is(op, "BAR")),
]


def instruction_mix(opcodes: Counter) -> dict[str, int]:
    """{column of INSTRUCTION_CLASSES: how many instructions of the kernel are of it}."""
    return {column: sum(n for op, n in opcodes.items() if test(op))
            for column, _, test in INSTRUCTION_CLASSES}


# --- occupancy ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Arch:
    """An SM's limits for the occupancy rules. Sources: the CUDA C++ Programming Guide's
    table of technical specifications per compute capability (warps, blocks, registers and
    shared memory per SM, shared memory per block), and the toolkit's cuda_occupancy.h
    (CUDA 13.0: register granularity 256 per warp, allocated per each of 4 sub-partitions;
    shared memory granularity 128 B; cudaDeviceProp.reservedSharedMemPerBlock, 1 KB from
    compute capability 8.0 on, added to each block). The static shared memory is the cubin's
    (what cudaFuncGetAttributes reports): for sm_90 ptxas adds 1 KiB to every kernel that
    uses shared memory (attention_forward_fp32_kernel<32>: 9856 B on sm_90, 8832 B, its
    arrays, on sm_80), which is counted as well as the driver's reserve, as
    cuda_occupancy.h would; not yet checked against cudaOccupancyMaxActiveBlocksPerMultiprocessor
    on an H100 (at most one block per SM fewer for a kernel near a shared memory step)."""
    name: str
    gpu: str
    regs_per_sm: int = 65536
    regs_per_block: int = 65536
    max_regs_per_thread: int = 255
    reg_granularity: int = 256          # registers, per warp
    sub_partitions: int = 4
    max_warps_per_sm: int = 64
    max_threads_per_block: int = 1024
    max_blocks_per_sm: int = 32
    smem_per_sm: int = 228 * 1024       # the largest carveout, what the driver picks as needed
    smem_per_block: int = 227 * 1024    # with the opt-in attribute (cudaFuncSetAttribute)
    smem_reserved_per_block: int = 1024
    smem_granularity: int = 128


ARCHS = {90: Arch("sm_90", "H100"),
         80: Arch("sm_80", "A100", smem_per_sm=164 * 1024, smem_per_block=163 * 1024)}


@dataclasses.dataclass(frozen=True)
class Occupancy:
    blocks: int     # resident blocks per SM
    warps: int      # resident warps per SM
    fraction: float  # warps / the SM's maximum
    limit: str      # what binds: 'warps', 'blocks', 'registers', 'shared memory' (those
                    # that tie, joined by ', '), or 'does not fit'


def occupancy(arch: Arch, threads: int, regs: int, smem: int) -> Occupancy:
    """Theoretical occupancy of a kernel of `threads` per block, `regs` registers per thread
    and `smem` bytes of shared memory per block (static + dynamic), by the rules of
    cuda_occupancy.h (cudaOccMaxBlocksPerSMWarpsLimit, ...RegsLimit, ...SmemLimit):
    the fewest blocks that any of the warp slots, the block slots, the registers and the
    shared memory allow. (Block barriers, 64 per sm_80/sm_90 SM, bind only kernels with
    more than 2 named barriers; these have 1.)"""
    warps_per_block = math.ceil(threads / 32)
    limits = {"warps": arch.max_warps_per_sm // warps_per_block,
              "blocks": arch.max_blocks_per_sm}
    regs_per_warp = math.ceil(regs * 32 / arch.reg_granularity) * arch.reg_granularity
    if regs_per_warp:
        warps_per_sub_partition = arch.regs_per_sm // arch.sub_partitions // regs_per_warp
        limits["registers"] = warps_per_sub_partition * arch.sub_partitions // warps_per_block
    smem_allocated = math.ceil((smem + arch.smem_reserved_per_block) / arch.smem_granularity
                               ) * arch.smem_granularity
    limits["shared memory"] = arch.smem_per_sm // smem_allocated
    # a block must fit at all: the hardware's register check rounds its warps up to a
    # multiple of the sub-partitions; the shared memory limit per block excludes the reserve
    regs_checked = regs_per_warp * math.ceil(warps_per_block / arch.sub_partitions
                                             ) * arch.sub_partitions
    if (threads > arch.max_threads_per_block or regs > arch.max_regs_per_thread
            or regs_checked > arch.regs_per_block
            or smem_allocated > arch.smem_per_block + arch.smem_reserved_per_block):
        return Occupancy(0, 0, 0.0, "does not fit")
    blocks = min(limits.values())
    warps = blocks * warps_per_block
    limit = ", ".join(name for name, n in limits.items() if n == blocks)
    return Occupancy(blocks, warps, warps / arch.max_warps_per_sm, limit)


# --- csrc/'s launch sizes, from the build ---------------------------------------------

def launch_sizes(library: str) -> dict[str, tuple[int, int]]:
    """{demangled kernel: (threads per block, dynamic shared memory bytes)} of every launch
    that the extension's launch code makes: the op fastgpt::kernel_launches (csrc/attention.cu)
    runs adamw.cuh's and attention.cuh's launch code, for every dtype and head dim, with a
    launcher that records instead of launching (csrc/launch_record.cuh). It names each
    kernel by its host stub's offset in the library, which `nm` (binutils) names. Loaded in
    a subprocess: one build of the fastgpt ops per process. Raises ValueError where one
    kernel is launched with two sizes."""
    code = ("import json, sys, torch; torch.ops.load_library(sys.argv[1]); "
            "print(json.dumps(torch.ops.fastgpt.kernel_launches()))")
    out = run_tool(sys.executable, "-c", code, library)
    kernels, threads, shared = json.loads(out.strip().splitlines()[-1])
    symbols = {}
    for line in run_tool("nm", "--defined-only", library).splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[1] in "tT":
            symbols[int(fields[0], 16)] = fields[2]
    missing = [hex(offset) for offset in kernels if offset not in symbols]
    if missing:
        raise ValueError(f"no symbol at {missing} in {library} (stripped?)")
    names = demangle(sorted({symbols[offset] for offset in kernels}))
    sizes = {}
    for offset, size in zip(kernels, zip(threads, shared)):
        name = names[symbols[offset]]
        if sizes.setdefault(name, size) != size:
            raise ValueError(f"{name} is launched with two sizes: {sizes[name]} and {size}")
    return sizes


# --- the kernels ----------------------------------------------------------------------

@dataclasses.dataclass
class Kernel:
    """One kernel compiled for one arch, as the report shows it."""
    name: str            # short: 'adamw_kernel<bf16>', '_scale_kernel'
    origin: str          # 'fastgpt._C' or 'triton: <launch label>'
    arch: int
    regs: int
    static_smem: int
    dynamic_smem: int
    local: int           # local memory per thread, bytes (spills and stack arrays)
    threads: int
    mix: dict[str, int]
    specialization: str = ""  # Triton: the arguments' types and divisibility, the constexprs
    mangled: str = ""

    @property
    def occupancy(self) -> Occupancy:
        return occupancy(ARCHS[self.arch], self.threads, self.regs,
                         self.static_smem + self.dynamic_smem)


def extension_kernels(library: str, arch: int, cuobjdump: str,
                      sizes: dict[str, tuple[int, int]] | None = None) -> list[Kernel]:
    """Every kernel of the built extension (a fastgpt_C_cuda*.so) for sm_<arch>, with the
    threads and dynamic shared memory of its launches (`sizes`, default launch_sizes()).
    Raises ValueError for a kernel that no launch uses, or one launched with more threads
    than its __launch_bounds__ (EIATTR_MAX_THREADS) allow."""
    usage = resource_usage(cuobjdump, library, arch)
    bounds = max_threads(cuobjdump, library, arch)
    sass = opcodes_by_function(run_tool(cuobjdump, "-sass", "-arch", f"sm_{arch}", library))
    sizes = launch_sizes(library) if sizes is None else sizes
    names = demangle(sorted(usage))
    kernels = []
    for mangled in sorted(usage, key=lambda m: short_name(names[m])):
        u = usage[mangled]
        if names[mangled] not in sizes:
            raise ValueError(f"{names[mangled]} is compiled but fastgpt::kernel_launches "
                             "records no launch of it")
        threads, dynamic_smem = sizes[names[mangled]]
        if threads > bounds.get(mangled, threads):
            raise ValueError(f"{names[mangled]} is launched with {threads} threads, above "
                             f"its __launch_bounds__ of {bounds[mangled]}")
        kernels.append(Kernel(
            short_name(names[mangled]), "fastgpt._C", arch, u["REG"], u["SHARED"],
            dynamic_smem, u["LOCAL"], threads, instruction_mix(sass[mangled]),
            mangled=mangled))
    return kernels


def triton_kernels(records: list[dict], cuobjdump: str, nvdisasm: str) -> list[Kernel]:
    """The kernels of triton_aot.compile_records() records."""
    kernels = []
    for record in records:
        usage = resource_usage(cuobjdump, record["cubin"], record["arch"])[record["kernel"]]
        sass = opcodes_by_function(run_tool(nvdisasm, "-c", record["cubin"]))[record["kernel"]]
        constexprs = ", ".join(f"{k}={v}" for k, v in record["constexprs"].items())
        kernels.append(Kernel(
            record["kernel"], f"triton: {record['label']}", record["arch"], usage["REG"],
            usage["SHARED"], record["shared"], usage["LOCAL"], record["num_warps"] * 32,
            instruction_mix(sass),
            specialization="; ".join(record["signature"]) + f"; {constexprs}",
            mangled=record["kernel"]))
    return kernels


# The report's own Triton launches, beside the self-check's.

def _scale_kernel_before_issue_16():
    """_scale_kernel as it was before issue 16 (commit 508a58b): the scale in every lane's
    mask. Compiled here only to show what the fix changed."""
    import triton
    import triton.language as tl

    @triton.jit
    def _scale_kernel(grad_ptr, scale_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        scale = tl.load(scale_ptr + tl.zeros([BLOCK], tl.int32))  # the one scale, in every lane
        todo = (offsets < n) & (scale != 1.0)
        g = tl.load(grad_ptr + offsets, mask=todo).to(tl.float32)
        tl.store(grad_ptr + offsets, (g * scale).to(grad_ptr.dtype.element_ty), mask=todo)

    return _scale_kernel


TRAINING_ROWS = 8192  # B * T of a GPT-2 small step (8 x 1024): a multiple of 16 either way


def report_launches():
    """(label, launch) of the launches only this report compiles: _scale_kernel before and
    after the fix on the bf16 V=512 self-check gradient (3072 elements), and the training
    forward (bf16, mean, gradient written) at V = 50257 (GPT-2's vocabulary: a row stride
    not divisible by 16) and 50304 (padded to a multiple of 64)."""
    import dataclasses as dc

    import torch
    from fastgpt.ops import triton_ce

    grad = torch.empty(triton_ce.SELF_CHECK_ROWS, 512, dtype=torch.bfloat16, device="meta")
    scale = torch.empty(1, dtype=torch.float32, device="meta")
    after = triton_ce.scale_launch(grad, scale, interpreted=False)
    before = dc.replace(after, kernel=_scale_kernel_before_issue_16())
    launches = [("bf16 3072 elements, before the fix", before),
                ("bf16 3072 elements, after the fix", after)]
    for vocab in (50257, 50304):
        logits = torch.empty(TRAINING_ROWS, vocab, dtype=torch.bfloat16, device="meta")
        targets = torch.empty(TRAINING_ROWS, dtype=torch.int64, device="meta")
        one = torch.empty((), dtype=torch.float32, device="meta")
        launch = triton_ce.prepare_launch(logits, targets, -100, 0.0, one, interpreted=False)[3]
        launches.append((f"training forward, bf16 V={vocab}", launch))
    return launches


def build_extension(build_dir: Path) -> str:
    """Build fastgpt._C with the CUDA kernels into build_dir (in a subprocess: only one
    build of the extension can be loaded per process) and return the .so's path; ninja
    rebuilds only what changed."""
    code = ("from fastgpt.ops import extension; "
            f"extension.build(cuda=True, build_directory={str(build_dir)!r})")
    env = {**os.environ, "CUDA_HOME": os.environ.get("CUDA_HOME", "/usr/local/cuda")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    return str(next(build_dir.glob("fastgpt_C_cuda*.so")))


# --- the report -----------------------------------------------------------------------

def _kib(n: int) -> str:
    return "0" if n == 0 else f"{n / 1024:.1f} KiB"


DEFAULT_SHARED_PER_BLOCK = 48 * 1024  # csrc/attention_common.cuh's kDefaultSharedMemoryPerBlock


def _total_smem(k: Kernel) -> str:
    """Static + dynamic shared memory of a launch, "(opt-in)" past the default 48 KiB: the
    launch then needs MaxDynamicSharedMemorySize set (the extension's CudaLaunch does it;
    Triton's launcher does it for its kernels)."""
    total = k.static_smem + k.dynamic_smem
    return _kib(total) + (" (opt-in)" if total > DEFAULT_SHARED_PER_BLOCK else "")


def resource_table(kernels: list[Kernel], with_origin: bool) -> list[str]:
    head = (["kernel"] + (["launch"] if with_origin else []) +
            ["regs", "static smem", "dynamic smem", "static + dynamic", "local (spills)",
             "threads", "blocks/SM", "occupancy", "limited by"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in kernels:
        o = k.occupancy
        row = ([f"`{k.name}`"] + ([k.origin.removeprefix("triton: ")] if with_origin else []) +
               [str(k.regs), _kib(k.static_smem), _kib(k.dynamic_smem), _total_smem(k),
                str(k.local),
                str(k.threads), str(o.blocks), f"{o.warps}/64 warps = {o.fraction:.0%}",
                o.limit])
        lines.append("| " + " | ".join(row) + " |")
    return lines


def mix_table(kernels: list[Kernel], with_origin: bool) -> list[str]:
    columns = [c for c, _, _ in INSTRUCTION_CLASSES]
    head = ["kernel"] + (["launch"] if with_origin else []) + columns
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in kernels:
        row = ([f"`{k.name}`"] + ([k.origin.removeprefix("triton: ")] if with_origin else []) +
               [str(k.mix[c]) if k.mix[c] else "." for c in columns])
        lines.append("| " + " | ".join(row) + " |")
    return lines


def tables(kernels: list[Kernel], with_origin: bool) -> list[str]:
    """The resource table and the instruction-mix table of these kernels."""
    return resource_table(kernels, with_origin) + [""] + mix_table(kernels, with_origin)


def render(arch: int, extension: list[Kernel], self_check: list[Kernel],
           extra: list[Kernel], facts: dict[str, str]) -> str:
    """The markdown report of one arch's kernels."""
    spec = ARCHS[arch]
    mine = lambda kernels: [k for k in kernels if k.arch == arch]
    extension, self_check, extra = mine(extension), mine(self_check), mine(extra)
    out = [f"# What the compiler made: {spec.name} ({spec.gpu})", "",
           f"Written by `python bench/kernel_report.py --arch {arch}` (do not edit; rerun it "
           "when a kernel changes). No GPU is needed: the figures are read from the "
           "binaries.", ""]
    out += [f"- {key}: {value}" for key, value in facts.items()]
    out += ["",
            "Columns: `regs` registers per thread; `static smem` declared `__shared__` "
            "arrays; `dynamic smem` the launch's dynamic shared memory (csrc/: what the "
            "build's launch code asks for, fastgpt::kernel_launches; Triton: all of its "
            "shared memory); `static + dynamic` their sum, \"(opt-in)\" past the default "
            "48 KiB per block, where a launch must first allow the dynamic part "
            "(MaxDynamicSharedMemorySize: the extension's CudaLaunch does it, as Triton's "
            "launcher does for its kernels); `local (spills)` local memory per thread in "
            "bytes (spills and dynamically indexed arrays live there: 0 means none); "
            "`threads` per block; "
            f"occupancy: resident warps per SM of {spec.gpu} by the CUDA occupancy rules "
            f"({spec.regs_per_sm} registers allocated per warp in units of "
            f"{spec.reg_granularity} across {spec.sub_partitions} sub-partitions, "
            f"{spec.max_warps_per_sm} warps, {spec.max_blocks_per_sm} blocks, "
            f"{spec.smem_per_sm // 1024} KiB shared memory with 1 KiB reserved per block in "
            f"units of {spec.smem_granularity} B; sources in `Arch`'s docstring), and what "
            "limits it. On sm_90 ptxas puts 1 KiB into the static shared memory of every "
            "kernel that uses any (hence the 1.0 KiB of kernels with dynamic shared memory "
            "only); the occupancy counts it as the cubin states it. Instruction counts are static (instructions in the code, not "
            "executed); '.' is none.", ""]
    out += ["Instruction classes:", ""]
    out += [f"- `{column}`: {what}" for column, what, _ in INSTRUCTION_CLASSES]
    if extension:
        out += ["", "## fastgpt._C (csrc/, nvcc)", ""] + tables(extension, False)
    out += ["", "## Triton: every launch compiled ahead of time: the cross-entropy "
            "self-check's (fastgpt/ops/triton_ce.py) and the linear + cross-entropy's "
            "version 2 (fastgpt/ops/triton_linear_ce.py)", "",
            "Compiled ahead of time as a launch on a GPU would compile them "
            "(bench/triton_aot.py). Their specialisations (`D`: the argument is "
            "divisible by 16, which lets Triton prove vector alignment):", ""]
    seen = set()
    for k in self_check:
        if k.origin not in seen:
            seen.add(k.origin)
            out.append(f"- {k.origin.removeprefix('triton: ')}: `{k.name}({k.specialization})`")
    out += [""] + tables(self_check, True)
    # the report's own launches (report_launches()): (kernel, heading, what they show)
    extra_sections = [
        ("_scale_kernel", "## `_scale_kernel`: the branch on the scalar (issue 16)",
         "Before, `scale != 1` was part of every lane's mask; the compiler cannot tell that "
         "such a mask is constant over a vector, so each element was loaded and stored "
         "alone. Now the kernel branches on the one scalar, and the bounds mask `offsets < n` "
         "(n divisible by 16) allows 128-bit accesses:"),
        ("_cross_entropy_kernel", "## Cross-entropy rows at V = 50257 and 50304",
         "The training forward (bf16 logits, mean, the gradient written in the same launch; "
         f"{TRAINING_ROWS} rows). Triton vectorises the row's loads and stores only when it "
         "can prove the row start aligned, i.e. when the row stride (in elements) is "
         "divisible by 16; 50257 is odd, so every logit is loaded and every gradient element "
         "stored 16 bits at a time. Padding the vocabulary to a multiple of 64 (50304, as "
         "nanoGPT does for GPT-2) gives the vector form:"),
    ]
    for name, heading, text in extra_sections if extra else []:
        out += ["", heading, "", text, ""] + tables([k for k in extra if k.name == name], True)
    out += ["", "## What CI asserts (tests/test_kernel_report.py)", "",
            "- no local memory in any kernel (`local` 0, no `LDL`/`STL`), sm_80 and sm_90;",
            "- every Triton launch compiled ahead of time compiles for sm_80 and sm_90; the "
            "linear + cross-entropy's version 2 kernels issue `HMMA` (tensor cores) in "
            "bf16 and its backward adds its gradients with atomics;",
            "- every kernel of the extension is launched by its launch code, with the "
            "threads and dynamic shared memory above (fastgpt::kernel_launches), within "
            "its `__launch_bounds__`;",
            "- `adamw_kernel`'s aligned path loads with 128-bit global loads;",
            "- every bf16/fp16 attention kernel (csrc/attention_mma.cuh: forward, dK/dV, "
            "deterministic dQ; D = 32, 64, 128) issues `HMMA`, loads tiles with `LDSM` and "
            "copies them with `LDGSTS`, with no generic `LD.E` and no `MOVM`; the D = 64 "
            "forward keeps at least 8 warps per SM;",
            "- `_scale_kernel` reads and writes 128 bits a thread when n is divisible by 16.",
            ""]
    return "\n".join(out)


def source_state() -> str:
    """'commit abc1234', with ', with uncommitted changes to the kernels' sources' when
    csrc/ or triton_ce.py differ from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout
    commit = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    dirty = git("status", "--porcelain", "--", "csrc", "fastgpt/ops/triton_ce.py",
                "fastgpt/ops/triton_linear_ce.py").strip()
    return f"commit {commit}" + (", with uncommitted changes to the kernels' sources"
                                 if dirty else "")


def collect(archs, library: str | None, work_dir: Path, with_extra: bool = True
            ) -> tuple[list[Kernel], list[Kernel], list[Kernel], dict[str, str]]:
    """(extension kernels, self-check Triton kernels, the report's own Triton kernels,
    facts about the tools) for each arch in archs."""
    import triton
    import triton_aot  # bench/triton_aot.py, beside this script

    cuobjdump, nvdisasm = find_tool("cuobjdump"), find_tool("nvdisasm")
    if not cuobjdump or not nvdisasm:
        raise SystemExit("needs cuobjdump and nvdisasm: pip install -e '.[test]' (or "
                         "nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    extension = []
    if library:
        for arch in archs:
            extension += extension_kernels(library, arch, cuobjdump)
    self_check = triton_kernels(
        triton_aot.compile_records(triton_aot.aot_launches(), archs, work_dir / "self_check"),
        cuobjdump, nvdisasm)
    extra = []
    if with_extra:
        extra = triton_kernels(
            triton_aot.compile_records(report_launches(), archs, work_dir / "report"),
            cuobjdump, nvdisasm)
    facts = {"source": source_state(),
             "tools": f"cuobjdump {tool_version(cuobjdump)}, nvdisasm {tool_version(nvdisasm)}",
             "Triton": f"{triton.__version__} (its bundled ptxas)"}
    nvcc = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    if library and nvcc.exists():
        facts["nvcc"] = tool_version(str(nvcc))
    return extension, self_check, extra, facts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(ARCHS),
                        help="90 (H100, the default) or 80 (A100); may be repeated")
    parser.add_argument("--library", help="a built fastgpt_C_cuda*.so (default: build one "
                        "into build/kernel_report/)")
    parser.add_argument("--no-extension", action="store_true",
                        help="the Triton kernels only (no nvcc needed)")
    parser.add_argument("--out", help="the markdown file (default: "
                        "bench/results/kernels-sm<arch>.md of the first --arch)")
    parser.add_argument("--json", help="also write every kernel's figures here")
    args = parser.parse_args(argv)
    # The Triton kernels are compiled in this process, which Triton's interpreter would
    # prevent (bench/triton_aot.py says why): off before Triton is first imported.
    os.environ.pop("TRITON_INTERPRET", None)
    archs = args.arch or [90]
    library = None
    if not args.no_extension:
        library = args.library or build_extension(ROOT / "build" / "kernel_report")
    with tempfile.TemporaryDirectory() as work:
        extension, self_check, extra, facts = collect(archs, library, Path(work))
    text = "\n\n".join(render(arch, extension, self_check, extra, facts) for arch in archs)
    out = Path(args.out or RESULTS / f"kernels-sm{archs[0]}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"\nwritten to {out}")
    if args.json:
        kernels = [dict(dataclasses.asdict(k), occupancy=dataclasses.asdict(k.occupancy),
                        part=part)
                   for part, group in (("extension", extension), ("self_check", self_check),
                                       ("report", extra)) for k in group]
        Path(args.json).write_text(json.dumps(dict(facts=facts, kernels=kernels), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
