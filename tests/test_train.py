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
from fastgpt.model import GPT
from fastgpt.train import NonFiniteLoss, lr_at, read_metrics, resume_config, train
from helpers import tiny_cli_args, tiny_config


def records(run_dir: Path, kind: str) -> list[tuple]:
    if kind == "train":
        return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl")
                if r["kind"] == "train"]
    return [(r["step"], r["train_loss"], r["val_loss"])
            for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "eval"]


def final_params(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "last.pt")["model"]


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
    assert records(runs / "split", "eval") == records(runs / "whole", "eval")
    whole, split = final_params(runs / "whole"), final_params(runs / "split")
    assert all(torch.equal(whole[k], split[k]) for k in whole)


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
    assert records(runs / "stopped", "train") == records(runs / "whole", "train")
    assert records(runs / "stopped", "eval") == records(runs / "whole", "eval")
    whole, resumed = final_params(runs / "whole"), final_params(runs / "stopped")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, corpus_file,
                                                                   monkeypatch):
    real_loss, calls = train_module.next_token_loss, []

    def loss_that_turns_nan(logits, targets):  # the training step's loss (evals: GPT.loss)
        calls.append(1)
        loss = real_loss(logits, targets)
        return loss * float("nan") if len(calls) >= 6 else loss  # the 6th training step

    monkeypatch.setattr(train_module, "next_token_loss", loss_that_turns_nan)
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
    from fastgpt.data import NextTokenDataset, load_corpus, prepare
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
    import fastgpt.data as data_module
    from fastgpt.data import Corpus
    shakespeare_calls = []

    def offline_shakespeare(log):
        shakespeare_calls.append(1)
        raise FastGPTError("offline")

    monkeypatch.setattr(data_module, "_shakespeare", offline_shakespeare)
    monkeypatch.setattr(data_module, "_pystdlib", lambda: Corpus("pystdlib", real_text))
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

    real_loss, calls = train_module.next_token_loss, []

    def loss_then_crash(logits, targets):  # the training step's loss
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # stands in for kill -9 during step 3
        return real_loss(logits, targets)

    monkeypatch.setattr(train_module, "next_token_loss", loss_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(runs, corpus_file, name="crashed", **settings))
    monkeypatch.setattr(train_module, "next_token_loss", real_loss)
    crashed = runs / "crashed"
    assert load_checkpoint(crashed / "last.pt")["step"] == 0  # only the step-0 checkpoint
    with open(crashed / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 3, "lo')  # a line torn by the crash

    train(resume_config(str(runs), "crashed", {}), resume=True)
    assert records(crashed, "train") == records(runs / "whole", "train")
    assert records(crashed, "eval") == records(runs / "whole", "eval")  # step 0 once
    assert (load_checkpoint(crashed / "last.pt")["evals_since_best"]
            == load_checkpoint(runs / "whole" / "last.pt")["evals_since_best"])


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
    from fastgpt.train import pick_device
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
        seen.append(ops.get_backend())
        return real_loss(self, idx, targets, **kwargs)

    monkeypatch.setattr(GPT, "loss", recording_loss)
    train(tiny_config(tmp_path / "runs", corpus_file, max_steps=1, backend="reference"))
    assert set(seen) == {"reference"}
    assert ops.get_backend() == "auto"  # restored after the run
    # "fused" is strict: every op must have a kernel that runs here
    if not all(ok for ok, _ in ops.available().values()):
        with pytest.raises(ops.BackendUnavailable, match="cannot run"):
            train(tiny_config(tmp_path / "runs", corpus_file, name="f", max_steps=1,
                              backend="fused"))
        assert ops.get_backend() == "auto"


def test_a_data_position_from_the_old_sampler_resumes_with_a_warning(capsys):
    from fastgpt.data import NextTokenDataset
    from fastgpt.train import BatchStream

    stream = BatchStream(NextTokenDataset(np.arange(100, dtype=np.uint16), 4), 8, 0, False)
    next(stream)
    state = stream.state_dict()
    resumed = BatchStream(NextTokenDataset(np.arange(100, dtype=np.uint16), 4), 8, 0, False)
    resumed.load_state_dict(state)
    assert torch.equal(next(resumed)[0], next(stream)[0])
    assert "older fastgpt" not in capsys.readouterr().out
    del state["sampler"]  # as a checkpoint written before data.ShuffledBatches
    resumed.load_state_dict(state)
    assert "drawn by an older fastgpt" in capsys.readouterr().out


def test_training_goes_on_without_matplotlib(tmp_path, corpus_file, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.delattr(train_module.plot_losses, "warned", raising=False)
    summary = train(tiny_config(tmp_path / "runs", corpus_file, max_steps=4, eval_interval=2))
    assert summary["step"] == 4
    run_dir = tmp_path / "runs" / "tiny"
    assert (run_dir / "last.pt").exists() and not (run_dir / "loss.png").exists()
    assert capsys.readouterr().out.count("matplotlib is not installed") == 1  # said once
