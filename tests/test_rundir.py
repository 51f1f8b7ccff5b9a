"""Run directories: what marks one as a run (never overwritten), the lock a live run holds
(a second run fails at once, naming the holder), and the temporaries a killed run leaves
(removed by the next run that takes the lock, and only those)."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastgpt import FastGPTError
from fastgpt.cli import main
from fastgpt.rundir import RunDir, RunInUse
from fastgpt.metrics import read_metrics
from fastgpt.train import resume_config, train
from helpers import tiny_cli_args, tiny_config


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture
def finished_run(tmp_path, corpus_file) -> Path:
    runs = tmp_path / "runs"
    train(tiny_config(runs, corpus_file, max_steps=3))
    return runs / "tiny"


@pytest.mark.parametrize("left, advice", [
    (("last.pt", "best.pt", "metrics.jsonl"), "continue it with --resume"),
    (("best.pt", "metrics.jsonl"), "it has best.pt but no last.pt: to continue from best.pt, "
                                   "copy it"),
    (("best.pt",), "it has best.pt but no last.pt"),
    (("metrics.jsonl",), "it stopped before its first checkpoint: delete the directory"),
])
def test_any_run_file_marks_a_directory_that_a_new_run_refuses(finished_run, corpus_file,
                                                               left, advice):
    for name in ("last.pt", "best.pt", "metrics.jsonl"):
        if name not in left:
            (finished_run / name).unlink()
    before = snapshot(finished_run)
    with pytest.raises(FastGPTError, match="already holds a run") as info:
        train(tiny_config(finished_run.parent, corpus_file, max_steps=3))
    assert advice in str(info.value)
    assert ", ".join(left) in str(info.value)  # which files it found
    assert "--name NEW_NAME" in str(info.value)
    assert snapshot(finished_run) == before  # best.pt and metrics.jsonl untouched


def test_resume_without_last_pt_says_how_to_continue_from_best_pt(finished_run, corpus_file):
    runs = finished_run.parent
    (finished_run / "last.pt").unlink()
    with pytest.raises(FastGPTError, match="has best.pt but no last.pt") as info:
        resume_config(str(runs), "tiny", {})
    assert "start the run without --resume" not in str(info.value)  # the old advice
    assert f"cp {finished_run / 'best.pt'} {finished_run / 'last.pt'}" in str(info.value)
    shutil.copy(finished_run / "best.pt", finished_run / "last.pt")  # the advice, followed
    summary = train(resume_config(str(runs), "tiny", {"max_steps": 4}), resume=True)
    assert summary["step"] == 4

    (finished_run / "last.pt").unlink()
    (finished_run / "best.pt").unlink()  # only metrics.jsonl: a run with nothing to resume
    with pytest.raises(FastGPTError, match="has no checkpoint.*delete it"):
        resume_config(str(runs), "tiny", {})


def wait_for(condition, what: str, timeout: float = 90):
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]


@pytest.mark.slow
def test_a_live_run_locks_its_directory_until_it_dies(tmp_path, corpus_file, capsys):
    runs = tmp_path / "runs"
    run_dir = runs / "tiny"
    settings = dict(max_steps=100_000, eval_interval=100_000, batch_size=4, log_interval=1)
    holder = subprocess.Popen(
        [sys.executable, "-m", "fastgpt", "train", *tiny_cli_args(runs, corpus_file, **settings)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(train_records(run_dir)) >= 2, "the holder's first steps")
        assert (run_dir / "last.pt").is_file()  # the step-0 checkpoint: resumable

        # a second run, new or resumed, fails at once (no eval, no step), naming the holder
        started = time.time()
        for resume in (False, True):
            config = (resume_config(str(runs), "tiny", {}) if resume
                      else tiny_config(runs, corpus_file, **settings))
            with pytest.raises(RunInUse, match=f"in use by another fastgpt run "
                                               f"\\(PID {holder.pid}\\)"):
                train(config, resume=resume)
        assert time.time() - started < 10
        capsys.readouterr()
        code = main(["train", *tiny_cli_args(runs, corpus_file, **settings), "--resume"])
        err = capsys.readouterr().err.strip()
        assert code == 1 and len(err.splitlines()) == 1, err
        assert f"PID {holder.pid}" in err and "--name" in err

        # reading needs no lock
        assert main(["sample", "--run", "tiny", "--runs_dir", str(runs),
                     "--max_new_tokens", "5"]) == 0
        assert main(["info"]) == 0

        # the holder's records were never interleaved with another run's
        steps = [r["step"] for r in train_records(run_dir)]
        assert steps == list(range(1, len(steps) + 1))
        assert holder.poll() is None  # untouched by all that
    finally:
        holder.kill()  # kill -9: the OS releases the lock
        holder.wait(timeout=60)
    summary = train(resume_config(str(runs), "tiny", {"max_steps": 1}), resume=True)
    assert summary["step"] == 1 and summary["stopped"] == "max_steps"  # from the step-0 last.pt


def test_the_lock_is_per_directory_and_released_when_a_run_ends(tmp_path, corpus_file):
    runs = tmp_path / "runs"
    other = RunDir(runs / "other")
    other.lock()  # a run elsewhere does not block this one
    try:
        train(tiny_config(runs, corpus_file, max_steps=1))
        train(resume_config(str(runs), "tiny", {"max_steps": 2}), resume=True)  # released
        with RunDir(runs / "tiny"):  # as would another live process
            with pytest.raises(RunInUse, match=f"PID {os.getpid()}"):
                train(resume_config(str(runs), "tiny", {"max_steps": 3}), resume=True)
        train(resume_config(str(runs), "tiny", {"max_steps": 3}), resume=True)
    finally:
        other.unlock()


def test_the_in_use_check_names_the_holder_and_creates_and_holds_nothing(tmp_path):
    run = RunDir(tmp_path / "runs" / "tiny")
    run.check_not_in_use()  # no directory: nothing to check, and nothing made
    assert not (tmp_path / "runs").exists()
    run.directory.mkdir(parents=True)
    run.check_not_in_use()  # no .lock: no run has held it
    assert list(run.directory.iterdir()) == []
    with RunDir(run.directory):  # as a live run holds it
        lock_file = (run.directory / ".lock").read_bytes()
        for _ in range(2):
            with pytest.raises(RunInUse, match=re.escape(
                    f"{run.directory} is in use by another fastgpt run (PID {os.getpid()}); "
                    f"wait for it")):
                run.check_not_in_use()
        assert (run.directory / ".lock").read_bytes() == lock_file
    run.check_not_in_use()  # released by its holder
    with run:  # the check released its own share at once
        assert (run.directory / ".lock").read_bytes() == f"{os.getpid()}\n".encode()


# the temporaries atomic_open makes for each file a run writes, as a kill -9 leaves them
STALE = (".last.pt.k3j2h1g0.tmp", ".best.pt.a9s8d7f6.tmp", ".loss.png.q1w2e3r4.tmp",
         ".metrics.jsonl.z0x9c8v7.tmp", ".config.json.m5n4b3v2.tmp")
# not this run's temporaries: never touched
FOREIGN = (".notes.txt.k3j2h1g0.tmp", "last.pt.tmp", ".last.pt.backup", "my.tmp",
           ".last.ptx.k3j2h1g0.tmp")


def plant(directory: Path, names, size: int = 1000) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_bytes(b"\0" * size)


def test_a_resume_removes_the_temporaries_a_killed_run_left(finished_run, corpus_file, capsys):
    plant(finished_run, STALE + FOREIGN)
    capsys.readouterr()
    train(resume_config(str(finished_run.parent), "tiny", {"max_steps": 4}), resume=True)
    assert "removed 5 temporary file(s) (0.0 MB) that an interrupted run left" in \
        capsys.readouterr().out
    left = {p.name for p in finished_run.iterdir()}
    assert not left & set(STALE)
    assert set(FOREIGN) <= left


def test_a_new_run_removes_temporaries_of_its_own_files_only(tmp_path, corpus_file, capsys):
    run_dir = tmp_path / "runs" / "tiny"
    plant(run_dir, (".config.json.m5n4b3v2.tmp",) + FOREIGN)  # a run killed as it began
    train(tiny_config(tmp_path / "runs", corpus_file, max_steps=1))
    assert "removed 1 temporary file(s)" in capsys.readouterr().out
    left = {p.name for p in run_dir.iterdir()}
    assert ".config.json.m5n4b3v2.tmp" not in left and set(FOREIGN) <= left


def test_temporaries_of_a_live_run_are_left_alone(finished_run, corpus_file):
    plant(finished_run, STALE)
    with RunDir(finished_run):  # another live process is writing them
        with pytest.raises(RunInUse):
            train(resume_config(str(finished_run.parent), "tiny", {"max_steps": 4}),
                  resume=True)
    assert set(STALE) <= {p.name for p in finished_run.iterdir()}


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_leaves_a_temporary_that_the_resume_removes(
        tmp_path, corpus_file):
    runs = tmp_path / "runs"
    run_dir = runs / "tiny"
    # the real thing: a run killed (SIGKILL) while torch.save writes last.pt
    code = (f"import os, signal, sys, torch\n"
            f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            f"from helpers import tiny_config\n"
            f"from fastgpt.train import train\n"
            f"real_save, calls = torch.save, []\n"
            f"def save_then_die(obj, f, *args, **kwargs):\n"
            f"    calls.append(1)\n"
            f"    if len(calls) == 4:  # the eval at step 2: best.pt, then last.pt\n"
            f"        f.write(b'half a checkpoint'); f.flush()\n"
            f"        os.kill(os.getpid(), signal.SIGKILL)\n"
            f"    return real_save(obj, f, *args, **kwargs)\n"
            f"torch.save = save_then_die\n"
            f"train(tiny_config({str(runs)!r}, {str(corpus_file)!r}, max_steps=4, "
            f"eval_interval=2))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == -signal.SIGKILL, result.stderr
    stale = list(run_dir.glob(".last.pt.*.tmp"))
    assert len(stale) == 1 and stale[0].read_bytes() == b"half a checkpoint"
    summary = train(resume_config(str(runs), "tiny", {}), resume=True)
    assert summary["step"] == 4
    assert not list(run_dir.glob(".*.tmp"))
