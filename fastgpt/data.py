"""What a training run reads: its corpus and prepared tokens (load_run_data), and
next-token batches from them (NextTokenDataset; BatchStream: the training's, resumable).
The token cache itself is fastgpt/token_cache.py, the corpus sources fastgpt/corpus.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fastgpt import FastGPTError, distributed
from fastgpt.corpus import Corpus, load_corpus
from fastgpt.token_cache import PreparedData, TokenIds, prepare
from fastgpt.tokenizer import Tokenizer

Log = Callable[[str], None]


def check_corpus(checkpoint: dict, path: Path, corpus: Corpus) -> None:
    """Raise when `corpus` is not the one the checkpoint at `path` was trained on (its file
    changed since)."""
    if corpus.sha256 != checkpoint["corpus"]["sha256"]:
        raise FastGPTError(f"the corpus has changed since {path} was written "
                           f"(sha256 {corpus.sha256[:12]}… now, "
                           f"{checkpoint['corpus']['sha256'][:12]}… then); cannot resume")


@dataclass
class RunData:
    """What a training run reads: its corpus, the prepared tokens and the two splits."""
    corpus: Corpus
    prepared: PreparedData
    datasets: dict[str, "NextTokenDataset"]


def load_run_data(config, ctx: distributed.Context, device: torch.device,
                  checkpoint: dict | None, checkpoint_path: Path, log: Log = print) -> RunData:
    """The corpus of `config` (a TrainConfig; on resume, what "auto" chose when the run
    began, checked against the checkpoint at `checkpoint_path`), its tokens (prepared once,
    rank 0 first; a resumed run keeps its tokenizer) and the train/val splits. Every rank
    must see the same corpus and tokens."""
    corpus_spec = config.corpus
    if checkpoint and corpus_spec == "auto":
        corpus_spec = checkpoint["corpus"]["name"]
    with distributed.main_rank_first(ctx, device):  # it downloads, tokenizes and caches
        corpus = load_corpus(corpus_spec, log=log)
        if checkpoint:
            check_corpus(checkpoint, checkpoint_path, corpus)
        if checkpoint:
            tokenizer = Tokenizer.from_json(checkpoint["tokenizer"])
        else:
            tokenizer = Tokenizer.load(config.tokenizer) if config.tokenizer else None
        if tokenizer is not None and tokenizer.vocab_size < config.vocab_size and ctx.is_main:
            log(f"vocab_size {config.vocab_size:,}: the tokenizer's {tokenizer.vocab_size:,} "
                f"tokens, padded (the lm_head's extra rows are never a target)")
        prepared = prepare(corpus, config.vocab_size, config.data_dir or None, tokenizer,
                           log=log, tokenizer_train_bytes=config.tokenizer_train_bytes)
    if not distributed.same_on_every_rank(
            ctx, (corpus.sha256, prepared.tokenizer.sha256, len(prepared.train_ids))):
        raise FastGPTError("the ranks do not see the same corpus and tokens: runs_dir and "
                           "the token cache (FASTGPT_CACHE or --data_dir) must be on a "
                           "filesystem that every machine shares")
    datasets = {split: NextTokenDataset(ids, config.context_length, split)
                for split, ids in (("train", prepared.train_ids), ("val", prepared.val_ids))}
    if len(datasets["train"]) < config.batch_size:
        raise FastGPTError(f"the train split has {len(datasets['train'])} windows, fewer than "
                           f"batch_size={config.batch_size}: use a larger corpus or a smaller "
                           f"batch")
    return RunData(corpus, prepared, datasets)


class NextTokenDataset(Dataset):
    """Item i is (x, y) = (ids[i:i+T], ids[i+1:i+T+1]) as int64 tensors of shape (T,);
    batch(starts) reads many windows at once.

    token_ids: a 1-D sequence of integer ids >= 0: a prepared cache's TokenIds, a numpy
    array, a list or tuple, or a torch tensor (made a numpy array once, on the CPU). TokenIds
    and memmaps are kept, not copied: only the windows being read are loaded (a window may
    span two shards), and they are not scanned for negative ids (the token cache's check
    covers its ids). Anything else raises TypeError (not a sequence of integers) or
    ValueError (not 1-D, negative ids).
    """

    def __init__(self, token_ids: np.ndarray | torch.Tensor | Sequence[int], context_length: int,
                 split: str = "data"):
        given = type(token_ids).__name__
        if isinstance(token_ids, TokenIds):
            pass
        elif isinstance(token_ids, torch.Tensor):
            dtype = token_ids.dtype
            if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
                raise TypeError(f"token_ids must be integers, got {given} with dtype {dtype}")
            token_ids = token_ids.detach().cpu().numpy()
        elif not isinstance(token_ids, np.ndarray):
            try:
                token_ids = np.asarray(token_ids)
            except ValueError:  # ragged nested lists
                raise ValueError(f"token_ids must be 1-D, got a ragged {given}") from None
            if token_ids.shape == (0,):  # [] is float64 to numpy
                token_ids = token_ids.astype(np.int64)
        if token_ids.ndim == 0:  # a number, a string, None, a dict...
            raise TypeError(f"token_ids must be a 1-D sequence of integers, got {given}")
        if token_ids.dtype.kind not in "iu":  # bools are "b", strings "U"/"S", objects "O"
            raise TypeError(f"token_ids must be integers, got {given} with dtype {token_ids.dtype}")
        if token_ids.ndim != 1:
            raise ValueError(f"token_ids must be 1-D, got {given} with shape {token_ids.shape}")
        if (token_ids.dtype.kind == "i" and not isinstance(token_ids, (np.memmap, TokenIds))
                and len(token_ids) and token_ids.min() < 0):
            raise ValueError(f"token ids must be >= 0, got {token_ids.min()} in {given}")
        if len(token_ids) < context_length + 1:
            raise FastGPTError(
                f"the {split} split has {len(token_ids)} tokens, fewer than context_length + 1 "
                f"= {context_length + 1}: use a larger corpus or a smaller context_length")
        self.token_ids = token_ids
        self.context_length = context_length

    def __len__(self) -> int:
        return len(self.token_ids) - self.context_length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} windows")
        window = torch.from_numpy(
            self.token_ids[np.arange(i, i + self.context_length + 1)].astype(np.int64))
        return window[:-1], window[1:]

    def batch(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The windows at `starts` (B,) int64, each in [0, len(self)): x, y (B, T) int64,
        contiguous, read in one gather (a DataLoader's per-item collate costs ~3 ms per
        32 x 64 batch, more than the rest of a GPU step's host work)."""
        offsets = starts.numpy()[:, None] + np.arange(self.context_length + 1)
        windows = torch.from_numpy(self.token_ids[offsets].astype(np.int64))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


