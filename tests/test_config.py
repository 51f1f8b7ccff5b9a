import dataclasses
import subprocess
import sys

import pytest

from fastgpt import FastGPTError
from fastgpt.config import FIELD_HELP, PRESETS, TrainConfig, make_config, parse_value


def test_seed_preset_is_the_chapter():
    config = make_config("seed")
    assert (config.vocab_size, config.context_length, config.d_model, config.num_heads,
            config.num_layers, config.dropout) == (512, 256, 384, 6, 6, 0.1)
    assert (config.batch_size, config.lr, config.max_steps, config.eval_interval,
            config.eval_batches) == (32, 3e-4, 5000, 250, 50)
    assert config.name == "seed"


def test_every_preset_is_valid_and_named_after_itself():
    for preset in PRESETS:
        assert make_config(preset).name == preset


def test_overrides_win_over_the_preset():
    config = make_config("cpu", {"d_model": 64, "name": "mine"})
    assert config.d_model == 64 and config.name == "mine"
    assert config.context_length == PRESETS["cpu"]["context_length"]


def test_every_field_is_documented_for_the_cli():
    assert set(FIELD_HELP) == {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize("field, text, value", [
    ("d_model", "128", 128), ("lr", "1e-3", 1e-3), ("corpus", "pystdlib", "pystdlib"),
    ("bf16", "true", True), ("bf16", "0", False), ("weight_decay_all", "yes", True),
])
def test_parse_value(field, text, value):
    assert parse_value(field, text) == value


@pytest.mark.parametrize("field, text, message", [
    ("d_model", "1.5", "d_model expects int"), ("bf16", "maybe", "bf16 expects bool"),
    ("nope", "1", "unknown config field 'nope'"),
])
def test_parse_value_errors(field, text, message):
    with pytest.raises(FastGPTError, match=message):
        parse_value(field, text)


@pytest.mark.parametrize("overrides, message", [
    ({"num_heads": 5}, r"num_heads \(5\) must divide d_model \(384\)"),
    ({"vocab_size": 2_000_000}, "vocab_size must be between 256 .* and 1,048,576"),
    ({"vocab_size": 100}, "byte alphabet"),
    ({"dropout": 1.0}, "dropout"),
    ({"batch_size": 0}, "batch_size must be at least 1"),
    ({"lr": -1.0}, "lr must be a positive number"),
    ({"beta2": 1.0}, "beta2"),
    ({"lr_schedule": "linear"}, "lr_schedule"),
    ({"grad_clip": -1.0}, "grad_clip must be a finite number >= 0"),
    ({"min_lr": float("nan")}, "min_lr must be a finite number >= 0"),
    ({"weight_decay": float("inf")}, "weight_decay must be a finite number >= 0"),
    ({"backend": "cuda"}, "backend must be one of auto, reference, torch, fused"),
    ({"backend": "attention=fused"}, "unknown op .attention."),
    ({"backend": "adamw=fast"}, "backend for adamw must be one of"),
    ({"name": "a/b"}, "plain directory name"),
    ({"seed": 2**63}, r"seed must be an integer from -2\*\*63 to 2\*\*63-1 \(64 bits\), "
                      r"got 9223372036854775808"),
    ({"seed": -2**63 - 1}, r"seed must be an integer from -2\*\*63 to 2\*\*63-1"),
])
def test_invalid_configs_name_the_field(overrides, message):
    with pytest.raises(FastGPTError, match=message):
        make_config("seed", overrides)


def test_unknown_preset_and_field():
    with pytest.raises(FastGPTError, match="unknown preset 'big'.*seed, cpu"):
        make_config("big")
    with pytest.raises(FastGPTError, match="unknown preset 'cpuu'; did you mean 'cpu'"):
        make_config("cpuu")
    with pytest.raises(FastGPTError, match="unknown config field"):
        TrainConfig.from_dict({"nope": 1})


def test_the_seeds_a_config_allows_are_those_torch_takes_with_trainings_offsets():
    import torch
    for seed in (-2**63, -1, 0, 2**63 - 1):
        assert make_config("seed", {"seed": seed}).seed == seed
        # train.py seeds generators with seed + 1 (evals) and seed + rank + 1_000_003 * step
        for offset in (0, 1, 7 + 1_000_003 * 10**9):
            torch.Generator().manual_seed(seed + offset)


def test_backend_names_live_without_torch_and_fastgpt_ops_re_exports_them():
    from fastgpt import backends, ops
    for name in ("BACKENDS", "KERNELS", "parse_backend", "BackendUnavailable", "UnknownBackend"):
        assert getattr(ops, name) is getattr(backends, name), name
    result = subprocess.run(
        [sys.executable, "-c", "import sys, fastgpt.config; print('torch' in sys.modules)"],
        capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr
