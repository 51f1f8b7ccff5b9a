"""bench/gpu_check.py's stage runner and bench/report.py --from, driven on the CPU with
stand-in stages: budgets, timeouts, skips, the files written as the run goes, a run killed
midway, and the report assembled from whatever a run left."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import gpu_check  # noqa: E402  (bench/gpu_check.py)
import report  # noqa: E402  (bench/report.py)

from gpu_check import Stage, run_stages  # noqa: E402


def python(code: str) -> tuple[str, ...]:
    return ("{python}", "-c", textwrap.dedent(code))


def stage(name: str, code: str, share_s: float = 60, minimum_s: float = 0, **kwargs) -> Stage:
    return Stage(name, f"stand-in {name}", python(code), expected_s=1, minimum_s=minimum_s,
                 share_s=share_s, **kwargs)


def write_result_stage(name: str) -> Stage:
    """A benchmark stand-in: writes a result file where the runner says."""
    code = ("import json, sys\n"
            "json.dump({'benchmark': 'adamw', 'device': 'stand-in GPU', 'torch': 'x',\n"
            "           'cuda': 'y', 'reps': 3, 'rows': [{'set': 'seed (11.1M)', 'clip': False,\n"
            "           'fastgpt_ms': 1.0, 'fused_ms': 2.0, 'foreach_ms': 3.0,\n"
            "           'fastgpt_GBps': 100.0}]}, open(sys.argv[1], 'w'))\n"
            "print('benchmark done')\n")
    return Stage(name, f"stand-in {name}", ("{python}", "-c", code, "{result}"), expected_s=1,
                 minimum_s=0, share_s=60)


def records_of(out: Path) -> dict[str, dict]:
    return {r["stage"]: r for r in report.run_records(out)}


def test_stages_pass_fail_overrun_and_skip_each_with_its_record(tmp_path):
    out = tmp_path / "run"
    stages = [
        stage("finishes", "print('hello from the first stage')"),
        # the files of the stage before exist, with its outcome, while this one runs
        stage("sees_the_first", f"""
            import json, pathlib
            out = pathlib.Path(r'{out}')
            assert json.loads((out / 'finishes.json').read_text())['status'] == 'pass'
            assert 'hello from the first stage' in (out / 'log.txt').read_text()
            assert json.loads((out / 'sees_the_first.json').read_text())['status'] == 'running'
            print('the first stage was on disk')"""),
        stage("fails", "import sys; print('about to fail'); sys.exit(3)"),
        stage("overruns", "import time; print('sleeping', flush=True); time.sleep(60)",
              share_s=1.5),
        stage("refused", "import sys; print('Error: Device not supported'); sys.exit(1)",
              refused=("Device not supported",)),
        stage("no_tool", "print('never runs')", skip=lambda: "compute-sanitizer not found"),
        stage("too_big", "print('never runs')", minimum_s=10_000),
        write_result_stage("benchmark"),
    ]
    started = time.monotonic()
    records = run_stages(stages, out, budget_s=600, reserve_s=0)
    assert time.monotonic() - started < 30  # the overrun was cut at its share
    got = {r["stage"]: r for r in records}
    assert [r["stage"] for r in records] == [s.name for s in stages]
    assert got["finishes"]["status"] == "pass" and got["sees_the_first"]["status"] == "pass"
    assert (got["fails"]["status"], got["fails"]["returncode"]) == ("fail", 3)
    assert got["overruns"]["status"] == "timeout" and got["overruns"]["seconds"] < 10
    assert got["refused"]["status"] == "skip"
    assert "refused the device (Device not supported)" in got["refused"]["reason"]
    assert got["no_tool"] == {**got["no_tool"], "status": "skip",
                              "reason": "compute-sanitizer not found"}
    assert got["too_big"]["status"] == "skip" and got["too_big"]["reason"].startswith("budget:")
    assert got["benchmark"]["status"] == "pass"
    assert got["benchmark"]["result"] == "benchmark.result.json"
    # what is on disk is what was returned
    assert records_of(out) == got
    log = (out / "log.txt").read_text()
    for line in ("== finishes: PASS", "about to fail", "== fails: FAIL", "sleeping",
                 "== overruns: TIMEOUT", "(its share ran out: killed)", "never runs"):
        assert (line in log) == (line != "never runs"), line
    assert "== no_tool: SKIP (compute-sanitizer not found)" in log


def test_the_budget_sets_each_timeout_and_skips_what_cannot_fit(tmp_path):
    clock = [0.0]

    def fake_clock():  # every reading of the clock finds 50 s more gone
        clock[0] += 50
        return clock[0]

    stages = [stage(f"s{i}", "print(1)", share_s=1000, minimum_s=120) for i in range(4)]
    stages.insert(1, stage("small_share", "print(1)", share_s=60, minimum_s=0))
    records = run_stages(stages, tmp_path, budget_s=400, reserve_s=20, clock=fake_clock)
    # the run starts at 50; a stage reads the clock when it decides, starts and ends; of
    # the 380 s (400 less the reserve) are left: 330, then 180 (its share: 60), then 30,
    # then -20 and -70
    assert [r["status"] for r in records] == ["pass", "pass", "skip", "skip", "skip"]
    assert [r["timeout_s"] for r in records[:2]] == [330.0, 60.0]
    assert records[2]["reason"] == "budget: 30 s left, it needs at least 120 s (about 1 s)"
    assert records[4]["reason"].startswith("budget: 0 s left")


HALF_WRITTEN = """
import os, signal, sys
f = open(sys.argv[1], "w")
f.write('{"benchmark": "adamw", "ro')
f.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""

