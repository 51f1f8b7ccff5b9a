"""Training configuration: one dataclass, named presets, and command-line overrides."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from fastgpt import FastGPTError


# The fields that fix the shapes of the model's parameters.
ARCHITECTURE_FIELDS = ("vocab_size", "context_length", "d_model", "num_heads", "num_layers")


@dataclass
class TrainConfig:
    # run
    name: str = "seed"  # outputs go to runs_dir/name/
    runs_dir: str = "runs"
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # data
    corpus: str = "auto"  # auto | shakespeare | pystdlib | path to a UTF-8 file or directory
    data_dir: str = ""  # token cache; empty = the user cache dir (see fastgpt.data.cache_dir)
    # model
    vocab_size: int = 512
    context_length: int = 256
    d_model: int = 384
    num_heads: int = 6
    num_layers: int = 6
    dropout: float = 0.1
    # optimisation
    batch_size: int = 32
    grad_accum: int = 1  # micro-batches per step; the step's batch is batch_size * grad_accum
    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    weight_decay_all: bool = False  # False: biases, LayerNorm weights and embeddings get no decay
    lr_schedule: str = "constant"  # constant | cosine (linear warmup, cosine decay to min_lr)
    warmup_steps: int = 0
    min_lr: float = 0.0
    grad_clip: float = 0.0  # max global gradient norm; 0 = off
    bf16: bool = False  # bf16 autocast for forward and loss
    max_steps: int = 5000
    # evaluation and logging
    eval_interval: int = 250
    eval_batches: int = 50  # up to this many batches of each split per estimate_loss
    log_interval: int = 10  # steps between train-loss records in metrics.jsonl
    patience: int = 0  # early stop after this many evals without val improvement; 0 = off

    def validate(self) -> None:
        """Raise FastGPTError naming the first field that makes no sense."""
        positive = ["vocab_size", "context_length", "d_model", "num_heads", "num_layers",
                    "batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches",
                    "log_interval"]
        for name in positive:
            if getattr(self, name) < 1:
                raise FastGPTError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.d_model % self.num_heads:
            raise FastGPTError(
                f"num_heads ({self.num_heads}) must divide d_model ({self.d_model})")
        if not 256 <= self.vocab_size <= 65536:
            raise FastGPTError(
                f"vocab_size must be between 256 (the byte alphabet) and 65536 (tokens are "
                f"stored as uint16), got {self.vocab_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise FastGPTError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ["lr", "eps"]:
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise FastGPTError(f"{name} must be a positive number, got {getattr(self, name)}")
        for name in ["beta1", "beta2"]:
            if not 0.0 <= getattr(self, name) < 1.0:
                raise FastGPTError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ["weight_decay", "min_lr", "grad_clip", "warmup_steps", "patience"]:
            if getattr(self, name) < 0:
                raise FastGPTError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise FastGPTError(
                f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise FastGPTError(f"name must be a plain directory name, got {self.name!r}")

    def model_kwargs(self) -> dict:
        """The arguments of fastgpt.model.GPT."""
        return {f: getattr(self, f) for f in ARCHITECTURE_FIELDS + ("dropout",)}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise FastGPTError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**values)


# `seed` is the chapter exactly. `cpu` is a smaller model and run that finishes in a few
# minutes on a 2-core CPU and still visibly learns (see README for its figures).
PRESETS: dict[str, dict] = {
    "seed": {},
    "cpu": dict(
        context_length=64, d_model=128, num_heads=4, num_layers=4, dropout=0.0,
        batch_size=32, lr=1e-3, max_steps=1000, eval_interval=100, eval_batches=20,
    ),
}


def field_types() -> dict[str, type]:
    return {f.name: type(f.default) for f in dataclasses.fields(TrainConfig)}


def parse_value(field: str, text: str):
    """Convert a command-line string to the type of TrainConfig.<field>."""
    types = field_types()
    if field not in types:
        raise FastGPTError(f"unknown config field {field!r}; see `fastgpt train --help`")
    kind = types[field]
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        return text
    except ValueError:
        raise FastGPTError(f"{field} expects {kind.__name__}, got {text!r}") from None


def make_config(preset: str = "seed", overrides: dict | None = None) -> TrainConfig:
    """The preset's config with `overrides` (field -> value, already typed) applied.

    The run name defaults to the preset's name.
    """
    if preset not in PRESETS:
        raise FastGPTError(
            f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    values = {"name": preset, **PRESETS[preset], **(overrides or {})}
    config = TrainConfig.from_dict(values)
    config.validate()
    return config
