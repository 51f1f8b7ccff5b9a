import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import fastgpt.train as train_module
from fastgpt import FastGPTError
from fastgpt.checkpoint import load_checkpoint
from fastgpt.metrics import read_metrics
from fastgpt.model import GPT
from fastgpt.train import NonFiniteLoss, lr_at, resume_config, train
from helpers import assert_same_run, gpu, quick, require_or_skip, tiny_cli_args, tiny_config


def records(run_dir: Path, kind: str) -> list[tuple]:
    if kind == "train":
        return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl")
                if r["kind"] == "train"]
    return [(r["step"], r["train_loss"], r["val_loss"])
            for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "eval"]


def test_training_learns_and_writes_its_outputs(tmp_path, corpus_file):
    config = tiny_config(tmp_path / "runs", corpus_file, max_steps=40, eval_interval=20,
                         dropout=0.0)
    summary = train(config)
    run_dir = tmp_path / "runs" / "tiny"
    for name in ("config.json", "metrics.jsonl", "loss.png", "last.pt", "best.pt"):
        assert (run_dir / name).is_file(), name
    evals = records(run_dir, "eval")
    assert [e[0] for e in evals] == [0, 20, 40]  # the eval at step 0 comes before any update
    assert abs(evals[0][2] - math.log(512)) < 0.05  # the untrained model's bound (test_model)
    # 40 steps on real text: clearly learning (seeds 1337, 1, 2, 3 drop 0.93-1.14 nats)
    assert evals[-1][2] < evals[0][2] - 0.75
    assert summary["step"] == 40 and summary["stopped"] == "max_steps"
    assert summary["val_loss"] == evals[-1][2]
    assert [r[0] for r in records(run_dir, "train")] == list(range(1, 41))
    assert load_checkpoint(run_dir / "last.pt")["step"] == 40
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("corpus_chars", [None, 2500], ids=["long-epoch", "epoch-wraps"])
@pytest.mark.slow
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path, real_text, corpus_chars):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(real_text[:corpus_chars] if corpus_chars else real_text)
    # With 2,500 characters an epoch is a few dozen batches of 16, so the data order
    # wraps across epochs before and after the checkpoint.
    settings = dict(max_steps=30, eval_interval=10, batch_size=16)
    runs = tmp_path / "runs"
    train(tiny_config(runs, corpus, name="whole", **settings))

    train(tiny_config(runs, corpus, name="split", **{**settings, "max_steps": 10}))
    train(resume_config(str(runs), "split", {"max_steps": 20}), resume=True)
    train(resume_config(str(runs), "split", {"max_steps": 30}), resume=True)

    assert records(runs / "split", "train") == records(runs / "whole", "train")
    assert_same_run(runs / "split", runs / "whole")


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_0_and_resumes_exactly(tmp_path, corpus_file):
    runs = tmp_path / "runs"
    # log_interval 3: the stop must not add a train record the uninterrupted run lacks
    settings = dict(max_steps=400, eval_interval=100, batch_size=4, log_interval=3)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastgpt", "train",
         *tiny_cli_args(runs, corpus_file, name="stopped", **settings)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    metrics = runs / "stopped" / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not any(
            r["kind"] == "train" for r in read_metrics(metrics)):  # i.e. past step 3
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "Resume with: fastgpt train --name stopped" in output
    stopped_at = load_checkpoint(runs / "stopped" / "last.pt")["step"]
    assert 0 < stopped_at < 400  # the signal arrived mid-run

    train(resume_config(str(runs), "stopped", {}), resume=True)
    train(tiny_config(runs, corpus_file, name="whole", **settings))
    assert_same_run(runs / "stopped", runs / "whole")


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, corpus_file,
                                                                   monkeypatch):
    real_loss, calls = train_module.ForwardAndLoss.forward, []

    def loss_that_turns_nan(self, x, y):  # the training step's loss (evals: GPT.loss)
        calls.append(1)
        loss = real_loss(self, x, y)
        return loss * float("nan") if len(calls) >= 6 else loss  # the 6th training step

    monkeypatch.setattr(train_module.ForwardAndLoss, "forward", loss_that_turns_nan)
    config = tiny_config(tmp_path / "runs", corpus_file, max_steps=10, eval_interval=4)
    with pytest.raises(NonFiniteLoss, match="step 6.*last good checkpoint"):
        train(config)
    checkpoint = load_checkpoint(tmp_path / "runs" / "tiny" / "last.pt")
    assert checkpoint["step"] == 4
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())


