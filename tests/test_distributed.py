"""Data-parallel training under torchrun, on CPUs with gloo: the same losses as one
process with the same global batch, checkpoints that move between rank counts, and a rank
that dies stopping the others."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastgpt import FastGPTError
from fastgpt.checkpoint import load_checkpoint
from fastgpt.distributed import Context, Shares
from fastgpt.metrics import read_metrics
from fastgpt.train import resume_config, train
from helpers import assert_same_run, tiny_cli_args, tiny_config

# Two processes and one add the same per-sequence gradients in other orders (an
# all-reduce of two halves against one accumulation): fp32 rounding, ~1e-7 relative per
# step, which a few AdamW steps carry into the losses at the 1e-6 level. 1e-5 relative
# leaves room for that and catches any real difference (a wrong share of the batch or a
# missing average moves the loss by percents).
LOSS_RTOL = 1e-5
# dropout 0: with dropout each rank draws its own masks, so only the statistics match.
# device cpu: gloo between CPU processes, also on a machine with GPUs.
SETTINGS = dict(dropout=0.0, max_steps=6, eval_interval=3, log_interval=1, batch_size=8,
                device="cpu")


def torchrun(nproc: int, args: list[str], timeout: float = 300,
             script: Path | None = None) -> subprocess.CompletedProcess:
    """`fastgpt train args` (or `script args`) on nproc ranks, which must succeed."""
    program = [str(script)] if script else ["-m", "fastgpt", "train"]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         str(nproc), *program, *args],
        capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def records(run_dir: Path, kind: str) -> list[tuple]:
    keys = ("loss",) if kind == "train" else ("train_loss", "val_loss")
    return [(r["step"], *(r[k] for k in keys)) for r in read_metrics(run_dir / "metrics.jsonl")
            if r["kind"] == kind]


def assert_same_losses(mine: list[tuple], want: list[tuple]) -> None:
    assert [r[0] for r in mine] == [r[0] for r in want]  # the same steps
    for got, expected in zip(mine, want):
        assert got[1:] == pytest.approx(expected[1:], rel=LOSS_RTOL), (got, expected)


@pytest.mark.parametrize("grad_accum, share", [
    (2, "1 micro-batch(es) of 8"), (4, "2 micro-batch(es) of 8"),   # whole micro-batches
    (1, "1 micro-batch(es) of 4"), (3, "3 micro-batch(es) of 4"),   # rows of each one
])
@pytest.mark.slow
def test_two_ranks_train_like_one_process_with_the_same_global_batch(tmp_path, corpus_file,
                                                                     grad_accum, share):
    # With 2+ micro-batches per rank, DDP's no_sync skips the all-reduce on all but the
    # last: a sync on the wrong one, or none, would change the losses.
    runs = tmp_path / "runs"
    settings = dict(SETTINGS, grad_accum=grad_accum)
    train(tiny_config(runs, corpus_file, name="one", **settings))
    result = torchrun(2, tiny_cli_args(runs, corpus_file, name="two", **settings))
    assert "data parallel over 2 ranks (gloo)" in result.stdout
    assert share in result.stdout
    assert result.stdout.count("step      3: train") == 1  # only rank 0 reports progress
    # The eval after the last step compares the final weights too.
    assert_same_losses(records(runs / "two", "train"), records(runs / "one", "train"))
    assert_same_losses(records(runs / "two", "eval"), records(runs / "one", "eval"))
    saved = load_checkpoint(runs / "two" / "last.pt")
    assert len(saved["rng"]["ranks"]) == 2
    assert json.loads((runs / "two" / "config.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_two_ranks_compiled_train_like_one_eager_process(tmp_path, corpus_file):
    # --compile under DDP: torch.compile of the DDP module (graphs split at the gradient
    # buckets), two micro-batches per rank so that no_sync runs compiled too
    runs = tmp_path / "runs"
    settings = dict(SETTINGS, grad_accum=4)
    train(tiny_config(runs, corpus_file, name="one", **settings))
    result = torchrun(2, tiny_cli_args(runs, corpus_file, name="two", compile=True,
                                       **settings), timeout=600)
    assert result.stdout.count("torch.compile: the first step") == 1  # rank 0 says it
    assert_same_losses(records(runs / "two", "train"), records(runs / "one", "train"))
    assert_same_losses(records(runs / "two", "eval"), records(runs / "one", "eval"))


@pytest.mark.slow
def test_torchrun_with_one_process_takes_the_distributed_path(tmp_path, corpus_file):
    runs = tmp_path / "runs"
    train(tiny_config(runs, corpus_file, name="plain", **SETTINGS))
    result = torchrun(1, tiny_cli_args(runs, corpus_file, name="one-rank", **SETTINGS))
    assert "data parallel over 1 ranks (gloo)" in result.stdout
    # the same operations (DDP divides by 1): the same bits
    assert records(runs / "one-rank", "train") == records(runs / "plain", "train")
    assert records(runs / "one-rank", "eval") == records(runs / "plain", "eval")
    assert len(load_checkpoint(runs / "one-rank" / "last.pt")["rng"]["ranks"]) == 1


@pytest.mark.slow
def test_a_checkpoint_moves_from_two_ranks_to_one_and_back(tmp_path, corpus_file):
    runs = tmp_path / "runs"
    train(tiny_config(runs, corpus_file, name="whole", **SETTINGS))
    # 2 ranks for steps 1-3, then one process for 4-6
    torchrun(2, tiny_cli_args(runs, corpus_file, name="two-one", **{**SETTINGS, "max_steps": 3}))
    train(resume_config(str(runs), "two-one", {"max_steps": 6}), resume=True)
    # one process for steps 1-3, then 2 ranks for 4-6
    train(tiny_config(runs, corpus_file, name="one-two", **{**SETTINGS, "max_steps": 3}))
    torchrun(2, ["--name", "one-two", "--runs_dir", str(runs), "--max_steps", "6", "--resume"])
    for name in ("two-one", "one-two"):
        assert_same_run(runs / name, runs / "whole", loss_rtol=LOSS_RTOL)


@pytest.mark.slow
def test_two_ranks_resume_on_two_with_each_rank_s_own_dropout_stream(tmp_path, corpus_file):
    runs = tmp_path / "runs"
    settings = dict(SETTINGS, dropout=0.1)
    torchrun(2, tiny_cli_args(runs, corpus_file, name="whole", **settings))
    torchrun(2, tiny_cli_args(runs, corpus_file, name="split", **{**settings, "max_steps": 3}))
    torchrun(2, ["--name", "split", "--runs_dir", str(runs), "--max_steps", "6", "--resume"])
    # every rank took back its own RNG state: the same bits as the uninterrupted run
    assert_same_run(runs / "split", runs / "whole")
    ranks = load_checkpoint(runs / "whole" / "last.pt")["rng"]["ranks"]
    assert not torch.equal(ranks[0]["torch"], ranks[1]["torch"])  # own masks per rank


def test_ranks_that_cannot_share_the_batch_equally_are_refused():
    with pytest.raises(FastGPTError, match="3 ranks must divide grad_accum .2. or batch_size .8."):
        Shares(iter([]), batch_size=8, grad_accum=2, ctx=Context(0, 0, 3, True))


@pytest.mark.parametrize("batch_size, grad_accum", [(4, 2), (4, 1), (6, 4)])
def test_the_shares_of_all_ranks_make_up_each_global_batch(batch_size, grad_accum):
    def global_stream():
        i = 0
        while True:
            x = torch.arange(i, i + batch_size).unsqueeze(1)
            yield x, x + 1
            i += batch_size

    steps = 3
    want = torch.arange(steps * batch_size * grad_accum)
    for world in (1, 2):
        seen = []
        for rank in range(world):
            shares = Shares(global_stream(), batch_size, grad_accum,
                            Context(rank, rank, world, True))
            assert shares.accum * shares.micro_batch * world == batch_size * grad_accum
            for step in range(steps):
                for _ in range(shares.accum):
                    x, _ = next(shares)
                    assert x.shape[0] == shares.micro_batch
                    seen.append((step, x[:, 0]))
        for step in range(steps):  # step s of every rank: exactly the global batch s
            got = torch.cat([x for s, x in seen if s == step]).sort().values
            per_step = batch_size * grad_accum
            assert torch.equal(got, want[step * per_step:(step + 1) * per_step])


def _children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in children.read_text().split()] if children.exists() else []


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the ranks through /proc")
@pytest.mark.slow
def test_a_rank_that_dies_stops_the_others_with_an_error(tmp_path, corpus_file):
    runs = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "fastgpt", "train",
         *tiny_cli_args(runs, corpus_file, name="dies", max_steps=100000, eval_interval=1000,
                        log_interval=1, dist_timeout=60, device="cpu")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not records(runs / "dies", "train"):
            time.sleep(0.1)
        assert records(runs / "dies", "train"), "the run never got going"
        workers = [pid for child in _children(proc.pid) for pid in [child, *_children(child)]]
        rank1 = [pid for pid in workers if _rank_of(pid) == 1]
        assert rank1, f"no rank-1 process among {workers}"
        killed_at = time.time()
        os.kill(rank1[0], signal.SIGKILL)
        output, _ = proc.communicate(timeout=90)  # bounded: gloo's broken link or torchrun
        assert proc.returncode != 0
        assert time.time() - killed_at < 60  # gloo sees the broken link at once
        # the survivor's own one-line error, and torchrun's summary naming the dead rank
        assert "rank 0: a collective with the other ranks failed" in output, output[-3000:]
        assert "Root Cause" in output and "rank      : 1" in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# `fastgpt train` under torchrun, then each rank names its threads before it exits: a
# process group still alive then keeps gloo's workers, and one of them still releasing the
# last collective's tensors aborts the interpreter's shutdown (1 run in ~40).
TRAIN_THEN_LIST_THREADS = """
import os, sys
from pathlib import Path
from fastgpt.cli import main
code = main(["train", *sys.argv[1:]])
names = sorted(p.read_text().strip() for p in Path("/proc/self/task").glob("*/comm"))
sys.stdout.flush()
os.write(1, ("threads at exit: " + " ".join(names) + "\\n").encode())  # one write per rank
sys.exit(code)
"""

NAN_ON_RANK_1 = """
import os
import fastgpt.train as train_module
real, calls = train_module.ForwardAndLoss.forward, []
def loss(self, x, y):
    calls.append(1)
    out = real(self, x, y)
    if os.environ["RANK"] == "1" and len(calls) >= 5:  # rank 1's 5th step
        return out * float("nan")
    return out
