"""The GPU check as stages in order of value, within a time budget, every stage's outcome
written the moment it ends: a lease of a few minutes, or a command killed at its limit,
still brings back what was done.

    bash bench/gpu_check.sh [--out DIR] [--budget SECONDS] [--full] [--only STAGE ...]
                            [--continue] [--list]

DIR (default: $OUT if set, else bench/results/) gets, as the run goes:
  log.txt            every stage's output, appended as it comes (unbuffered)
  environment.result.json   commit, GPU, driver, CUDA, torch, triton, Python, CPU count
  STAGE.json         a stage's record: {"stage", "status", "seconds", "command", ...} with
                     status "running" while it runs (so a killed run says where it stopped),
                     then "pass", "fail", "timeout" (it overran its share and was killed)
                     or "skip" (with the reason: the budget, a missing tool, a refused device)
  STAGE.result.json  a benchmark's own results
`python bench/report.py --from DIR` assembles the report from whatever is there (here at
the end of the run, or on a CPU machine from the files a killed run brought back).

Each stage runs with a timeout: its share (share_s), or what is left of the budget if that
is less; one that would start with less than its minimum_s left is skipped, and says so.
Exit status: 0 when every stage that ran passed, 1 otherwise, 2 without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import report  # bench/report.py (no torch at import; bench/ is on sys.path as this runs)
from stages import BUDGET_SKIP, finished, read_json, write_json  # bench/stages.py

BENCH = Path(__file__).resolve().parent
# pyproject's pytest options without xdist's `-n auto`: one process for the one GPU, and
# the GPU machine's pytest may have no pytest-xdist (an unknown -n would stop it)
ONE_PROCESS = ("-o", "addopts=-ra --strict-markers")
ROOT = BENCH.parent
DEFAULT_BUDGET_S = 420
RESERVE_S = 15  # kept back for the report at the end
PYTHON = sys.executable


@dataclass(frozen=True)
class Stage:
    """One step of the check. `command` is an argv; the arguments "{python}", "{dir}" and
    "{result}" (DIR/NAME.result.json), and "{dir}/" at an argument's start, are filled in.
    expected_s: its time on a 16-core H100 machine (an estimate until a run measured it);
    minimum_s: not started with less left; share_s: the longest it may run. skip: returns
    why it cannot run here, or None. refused: text which, in the output of a failed run,
    means the tool refused the device (a SKIP with that reason, not a failure)."""
    name: str
    what: str
    command: tuple[str, ...]
    expected_s: float
    minimum_s: float
    share_s: float
    full_only: bool = False
    env: dict = field(default_factory=dict)
    skip: Callable[[], str | None] | None = None
    refused: tuple[str, ...] = ()


class _Tee(threading.Thread):
    """Copies a child's output, as it comes, to the log (unbuffered) and to our stdout."""

    def __init__(self, pipe, log, echo):
        super().__init__(daemon=True)
        self.pipe, self.log, self.echo = pipe, log, echo

    def run(self) -> None:
        while True:
            chunk = os.read(self.pipe.fileno(), 65536)
            if not chunk:
                return
            self.log.write(chunk)
            if self.echo is not None:
                self.echo.write(chunk)
                self.echo.flush()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _kill_group(proc: subprocess.Popen) -> None:
    """End every process of the stage's group (the stage, and whatever it started that is
    still there after it exits): SIGTERM, SIGKILL after 5 s. A stop signal arriving
    meanwhile waits until this is done."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        for sig, grace_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline:
                if proc.poll() is not None and not _group_alive(proc.pid):
                    break
                time.sleep(0.05)
            else:
                continue
            break
        proc.wait()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


# Each stage in a process group of its own (a timeout kills everything it started) but in
# the runner's session: where the runner itself is killed (a command at the lease's limit),
# the machine ends that session's processes, the stage's too. In a session of its own it
# would run on, holding the GPU, into the next command.
_OWN_GROUP = ({"process_group": 0} if sys.version_info >= (3, 11)
              else {"preexec_fn": os.setpgrp})


class _Stopped(Exception):
    """SIGTERM, SIGHUP or SIGINT reached the runner."""


def _raise_stopped(signum, frame) -> None:
    raise _Stopped(signum)


def run_stages(stages: Sequence[Stage], out: Path, budget_s: float, *,
               keep_finished: bool = False, echo=None, reserve_s: float = RESERVE_S,
               clock: Callable[[], float] = time.monotonic) -> list[dict]:
    """Run `stages` in order within `budget_s` seconds (less reserve_s, kept for the
    report), recording each in out/NAME.json and appending its output to out/log.txt;
    out/plan.json lists them first, so that a report can tell the stages a killed run did
    not reach. keep_finished: a stage whose record in `out` is finished() is kept, not run
    again (one cut off or skipped for the budget runs). SIGTERM, SIGHUP or SIGINT kill the
    running stage's
    processes and end the run (exit 128 + the signal), its record left "running".
    Returns the records."""
    out.mkdir(parents=True, exist_ok=True)
    start = clock()
    planned = [{"stage": s.name, "what": s.what, "expected_s": s.expected_s} for s in stages]
    earlier = (read_json(out / "plan.json") or {}).get("stages", [])
    if keep_finished:  # the earlier run's stages stay in the report, in their order
        names = {entry["stage"] for entry in earlier}
        planned = earlier + [entry for entry in planned if entry["stage"] not in names]
    else:  # a fresh run: the earlier run's files go (and nothing else in `out`)
        for entry in earlier:
            for suffix in (".json", ".result.json"):
                (out / f"{entry['stage']}{suffix}").unlink(missing_ok=True)
        (out / "log.txt").unlink(missing_ok=True)
    write_json(out / "plan.json", {
        "budget_s": budget_s, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "stages": planned})
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, _raise_stopped) for sig in STOP_SIGNALS}
    records = []
    try:
        with open(out / "log.txt", "ab", buffering=0) as log:
            def say(line: str) -> None:
                log.write((line + "\n").encode())
                if echo is not None:
                    echo.write((line + "\n").encode())
                    echo.flush()

            for stage in stages:
                previous = read_json(out / f"{stage.name}.json") if keep_finished else None
                if previous and finished(previous):
                    say(f"== {stage.name}: kept from the earlier run ({previous['status']})")
                    records.append(previous)
                    continue
                left = budget_s - reserve_s - (clock() - start)
                records.append(_run_stage(stage, out, left, log, echo, say, clock))
    except _Stopped as stopped:
        raise SystemExit(128 + stopped.args[0]) from None
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return records


def _run_stage(stage: Stage, out: Path, left: float, log, echo, say, clock) -> dict:
    """One stage, with `left` seconds of the budget left: skipped, or run under its
    timeout; its record written before (status "running") and after."""
    path = out / f"{stage.name}.json"
    fill = {"{python}": PYTHON, "{dir}": str(out),
            "{result}": str(out / f"{stage.name}.result.json")}
    command = [fill.get(part, part).replace("{dir}/", f"{out}/") for part in stage.command]
    record = {"stage": stage.name, "what": stage.what, "command": shlex.join(command),
              "expected_s": stage.expected_s}
    reason = stage.skip() if stage.skip else None
    if reason is None and left < stage.minimum_s:
        reason = (f"{BUDGET_SKIP} {max(left, 0):.0f} s left, it needs at least "
                  f"{stage.minimum_s:.0f} s (about {stage.expected_s:.0f} s)")
    if reason is not None:
        record.update(status="skip", reason=reason, seconds=0.0)
        write_json(path, record)
        say(f"== {stage.name}: SKIP ({reason})")
        return record

    timeout = min(stage.share_s, left)
    say(f"== {stage.name}: {stage.what} (timeout {timeout:.0f} s): {record['command']}")
    began, output_from = clock(), (out / "log.txt").stat().st_size
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, **_OWN_GROUP,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **stage.env})
    tee = _Tee(proc.stdout, log, echo)
    try:  # whatever happens here (a timeout, a stop signal), the stage's group is ended
        record.update(status="running", timeout_s=round(timeout, 1), pid=proc.pid,
                      started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        write_json(path, record)
        tee.start()
        try:
            returncode = proc.wait(timeout=timeout)
            status = "pass" if returncode == 0 else "fail"
        except subprocess.TimeoutExpired:
            status = "timeout"
        except _Stopped as stopped:  # the record stays "running": the report says cut off
            say(f"== {stage.name}: the check was stopped (signal {stopped.args[0]}) while "
                f"it ran; its processes are killed")
            raise
    finally:
        _kill_group(proc)
    returncode = proc.returncode
    if tee.is_alive():
        tee.join(timeout=10)
    proc.stdout.close()
    seconds = round(clock() - began, 1)
    record.update(status=status, returncode=returncode, seconds=seconds)
    if status == "fail" and stage.refused:
        with open(out / "log.txt", "rb") as f:  # this stage's output
            f.seek(output_from)
            text = f.read().decode(errors="replace")
        found = [r for r in stage.refused if r in text]
        if found:
            record.update(status="skip", reason=f"the tool refused the device ({found[0]})")
    result = out / f"{stage.name}.result.json"
    if result.exists():
        record["result"] = result.name
    write_json(path, record)
    say(f"== {stage.name}: {record['status'].upper()} in {seconds:.0f} s"
        + (f" ({record['reason']})" if "reason" in record else "")
        + (" (its share ran out: killed)" if status == "timeout" else ""))
    return record


# --- the stages of a GPU machine ---------------------------------------------------------

def _missing_module(*modules: str) -> Callable[[], str | None]:
    def check() -> str | None:
        import importlib.util
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            return f"needs {', '.join(missing)} (pip install -e ., or .gpu-packages/)"
        return None
    return check


def _sanitizer() -> str:
    return os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin",
                        "compute-sanitizer")


def _no_sanitizer() -> str | None:
    if os.access(_sanitizer(), os.X_OK):
        return None
    return f"compute-sanitizer not found at {_sanitizer()}"


BUILD = """
import time
started = time.perf_counter()
from fastgpt.ops import extension
extension.build(cuda=True, verbose=True)
print(f"build: fastgpt._C compiled and loaded in {time.perf_counter() - started:.1f} s")
from fastgpt import ops
failed = []
for op, (ok, why) in ops.available().items():  # every kernel's self-check, on this GPU
    print(f"self-check {op}: {'PASS' if ok else 'FAIL'}: {why}")
    failed += [] if ok else [op]