def test_early_stopping_after_patience_evals_without_improvement(tmp_path, corpus_file,
                                                                 monkeypatch):
    monkeypatch.setattr(train_module, "estimate_loss",
                        lambda *args, **kwargs: {"train": 5.0, "val": 5.0})
    config = tiny_config(tmp_path / "runs", corpus_file, max_steps=30, eval_interval=3,
                         patience=2)
    summary = train(config)
    assert summary["stopped"] == "early_stop"
    assert summary["step"] == 6  # best at step 0, then no improvement at steps 3 and 6


def test_optional_features_train_with_finite_losses(tmp_path, corpus_file):
    config = tiny_config(tmp_path / "runs", corpus_file, max_steps=4, eval_interval=4,
                         grad_accum=2, bf16=True, lr_schedule="cosine", warmup_steps=2,
                         grad_clip=1.0, weight_decay_all=True)
    summary = train(config)
    assert summary["step"] == 4
    # 4 updates (8 micro-batches) at lr 3e-3 already beat the uniform guess
    assert summary["val_loss"] < math.log(512) - 0.1
    lrs = [r["lr"] for r in read_metrics(tmp_path / "runs" / "tiny" / "metrics.jsonl")
           if r["kind"] == "train"]
    assert lrs == [lr_at(s, config) for s in range(4)]


def test_lr_schedule():
    from fastgpt.config import make_config
    constant = make_config("seed")
    assert lr_at(0, constant) == lr_at(4999, constant) == 3e-4
    cosine = make_config("seed", dict(lr_schedule="cosine", warmup_steps=100, min_lr=3e-5,
                                      max_steps=1100))
    assert lr_at(0, cosine) == pytest.approx(3e-6)      # (0 + 1) / 100 of lr
    assert lr_at(99, cosine) == pytest.approx(3e-4)     # warmup done
    assert lr_at(100, cosine) == pytest.approx(3e-4)    # cosine starts at lr
    assert lr_at(600, cosine) == pytest.approx((3e-4 + 3e-5) / 2)  # halfway
    assert lr_at(1100, cosine) == pytest.approx(3e-5)   # ends at min_lr


def test_a_run_is_never_overwritten_and_resume_needs_a_checkpoint(tmp_path, corpus_file):
    runs = tmp_path / "runs"
    train(tiny_config(runs, corpus_file, max_steps=3))
    before = (runs / "tiny" / "last.pt").read_bytes()
    with pytest.raises(FastGPTError, match="already holds a run.*--resume"):
        train(tiny_config(runs, corpus_file, max_steps=3))
    assert (runs / "tiny" / "last.pt").read_bytes() == before
    with pytest.raises(FastGPTError, match="no checkpoint"):
        resume_config(str(runs), "other", {})


def test_resume_refuses_a_different_architecture_or_corpus(tmp_path, corpus_file, real_text):
    runs = tmp_path / "runs"
    train(tiny_config(runs, corpus_file, max_steps=3))
    with pytest.raises(FastGPTError, match="d_model=32.*d_model=64"):
        train(resume_config(str(runs), "tiny", {"d_model": 64}), resume=True)
    corpus_file.write_text(real_text[:50_000])
    with pytest.raises(FastGPTError, match="corpus has changed"):
        train(resume_config(str(runs), "tiny", {"max_steps": 6}), resume=True)


def test_resume_after_max_steps_does_nothing(tmp_path, corpus_file):
    runs = tmp_path / "runs"
    train(tiny_config(runs, corpus_file, max_steps=3))
    before = (runs / "tiny" / "metrics.jsonl").read_text()
    summary = train(resume_config(str(runs), "tiny", {}), resume=True)
    assert summary["step"] == 3
    assert (runs / "tiny" / "metrics.jsonl").read_text() == before


def test_estimate_loss_restores_the_mode_and_uses_the_same_batches(tmp_path, corpus_file):
    from fastgpt.corpus import load_corpus
    from fastgpt.data import NextTokenDataset
    from fastgpt.token_cache import prepare
    data = prepare(load_corpus(str(corpus_file)), 512)
    datasets = {"val": NextTokenDataset(data.val_ids, 16)}
    model = GPT(vocab_size=512, context_length=16, d_model=32, num_heads=2, num_layers=2)
    model.train()
    rng_before = torch.get_rng_state()
    first = train_module.estimate_loss(model, datasets, 4, 3, torch.device("cpu"), seed=7)
    second = train_module.estimate_loss(model, datasets, 4, 3, torch.device("cpu"), seed=7)
    assert model.training
    assert first == second  # same batches, dropout off
    assert torch.equal(torch.get_rng_state(), rng_before)  # training randomness untouched
    # by hand: the mean token loss over the same 3 batches
    loader = train_module.make_loader(datasets["val"], 4, torch.Generator().manual_seed(7),
                                      drop_last=False)
    model.eval()
    with torch.no_grad():
        losses = [model.loss(x, y).item() for _, (x, y) in zip(range(3), loader)]
    assert first["val"] == pytest.approx(sum(losses) / 3, rel=1e-6)  # fp32 sums in another order


