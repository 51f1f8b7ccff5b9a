"""The device a run trains on (`pick_device`), and data-parallel training on
torch.distributed: one process per GPU (or several CPU processes), launched by torchrun,
each holding the whole model (DistributedDataParallel).

    torchrun --nproc_per_node 8 -m fastgpt train --preset seed
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 --rdzv-id myrun -m fastgpt train --preset seed

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; `setup` joins the
process group with NCCL for GPUs or gloo for CPUs, and gives every collective a timeout
so that a rank that stops answering ends the run with an error instead of a hang.

Every rank walks the same global stream of micro-batches (same seed, same order) and
takes its own share of each step's batch_size x grad_accum sequences (see `Shares`), so
the global batch, and with it the loss trajectory and the checkpoint's data position, do
not depend on the number of ranks.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import importlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastgpt import FastGPTError


@dataclass(frozen=True)
class Context:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    enabled: bool = False  # in a process group (under torchrun, even with one process)
    cpu_group: object = None  # gloo group for host-side flags (None: the default group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Context()


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets RANK
    and WORLD_SIZE), even as the only one: `torchrun --nproc_per_node 1` runs the
    distributed code path on one GPU, a smoke test of it."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device_spec: str, timeout_s: float) -> tuple[Context, torch.device]:
    """Join the process group torchrun describes; (context, this rank's device).

    device "auto" or "cuda": GPU LOCAL_RANK with NCCL (or gloo on CPUs when there is no
    GPU or device is "cpu"). An explicit cuda:N is refused: each rank takes its own GPU.
    """
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        raise FastGPTError("RANK / LOCAL_RANK / WORLD_SIZE are not set as torchrun sets them: "
                           "launch with torchrun (see README, Training on several GPUs)") from None
    if device_spec.startswith("cuda:"):
        raise FastGPTError(f"--device {device_spec} cannot be used under torchrun: each rank "
                           f"takes GPU LOCAL_RANK; pass --device cuda (or auto), and choose "
                           f"GPUs with CUDA_VISIBLE_DEVICES")
    if device_spec == "cuda" and not torch.cuda.is_available():
        raise FastGPTError("--device cuda asked for, but this PyTorch sees no CUDA GPU")
    if device_spec in ("auto", "cuda") and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise FastGPTError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} "
                               f"GPUs are visible: use at most that many --nproc_per_node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # DDP imports torch._dynamo on first use; imported while a group exists, it keeps
    # references to that group for good (torch 2.14), so that destroy_process_group
    # could not free it (see teardown). Imported first, it holds none.
    importlib.import_module("torch._dynamo")
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend_for(device), timeout=datetime.timedelta(seconds=timeout_s),
            **({"device_id": device} if device.type == "cuda" else {}))
    # Flags (stop requests) go over gloo on the host every step: no GPU sync for them.
    cpu_group = dist.new_group(backend="gloo") if device.type == "cuda" else None
    return Context(rank, local_rank, world_size, enabled=True, cpu_group=cpu_group), device


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise FastGPTError(f"device {spec!r} is not one of auto, cpu, cuda, cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FastGPTError(f"device {spec!r} asked for, but this PyTorch sees no CUDA GPU")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise FastGPTError(f"device {spec!r} asked for, but there are only "
                           f"{torch.cuda.device_count()} CUDA GPUs")
    return device


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def teardown(ctx: Context, device: torch.device, dropping: BaseException | None = None) -> None:
    """Leave the process group at a point every rank reaches (the end of the run, or an
    error that all of them raised there: `dropping`, whose traceback is dropped first).

    The ranks wait for each other first, so none leaves while another still works (rank 0
    writing the last checkpoint). The group is freed, and gloo's worker threads joined,
    once nothing holds it: here, if the caller let go of the run's DDP model (after a
    non-finite loss train() drops the traceback whose frames hold it: with torch 2.11 the
    group otherwise outlived the run every time), else when that model goes. A group still
    alive at interpreter shutdown (held by torch._dynamo: see setup) keeps them running,
    and a worker still releasing the last collective's tensors then waits for the GIL and
    aborts the process ("terminate called without an active exception"; about 1 two-rank
    CPU run in 40).
    """
    if dropping is not None:
        # Its traceback's frames hold the run's DDP model, which holds the group: drop them
        # (and the cycles they sit in) so that leaving the group frees it.
        dropping.with_traceback(None)
        gc.collect()
    if dist.is_initialized():
        barrier(ctx, device)
        dist.destroy_process_group()


def raise_collective_failure(ctx: Context, exc: RuntimeError) -> None:
    """When `exc` is a failed collective (NCCL's DistBackendError, gloo's plain
    RuntimeError) in a distributed run, raise it as a one-line FastGPTError; else return."""
    text = str(exc).strip()
    if not (ctx.enabled and (isinstance(exc, dist.DistError)
                             or "gloo" in text.lower() or "nccl" in text.lower())):
        return
    first = text.splitlines()[0][:300] if text else type(exc).__name__
    raise FastGPTError(f"rank {ctx.rank}: a collective with the other ranks failed "
                       f"({first}); another rank has probably stopped: see its output") from None


def barrier(ctx: Context, device: torch.device) -> None:
    if ctx.enabled:
        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)


def all_reduce_sum(ctx: Context, values: torch.Tensor) -> torch.Tensor:
    """The sum of `values` over the ranks (in place, returned); as is when alone."""
    if ctx.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def any_rank(ctx: Context, flag: bool) -> bool:
    """Whether `flag` is true on any rank (every rank must ask, at the same point)."""
    if not ctx.enabled:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=ctx.cpu_group)
    return bool(value.item())


@contextlib.contextmanager
def main_rank_first(ctx: Context, device: torch.device) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. fills a cache), the other ranks after it."""
    if not ctx.is_main:
        barrier(ctx, device)
    yield
    if ctx.is_main:
        barrier(ctx, device)


