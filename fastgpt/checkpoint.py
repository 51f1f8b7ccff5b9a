"""Checkpoints: written atomically, read with torch.load(weights_only=True) so that loading a
checkpoint can never run code.

A checkpoint is a dict of tensors and plain Python values:
  format, step, config (TrainConfig as a dict), model, optimizer (state_dicts),
  tokenizer (its JSON), corpus ({"name", "sha256"}), rng (torch and cuda RNG states; under
  torchrun rank 0's, and every rank's in a list "ranks"),
  data_position (see train.BatchStream), best_val_loss, evals_since_best, tokens_seen
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastgpt import FastGPTError
from fastgpt.config import TrainConfig
from fastgpt.fileio import atomic_open
from fastgpt.model import GPT
from fastgpt.tokenizer import Tokenizer

CHECKPOINT_FORMAT = 1
REQUIRED_KEYS = ("format", "step", "config", "model", "tokenizer")


def save_checkpoint(path: str | Path, checkpoint: dict) -> None:
    with atomic_open(path) as f:
        torch.save({"format": CHECKPOINT_FORMAT, **checkpoint}, f)


def load_checkpoint(path: str | Path) -> dict:
    """Load and sanity-check a checkpoint onto the CPU; any problem is a one-line FastGPTError."""
    path = Path(path)
    if not path.is_file():
        raise FastGPTError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt file can make torch.load raise almost anything
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FastGPTError(f"{path} is not a readable fastgpt checkpoint ({reason[:200]})") from None
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in REQUIRED_KEYS):
        raise FastGPTError(f"{path} is not a fastgpt checkpoint (missing model, config or tokenizer)")
    if checkpoint["format"] != CHECKPOINT_FORMAT:
        raise FastGPTError(f"{path} has checkpoint format {checkpoint['format']}; this fastgpt "
                           f"reads format {CHECKPOINT_FORMAT}")
    return checkpoint


def model_from_checkpoint(checkpoint: dict, path: str | Path = "checkpoint"
                          ) -> tuple[GPT, TrainConfig, Tokenizer]:
    """Rebuild the model (weights loaded, on the CPU), its config and its tokenizer."""
    try:
        config = TrainConfig.from_dict(checkpoint["config"])
        config.validate()
        model = GPT(**config.model_kwargs())
        model.load_state_dict(checkpoint["model"])
    except (FastGPTError, TypeError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise FastGPTError(f"{path} does not fit this fastgpt's GPT ({reason[:200]})") from None
    return model, config, Tokenizer.from_json(checkpoint["tokenizer"])