raise SystemExit(1 if failed else 0)
"""

# a tiny fused run for compute-sanitizer: every kernel, small shapes, both backwards
SMALL_RUN = """
import torch
from fastgpt import ops
from fastgpt.optim import AdamW
from fastgpt.ops.cuda_attention import attention
x = torch.randn(37, 1000, device='cuda', requires_grad=True)
t = torch.randint(0, 1000, (37,), device='cuda')
for reduction in ('mean', 'none'):
    ops.cross_entropy(x, t, reduction=reduction, backend='fused').sum().backward()
ps = [torch.nn.Parameter(torch.randn(n, device='cuda')) for n in (1, 7, 70001)]
for p in ps:
    p.grad = torch.randn_like(p)
AdamW(ps, backend='fused', max_grad_norm=1.0).step()
for dtype in (torch.float32, torch.bfloat16):
    for T, D in ((70, 64), (33, 128)):
        q, k, v = (torch.randn(2, 2, T, D, device='cuda', dtype=dtype, requires_grad=True)
                   for _ in range(3))
        for deterministic in (False, True):
            attention(q, k, v, D ** -0.5, 0.1, deterministic).sum().backward()
torch.cuda.synchronize()
print('small fused run: ok')
"""

SANITIZER_ENV = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}  # an overrun is not hidden in a block
REFUSED = ("Device not supported", "not supported on this device",
           "Unable to find injection library")


def gpu_stages() -> list[Stage]:
    """The check of a GPU machine, in order of value (quick ones; then --full's)."""
    sanitizer = [
        Stage(f"sanitizer_{tool}", f"compute-sanitizer {tool} on a tiny fused run",
              (_sanitizer(), "--tool", tool, "--error-exitcode", "1", "{python}", "-c",
               SMALL_RUN), expected_s=40, minimum_s=20, share_s=120, env=SANITIZER_ENV,
              skip=_no_sanitizer, refused=REFUSED)
        for tool in ("memcheck", "racecheck")]
    return [
        Stage("environment", "commit, GPU, driver and versions",
              ("{python}", str(BENCH / "gpu_check.py"), "--environment", "{result}"),
              expected_s=5, minimum_s=5, share_s=60),
        Stage("build", "fastgpt._C compiled in parallel and loaded, every kernel's self-check",
              ("{python}", "-c", BUILD), expected_s=90, minimum_s=60, share_s=300),
        Stage("info", "fastgpt info", ("{python}", "-m", "fastgpt", "info"),
              expected_s=10, minimum_s=5, share_s=60),
        Stage("verify", "fastgpt verify: fused against reference",
              ("{python}", "-m", "fastgpt", "verify"), expected_s=40, minimum_s=20, share_s=150),
        # which implementation `auto` takes at the seed shapes (bf16, as on a GPU): every
        # candidate's time, the first word on whether the kernels win
        Stage("tune", "fastgpt tune at the seed shapes: reference, torch and fused timed",
              ("{python}", "-m", "fastgpt", "tune", "--preset", "seed", "--bf16"),
              expected_s=30, minimum_s=15, share_s=90),
        # the tests marked gpu_quick / gpu (tests/helpers.py): the CPU emulator's and the
        # nvcc build's tests are CI's, not marked, so not run here. In one process
        # (ONE_PROCESS), not pyproject's one xdist worker per core
        Stage("gpu_tests", "the quick GPU tests (pytest -m gpu_quick)",
              ("{python}", "-m", "pytest", "-q", "-p", "no:cacheprovider", *ONE_PROCESS,
               "-m", "gpu_quick", "tests"), expected_s=60, minimum_s=30, share_s=150),
        Stage("bench_cross_entropy", "cross-entropy at V = 512 and 50257",
              ("{python}", str(BENCH / "bench_cross_entropy.py"), "--vocabs", "512", "50257",
               "--out", "{result}"), expected_s=30, minimum_s=15, share_s=90),
        Stage("bench_linear_cross_entropy", "linear + cross-entropy at N = 8192, V = 50257",
              ("{python}", str(BENCH / "bench_linear_cross_entropy.py"), "--rows", "8192",
               "--vocabs", "50257", "--out", "{result}"), expected_s=40, minimum_s=20,
              share_s=120),
        Stage("bench_adamw", "AdamW for the seed model, with and without clipping",
              ("{python}", str(BENCH / "bench_adamw.py"), "--sets", "seed (11.1M)",
               "--out", "{result}"), expected_s=15, minimum_s=10, share_s=60),
        Stage("bench_attention", "attention T = 256 and 4096, D = 64",
              ("{python}", str(BENCH / "bench_attention.py"), "--head-dims", "64", "--seqs",
               "256", "4096", "--out", "{result}"), expected_s=40, minimum_s=20, share_s=120),
        Stage("bench_train", "the training step at the seed size: variants 1, 3, 4, 5",
              ("{python}", str(BENCH / "bench_train.py"), "--configs", "seed", "--variants",
               "1", "3", "4", "5", "--out", "{result}"), expected_s=120, minimum_s=60,
              share_s=240),
        *sanitizer,
        # --full only
        Stage("gpu_tests_full", "every GPU test (pytest -m gpu)",
              ("{python}", "-m", "pytest", "-q", "-p", "no:cacheprovider", *ONE_PROCESS,
               "-m", "gpu", "tests"), expected_s=300, minimum_s=60, share_s=600, full_only=True),
        *(Stage(f"{script}_full", f"{script}.py, every shape it has",
                ("{python}", str(BENCH / f"{script}.py"), "--out", "{result}"),
                expected_s=expected, minimum_s=minimum, share_s=share, full_only=True)
          for script, expected, minimum, share in (
              ("bench_cross_entropy", 90, 30, 300), ("bench_linear_cross_entropy", 120, 30, 300),
              ("bench_adamw", 40, 20, 120),
              ("bench_attention", 120, 30, 300), ("bench_train", 400, 120, 600))),
        Stage("quality", "bench/quality.py at the seed preset: fused learns as well",
              ("{python}", str(BENCH / "quality.py"), "--presets", "seed", "--corpus",
               "pystdlib", "--out-dir", "{dir}/quality"), expected_s=480, minimum_s=300,
              share_s=600, full_only=True, skip=_missing_module("tokenizers", "tqdm")),
        Stage("torchrun_smoke", "the trainer under torchrun (NCCL) on every GPU",
              ("{python}", str(BENCH / "gpu_check.py"), "--torchrun-smoke", "{dir}/torchrun"),
              expected_s=60, minimum_s=30, share_s=180, full_only=True,
              skip=_missing_module("tokenizers", "tqdm")),
    ]


def run_output(*cmd: str) -> str | None:
    """A command's stdout, stripped; None if it cannot run or fails."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def source_commit() -> dict:
    """{"commit", "dirty"} of the tree this runs from: from git, or where the tree is a copy
    without .git (the lent GPU machine gets one), from GPU_CHECK_COMMIT, dirty unknown."""
    commit = run_output("git", "rev-parse", "HEAD")
    if commit:
        return {"commit": commit, "dirty": bool(run_output("git", "status", "--porcelain"))}
    given = os.environ.get("GPU_CHECK_COMMIT", "").strip()
    if given:
        return {"commit": given, "dirty": None, "commit_from": "GPU_CHECK_COMMIT"}
    return {"commit": "unknown (no git checkout here, and GPU_CHECK_COMMIT not set)",
            "dirty": None}


def environment(path: Path) -> int:
    """Write what this run ran on."""
    import platform

    import torch
    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:  # noqa: BLE001
        triton_version = f"unavailable ({type(exc).__name__}: {exc})"
    info = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        **source_commit(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "gpus": torch.cuda.device_count(),
        "driver": run_output("nvidia-smi", "--query-gpu=driver_version",
                             "--format=csv,noheader") or "unknown (nvidia-smi did not answer)",
        "cuda": torch.version.cuda, "torch": torch.__version__, "triton": triton_version,
        "python": platform.python_version(), "cpus": os.cpu_count(),
    }
    write_json(path, info)
    print(json.dumps(info))
    return 0


def torchrun_smoke(directory: Path) -> int:
    """A short run of the trainer under torchrun on every GPU here (a one-rank group with
    one GPU), NCCL, from a fresh cache."""
    import torch
    env = {**os.environ, "FASTGPT_CACHE": str(directory / "cache")}
    return subprocess.run(
        [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         str(torch.cuda.device_count()), "-m", "fastgpt", "train", "--preset", "cpu",
         "--corpus", "pystdlib", "--max_steps", "60", "--eval_interval", "30",
         "--runs_dir", str(directory / "runs"), "--name", "torchrun-smoke"],
        env=env, cwd=ROOT).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="default: $OUT if set, else bench/results/")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds for the whole run (default {DEFAULT_BUDGET_S})")
    parser.add_argument("--full", action="store_true", help="also the long stages")
    parser.add_argument("--only", nargs="+", metavar="STAGE", help="just these stages")
    parser.add_argument("--continue", dest="keep_finished", action="store_true",
                        help="keep the stages DIR already has a result for; run the rest")
    parser.add_argument("--list", action="store_true", help="print the stages and exit")
    parser.add_argument("--environment", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--torchrun-smoke", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.environment:
        return environment(Path(args.environment))
    if args.torchrun_smoke:
        return torchrun_smoke(Path(args.torchrun_smoke))

    stages = [s for s in gpu_stages() if args.full or not s.full_only]
    if args.only:
        unknown = set(args.only) - {s.name for s in gpu_stages()}
        if unknown:
            parser.error(f"unknown stage(s) {', '.join(sorted(unknown))}; --list shows them")
        stages = [s for s in gpu_stages() if s.name in args.only]
    if args.list:
        for s in stages:
            print(f"{s.name:26} ~{s.expected_s:4.0f} s (share {s.share_s:.0f} s)"
                  f"{'  [--full]' if s.full_only else ''}  {s.what}")
        print(f"{'total':26} ~{sum(s.expected_s for s in stages):4.0f} s")
        return 0

    try:
        import torch
        cuda = torch.cuda.is_available()
    except ImportError as exc:
        print(f"gpu_check: torch cannot be imported by {PYTHON} ({exc}); set PYTHON to the "
              f"interpreter that has it", file=sys.stderr)
        return 2
    if not cuda:
        print("gpu_check: no CUDA GPU is visible to torch here; this check needs one "
              "(run pytest for the CPU checks)", file=sys.stderr)
        return 2
    out = Path(args.out or os.environ.get("OUT") or BENCH / "results")
    records = run_stages(stages, out, args.budget, keep_finished=args.keep_finished,
                         echo=sys.stdout.buffer)
    written = report.assemble(out, out)
    print(f"gpu_check: wrote {', '.join(str(p) for p in written)}")
    print(report.stage_table(records))
    return 0 if all(r["status"] in ("pass", "skip") for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
