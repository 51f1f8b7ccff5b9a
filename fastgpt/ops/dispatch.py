"""Which implementation runs each op: the backend settings, what can run here and why not
(each fused kernel's build and self-check, once per device), and the resolution of a
backend name to the implementation that runs.

Backends, per op (fastgpt.backends.BACKENDS):
  "auto"       at a call: the fused kernel when the tensors are on CUDA and the kernel
               passed its self-check, else the pure-PyTorch reference; `fastgpt train`
               measures instead (choose, below; fastgpt/tune.py) and sets the names;
  "reference"  always the reference (fastgpt/ops/reference.py), the maths written out;
  "torch"      PyTorch's own op (fastgpt.backends.TORCH_OPS): SDPA, F.cross_entropy,
               torch's fused AdamW;
  "fused"      the kernel, or a BackendUnavailable error that says why it cannot run.
  None         the process-wide default: set_backend(...), else $FASTGPT_BACKEND, else "auto".
The default is one of those names for every op, or a per-op list such as
"linear_cross_entropy=fused,adamw=torch" (ops not named: "auto").
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fastgpt.backends import KERNELS, BackendUnavailable, check_backend, parse_backend
from fastgpt.ops import cuda_attention, reference

_default_backend: str | None = None


def set_backend(spec: str | None) -> str | None:
    """Set the process-wide default (see parse_backend; None: back to $FASTGPT_BACKEND or
    "auto"). Returns the previous setting, so a caller can restore it."""
    global _default_backend
    previous = _default_backend
    if spec is not None:
        parse_backend(spec)
    _default_backend = spec
    return previous


def get_backend(op: str | None = None) -> str:
    """The process-wide default: set_backend(...), else $FASTGPT_BACKEND, else "auto"; for
    `op`, that op's backend in it."""
    if _default_backend is not None:
        spec, source = _default_backend, "backend"
    else:
        spec, source = os.environ.get("FASTGPT_BACKEND") or "auto", "FASTGPT_BACKEND"
    chosen = _parsed.get((spec, source))  # every op call asks: parsed once per spec
    if chosen is None:
        chosen = _parsed[(spec, source)] = parse_backend(spec, source)  # a bad one raises
    return spec if op is None else chosen[op]


_parsed: dict[tuple[str, str], dict[str, str]] = {}  # (spec, source) -> {op: backend}


def fused_where_available() -> str:
    """The backend spec that takes every fused kernel able to run here and the reference
    for the rest (e.g. to run the kernels through the interpreter on a CPU)."""
    ok = [op for op, (runs, _) in available().items() if runs]
    return ",".join(f"{op}=fused" for op in ok) if ok else "reference"


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "yes", "on")