RUNNER = """
import sys
sys.path.insert(0, BENCH)
from gpu_check import Stage, run_stages
stages = [
    Stage("quick", "quick", ("{python}", "-c", "print('quick done')"), 1, 0, 60),
    Stage("half_written", "writes half its result, then is killed",
          ("{python}", "-c", HALF_WRITTEN, "{result}"), 1, 0, 60),
    Stage("long", "runs until the runner is killed",
          # (its output, not its command line, which the log shows first, says "long started")
          ("{python}", "-c",
           "import time; print('long', 'started', flush=True); time.sleep(120)"),
          1, 0, 300),
    Stage("after", "never reached", ("{python}", "-c", "print('after')"), 1, 0, 60),
]
run_stages(stages, __import__("pathlib").Path(OUT), budget_s=600, reserve_s=0)
"""


def test_a_killed_run_leaves_files_that_report_assembles(tmp_path):
    out = tmp_path / "run"
    code = f"BENCH, OUT, HALF_WRITTEN = {str(BENCH)!r}, {str(out)!r}, {HALF_WRITTEN!r}\n" + RUNNER
    runner = subprocess.Popen([sys.executable, "-c", code],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    deadline = time.time() + 60
    while "long started" not in ((out / "log.txt").read_text() if (out / "log.txt").exists()
                                 else ""):
        assert time.time() < deadline and runner.poll() is None, runner.stderr.read()
        time.sleep(0.05)
    os.killpg(runner.pid, signal.SIGKILL)  # the command hits the machine's limit
    runner.wait(timeout=30)
    # the stage ran in a process group of its own (its timeout kills all of it) but in the
    # runner's session, which the GPU machine ends when a command is killed
    long_pid = records_of(out)["long"]["pid"]
    try:
        assert os.getsid(long_pid) == runner.pid and os.getpgid(long_pid) == long_pid
    finally:
        os.kill(long_pid, signal.SIGKILL)  # what the machine does (here nobody would)

    records = records_of(out)
    assert records["quick"]["status"] == "pass"
    assert records["half_written"]["status"] == "fail"
    assert records["half_written"]["returncode"] == -signal.SIGKILL
    assert records["long"]["status"] == "running"  # where the run stopped
    assert records["after"]["status"] == "not reached"

    results = tmp_path / "published"
    shown = subprocess.run([sys.executable, str(BENCH / "report.py"), "--from", str(out),
                            "--results", str(results)], capture_output=True, text=True,
                           timeout=120)
    assert shown.returncode == 0, shown.stderr
    md = next(results.glob("undated-unknown-gpu.md")).read_text()  # no environment stage
    assert "| quick | PASS |" in md
    assert "| half_written | FAIL |" in md
    assert "half_written: its result file is unreadable (cut off while it was written?)" in md
    assert "| long | CUT OFF |" in md and "the run was killed while this stage ran" in md
    assert "| after | not reached |" in md.replace("NOT REACHED", "not reached")
    assert (results / "README.md").read_text().count("| long | CUT OFF |") == 1
    assert "long started" in (results / "undated-unknown-gpu.log").read_text()
    data = json.loads((results / "undated-unknown-gpu.json").read_text())
    assert [s["stage"] for s in data["stages"]] == ["quick", "half_written", "long", "after"]


def test_a_stop_signal_kills_the_running_stage_and_ends_the_run(tmp_path):
    out = tmp_path / "run"
    code = f"BENCH, OUT, HALF_WRITTEN = {str(BENCH)!r}, {str(out)!r}, {HALF_WRITTEN!r}\n" + RUNNER
    runner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while "long started" not in ((out / "log.txt").read_text() if (out / "log.txt").exists()
                                 else ""):
        assert time.time() < deadline and runner.poll() is None, runner.stderr.read()
        time.sleep(0.05)
    long_pid = records_of(out)["long"]["pid"]
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=30) == 128 + signal.SIGTERM, runner.stderr.read()
    try:
        os.kill(long_pid, 0)  # a zombie would still be found: the runner reaped it
        raise AssertionError(f"the stage's process {long_pid} outlived the stopped run")
    except ProcessLookupError:
        pass
    records = records_of(out)
    assert records["long"]["status"] == "running" and records["after"]["status"] == "not reached"
    log = (out / "log.txt").read_text()
    assert "== long: the check was stopped (signal 15) while it ran" in log