class ShuffledBatches:
    """Each pass draws one permutation of the windows from `generator` (torch.randperm) and
    yields them in batches of batch_size: every window once per pass; a short last batch
    is dropped or kept per drop_last."""

    def __init__(self, dataset: NextTokenDataset, batch_size: int, generator: torch.Generator,
                 pin_memory: bool = False, drop_last: bool = True):
        self.dataset, self.batch_size, self.generator = dataset, batch_size, generator
        self.pin_memory, self.drop_last = pin_memory, drop_last

    def __len__(self) -> int:
        full, rest = divmod(len(self.dataset), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.dataset), generator=self.generator)
        for i in range(len(self)):
            x, y = self.dataset.batch(order[i * self.batch_size:(i + 1) * self.batch_size])
            yield (x.pin_memory(), y.pin_memory()) if self.pin_memory else (x, y)


def make_loader(dataset: NextTokenDataset, batch_size: int, generator: torch.Generator,
                pin_memory: bool = False, drop_last: bool = True) -> ShuffledBatches:
    """Shuffled batches (B, T) drawn with `generator`, so the order is reproducible."""
    return ShuffledBatches(dataset, batch_size, generator, pin_memory, drop_last)


class BatchStream:
    """Endless shuffled training batches, epoch after epoch, that can be saved and resumed.

    Its position is (epoch, batches taken in that epoch) plus the generator's state at the
    epoch's start: resuming replays that epoch's shuffle and skips the batches already taken.
    """

    def __init__(self, dataset: NextTokenDataset, batch_size: int, seed: int, pin_memory: bool):
        self.generator = torch.Generator().manual_seed(seed)
        self.loader = make_loader(dataset, batch_size, self.generator, pin_memory=pin_memory)
        self.epoch, self.batch = 0, 0
        self._epoch_start = self.generator.get_state()
        self._iterator: Iterator | None = None

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._iterator is None:
            self._epoch_start = self.generator.get_state()
            self._iterator = iter(self.loader)
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.epoch, self.batch, self._iterator = self.epoch + 1, 0, None
            return next(self)
        self.batch += 1
        return batch

    # How the order is drawn (ShuffledBatches); before it, a torch DataLoader drew it.
    SAMPLER = "randperm-1"

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "generator": self._epoch_start,
                "sampler": self.SAMPLER}

    def load_state_dict(self, state: dict, log: Log = print) -> None:
        if state.get("sampler") != self.SAMPLER:
            log("this checkpoint's data order was drawn by an older fastgpt: the batches "
                "after the resume differ from those the uninterrupted run would have seen")
        self.generator.set_state(state["generator"])
        self.epoch, self.batch, self._iterator = state["epoch"], 0, None
        for _ in range(state["batch"]):
            next(self)
