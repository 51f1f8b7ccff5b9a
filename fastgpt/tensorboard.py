"""--tensorboard: metrics.jsonl's scalars also as TensorBoard event files, in
runs/NAME/tensorboard/ (`tensorboard --logdir runs` shows every run side by side). The
package is an optional extra (pip install "fastgpt[tensorboard]"), imported only when asked.

Tags, each the metrics.jsonl field of that name at the record's step:
  train/loss, train/lr, train/tokens_per_s, train/mfu (where known),
  train/grad_norm (where clipping)                                    every log step
  eval/train_loss, eval/val_loss                                       every eval
Every eval flushes the file, before the checkpoint is written (as metrics.jsonl is synced).
A resumed run at step S opens its file with purge_step S + 1: TensorBoard then hides the
events at later steps that the interrupted run wrote after its last checkpoint (as
metrics.truncate drops those records), and the resumed run writes them again.
"""

from __future__ import annotations

from pathlib import Path

from fastgpt import FastGPTError

DIRECTORY = "tensorboard"
TAGS = {  # the fields of each kind of metrics record that become scalars
    "train": ("loss", "lr", "tokens_per_s", "mfu", "grad_norm"),
    "eval": ("train_loss", "val_loss"),
}


def _summary_writer():
    """torch's SummaryWriter class; a one-line FastGPTError without the tensorboard package
    (torch.utils.tensorboard imports it, and refuses one older than 1.15)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise FastGPTError(f'--tensorboard needs the tensorboard package ({exc}): pip install '
                           f'"fastgpt[tensorboard]", or train without --tensorboard') from None
    return SummaryWriter


def require(enabled: bool) -> None:
    """Before a run starts (enabled: --tensorboard, on the rank that writes): fail at once,
    in one line, when the package is missing, rather than train without the files."""
    if enabled:
        _summary_writer()


class Board:
    """The run's TensorBoard writer; with directory None (no --tensorboard, or a rank other
    than 0) every method does nothing."""

    def __init__(self, directory: Path | None, resumed_at: int | None = None):
        """directory: the run directory (the files go in its tensorboard/); resumed_at: the
        step a resumed run continues from (None for a new run)."""
        self.writer = None
        if directory is not None:
            # a new run purges from step 0: anything an earlier run left there is not its
            purge_step = 0 if resumed_at is None else resumed_at + 1
            self.writer = _summary_writer()(str(Path(directory) / DIRECTORY),
                                            purge_step=purge_step)

    def add(self, record: dict) -> None:
        """Mirror one metrics.jsonl record; an eval record also flushes the file."""
        if self.writer is None:
            return
        for field in TAGS.get(record.get("kind"), ()):
            if record.get(field) is not None:
                self.writer.add_scalar(f"{record['kind']}/{field}", record[field],
                                       global_step=record["step"])
        if record.get("kind") == "eval":
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