def test_continue_keeps_finished_stages_and_runs_the_rest(tmp_path):
    first = [stage("a", "print('a ran')"), stage("b", "print('b ran')", minimum_s=10_000),
             stage("cut", "print('cut ran')"),
             stage("no_tool", "print(1)", skip=lambda: "compute-sanitizer not found")]
    run_stages(first, tmp_path, budget_s=100, reserve_s=0)
    assert records_of(tmp_path)["b"]["status"] == "skip"  # for the budget
    (tmp_path / "cut.json").write_text(json.dumps({"stage": "cut", "status": "running"}))
    again = [stage("a", "raise SystemExit('a must not run again')"), stage("b", "print('b ran')"),
             stage("cut", "print('cut ran')"),
             stage("no_tool", "raise SystemExit('a skip for a reason of its own is kept')"),
             stage("c", "print('c ran')")]
    records = run_stages(again, tmp_path, budget_s=100, reserve_s=0, keep_finished=True)
    assert [(r["stage"], r["status"]) for r in records] == [
        ("a", "pass"), ("b", "pass"), ("cut", "pass"), ("no_tool", "skip"), ("c", "pass")]
    log = (tmp_path / "log.txt").read_text()
    assert log.count("\na ran\n") == 1 and "kept from the earlier run (pass)" in log
    # the budget skip and the cut-off stage ran again
    assert "\nb ran\n" in log and log.count("\ncut ran\n") == 2
    # a fresh run (no --continue) starts over: the earlier stages' files are gone
    run_stages([stage("d", "print('d')")], tmp_path, budget_s=100, reserve_s=0)
    assert list(records_of(tmp_path)) == ["d"]
    assert not (tmp_path / "a.json").exists() and "a ran" not in (tmp_path / "log.txt").read_text()


def test_a_stage_that_exits_leaves_nothing_running(tmp_path):
    # what a stage started and left behind (a server, a worker pool) would hold the GPU
    # into the next stages: its process group is ended when it exits
    child = tmp_path / "child.pid"
    code = (f"import subprocess, sys\n"
            f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            f"open({str(child)!r}, 'w').write(str(p.pid))\n")
    started = time.monotonic()
    records = run_stages([stage("leaves_a_child", code)], tmp_path, budget_s=100, reserve_s=0)
    assert records[0]["status"] == "pass" and time.monotonic() - started < 30
    pid = int(child.read_text())
    deadline = time.monotonic() + 10
    while True:  # killed; gone once its new parent has reaped it
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    break  # a zombie: dead, its new parent not reaping it yet
        except (ProcessLookupError, FileNotFoundError):
            break
        assert time.monotonic() < deadline, f"the stage's child {pid} is still running"
        time.sleep(0.05)