train_module.ForwardAndLoss.forward = loss
""" + TRAIN_THEN_LIST_THREADS


# Each rank's clock finds another implementation fastest: rank 0 torch's ops, rank 1 the
# reference. Rank 0 measures and every rank runs its choice.
CLOCK_PER_RANK = """
import os
os.environ.pop("FASTGPT_BACKEND", None)  # auto (the tests' default is the reference)
from fastgpt import tune
from fastgpt.ops import dispatch
rank = os.environ["RANK"]
fastest = {"0": "torch", "1": "reference"}[rank]
dispatch.median_ms = lambda trial, device: 1.0 if trial.implementation == fastest else 2.0
real = tune.backends_for_run
def reporting(*args, **kwargs):
    chosen = real(*args, **kwargs)
    print(f"rank {rank} runs " + ",".join(f"{op}={impl}" for op, impl in sorted(chosen.items())),
          flush=True)
    return chosen
tune.backends_for_run = reporting
""" + TRAIN_THEN_LIST_THREADS


@pytest.mark.slow
def test_two_ranks_run_rank_0s_measured_choice(tmp_path, corpus_file):
    script = tmp_path / "clock_per_rank.py"
    script.write_text(CLOCK_PER_RANK)
    result = torchrun(2, tiny_cli_args(tmp_path / "runs", corpus_file, **SETTINGS), script=script)
    ran = sorted(re.findall(r"rank (\d) runs (\S+)", result.stdout))
    want = ("adamw=torch,causal_attention=torch,cross_entropy=auto,"
            "linear_cross_entropy=torch")
    assert ran == [("0", want), ("1", want)], result.stdout[-3000:]
    assert_left_the_process_group(result.stdout)


def assert_left_the_process_group(output: str) -> None:
    at_exit = re.findall(r"threads at exit: .*", output)
    assert len(at_exit) == 2, output[-3000:]  # one line per rank
    assert not any("gloo" in line for line in at_exit), at_exit


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="lists threads through /proc")
@pytest.mark.slow
def test_every_rank_leaves_the_process_group_before_it_exits(tmp_path, corpus_file):
    script = tmp_path / "train_then_list_threads.py"
    script.write_text(TRAIN_THEN_LIST_THREADS)
    result = torchrun(2, tiny_cli_args(tmp_path / "runs", corpus_file, **SETTINGS), script=script)
    assert_left_the_process_group(result.stdout)


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank(tmp_path, corpus_file):
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1)
    runs = tmp_path / "runs"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), *tiny_cli_args(runs, corpus_file, name="nan", max_steps=50,
                                     eval_interval=4, log_interval=1, device="cpu")],
        capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    # both ranks saw it in the all-reduced loss of step 5 (rank 0's own loss was finite)
    assert output.count("training loss is nan at step 5; stopped.") == 2
    assert "Root Cause" in output  # torchrun's summary of the failed ranks
    assert load_checkpoint(runs / "nan" / "last.pt")["step"] == 4  # the last good one
    if Path("/proc/self/task").exists():
        assert_left_the_process_group(result.stdout)


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_all_ranks_at_the_same_step_with_a_checkpoint(tmp_path,
                                                                              corpus_file):
    runs = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "fastgpt", "train",
         *tiny_cli_args(runs, corpus_file, name="term", max_steps=100000, eval_interval=1000,
                        log_interval=7, device="cpu")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(records(runs / "term", "train")) < 3:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)  # torchrun passes it on to every rank
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Rank 0 saves only after both ranks agreed on the step: a rank that stopped alone
    # would leave it waiting in the gather of the RNG states, with no checkpoint saved.
    # log_interval 7: the stop does not wait for a logging step.
    assert "checkpoint saved to" in output, output[-3000:]
    assert "Root Cause" not in output  # no rank failed
    saved = load_checkpoint(runs / "term" / "last.pt")
    assert 3 <= saved["step"] < 100000
    assert len(saved["rng"]["ranks"]) == 2
