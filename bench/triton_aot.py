"""The Triton kernels compiled ahead of time for a GPU that this machine need not have.

compile_launch() takes a triton_ce.KernelLaunch (a kernel, its arguments and options, as a
launch on a GPU would pass them) and compiles it for an NVIDIA architecture (80: A100, 90:
H100) the way the launch would: the arguments are specialised by Triton's own binder (a
pointer or an integer divisible by 16 gets the divisibility attribute, an integer equal to
1 becomes a constant), then triton.compile on an ASTSource with that target. Only Triton's
compiler and ptxas run; no driver is needed. These are the steps of JITFunction.run in
Triton 3.8, whose helpers (create_function_from_signature, JITFunction._pack_args) are
private: a Triton that changes them makes this fail loudly, not compile something else.

The compile cannot run in a process where TRITON_INTERPRET=1 was set before Triton was
imported (the test suite without a GPU): there Triton's own library functions (tl.sum,
tl.zeros, ...) are interpreter objects that the compiler cannot lower. Such a process calls
compile_in_subprocess(), which runs `python bench/triton_aot.py` without it.

    python bench/triton_aot.py --out DIR [--arch 90 --arch 80]

compiles every launch of aot_launches() (the cross-entropy self-check's and the linear +
cross-entropy's version 2) and writes DIR/<name>.cubin and .ptx for each, and
DIR/manifest.json (a list of compile_records()).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from fastgpt.ops.triton_ce import KernelLaunch

DEFAULT_ARCHS = (90, 80)


def compile_launch(launch: KernelLaunch, arch: int):
    """launch's kernel, specialised for its arguments as a GPU launch would be, compiled for
    sm_<arch>: a triton CompiledKernel (.asm holds 'ttir', 'ttgir', 'llir', 'ptx', 'cubin';
    .metadata.shared the static shared memory in bytes, .metadata.num_warps)."""
    if triton.knobs.runtime.interpret:
        raise RuntimeError("TRITON_INTERPRET=1 is set in this process: Triton's library "
                           "functions are interpreter objects here; use compile_in_subprocess()")
    kernel = launch.kernel
    fn = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(launch.options, debug=fn.debug or triton.knobs.runtime.debug,
                  instrumentation_mode=triton.knobs.compilation.instrumentation_mode)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args,
                                                          specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


def compile_records(launches: list[tuple[str, KernelLaunch]], archs, out_dir) -> list[dict]:
    """Compile each (label, launch) for each arch into out_dir: <kernel>-<i>-sm<arch>.cubin
    and .ptx. Returns one record per compile: label, kernel, arch, cubin and ptx (paths),
    shared (static shared memory, bytes), num_warps, and the specialisation (signature:
    each argument's type, 'D' after an argument divisible by 16; constexprs)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (label, launch) in enumerate(launches):
        for arch in archs:
            compiled = compile_launch(launch, arch)
            stem = out_dir / f"{compiled.name}-{i}-sm{arch}"
            stem.with_suffix(".cubin").write_bytes(compiled.asm["cubin"])
            stem.with_suffix(".ptx").write_text(compiled.asm["ptx"])
            divisible = {fn_path[0] for fn_path, attr in compiled.src.attrs.items()
                         if ["tt.divisibility", 16] in attr}
            names = compiled.src.fn.arg_names
            signature = [f"{name}: {kind}{' D' if i in divisible else ''}"
                         for i, (name, kind) in enumerate(compiled.src.signature.items())
                         if kind != "constexpr"]
            constexprs = {names[path[0]]: value for path, value in compiled.src.constants.items()}
            records.append(dict(label=label, kernel=compiled.name, arch=arch,
                                cubin=str(stem.with_suffix(".cubin")),
                                ptx=str(stem.with_suffix(".ptx")),
                                shared=compiled.metadata.shared,
                                num_warps=compiled.metadata.num_warps,
                                signature=signature,
                                constexprs={k: v if isinstance(v, (int, float, bool, str))
                                            else str(v) for k, v in constexprs.items()}))
    return records


def aot_launches() -> list[tuple[str, KernelLaunch]]:
    """What is compiled ahead of time: every launch that triton_ce.self_check makes on a GPU
    (the cross-entropy kernel's variants, which version 1 of the linear + cross-entropy
    runs too) and version 2's kernels (linear_cross_entropy_v2.version_2_launches)."""
    from fastgpt.ops import triton_ce
    from fastgpt.ops.experimental import linear_cross_entropy_v2
    return triton_ce.self_check_launches() + linear_cross_entropy_v2.version_2_launches()


def compile_self_check(archs=DEFAULT_ARCHS, out_dir=".") -> list[dict]:
    """compile_records() of every launch of aot_launches()."""
    return compile_records(aot_launches(), archs, out_dir)


def compile_in_subprocess(out_dir, archs=DEFAULT_ARCHS, cache_dir=None,
                          timeout: float = 600) -> list[dict]:
    """compile_self_check() in a fresh Python process without TRITON_INTERPRET (and with
    Triton's cache in cache_dir if given); returns its records."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if cache_dir is not None:
        env["TRITON_CACHE_DIR"] = str(cache_dir)
    command = [sys.executable, str(Path(__file__).resolve()), "--out", str(out_dir)]
    for arch in archs:
        command += ["--arch", str(arch)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")
    return json.loads((Path(out_dir) / "manifest.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for the cubins and manifest.json")
    parser.add_argument("--arch", type=int, action="append",
                        help="compute capability without the dot, e.g. 90 (default: 90 and 80)")
    args = parser.parse_args(argv)
    records = compile_self_check(args.arch or DEFAULT_ARCHS, args.out)
    (Path(args.out) / "manifest.json").write_text(json.dumps(records, indent=1))
    for record in records:
        print(f"sm_{record['arch']} {record['kernel']:24} {record['label']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