def test_the_environment_stage_puts_gpu_date_and_commit_in_the_report(tmp_path):
    # the real stage (on a CPU its GPU is None): its record must not overwrite its result
    out = tmp_path / "run"
    environment = next(s for s in gpu_check.gpu_stages() if s.name == "environment")
    assert run_stages([environment], out, budget_s=100, reserve_s=0)[0]["status"] == "pass"
    info = json.loads((out / "environment.result.json").read_text())
    assert info["commit"] == subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                            text=True, cwd=BENCH.parent).stdout.strip()
    written = report.assemble(out, tmp_path / "published")
    md = next(p for p in written if p.suffix == ".md" and p.name != "README.md").read_text()
    assert f"commit `{info['commit'][:12]}`" in md and info["date"] in md
    assert "unreadable" not in md  # the environment is not a benchmark table


def test_a_later_run_short_of_time_does_not_hide_an_earlier_result(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    run_stages([write_result_stage("bench_adamw")], first, budget_s=100, reserve_s=0)
    run_stages([stage("bench_adamw", "print(1)", minimum_s=10_000)], second, budget_s=100,
               reserve_s=0)
    assert report.run_records(first, second)[0]["status"] == "pass"
    md = (tmp_path / "published" / "undated-unknown-gpu.md")
    report.assemble([first, second], tmp_path / "published")
    assert "| seed (11.1M) | no | 1.000 |" in md.read_text()  # the first run's table


def test_report_assembles_a_finished_run_with_its_benchmark_tables(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "environment.result.json").write_text(json.dumps({
        "date": "2026-12-04", "commit": "0123456789abcdef", "dirty": False,
        "gpu": "NVIDIA H100 80GB HBM3", "driver": "580.1", "cuda": "13.0", "torch": "2.11.0",
        "triton": "3.6.0", "python": "3.12.3"}))
    run_stages([write_result_stage("bench_adamw"), stage("verify", "print('ok')")], out,
               budget_s=100, reserve_s=0)
    published = tmp_path / "published"
    published.mkdir()
    (published / "cpu.md").write_text("# CPU figures\n")  # kept, and linked
    written = report.assemble(out, published)
    names = sorted(p.name for p in written)
    assert names == ["2026-12-04-NVIDIA-H100-80GB-HBM3-bench_adamw.json",
                     "2026-12-04-NVIDIA-H100-80GB-HBM3.json",
                     "2026-12-04-NVIDIA-H100-80GB-HBM3.log",
                     "2026-12-04-NVIDIA-H100-80GB-HBM3.md", "README.md"]
    md = (tmp_path / "published" / "2026-12-04-NVIDIA-H100-80GB-HBM3.md").read_text()
    assert md.startswith("# GPU check: NVIDIA H100 80GB HBM3, 2026-12-04, commit `0123456789ab`")
    assert "torch 2.11.0, triton 3.6.0" in md
    assert "| seed (11.1M) | no | 1.000 | 2.000 | 3.000 | 2.00x | 3.00x | 100 |" in md
    assert (published / "cpu.md").read_text() == "# CPU figures\n"
    assert "[cpu.md](cpu.md)" in (published / "README.md").read_text()


def test_the_gpu_stages_come_in_order_of_value_and_fit_the_lease():
    stages = gpu_check.gpu_stages()
    names = [s.name for s in stages if not s.full_only]
    assert names[:6] == ["environment", "build", "info", "verify", "tune", "gpu_tests"]
    assert names[-2:] == ["sanitizer_memcheck", "sanitizer_racecheck"]
    assert all(s.share_s <= 600 for s in stages)  # no stage may pass one command's limit
    assert all(s.minimum_s <= s.share_s for s in stages)
    sanitizers = [s for s in stages if s.name.startswith("sanitizer")]
    assert all(s.env == {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"} for s in sanitizers)
    assert all("Device not supported" in s.refused for s in sanitizers)


def test_gpu_check_lists_its_stages_without_a_gpu():
    shown = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--list"], capture_output=True,
                           text=True, timeout=60, env={**os.environ, "PYTHON": sys.executable})
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[0].startswith("environment")
    assert "[--full]" not in shown.stdout
    assert "quality" in subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh"), "--list", "--full"], capture_output=True,
        text=True, timeout=60, env={**os.environ, "PYTHON": sys.executable}).stdout


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path):
    shown = subprocess.run([sys.executable, str(BENCH / "report.py"), "--from", str(tmp_path)],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 2
    assert shown.stderr.strip() == (f"report: {tmp_path} is not a gpu_check run directory "
                                    f"(no plan.json)")


def test_a_rerun_of_what_a_first_run_missed_completes_its_report(tmp_path):
    first, rerun = tmp_path / "first", tmp_path / "rerun"
    run_stages([stage("a", "print('a ran')"), stage("b", "print(1)", minimum_s=10_000),
                write_result_stage("bench_adamw")], first, budget_s=100, reserve_s=0)
    (first / "bench_adamw.json").write_text(json.dumps(  # as if killed while it ran
        {"stage": "bench_adamw", "status": "running"}))
    (first / "bench_adamw.result.json").unlink()
    run_stages([stage("b", "print('b ran')"), write_result_stage("bench_adamw")], rerun,
               budget_s=100, reserve_s=0)
    shown = subprocess.run([sys.executable, str(BENCH / "report.py"), "--from", str(first),
                            str(rerun), "--results", str(tmp_path / "published")],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    md = (tmp_path / "published" / "undated-unknown-gpu.md").read_text()
    for row in ("| a | PASS |", "| b | PASS |", "| bench_adamw | PASS |"):
        assert row in md, md
    assert "| seed (11.1M) | no | 1.000 |" in md
    log = (tmp_path / "published" / "undated-unknown-gpu.log").read_text()
    assert log.index("a ran") < log.index("b ran")


def test_the_commit_comes_from_git_or_where_there_is_none_from_gpu_check_commit(monkeypatch):
    # the lent GPU machine gets a copy of the tree without .git
    assert gpu_check.source_commit()["commit"] == subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True,
        cwd=BENCH.parent).stdout.strip()
    monkeypatch.setattr(gpu_check, "run_output", lambda *cmd: None)
    monkeypatch.delenv("GPU_CHECK_COMMIT", raising=False)
    unknown = gpu_check.source_commit()
    assert unknown["dirty"] is None and unknown["commit"].startswith("unknown (no git")
    assert report._commit(unknown) == f"commit {unknown['commit']}"
    monkeypatch.setenv("GPU_CHECK_COMMIT", "0123456789abcdef0123")
    given = gpu_check.source_commit()
    assert given == {"commit": "0123456789abcdef0123", "dirty": None,
                     "commit_from": "GPU_CHECK_COMMIT"}
    assert report._commit(given) == ("commit `0123456789ab` (as GPU_CHECK_COMMIT stated: "
                                     "no git there)")
    assert report._commit({"commit": "fedcba9876543210", "dirty": True}) == (
        "commit `fedcba987654` (with uncommitted changes)")


def test_gpu_test_stages_run_in_one_process_with_pyproject_s_other_pytest_options():
    """The GPU machine may lack pytest-xdist: its pytest stages replace pyproject's addopts
    by the same options less xdist's (-n N, --dist MODE)."""
    import tomllib

    pyproject = tomllib.loads((Path(gpu_check.ROOT) / "pyproject.toml").read_text())
    addopts = pyproject["tool"]["pytest"]["ini_options"]["addopts"].split()
    xdist = {i for i, word in enumerate(addopts) if word in ("-n", "--dist")}
    kept = [w for i, w in enumerate(addopts) if i not in xdist and i - 1 not in xdist]
    assert gpu_check.ONE_PROCESS == ("-o", "addopts=" + " ".join(kept))
    pytest_stages = [s for s in gpu_check.gpu_stages() if "pytest" in s.command]
    assert len(pytest_stages) == 2
    assert all("-n" not in s.command and "-o" in s.command for s in pytest_stages)
