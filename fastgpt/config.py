"""Training configuration: one dataclass, named presets, and command-line overrides."""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass

from fastgpt import FastGPTError
from fastgpt.backends import parse_backend
from fastgpt.tokenizer import (BYTE_ALPHABET_SIZE, MAX_VOCAB_SIZE, TOKENIZER_TRAIN_BYTES,
                               Tokenizer, padded_vocab_size)


# The fields that fix the shapes of the model's parameters.
ARCHITECTURE_FIELDS = ("vocab_size", "context_length", "d_model", "num_heads", "num_layers")

# torch's generators take seeds in [-2**63, 2**64 - 1]; training also seeds some with the seed
# plus small offsets (train.py), which a signed 64-bit seed leaves room for.
SEED_MIN, SEED_MAX = -2**63, 2**63 - 1


def check_seed(seed: int) -> None:
    """Raise FastGPTError for a seed (training's or sampling's) out of SEED_MIN..SEED_MAX."""
    if not SEED_MIN <= seed <= SEED_MAX:
        raise FastGPTError(f"seed must be an integer from -2**63 to 2**63-1 (64 bits), "
                           f"got {seed}")


@dataclass
class TrainConfig:
    """Everything a run needs; FIELD_HELP below says what each field means."""
    name: str = "seed"
    runs_dir: str = "runs"
    seed: int = 1337
    device: str = "auto"
    corpus: str = "auto"
    data_dir: str = ""
    tokenizer: str = ""
    tokenizer_train_bytes: int = TOKENIZER_TRAIN_BYTES
    vocab_size: int = 512
    context_length: int = 256
    d_model: int = 384
    num_heads: int = 6
    num_layers: int = 6
    dropout: float = 0.1
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    weight_decay_all: bool = False
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_lr: float = 0.0
    grad_clip: float = 0.0
    bf16: bool = False
    compile: bool = False
    max_steps: int = 5000
    eval_interval: int = 250
    eval_batches: int = 50
    log_interval: int = 10
    tensorboard: bool = False
    patience: int = 0
    backend: str = ""
    dist_timeout: float = 600.0

    def validate(self) -> None:
        """Raise FastGPTError naming the first field that makes no sense."""
        positive = ["vocab_size", "context_length", "d_model", "num_heads", "num_layers",
                    "batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches",
                    "log_interval", "tokenizer_train_bytes"]
        for name in positive:
            if getattr(self, name) < 1:
                raise FastGPTError(f"{name} must be at least 1, got {getattr(self, name)}")
        check_seed(self.seed)
        if self.d_model % self.num_heads:
            raise FastGPTError(
                f"num_heads ({self.num_heads}) must divide d_model ({self.d_model})")
        if not BYTE_ALPHABET_SIZE <= self.vocab_size <= MAX_VOCAB_SIZE:
            raise FastGPTError(
                f"vocab_size must be between {BYTE_ALPHABET_SIZE} (the byte alphabet) and "
                f"{MAX_VOCAB_SIZE:,}, got {self.vocab_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise FastGPTError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ["lr", "eps", "dist_timeout"]:
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise FastGPTError(f"{name} must be a positive number, got {getattr(self, name)}")
        for name in ["beta1", "beta2"]:
            if not 0.0 <= getattr(self, name) < 1.0:
                raise FastGPTError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ["weight_decay", "min_lr", "grad_clip", "warmup_steps", "patience"]:
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise FastGPTError(
                    f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.backend:
            parse_backend(self.backend)  # raises, naming the bad part
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


FIELD_HELP = {
    "name": "run name: outputs go to runs_dir/name/",
    "runs_dir": "directory holding the runs",
    "seed": "seed for initialisation, dropout and the data order",
    "device": "auto | cpu | cuda | cuda:N",
    "corpus": "auto | shakespeare | pystdlib | a UTF-8 text file or a directory of them",
    "data_dir": "token cache directory (empty: the user cache dir)",
    "tokenizer": "a HuggingFace tokenizer.json to use instead of training one (GPT-2's, "
                 "say); vocab_size then defaults to its size padded to a multiple of 64",
    "tokenizer_train_bytes": "the trained tokenizer learns from the corpus's first this "
                             "many bytes (all of it, if smaller)",
    "vocab_size": "the model's vocabulary: the trained byte-level BPE's size (256..1048576)",
    "context_length": "tokens per training sequence",
    "d_model": "model width",
    "num_heads": "attention heads (must divide d_model)",
    "num_layers": "transformer blocks",
    "dropout": "dropout on attention weights and residual branches",
    "batch_size": "sequences per micro-batch",
    "grad_accum": "micro-batches per optimizer step",
    "lr": "peak learning rate",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "eps": "AdamW epsilon",
    "weight_decay": "AdamW decoupled weight decay",
    "weight_decay_all": "decay every parameter (default: not biases, LayerNorm weights, embeddings)",
    "lr_schedule": "constant | cosine (after warmup, decays to min_lr at max_steps)",
    "warmup_steps": "linear warmup steps",
    "min_lr": "final learning rate of the cosine schedule",
    "grad_clip": "clip the global gradient norm to this (0: off)",
    "bf16": "bf16 autocast for the forward pass and the loss",
    "compile": "torch.compile the forward, the loss and their backward as one graph (the "
               "first step compiles, for a minute or so)",
    "max_steps": "optimizer steps in all",
    "eval_interval": "steps between estimate_loss evals (and checkpoints)",
    "eval_batches": "batches of each split per eval (at most)",
    "log_interval": "steps between train-loss records in metrics.jsonl",
    "tensorboard": "also write metrics.jsonl's scalars as TensorBoard event files in "
                   "runs_dir/name/tensorboard/ (pip install \"fastgpt[tensorboard]\")",
    "patience": "stop after this many evals without a better val loss (0: off)",
    "backend": "auto | reference | torch | fused for every op, or per op: "
               "linear_cross_entropy=fused,adamw=torch (others auto); empty: "
               "$FASTGPT_BACKEND, else auto",
    "dist_timeout": "under torchrun: seconds a rank waits for the others in a collective "
                    "before the run stops with an error",
}


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
        close = difflib.get_close_matches(preset, PRESETS, n=1)
        guess = f"did you mean {close[0]!r}? " if close else ""
        raise FastGPTError(
            f"unknown preset {preset!r}; {guess}choose one of: {', '.join(PRESETS)}")
    values = {"name": preset, **PRESETS[preset], **(overrides or {})}
    if values.get("tokenizer"):  # the model's vocabulary comes from the file
        tokens = Tokenizer.load(values["tokenizer"]).vocab_size
        if "vocab_size" not in (overrides or {}):
            values["vocab_size"] = padded_vocab_size(tokens)
        elif values["vocab_size"] < tokens:
            raise FastGPTError(
                f"vocab_size {values['vocab_size']:,} cannot hold the {tokens:,} tokens of "
                f"{values['tokenizer']}: leave --vocab_size out (it becomes "
                f"{padded_vocab_size(tokens):,}) or give at least {tokens:,}")
    config = TrainConfig.from_dict(values)
    config.validate()
    return config