def _release(version: str) -> tuple[int, int]:
    major, minor = (version.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run the cross-entropy kernel here, or None.

    Triton before 3.7 turns a runtime loop bound (the kernel's `range(0, n_cols, BLOCK_V)`)
    into a Python int with int() of a 1-element array, which NumPy 2.4 refuses (a
    DeprecationWarning before it); Triton 3.7 squeezes the array first. Compiled for a GPU
    the kernel does not meet this."""
    import numpy
    import triton

    if _release(triton.__version__) < (3, 7) and _release(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter cannot run the kernel with "
                f"NumPy {numpy.__version__} (its loop bounds go through int() of a "
                f"1-element array, an error since NumPy 2.4): use triton>=3.7 or "
                f"numpy<2.4 to run it on the CPU")
    return None


def _triton_status() -> tuple[bool, str]:
    device = torch.cuda.current_device() if torch.cuda.is_available() else None
    return _triton_status_on(device)


@functools.cache
def _triton_status_on(device_index: int | None) -> tuple[bool, str]:
    """Whether the Triton kernel runs (and passes its self-check) on this CUDA device."""
    try:
        import triton
        from fastgpt.ops import triton_ce  # noqa: F401  (defines the kernels)
    except Exception as exc:  # ImportError, or a Triton install that cannot load
        return False, f"triton cannot be imported ({type(exc).__name__}: {exc})"
    if triton_interpreting():
        problem = interpreter_problem()
        if problem:
            return False, problem
        return True, (f"Triton {triton.__version__} through its interpreter "
                      f"(TRITON_INTERPRET=1): CPU tensors, slowly")
    if device_index is None:  # fastgpt verify sets TRITON_INTERPRET on a CPU
        return False, ("needs a CUDA GPU to train with it; `fastgpt verify` runs it here "
                       "through Triton's interpreter (TRITON_INTERPRET=1 uses it on CPU "
                       "tensors, slowly)")
    name = torch.cuda.get_device_name(device_index)
    try:
        triton_ce.self_check(torch.device("cuda", device_index))
    except Exception as exc:
        return False, (f"Triton {triton.__version__} failed its self-check on {name} "
                       f"({type(exc).__name__}: {str(exc)[:300]})")
    return True, f"Triton {triton.__version__} on {name}"


def _adamw_status() -> tuple[bool, str]:
    from fastgpt.ops import extension

    ok, why = extension.load_extension()
    if not torch.cuda.is_available():
        if extension.registered():  # e.g. the CPU build, loaded by extension.build
            return True, ("fastgpt._C's CPU loop (the kernel's arithmetic) on CPU tensors, "
                          "which `fastgpt verify` tests; the CUDA kernel needs a CUDA GPU")
        return False, why
    if not ok:
        return False, why
    return _adamw_self_check_on(torch.cuda.current_device(), why)


@functools.cache
def _adamw_self_check_on(device_index: int, source: str) -> tuple[bool, str]:
    """Whether the loaded AdamW kernel passes its self-check on this CUDA device."""
    try:
        adamw_self_check(torch.device("cuda", device_index))
    except Exception as exc:
        return False, f"{source}, but it failed its self-check ({type(exc).__name__}: {exc})"
    return True, source


def adamw_self_check(device: torch.device) -> None:
    """One fused AdamW step against reference.adamw_step on `device`: fp32 and bf16,
    aligned and unaligned tensors, more tensors than one launch takes. Raises RuntimeError
    if they disagree beyond rounding (1e-5 relative for fp32, 2^-7 for bf16)."""
    generator = torch.Generator().manual_seed(0)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=1)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2.0 ** -7)):
        sizes = [1 + (i * 977) % 5000 for i in range(40)]
        start = [torch.randn(n + 1, generator=generator) for n in sizes]
        grads = [torch.randn(n, generator=generator) for n in sizes]
        results = []
        for fused in (False, True):
            # every other tensor starts one element in: unaligned for the vector loads
            params = [s.to(device, dtype, copy=True)[i % 2:i % 2 + n]
                      for i, (s, n) in enumerate(zip(start, sizes))]
            moments = [[torch.zeros(p.shape, device=device) for p in params] for _ in range(2)]
            device_grads = [g.to(device, dtype) for g in grads]
            if fused:
                torch.ops.fastgpt.adamw_step(
                    params, device_grads, *moments, hyper["lr"], hyper["beta1"],
                    hyper["beta2"], hyper["eps"], hyper["weight_decay"], hyper["step"], None)
            else:
                reference.adamw_step(params, device_grads, *moments, **hyper)
            results.append(torch.cat([p.float().flatten() for p in params]))
        error = (results[0] - results[1]).abs().max().item()
        if not error <= tol * results[0].abs().max().item():
            raise RuntimeError(f"{dtype} step differs from the reference by {error:.3g}")


def status(op: str) -> tuple[bool, str]:
    """(whether `op`'s fused kernel can run here, what it runs on or why not). Only that
    op's kernel is looked at (and, on a GPU, built and self-checked once)."""
    if op == "cross_entropy":
        ok, why = _triton_status()
    elif op == "linear_cross_entropy":
        ok, why = _linear_cross_entropy_status()
    elif op == "adamw":
        ok, why = _adamw_status()
    else:
        ok, why = _attention_status()
    return ok, f"{KERNELS[op]}: {why}"


def _linear_cross_entropy_status() -> tuple[bool, str]:
    ok, why = _triton_status()  # it runs the cross-entropy kernel, checked first
    if not ok or not torch.cuda.is_available() or triton_interpreting():
        return ok, why
    return _linear_cross_entropy_self_check_on(torch.cuda.current_device(), why)


@functools.cache
def _linear_cross_entropy_self_check_on(device_index: int, source: str) -> tuple[bool, str]:
    """Whether the fused linear + cross-entropy passes its self-check on this CUDA device."""
    from fastgpt.ops import triton_linear_ce

    try:
        triton_linear_ce.self_check(torch.device("cuda", device_index))
    except Exception as exc:
        return False, (f"{source}, but linear_cross_entropy failed its self-check "
                       f"({type(exc).__name__}: {str(exc)[:300]})")
    return True, source


def _attention_status() -> tuple[bool, str]:
    device = torch.cuda.current_device() if torch.cuda.is_available() else None
    return _attention_status_on(device)


@functools.cache
def _attention_status_on(device_index: int | None) -> tuple[bool, str]:
    """Whether the attention kernels run (and pass their self-check) on this CUDA device."""
    from fastgpt.ops import extension

    ok, why = extension.load_extension()
    if not ok:
        return False, why
    device = torch.device("cuda", device_index)
    try:
        cuda_attention.self_check(device)
    except Exception as exc:
        return False, (f"{why}, but attention failed its self-check on "
                       f"{torch.cuda.get_device_name(device)} ({type(exc).__name__}: "
                       f"{str(exc)[:300]})")
    return True, f"{why}, on {torch.cuda.get_device_name(device)}"


def available() -> dict[str, tuple[bool, str]]:
    """For each op: (whether its fused kernel can run here, what it runs on or why not)."""
    return {op: status(op) for op in KERNELS}


def fused_runs_on(op: str, device: torch.device) -> bool:
    """Beyond CUDA tensors: the Triton kernel under the interpreter, AdamW's CPU build."""
    if device.type == "cuda":
        return True
    if op in ("cross_entropy", "linear_cross_entropy"):
        return triton_interpreting()
    if op == "adamw":
        return torch._C._dispatch_has_kernel_for_dispatch_key("fastgpt::adamw_step", "CPU") \
            if hasattr(torch.ops.fastgpt, "adamw_step") else False
    return False


def torch_status(op: str) -> tuple[bool, str]:
    """(whether PyTorch's own `op` runs here, what it is or why not)."""
    from fastgpt.backends import TORCH_OPS

    if op == "adamw" and not hasattr(torch, "_fused_adamw_"):
        return False, f"torch {torch.__version__} has no fused AdamW (torch._fused_adamw_)"
    return True, f"{TORCH_OPS[op]}, torch {torch.__version__}"


def resolve_backend(op: str, backend: str | None, device: torch.device | None = None) -> str:
    """The implementation that will run `op` on tensors on `device`: "reference", "torch"
    or "fused".

    Under torch.compile a graph keeps the choice it was traced with; set_backend() makes
    the next call recompile, while $FASTGPT_BACKEND is read when a graph is traced."""
    backend = get_backend(op) if backend is None else check_backend(backend)
    return _resolve(op, backend, device)


# Whether a kernel can run is host-side setup (its build, a self-check, cached results):
# torch.compile takes the answer as a constant rather than trace it (which would trace
# imports and break the graph).
@torch.compiler.assume_constant_result
def _resolve(op: str, backend: str, device: torch.device | None) -> str:
    if backend in ("reference", "torch"):
        if backend == "torch" and not torch_status(op)[0]:
            raise BackendUnavailable(f"torch {op} cannot run: {torch_status(op)[1]}")
        return backend
    ok, why = status(op)
    on_cuda = device is not None and device.type == "cuda"
    if backend == "auto":
        return "fused" if ok and on_cuda else "reference"
    if not ok:
        raise BackendUnavailable(f"fused {op} cannot run: {why}")
    if device is not None and not fused_runs_on(op, device):
        raise BackendUnavailable(f"fused {op} needs CUDA tensors, got {device} ones")
    return "fused"


# --- the measured choice -----------------------------------------------------------------
#
# `auto` at training's shapes: each implementation that can run (a fused kernel only after
# its self-check) is timed on a short trial of the op (forward + backward; AdamW: a step),
# and the fastest is kept if it beats the incumbent (the cached choice, else PyTorch's own
# op) by MARGIN, so that noise does not flip it. The result is cached on disk per machine,
# versions and kernel sources, op, dtype and shapes: a second run pays nothing.

IMPLEMENTATIONS = ("reference", "torch", "fused")
INCUMBENT = "torch"  # what a challenger must beat: PyTorch's own op
MARGIN = 0.05        # ... by 5% of its time (trial-to-trial noise on a busy CPU is ~2-3%)

Trial = Callable[[], object]       # one forward + backward (or step) of an implementation
Timer = Callable[[Trial], float]   # a trial -> its median time in ms


@dataclasses.dataclass
class Choice:
    """What auto chose for one op at one shape: the implementation, each candidate's median
    time in ms, why the others could not run, and whether it came from the cache."""
    op: str
    shape: str
    chosen: str
    times_ms: dict[str, float]
    excluded: dict[str, str]
    cached: bool = False

    def describe(self) -> str:
        """One line: 'causal_attention: torch (torch 1.20 ms, reference 2.31 ms; fused:
        needs a CUDA GPU)'."""
        times = ", ".join(f"{impl} {ms:.3g} ms" for impl, ms in
                          sorted(self.times_ms.items(), key=lambda item: item[1]))
        why_not = "; ".join(f"{impl}: {why}" for impl, why in self.excluded.items())
        detail = "; ".join(part for part in (times, why_not) if part)
        return (f"{self.op}: {self.chosen} ({detail})" + (" [cached]" if self.cached else "")
                + f" at {self.shape}")

    def speedup(self) -> float | None:
        """torch's time over the chosen one's (None when torch did not run)."""
        if INCUMBENT not in self.times_ms or self.chosen not in self.times_ms:
            return None
        return self.times_ms[INCUMBENT] / self.times_ms[self.chosen]


def median_ms(trial: Trial, device: torch.device, reps: int = 5,
              budget_s: float = 2.0) -> float:
    """The median time of `trial` in ms after warm-up (two calls on a GPU: the first
    compiles Triton kernels; one on a CPU): CUDA events around each call on a GPU,
    perf_counter on a CPU; `reps` calls, fewer (at least 3) past budget_s."""
    cuda = device.type == "cuda"
    for _ in range(2 if cuda else 1):
        trial()
    if cuda:
        torch.cuda.synchronize(device)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < reps and (len(times) < 3 or time.perf_counter() - started < budget_s):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            trial()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t = time.perf_counter()
            trial()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def choose(op: str, shape: str, trials: dict[str, Trial | str], timer: Timer,
           cache: ChoiceCache | None = None, remeasure: bool = False,
           margin: float = MARGIN) -> Choice:
    """The implementation of `op` that `auto` runs at `shape` (a string naming the shapes
    and dtype). trials: {implementation: a trial, or why it cannot run here}. A cached
    choice is taken as it is (unless remeasure, or it can no longer run); otherwise every
    trial is timed, and the fastest replaces the incumbent (the cached choice, else torch's
    op, else the fastest) only if it is `margin` faster. A trial that raises is excluded
    with its error."""
    cached = cache.get(op, shape) if cache is not None else None
    if cached is not None and not remeasure and callable(trials.get(cached.chosen)):
        return cached
    times, excluded = {}, {}
    for impl, trial in trials.items():
        if not callable(trial):
            excluded[impl] = trial
            continue
        try:
            times[impl] = timer(trial)
        except Exception as exc:  # a kernel that fails at these shapes is not a candidate
            excluded[impl] = f"failed in its trial ({type(exc).__name__}: " \
                             f"{str(exc).splitlines()[0][:200] if str(exc) else ''})"
    if not times:
        raise BackendUnavailable(f"no implementation of {op} can run at {shape}: "
                                 + "; ".join(f"{k}: {v}" for k, v in excluded.items()))
    fastest = min(times, key=times.get)
    incumbent = next((impl for impl in (cached.chosen if cached else None, INCUMBENT)
                      if impl in times), fastest)
    chosen = fastest if times[fastest] < (1.0 - margin) * times[incumbent] else incumbent
    choice = Choice(op, shape, chosen, times, excluded)
    if cache is not None:
        cache.put(choice)
    return choice


def _kernel_sources_hash() -> str:
    """sha256 of fastgpt/ops/*.py and csrc/*: a changed kernel is measured again."""
    from fastgpt.ops.extension import CSRC

    digest = hashlib.sha256()
    files = sorted(Path(__file__).parent.glob("*.py")) + (
        sorted(p for p in CSRC.iterdir() if p.is_file()) if CSRC.is_dir() else [])
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


@functools.cache
def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from fastgpt import __version__
    try:
        triton = version("triton")
    except PackageNotFoundError:
        triton = "none"
    return (f"fastgpt {__version__} kernels {_kernel_sources_hash()}, torch {torch.__version__}"
            f" (CUDA {torch.version.cuda or 'none'}), triton {triton}")


def machine(device: torch.device) -> str:
    """The device a choice was measured on: the GPU's name and capability, or the CPU's
    architecture and torch's thread count."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})"
    return f"cpu {platform.machine()} x{torch.get_num_threads()} threads"


def choice_cache_path() -> Path:
    """$FASTGPT_CACHE/choices.json (the user cache dir, as the token cache)."""
    from fastgpt.fileio import cache_dir

    return cache_dir() / "choices.json"


class ChoiceCache:
    """The measured choices of one machine and set of versions, in a JSON file shared with
    other machines' and versions' entries (each keyed by them). A file that cannot be read
    is measured over again, with a one-line note."""

    def __init__(self, path: Path, device: torch.device,
                 log: Callable[[str], None] = lambda line: None):
        self.path, self.log = Path(path), log
        self.prefix = f"{machine(device)} | {_versions()} | "
        self.entries: dict[str, dict] = {}
        try:
            data = json.loads(self.path.read_text())
            if not (isinstance(data, dict) and isinstance(data.get("entries"), dict)):
                raise ValueError("not a fastgpt choice cache")
            self.entries = data["entries"]
        except FileNotFoundError:
            pass
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            log(f"the choice cache {self.path} could not be read ({type(exc).__name__}: "
                f"{str(exc)[:100]}); measuring again")

    def _key(self, op: str, shape: str) -> str:
        return f"{self.prefix}{op} | {shape}"

    def get(self, op: str, shape: str) -> Choice | None:
        entry = self.entries.get(self._key(op, shape))
        try:
            return Choice(op, shape, entry["chosen"], dict(entry["times_ms"]),
                          dict(entry["excluded"]), cached=True) if entry else None
        except (KeyError, TypeError):
            return None

    def put(self, choice: Choice) -> None:
        from fastgpt.fileio import write_atomic

        self.entries[self._key(choice.op, choice.shape)] = {
            "chosen": choice.chosen, "times_ms": choice.times_ms, "excluded": choice.excluded}
        try:
            write_atomic(self.path, (json.dumps({"entries": self.entries}, indent=1)
                                     + "\n").encode())
        except OSError as exc:  # a read-only cache costs the next run a measurement, no more
            self.log(f"the choice cache {self.path} could not be written ({exc}); the choice "
                     f"holds for this run only")

    def here(self) -> list[Choice]:
        """This machine's and these versions' choices."""
        mine = []
        for key in self.entries:
            if key.startswith(self.prefix):
                op, _, shape = key[len(self.prefix):].partition(" | ")
                if (choice := self.get(op, shape)) is not None:
                    mine.append(choice)
        return mine
