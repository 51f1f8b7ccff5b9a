"""--tensorboard (the event files, read back with TensorBoard's own reader, against
metrics.jsonl) and MFU (the peak table, the FLOPs formula, the progress line)."""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import fastgpt.train as train_module
from fastgpt import FastGPTError, metrics
from fastgpt.config import make_config
from fastgpt.metrics import MFU, flops_per_token, peak_bf16_flops, read_metrics
from fastgpt.model import GPT
from fastgpt.progress import ProgressReport
from fastgpt.train import resume_config, train
from helpers import tiny_cli_args, tiny_config

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason='the tensorboard package (pip install "fastgpt[tensorboard]")')

TAGS = {"train": ("loss", "lr", "tokens_per_s"), "eval": ("train_loss", "val_loss")}


def read_board(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of run_dir/tensorboard/ as TensorBoard shows it: tag -> [(step, value)]."""
    board = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"))
    board.Reload()
    return {tag: [(e.step, e.value) for e in board.Scalars(tag)]
            for tag in board.Tags()["scalars"]}


def expected_board(run_dir: Path, tags: dict) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl's records as the scalars they should be (stored as float32)."""
    records = read_metrics(run_dir / "metrics.jsonl")
    return {f"{kind}/{field}": [(r["step"], float(np.float32(r[field])))
                                for r in records if r["kind"] == kind]
            for kind, fields in tags.items() for field in fields}


def test_the_event_files_hold_the_scalars_of_metrics_jsonl(tmp_path, corpus_file,
                                                           monkeypatch):
    run_dir = tmp_path / "runs" / "tiny"
    real_save, on_disk = train_module.save_checkpoint, {}

    def save_checkpoint(path, state):  # what a crash now would leave: flushed at each eval
        board = read_board(run_dir)
        on_disk[state["step"]] = ([s for s, _ in board.get("eval/val_loss", [])],
                                  [s for s, _ in board.get("train/loss", [])])
        real_save(path, state)

    monkeypatch.setattr(train_module, "save_checkpoint", save_checkpoint)
    train(tiny_config(tmp_path / "runs", corpus_file, max_steps=6, eval_interval=3,
                      tensorboard=True))
    got, want = read_board(run_dir), expected_board(run_dir, TAGS)
    assert got == want  # on a CPU: no train/mfu
    assert [step for step, _ in got["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [step for step, _ in got["eval/val_loss"]] == [0, 3, 6]
    assert on_disk == {0: ([0], []), 3: ([0, 3], [1, 2, 3]), 6: ([0, 3, 6], [1, 2, 3, 4, 5, 6])}


def test_with_clipping_the_gradient_norm_is_recorded_and_drawn(tmp_path, corpus_file):
    """grad_clip: each train record has the step's global gradient norm before clipping
    (read with the loss, in the same wait), and train/grad_norm draws it."""
    from fastgpt.model import GPT
    train(tiny_config(tmp_path / "runs", corpus_file, max_steps=3, eval_interval=3,
                      dropout=0.0, grad_clip=0.5, tensorboard=True))
    run_dir = tmp_path / "runs" / "tiny"
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert all(r["grad_norm"] > 0.5 for r in records)  # an untrained model's: clipped
    got = read_board(run_dir)
    assert got == expected_board(run_dir, {**TAGS, "train": TAGS["train"] + ("grad_norm",)})
    # the first step's norm is that of the gradient of the first batch's loss at init
    config = tiny_config(tmp_path / "runs", corpus_file, dropout=0.0)
    torch.manual_seed(config.seed)
    model = GPT(**config.model_kwargs())
    from fastgpt.corpus import load_corpus
    from fastgpt.data import BatchStream, NextTokenDataset
    from fastgpt.token_cache import prepare
    data = prepare(load_corpus(str(corpus_file)), config.vocab_size, log=lambda _: None)
    x, y = next(BatchStream(NextTokenDataset(data.train_ids, config.context_length),
                            config.batch_size, config.seed, pin_memory=False))
    model.loss(x, y).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    assert records[0]["grad_norm"] == pytest.approx(norm.item(), rel=1e-5)  # fp32 sums


def test_without_the_flag_nothing_is_written(tmp_path, corpus_file):
    train(tiny_config(tmp_path / "runs", corpus_file, max_steps=2, eval_interval=2))
    assert not (tmp_path / "runs" / "tiny" / "tensorboard").exists()


def test_mfu_reaches_the_records_and_the_event_files(tmp_path, corpus_file, monkeypatch):
    peak = 1e9  # a made-up peak for this CPU, so that the run has an MFU to record
    monkeypatch.setattr(metrics, "device_peak_flops", lambda device: peak)
    train(tiny_config(tmp_path / "runs", corpus_file, max_steps=4, eval_interval=2,
                      tensorboard=True))
    run_dir = tmp_path / "runs" / "tiny"
    config = tiny_config(tmp_path / "runs", corpus_file)
    per_token = flops_per_token(config, GPT(**config.model_kwargs()).num_parameters())
    trains = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert len(trains) == 4
    for r in trains:
        # the record's mfu is rounded to 4 places and its tokens_per_s to 0.1 (~1e-6 here)
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * per_token / peak, abs=1e-4)
    tags = {"train": ("loss", "lr", "tokens_per_s", "mfu"), "eval": ("train_loss", "val_loss")}
    assert read_board(run_dir) == expected_board(run_dir, tags)


def test_a_resume_hides_what_the_crashed_run_wrote_after_its_checkpoint(
        tmp_path, corpus_file, monkeypatch):
    runs = tmp_path / "runs"
    settings = dict(max_steps=6, eval_interval=3, tensorboard=True)
    real_loss, calls = train_module.ForwardAndLoss.forward, []

    def loss_then_crash(self, x, y):  # the training step's loss
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt  # stands in for a kill during step 6
        return real_loss(self, x, y)

    monkeypatch.setattr(train_module.ForwardAndLoss, "forward", loss_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(runs, corpus_file, **settings))
    monkeypatch.setattr(train_module.ForwardAndLoss, "forward", real_loss)
    run_dir = runs / "tiny"
    # the checkpoint is at step 3; the event files already hold steps 4 and 5
    assert [s for s, _ in read_board(run_dir)["train/loss"]] == [1, 2, 3, 4, 5]
    time.sleep(1.1)  # the resumed run's file sorts after (its name starts with the second)

    train(resume_config(str(runs), "tiny", {}), resume=True)
    got = read_board(run_dir)
    assert [s for s, _ in got["train/loss"]] == [1, 2, 3, 4, 5, 6]  # 4 and 5 once
    assert got == expected_board(run_dir, TAGS)  # the resumed run's values, its tokens/s


def test_without_the_package_the_run_stops_at_once_in_one_line(tmp_path, corpus_file,
                                                               monkeypatch, capsys):
    from fastgpt.cli import main
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # -> ImportError
    runs = tmp_path / "runs"
    with pytest.raises(FastGPTError, match=r'pip install "fastgpt\[tensorboard\]"'):
        train(tiny_config(runs, corpus_file, tensorboard=True))
    assert main(["train", *tiny_cli_args(runs, corpus_file, tensorboard=True)]) == 1
    err = capsys.readouterr().err.strip()
    assert "--tensorboard needs the tensorboard package" in err and "\n" not in err, err
    assert not runs.exists()  # stopped before anything was written
    summary = train(tiny_config(runs, corpus_file, max_steps=2, eval_interval=2))
    assert summary["step"] == 2  # without --tensorboard, the package is not needed


def test_fastgpt_imports_no_tensorboard_until_asked():
    code = ("import sys, fastgpt.cli, fastgpt.train, fastgpt.tensorboard; "
            "print(sorted(m for m in sys.modules if 'tensorboard' in m and 'fastgpt' not in m))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


# --- MFU ------------------------------------------------------------------------------


def test_the_peak_table_knows_some_gpus_and_guesses_none():
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    for name in ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "NVIDIA GeForce GTX 1080", ""):
        assert peak_bf16_flops(name) is None, name
    for name, peak in metrics.PEAK_BF16_FLOPS.items():  # dense figures, not FLOP/s typos
        assert 50e12 <= peak <= 1000e12, name


def test_mfu_only_on_a_cuda_gpu_the_table_knows(monkeypatch):
    config = make_config("seed")
    assert MFU.for_run(config, 11_132_672, torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    mfu = MFU.for_run(config, 11_132_672, torch.device("cuda", 0), world_size=2)
    assert mfu == MFU(72_104_448, 2 * 312e12)  # tokens/s are the run's: peak x world size
    assert mfu(2 * 312e12 / 72_104_448 * 0.5) == pytest.approx(0.5)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert MFU.for_run(config, 11_132_672, torch.device("cuda", 0)) is None


def test_flops_per_token_of_the_chapters_model():
    config = make_config("seed")  # d_model 384, 6 layers, context 256, vocab 512
    n_params = GPT(**config.model_kwargs()).num_parameters()
    assert n_params == 11_132_672
    # N = 11,132,672 - 512 x 384 (token embedding) - 256 x 384 (position) = 10,837,760
    # 6 N = 65,026,560; 12 x 6 layers x 384 x 256 = 7,077,888
    assert flops_per_token(config, n_params) == 72_104_448


def make_report(mfu, monkeypatch, lines):
    config = make_config("cpu", {"batch_size": 4, "context_length": 25})  # 100 tokens/step
    report = ProgressReport(config, 0, torch.device("cpu"), lines.append, show=False, mfu=mfu)
    monkeypatch.setattr(report.timer, "take_window", lambda: 0.1)  # 1 step in 0.1 s
    report.stepped()
    return report


def test_the_progress_line_gives_the_mfu_where_known(monkeypatch):
    lines = []
    report = make_report(MFU(flops_per_token=412, peak_flops=1e6), monkeypatch, lines)
    rates = report.logged(1, 2.0, None)
    assert lines == ["step      1: loss 2.0000, 1,000 tokens/s, MFU 41.2%"]
    assert rates == {"tokens_per_s": 1000.0, "mfu": 0.412}


def test_without_an_mfu_the_progress_line_is_as_before(monkeypatch):
    lines = []
    rates = make_report(None, monkeypatch, lines).logged(1, 2.0, None)
    assert lines == ["step      1: loss 2.0000, 1,000 tokens/s"]
    assert rates == {"tokens_per_s": 1000.0}