def test_resume_of_an_auto_corpus_uses_what_auto_chose(tmp_path, real_text, monkeypatch):
    # Offline, "auto" falls back to pystdlib; the resumed run must read pystdlib again, not
    # resolve "auto" afresh (it might find shakespeare by then). Small stand-ins for both
    # sources make that observable and fast.
    import fastgpt.corpus as corpus_module
    from fastgpt.corpus import Corpus
    shakespeare_calls = []

    def offline_shakespeare(log):
        shakespeare_calls.append(1)
        raise FastGPTError("offline")

    monkeypatch.setattr(corpus_module, "_shakespeare", offline_shakespeare)
    monkeypatch.setattr(corpus_module, "_pystdlib", lambda: Corpus("pystdlib", real_text))
    runs = tmp_path / "runs"
    train(tiny_config(runs, "auto", max_steps=2, eval_interval=2))
    assert load_checkpoint(runs / "tiny" / "last.pt")["corpus"]["name"] == "pystdlib"
    assert shakespeare_calls == [1]
    summary = train(resume_config(str(runs), "tiny", {"max_steps": 3}), resume=True)
    assert summary["step"] == 3
    assert shakespeare_calls == [1]  # "auto" was not resolved again


def test_resume_after_a_crash_before_the_first_eval(tmp_path, corpus_file, monkeypatch):
    runs = tmp_path / "runs"
    settings = dict(max_steps=6, eval_interval=3, patience=5, log_interval=1)
    train(tiny_config(runs, corpus_file, name="whole", **settings))

    real_loss, calls = train_module.ForwardAndLoss.forward, []

    def loss_then_crash(self, x, y):  # the training step's loss
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # stands in for kill -9 during step 3
        return real_loss(self, x, y)

    monkeypatch.setattr(train_module.ForwardAndLoss, "forward", loss_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(runs, corpus_file, name="crashed", **settings))
    monkeypatch.setattr(train_module.ForwardAndLoss, "forward", real_loss)
    crashed = runs / "crashed"
    assert load_checkpoint(crashed / "last.pt")["step"] == 0  # only the step-0 checkpoint
    with open(crashed / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 3, "lo')  # a line torn by the crash

    train(resume_config(str(runs), "crashed", {}), resume=True)
    assert records(crashed, "eval") == records(runs / "whole", "eval")  # step 0 once
    assert_same_run(crashed, runs / "whole")


def test_resume_applies_new_hyperparameters_but_refuses_new_decay_groups(tmp_path, corpus_file):
    runs = tmp_path / "runs"
    train(tiny_config(runs, corpus_file, max_steps=2, eval_interval=2))
    with pytest.raises(FastGPTError, match="weight_decay_all"):
        train(resume_config(str(runs), "tiny", {"weight_decay_all": True, "max_steps": 3}),
              resume=True)
    train(resume_config(str(runs), "tiny", {"weight_decay": 0.5, "beta2": 0.9, "max_steps": 3}),
          resume=True)
    groups = load_checkpoint(runs / "tiny" / "last.pt")["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]
    assert all(g["betas"] == (0.9, 0.9) for g in groups)


@pytest.mark.parametrize("spec, message", [
    ("mps", "is not one of auto, cpu, cuda"), ("gpu", "is not one of auto, cpu, cuda"),
    ("cuda:7", "CUDA"),
])
def test_bad_devices(spec, message):
    from fastgpt.distributed import pick_device
    if spec == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(FastGPTError, match=message):
        pick_device(spec)


def test_backend_field_sets_the_process_default_for_the_run(tmp_path, corpus_file, monkeypatch):
    from fastgpt import ops
    monkeypatch.delenv("FASTGPT_BACKEND", raising=False)
    seen = []
    real_loss = GPT.loss

    def recording_loss(self, idx, targets, **kwargs):
        seen.append(tuple(ops.get_backend(op) for op in ops.KERNELS))
        return real_loss(self, idx, targets, **kwargs)

    monkeypatch.setattr(GPT, "loss", recording_loss)
    train(tiny_config(tmp_path / "runs", corpus_file, max_steps=1, backend="reference"))
    assert set(seen) == {("reference",) * len(ops.KERNELS)}
    assert ops.get_backend() == "auto"  # restored after the run
    # "fused" is strict: every op must have a kernel that runs here
    if not all(ok for ok, _ in ops.available().values()):
        with pytest.raises(ops.BackendUnavailable, match="cannot run"):
            train(tiny_config(tmp_path / "runs", corpus_file, name="f", max_steps=1,
                              backend="fused"))
        assert ops.get_backend() == "auto"


def test_training_goes_on_without_matplotlib(tmp_path, corpus_file, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    summary = train(tiny_config(tmp_path / "runs", corpus_file, max_steps=4, eval_interval=2))
    assert summary["step"] == 4
    run_dir = tmp_path / "runs" / "tiny"
    assert (run_dir / "last.pt").exists() and not (run_dir / "loss.png").exists()
    assert capsys.readouterr().out.count("matplotlib is not installed") == 1  # said once


# --- progress across a resume, best.pt across a kill, stops during an eval --------------


class ScriptedEvals:
    """estimate_loss returns the val loss a test wants (train: 0.5 more), so that the test
    decides which evals improve. The first run scripted (an uninterrupted one) gets
    val_losses[i] at its i-th eval, and the model's weights at that eval are remembered;
    a later run gets the value of the eval whose weights it has, so a resumed run sees
    the same values at the same steps (its weights are the same bits; other weights are a
    KeyError)."""

    def __init__(self, monkeypatch, val_losses: list[float]):
        self.val_losses, self.by_weights = val_losses, {}
        self.recording = True
        monkeypatch.setattr(train_module, "estimate_loss", self)

    def __call__(self, model, *args, **kwargs) -> dict[str, float]:
        weights = b"".join(t.numpy().tobytes() for t in model.state_dict().values())
        if self.recording:
            self.by_weights[weights] = self.val_losses[len(self.by_weights)]
        value = self.by_weights[weights]
        return {"train": value + 0.5, "val": value}


@pytest.mark.slow
def test_a_resume_keeps_the_best_val_loss_patience_and_tokens_seen(tmp_path, corpus_file,
                                                                   monkeypatch):
    # best at step 3; steps 6, 9, 12 do not improve: patience 3 stops the run at step 12.
    # A resume at step 6 that forgot best_val_loss would take step 9 for the best (best.pt
    # overwritten), one that forgot evals_since_best would not stop at 12, one that forgot
    # tokens_seen would write other eval records.
    evals = ScriptedEvals(monkeypatch, [5.0, 4.0, 4.5, 4.6, 4.7])  # at steps 0, 3, ..., 12
    runs = tmp_path / "runs"
    settings = dict(max_steps=30, eval_interval=3, patience=3, log_interval=2)
    summary = train(tiny_config(runs, corpus_file, name="whole", **settings))
    assert (summary["step"], summary["stopped"]) == (12, "early_stop")
    evals.recording = False

    train(tiny_config(runs, corpus_file, name="split", **{**settings, "max_steps": 6}))
    summary = train(resume_config(str(runs), "split", {"max_steps": 30}), resume=True)
    assert (summary["step"], summary["stopped"]) == (12, "early_stop")
    assert load_checkpoint(runs / "split" / "best.pt")["step"] == 3
    assert_same_run(runs / "split", runs / "whole")


# The saves of a run whose evals at steps 0, 3, 9 improve and at 6 does not: best.pt and
# last.pt at 0 and 3, last.pt alone at 6, both at 9.
SAVES = 7


@pytest.mark.parametrize("crash_after", range(1, SAVES))
@pytest.mark.slow
def test_best_pt_is_never_staler_than_last_pt_wherever_a_kill_cuts_the_saves(
        tmp_path, corpus_file, monkeypatch, crash_after):
    evals = ScriptedEvals(monkeypatch, [5.0, 4.0, 4.5, 3.0])  # at steps 0, 3, 6, 9
    runs = tmp_path / "runs"
    settings = dict(max_steps=9, eval_interval=3)
    train(tiny_config(runs, corpus_file, name="whole", **settings))
    evals.recording = False

    real_save, saved = train_module.save_checkpoint, []

    def save_then_die(path, state):
        real_save(path, state)
        saved.append(path.name)
        if len(saved) == crash_after:
            raise KeyboardInterrupt  # stands in for kill -9 right after this rename

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(runs, corpus_file, name="killed", **settings))
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    killed = runs / "killed"

    best = load_checkpoint(killed / "best.pt")  # the first save is always best.pt
    if (killed / "last.pt").exists():
        last = load_checkpoint(killed / "last.pt")
        # best.pt holds the best val loss recorded up to last.pt's step, or a newer one
        assert best["best_val_loss"] <= last["best_val_loss"]
        best_step = next(r["step"] for r in read_metrics(killed / "metrics.jsonl")
                         if r["kind"] == "eval" and r["val_loss"] == last["best_val_loss"])
        assert best["step"] >= best_step
    else:  # killed after best.pt's first write: following the refusal's advice resumes it
        with pytest.raises(FastGPTError, match="has best.pt but no last.pt"):
            resume_config(str(runs), "killed", {})
        (killed / "last.pt").write_bytes((killed / "best.pt").read_bytes())
    train(resume_config(str(runs), "killed", {}), resume=True)
    assert_same_run(killed, runs / "whole")


@pytest.mark.slow
def test_a_stop_during_an_eval_abandons_it_and_the_resume_is_exact(tmp_path, corpus_file,
                                                                  monkeypatch):
    runs = tmp_path / "runs"
    settings = dict(max_steps=6, eval_interval=3, eval_batches=20)
    train(tiny_config(runs, corpus_file, name="whole", **settings))

    real_loss, eval_batches, after_signal = GPT.loss, [], []

    def loss_then_ctrl_c(self, idx, targets, **kwargs):  # GPT.loss: only evals call it
        eval_batches.append(1)
        if len(eval_batches) == 2 * 20 + 5:  # the 5th batch of the eval at step 3
            os.kill(os.getpid(), signal.SIGINT)
        elif len(eval_batches) > 2 * 20 + 5:
            after_signal.append(1)
        return real_loss(self, idx, targets, **kwargs)

    monkeypatch.setattr(GPT, "loss", loss_then_ctrl_c)
    summary = train(tiny_config(runs, corpus_file, name="stopped", **settings))
    monkeypatch.setattr(GPT, "loss", real_loss)
    assert (summary["step"], summary["stopped"]) == (3, "SIGINT")
    assert after_signal == []  # not one batch more (an eval at the seed size: ~5 s a batch)
    stopped = runs / "stopped"
    checkpoint = load_checkpoint(stopped / "last.pt")
    assert checkpoint["step"] == 3 and checkpoint["eval_pending"]
    assert [r["step"] for r in read_metrics(stopped / "metrics.jsonl")
            if r["kind"] == "eval"] == [0]  # the cut eval left no record

    summary = train(resume_config(str(runs), "stopped", {}), resume=True)
    assert summary["step"] == 6
    assert_same_run(stopped, runs / "whole")


# --- what a newcomer sees ---------------------------------------------------------------


def test_the_time_to_max_steps_is_said_once_early_on(tmp_path, corpus_file, capsys):
    train(tiny_config(tmp_path / "runs", corpus_file, max_steps=12, eval_interval=6,
                      log_interval=2))
    lines = [line for line in capsys.readouterr().out.splitlines() if "to max_steps=" in line]
    assert len(lines) == 1, lines
    # after 2 logs: the first step is not timed, the next two are
    assert "s/step: about" in lines[0] and "(8 steps and 2 eval(s) of ~" in lines[0]
    assert "--preset cpu" not in lines[0]  # seconds, not hours


def test_the_estimate_counts_steps_and_evals_and_hints_at_the_cpu_preset():
    from fastgpt.config import make_config
    from fastgpt.progress import eta_line
    seed, cpu = make_config("seed"), make_config("cpu")
    # the seed preset on this project's CPU: ~7 s/step; 20 evals of 50+50 batches, each
    # batch a forward (~1/3 of a step): 233 s each
    line = eta_line(10, seed, 7.0, None, torch.device("cpu"))
    assert line.startswith("7 s/step: about 11 h 0 min to max_steps=5000 (4990 steps and "
                           "20 eval(s) of ~4 min)")
    assert "`--preset cpu` trains a smaller one in minutes" in line
    assert "--preset cpu" not in eta_line(10, seed, 0.05, 1.0, torch.device("cuda"))
    assert "--preset cpu" not in eta_line(10, seed, 7.0, None, torch.device("cuda"))
    line = eta_line(10, cpu, 0.17, 3.0, torch.device("cpu"))
    assert "about 3 min to max_steps=1000 (990 steps and 10 eval(s) of ~3 s)" in line
    assert "--preset cpu" not in line


@pytest.mark.slow
def test_progress_lines_reach_a_file_before_a_kill_9(tmp_path, corpus_file):
    runs = tmp_path / "runs"
    out = tmp_path / "out.txt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    with out.open("w") as stdout:  # a file: Python block-buffers it
        proc = subprocess.Popen(
            [sys.executable, "-m", "fastgpt", "train",
             *tiny_cli_args(runs, corpus_file, max_steps=100_000, eval_interval=100_000,
                            batch_size=4, log_interval=1)],
            stdout=stdout, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.time() + 90
            while time.time() < deadline and not any(
                    r["kind"] == "train" and r["step"] >= 3
                    for r in read_metrics(runs / "tiny" / "metrics.jsonl")):
                time.sleep(0.02)
        finally:
            proc.kill()
            proc.wait(timeout=60)
    text = out.read_text()
    # step 2's line is written before step 3's record: a kill after that must not lose it
    for expected in ("estimating the loss on", "step      0: train", "step      1: loss",
                     "step      2: loss"):
        assert expected in text, text


def random_batches(vocab_size=64, batch_size=4, context=16, seed=0, pin=False):
    generator = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randint(0, vocab_size, (batch_size, context), generator=generator)
        y = torch.roll(x, -1, dims=1)
        yield (x.pin_memory(), y.pin_memory()) if pin else (x, y)


def small_gpt(device="cpu"):
    torch.manual_seed(0)
    return GPT(vocab_size=64, context_length=16, d_model=32, num_heads=2, num_layers=2,
               dropout=0.1).to(device)


def test_the_training_step_never_waits_for_the_device():
    # A meta tensor has a shape and no values: reading one into Python (.item(), bool(),
    # a copy to the CPU) raises. A step that runs on meta tensors therefore has no device
    # -> host sync anywhere on its path, torch's own ops included (reference backends:
    # model, loss with its target check, backward, clipping, AdamW, grad accumulation).
    from fastgpt.optim import AdamW, param_groups
    meta = torch.device("meta")
    model = small_gpt(meta)
    optimizer = AdamW(param_groups(model, 0.1), max_grad_norm=1.0)
    batches = random_batches()
    for _ in range(3):
        loss = train_model_step(model, optimizer, batches, meta)
    assert loss.device == meta and loss.shape == ()


def train_model_step(model, optimizer, batches, device):
    return train_module.train_step(train_module.training_module(model), optimizer, batches,
                                   device, grad_accum=2)


@pytest.mark.parametrize("backend", ["reference", "linear_cross_entropy=fused", "adamw=fused"])
def test_fastgpts_code_on_the_step_reads_no_tensor_into_python(backend, cpu_extension,
                                                               monkeypatch):
    # The fused kernels cannot run on meta tensors: here fastgpt's own Python on the step's
    # path (the kernels' wrappers, the loss, clipping, AdamW) is watched for .item(),
    # bool(tensor) and the like, which on a GPU each wait for the device. The targets'
    # check takes its GPU branch (an asynchronous assert; on CPU tensors it may read them).
    from fastgpt import ops
    from fastgpt.ops import reference
    from fastgpt.optim import AdamW, param_groups
    from helpers import HostReads
    if backend != "reference" and not ops.available()[backend.split("=")[0]][0]:
        require_or_skip(f"the fused {backend} cannot run here")
    monkeypatch.setattr(reference, "_readable_on_host", lambda tensor: False)
    previous = ops.set_backend(backend)
    try:
        model = small_gpt()
        optimizer = AdamW(param_groups(model, 0.1), max_grad_norm=1.0)
        batches = random_batches()
        train_model_step(model, optimizer, batches, torch.device("cpu"))  # creates the state
        # the step counts are CPU tensors on every device (host bookkeeping, no sync)
        counts = [state["step"] for state in optimizer.state.values()]
        with HostReads(allowed=counts) as watched:
            for _ in range(2):
                train_model_step(model, optimizer, batches, torch.device("cpu"))
        assert watched.reads == []
        # and the watch sees a read when there is one
        with HostReads() as watched:
            train_model_step(model, optimizer, batches, torch.device("cpu"))
        assert any("optim.py" in read for read in watched.reads)
    finally:
        ops.set_backend(previous)


@gpu
@quick
@pytest.mark.parametrize("bf16", [False, True])
def test_on_a_gpu_the_training_step_never_syncs(bf16):
    # every fused kernel that runs here ("auto"), clipping inside AdamW, 2 micro-batches
    from fastgpt.optim import AdamW, param_groups
    cuda = torch.device("cuda")
    model = small_gpt(cuda)
    optimizer = AdamW(param_groups(model, 0.1), max_grad_norm=1.0)
    batches = random_batches(pin=True)
    step = train_module.training_module(model)
    for _ in range(2):  # first steps: the optimizer's state, kernel builds and self-checks
        train_module.train_step(step, optimizer, batches, cuda, grad_accum=2, bf16=bf16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            loss = train_module.train_step(step, optimizer, batches, cuda, grad_accum=2,
                                           bf16=bf16)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss).item()


# --- the run-level doors: refusals before anything is written, and what a run says ------


@pytest.mark.parametrize("damage", ["7", '{"kind": "train", "loss": 4.2}', "[1, 2"])
def test_a_damaged_metrics_line_refuses_the_resume_in_one_line_and_loses_nothing(
        tmp_path, corpus_file, capsys, damage):
    from fastgpt.cli import main
    runs = tmp_path / "runs"
    train(tiny_config(runs, corpus_file, max_steps=2, eval_interval=2))
    metrics = runs / "tiny" / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    damaged = "".join(lines[:2] + [damage + "\n"] + lines[2:])  # line 3 of 5
    metrics.write_text(damaged)
    capsys.readouterr()
    assert main(["train", "--resume", "--name", "tiny", "--runs_dir", str(runs),
                 "--max_steps", "3"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"{metrics}, line 3" in error, error
    assert metrics.read_text() == damaged


def test_nothing_is_created_before_the_config_and_device_are_checked(tmp_path, corpus_file,
                                                                     capsys):
    from fastgpt.cli import main
    runs = tmp_path / "runs"
    missing_gpu = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, on any machine
    with pytest.raises(FastGPTError, match="CUDA"):
        train(tiny_config(runs, corpus_file, device=missing_gpu))
    assert main(["train", *tiny_cli_args(runs, corpus_file, device=missing_gpu)]) == 1
    assert "CUDA" in capsys.readouterr().err
    with pytest.raises(FastGPTError, match="no checkpoint"):
        train(tiny_config(runs, corpus_file), resume=True)
    assert not runs.exists()


def test_on_a_cpu_a_run_of_hours_says_so_before_its_first_eval(tmp_path, corpus_file,
                                                               monkeypatch, capsys):
    said_before_the_eval = []

    def eval_that_stops(*args, **kwargs):
        said_before_the_eval.append(capsys.readouterr().out)
        raise KeyboardInterrupt  # the test has what it wants: stop the run

    monkeypatch.setattr(train_module, "estimate_loss", eval_that_stops)
    with pytest.raises(KeyboardInterrupt):  # hours on any CPU: 10 million tiny steps
        train(tiny_config(tmp_path / "runs", corpus_file, device="cpu", max_steps=10_000_000,
                          eval_interval=1_000_000))
    [before] = said_before_the_eval
    [line] = [line for line in before.splitlines() if "to max_steps=10000000" in line]
    assert "one forward and backward" in line and " h " in line, line
    assert "`--preset cpu` trains a smaller one in minutes" in line


def test_a_finished_run_ends_saying_how_to_sample_from_it(tmp_path, corpus_file, capsys):
    import shlex
    from fastgpt.cli import main
    runs = tmp_path / "runs"
    train(tiny_config(runs, corpus_file, name="done", max_steps=2, eval_interval=2))
    last = capsys.readouterr().out.splitlines()[-1]
    command = last[last.index("fastgpt sample"):]
    assert command == f"fastgpt sample --run done --runs_dir {shlex.quote(str(runs))}", last
    assert main([*shlex.split(command)[1:], "--max_new_tokens", "3"]) == 0  # it works


def _foreign_tokenizer(path: Path, text: str) -> int:
    """A tokenizer.json that fastgpt did not make: HF BPE of 700 tokens with a "<bos>"
    special token its post-processor adds to every encoding (as Llama's does); fastgpt must
    not add it inside the corpus. Returns its vocabulary size."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<bos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", hf.token_to_id("<bos>"))])
    assert hf.encode("x").ids[0] == hf.token_to_id("<bos>")
    path.write_text(hf.to_str())
    return hf.get_vocab_size()


@pytest.mark.slow
def test_a_foreign_tokenizer_trains_resumes_and_samples_end_to_end(tmp_path, corpus_file,
                                                                    real_text):
    """`fastgpt train --tokenizer tokenizer.json`: vocab_size padded to a multiple of 64 and
    said; the ids are the file's (no <bos> inside); the checkpoint keeps the tokenizer (the
    file may go); --resume continues exactly; `fastgpt sample` decodes with it."""
    from fastgpt.sample import sample_from_checkpoint
    from fastgpt.tokenizer import Tokenizer
    tokenizer_path = tmp_path / "tokenizer.json"
    tokens = _foreign_tokenizer(tokenizer_path, real_text)
    runs = tmp_path / "runs"
    args = [a for a in tiny_cli_args(runs, corpus_file, max_steps=4, eval_interval=2)]
    at = args.index("--vocab_size")
    args = args[:at] + args[at + 2:] + ["--tokenizer", str(tokenizer_path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run = subprocess.run([sys.executable, "-m", "fastgpt", "train", *args],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"vocab_size 704: the tokenizer's {tokens:,} tokens, padded" in run.stdout
    checkpoint = load_checkpoint(runs / "tiny" / "last.pt")
    assert checkpoint["config"]["vocab_size"] == 704
    assert checkpoint["model"]["lm_head.weight"].shape[0] == 704
    foreign = Tokenizer.load(tokenizer_path)
    assert Tokenizer.from_json(checkpoint["tokenizer"]).sha256 == foreign.sha256
    from fastgpt.corpus import load_corpus
    from fastgpt.token_cache import prepare
    data = prepare(load_corpus(str(corpus_file)), 704, tokenizer=foreign, log=lambda _: None)
    ids = np.concatenate([np.asarray(data.train_ids), np.asarray(data.val_ids)])
    assert ids.tolist() == foreign._tok.encode(real_text, add_special_tokens=False).ids
    assert foreign._tok.token_to_id("<bos>") not in ids

    tokenizer_path.unlink()  # the run carries its tokenizer: the file is not needed again
    run = subprocess.run([sys.executable, "-m", "fastgpt", "train", "--resume", "--name",
                          "tiny", "--runs_dir", str(runs), "--max_steps", "6"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "resuming" in run.stdout and load_checkpoint(runs / "tiny" / "last.pt")["step"] == 6
    whole_args = args[:args.index("--name")] + ["--name", "whole"] + \
        args[args.index("--name") + 2:]
    _foreign_tokenizer(tokenizer_path, real_text)  # the same file again, for the whole run
    whole = subprocess.run([sys.executable, "-m", "fastgpt", "train", *whole_args,
                            "--max_steps", "6"], capture_output=True, text=True, env=env,
                           timeout=300)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    assert_same_run(runs / "tiny", runs / "whole")

    sampled = subprocess.run([sys.executable, "-m", "fastgpt", "sample", "--run", "tiny",
                              "--runs_dir", str(runs), "--prompt", "import ",
                              "--max_new_tokens", "12", "--seed", "5", "--device", "cpu"],
                             capture_output=True, text=True, env=env, timeout=120)
    assert sampled.returncode == 0, sampled.stderr
    (text,) = sample_from_checkpoint(str(runs / "tiny" / "best.pt"), prompt="import ",
                                     max_new_tokens=12, seed=5, device="cpu")
    assert text.startswith("import ") and text in sampled.stdout


def test_resume_with_another_tokenizer_is_refused_in_one_line(tmp_path, corpus_file, real_text):
    """A resumed run encodes with its checkpoint's tokenizer: a --tokenizer (or
    tokenizer_train_bytes) given on resume would be silently ignored, so it is refused."""
    runs = tmp_path / "runs"
    train(tiny_config(runs, corpus_file, max_steps=2, eval_interval=2))
    other = tmp_path / "other.json"
    _foreign_tokenizer(other, real_text)
    for field, value in (("tokenizer", str(other)), ("tokenizer_train_bytes", 1000)):
        config = resume_config(str(runs), "tiny", {field: value})
        with pytest.raises(FastGPTError) as info:
            train(config, resume=True)
        before = "" if field == "tokenizer" else 500_000_000
        assert str(info.value) == (f"{runs / 'tiny' / 'last.pt'} was trained with "
                                   f"{field}={before!r}; it cannot resume with "
                                   f"{field}={value!r}")
    assert train(resume_config(str(runs), "tiny", {"max_steps": 3}), resume=True)["step"] == 3
