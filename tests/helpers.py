"""Shared test helpers: a tiny config that trains in a second on a CPU."""

from pathlib import Path

from fastgpt.config import TrainConfig, make_config

TINY = dict(context_length=16, d_model=32, num_heads=2, num_layers=2, dropout=0.1,
            batch_size=8, lr=3e-3, max_steps=6, eval_interval=3, eval_batches=2,
            log_interval=1, vocab_size=512)


def tiny_config(runs_dir: Path, corpus: Path, **overrides) -> TrainConfig:
    """dropout stays on, so resume tests also prove the RNG state is restored."""
    return make_config("cpu", {"corpus": str(corpus), "runs_dir": str(runs_dir), "name": "tiny",
                               **TINY, **overrides})


def tiny_cli_args(runs_dir: Path, corpus: Path, **overrides) -> list[str]:
    values = {"corpus": str(corpus), "runs_dir": str(runs_dir), "name": "tiny", **TINY, **overrides}
    args = ["--preset", "cpu"]
    for field, value in values.items():
        args += [f"--{field}", str(value)]
    return args
