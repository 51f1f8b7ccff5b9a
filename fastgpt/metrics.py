"""runs/NAME/metrics.jsonl, one JSON record per line, and its plot, loss.png.

  {"kind": "train", "step", "loss", "lr", "tokens_per_s"}  every log_interval steps
  {"kind": "eval", "step", "train_loss", "val_loss", "lr", "tokens_seen", "elapsed_s"}
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from fastgpt import FastGPTError
from fastgpt.fileio import atomic_open, write_atomic


def append(path: Path, record: dict, sync: bool = False) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        if sync:  # before a checkpoint: the metrics it covers reach the disk first
            f.flush()
            os.fsync(f.fileno())


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl; a line that is not JSON (a torn last line: a crash
    mid-write, or one being written now) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate(path: Path, step: int) -> None:
    """Drop the records a crashed run wrote after its last checkpoint, at `step` (the
    resumed run writes them again), and a last line the crash tore. Any other line that is
    not a record with a step is a one-line FastGPTError, and the file is left as it is."""
    if not path.exists():
        return
    text = path.read_text()
    lines = text.splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) and not text.endswith("\n"):  # torn mid-write
                continue
            record = None
        if not (isinstance(record, dict) and type(record.get("step")) is int):
            raise FastGPTError(
                f"{path}, line {number}: not a metrics record with a step ({line[:60]!r}); "
                f"mend or delete that line, then resume again")
        if record["step"] <= step:
            kept.append(line + "\n")
    write_atomic(path, "".join(kept).encode())


def plot_losses(metrics_path: Path, png_path: Path, vocab_size: int) -> bool:
    """Train and val loss against step, with the untrained model's ln(vocab_size), drawn to
    png_path. False, and nothing drawn, without matplotlib (e.g. a bare GPU machine)."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in read_metrics(metrics_path) if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    steps = [r["step"] for r in evals]
    ax.plot(steps, [r["train_loss"] for r in evals], marker=".", label="train")
    ax.plot(steps, [r["val_loss"] for r in evals], marker=".", label="val")
    ax.axhline(math.log(vocab_size), color="grey", linestyle="--",
               label=f"ln({vocab_size}) = {math.log(vocab_size):.3f} (uniform guess)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title(f"{png_path.parent.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_open(png_path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return True