def same_on_every_rank(ctx: Context, value) -> bool:
    """Whether every rank passed an equal `value` (a picklable tuple)."""
    return all(tuple(theirs) == value for theirs in all_gather(ctx, value))


def broadcast_from_main(ctx: Context, obj):
    """Rank 0's `obj` on every rank (a picklable object; the others' are ignored)."""
    if not ctx.enabled:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0, group=ctx.cpu_group)
    return holder[0]


def all_gather(ctx: Context, obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects)."""
    if not ctx.enabled:
        return [obj]
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


class Shares:
    """This rank's share of every step's global batch of batch_size x grad_accum sequences.

    Every rank draws the same global micro-batches of batch_size from `batches`. When the
    ranks divide grad_accum, rank r takes whole micro-batches r, r + N, ... (each rank's
    micro-batch stays batch_size, as on one process); else, when they divide batch_size,
    rank r takes rows [r B/N, (r + 1) B/N) of every micro-batch. Each rank then runs
    `accum` micro-batches of `micro_batch` sequences per step. The loss of each is divided
    by `accum`, and DDP averages the gradients over the ranks: with equal shares that is
    the mean over the whole global batch, as on one process.
    """

    def __init__(self, batches: Iterator, batch_size: int, grad_accum: int, ctx: Context):
        n = ctx.world_size
        if grad_accum % n == 0:
            self.whole, self.accum, self.micro_batch = True, grad_accum // n, batch_size
        elif batch_size % n == 0:
            self.whole, self.accum, self.micro_batch = False, grad_accum, batch_size // n
        else:
            raise FastGPTError(
                f"{n} ranks must divide grad_accum ({grad_accum}) or batch_size ({batch_size}) "
                f"so that every rank takes an equal share of each step's batch")
        self.batches, self.grad_accum, self.ctx = batches, grad_accum, ctx
        self._pending: list = []

    def __iter__(self) -> "Shares":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._pending:  # draw the step's global micro-batches, keep this rank's share
            step = [next(self.batches) for _ in range(self.grad_accum)]
            r, n = self.ctx.rank, self.ctx.world_size
            if self.whole:
                self._pending = step[r::n]
            else:
                rows = slice(r * self.micro_batch, (r + 1) * self.micro_batch)
                self._pending = [(x[rows], y[rows]) for x, y in step]
        return self._pending.pop(0)
