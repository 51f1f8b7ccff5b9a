"""runs/NAME/metrics.jsonl, one JSON record per line, and its plot, loss.png.

  {"kind": "train", "step", "loss", "lr", "tokens_per_s", "mfu", "grad_norm"}  every log step
  {"kind": "eval", "step", "train_loss", "val_loss", "lr", "tokens_seen", "elapsed_s"}

"mfu" (model FLOPs utilization, see MFU) only on a GPU that PEAK_BF16_FLOPS knows;
"grad_norm" (the global gradient norm before clipping) only with grad_clip.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastgpt import FastGPTError
from fastgpt.fileio import atomic_open, write_atomic

if TYPE_CHECKING:
    import torch

    from fastgpt.config import TrainConfig


def append(path: Path, record: dict, sync: bool = False) -> dict:
    """Append `record` to metrics.jsonl; returns it (for the TensorBoard mirror)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        if sync:  # before a checkpoint: the metrics it covers reach the disk first
            f.flush()
            os.fsync(f.fileno())
    return record


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


# Dense (no 2:4 sparsity) bf16 tensor-core peak FLOP/s (FP32 accumulate) of one GPU, keyed by
# what torch.cuda.get_device_name() returns. From NVIDIA's datasheets, which print the
# sparse figure (marked *): half of it is the dense one; the Hopper, Ada and GA102
# whitepapers print both. A name not here (another GPU, a MIG slice) gets no MFU. The H100
# NVL is left out: its datasheets of 2023 and 2024 give different figures.
PEAK_BF16_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989.4e12,  # H100 SXM5 (Hopper whitepaper; datasheet 1,979*)
    "NVIDIA H100 PCIe": 756.5e12,       # H100 datasheet: 1,513*
    "NVIDIA H200": 989.5e12,            # H200 SXM, H200 datasheet: 1,979*
    "NVIDIA H200 NVL": 835.5e12,        # H200 datasheet: 1,671*
    "NVIDIA A100-SXM4-40GB": 312e12,    # A100 datasheet: 312 (624*), SXM and PCIe alike
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA L40S": 362.05e12,           # L40S datasheet: 362.05 (733*)
    "NVIDIA L4": 121e12,                # L4 datasheet: 242*
    "NVIDIA A10": 125e12,               # A10 datasheet: 125 (250*)
    "NVIDIA GeForce RTX 4090": 165.2e12,  # Ada whitepaper, FP32 accumulate: 165.2 (330.4*)
    "NVIDIA GeForce RTX 3090": 71e12,     # GA102 whitepaper, FP32 accumulate: 71 (142*)
}


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak FLOP/s of the GPU so named, or None for one not in the table."""
    return PEAK_BF16_FLOPS.get(device_name)


def device_peak_flops(device: torch.device) -> float | None:
    """peak_bf16_flops of `device`: None on a CPU (or any device but a known CUDA GPU)."""
    if device.type != "cuda":
        return None
    import torch
    return peak_bf16_flops(torch.cuda.get_device_name(device))


def flops_per_token(config: TrainConfig, n_params: int) -> int:
    """Training FLOPs per token, forward and backward, as nanoGPT's estimate_mfu (after
    PaLM's appendix B): 6 N + 12 num_layers d_model context_length, the second term the
    attention's score and value matmuls. N counts the parameters that multiply: all but
    the token and position embeddings, which are lookups (the lm_head is a matmul and
    counts). Biases and LayerNorms count too; they are a rounding error."""
    n = n_params - (config.vocab_size + config.context_length) * config.d_model
    return 6 * n + 12 * config.num_layers * config.d_model * config.context_length


@dataclass(frozen=True)
class MFU:
    """Model FLOPs utilization: tokens/s x flops_per_token over peak_flops, the dense bf16
    peak of all the run's GPUs together (its tokens/s are the whole run's). Measured
    against the bf16 peak whether or not the run trains in bf16."""
    flops_per_token: int
    peak_flops: float

    def __call__(self, tokens_per_s: float) -> float:
        return tokens_per_s * self.flops_per_token / self.peak_flops

    @classmethod
    def for_run(cls, config: TrainConfig, n_params: int, device: torch.device,
                world_size: int = 1) -> "MFU | None":
        """The run's MFU, or None where the device's peak is unknown (a CPU, a GPU not in
        PEAK_BF16_FLOPS): no MFU rather than a guess. Every rank is taken to be a GPU like
        `device`."""
        peak = device_peak_flops(device)
        if peak is None:
            return None
        return cls(flops_per_token(config, n_params), peak * world_size)
