"""Corpus sources, the token cache (`prepare`), the 90/10 split and next-token batches
(BatchStream: the training's, resumable).

Corpus sources:
  shakespeare  tiny-shakespeare (1,115,394 bytes), downloaded once into the cache dir and
               verified by sha256
  pystdlib     offline and present everywhere: the top-level .py modules of the running
               Python's standard library, sorted by name and concatenated
  PATH         a UTF-8 text file, or a directory whose files (recursively, sorted by path,
               hidden ones skipped) are all UTF-8 text, concatenated
  auto         shakespeare if cached or downloadable, else pystdlib

Text that is not valid UTF-8 is refused with the file and byte offset, never guessed at or
silently repaired: convert it first (e.g. `iconv -f latin1 -t utf-8`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import sysconfig
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fastgpt import FastGPTError, distributed
from fastgpt.fileio import atomic_open, cache_dir, write_atomic
from fastgpt.tokenizer import Tokenizer

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt")
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_FILE = "tinyshakespeare.txt"  # in cache_dir()
DOWNLOAD_TIMEOUT_S = 20
VAL_FRACTION = 0.1
CACHE_FORMAT = 2  # bump when the layout of a prepared cache changes (2: checksum, id range)
CHECK_CHUNK = 1 << 22  # ids per step of the cache check: 8 MiB, whatever the file's size

Log = Callable[[str], None]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Corpus:
    name: str
    text: str

    @functools.cached_property
    def sha256(self) -> str:
        return sha256_hex(self.text.encode("utf-8"))


def load_corpus(spec: str = "auto", log: Log = print) -> Corpus:
    """Resolve a corpus source (see the module docstring) to its text."""
    if spec == "auto":
        try:
            corpus = _shakespeare(log)
        except FastGPTError as exc:
            log(f"corpus: pystdlib (offline fallback: {exc})")
            return _pystdlib()
        log("corpus: shakespeare (auto: found or downloaded)")
        return corpus
    if spec == "shakespeare":
        try:
            return _shakespeare(log)
        except FastGPTError as exc:  # offline, or a bad download: say how to go on without it
            raise FastGPTError(
                f"{exc}; a copy placed at {cache_dir() / SHAKESPEARE_FILE} is used instead "
                f"(checked by sha256), or --corpus PATH trains on any UTF-8 text file or "
                f"directory (--corpus pystdlib works offline)") from None
    if spec == "pystdlib":
        return _pystdlib()
    return _from_path(Path(spec))


def _shakespeare(log: Log) -> Corpus:
    path = cache_dir() / SHAKESPEARE_FILE
    if path.is_file():
        data = path.read_bytes()
        if sha256_hex(data) == SHAKESPEARE_SHA256:
            return Corpus("shakespeare", data.decode("utf-8"))
        log(f"{path} does not match the expected sha256; downloading it again")
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=DOWNLOAD_TIMEOUT_S) as response:
            data = response.read()
    except (OSError, ValueError) as exc:  # URLError, timeouts and refused connections are OSErrors
        raise FastGPTError(f"cannot download tiny-shakespeare from {SHAKESPEARE_URL} "
                           f"({getattr(exc, 'reason', None) or exc})") from None
    if sha256_hex(data) != SHAKESPEARE_SHA256:
        raise FastGPTError(
            f"the download from {SHAKESPEARE_URL} has the wrong sha256 ({sha256_hex(data)[:16]}…); "
            f"not using it")
    write_atomic(path, data)
    log(f"downloaded tiny-shakespeare to {path}")
    return Corpus("shakespeare", data.decode("utf-8"))


def _pystdlib() -> Corpus:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"), key=lambda p: p.name)
    text = "".join(_read_utf8(p) for p in files)
    if not text:
        raise FastGPTError(f"no .py modules found in the standard library at {stdlib}")
    return Corpus("pystdlib", text)


def _from_path(path: Path) -> Corpus:
    if not path.exists():
        raise FastGPTError(
            f"corpus {str(path)!r} is not a file, a directory, or one of: auto, shakespeare, pystdlib")
    if not (path.is_file() or path.is_dir()):  # /dev/zero would fill memory, a FIFO hang
        raise FastGPTError(f"corpus {path} is not a regular file or a directory (a device, "
                           f"FIFO or socket cannot be a corpus): give a UTF-8 text file or a "
                           f"directory of them")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise FastGPTError(f"corpus directory {path} has no (non-hidden) files")
    else:
        files = [path]
    text = "".join(_read_utf8(p) for p in files)
    if not text:
        raise FastGPTError(f"corpus {path} is empty")
    return Corpus(str(path), text)


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FastGPTError(
            f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            f"convert it first, e.g. iconv -f latin1 -t utf-8") from None


@dataclass
class PreparedData:
    """A tokenized corpus: the tokenizer, the token ids (uint16 memmaps) and the cache meta."""
    tokenizer: Tokenizer
    train_ids: np.ndarray
    val_ids: np.ndarray
    meta: dict
    directory: Path


def prepare(corpus: Corpus, vocab_size: int, data_dir: str | Path | None = None,
            tokenizer: Tokenizer | None = None, log: Log = print) -> PreparedData:
    """Train (or take) the tokenizer, encode the corpus once and cache the ids.

    The cache for (corpus, vocab_size) lives in data_dir/<corpus sha256[:16]>-v<vocab_size>:
    tokens.bin (uint16 ids), tokenizer.json and meta.json. meta.json is written last, so a
    cache without one is half-written and rebuilt, never read. A cache with one is used only
    if it passes `_read_cache`'s check (meta.json matches the corpus, the tokenizer and
    itself; tokens.bin its size, crc32 and id range); one that fails is rebuilt with a
    one-line note. Passing `tokenizer` (as a resumed run does) reuses a cache only if it was
    built with that exact tokenizer.
    """
    root = Path(data_dir) if data_dir else cache_dir() / "prepared"
    directory = root / f"{corpus.sha256[:16]}-v{vocab_size}"
    cached, problem = _read_cache(directory, corpus, vocab_size)
    if tokenizer is not None and (cached is None or cached.tokenizer.sha256 != tokenizer.sha256):
        # another tokenizer's tokens go to a cache of their own; a damaged cache of this very
        # tokenizer (a resumed run's, as a rule) is rebuilt in place, below
        if not (problem and _tokenizer_sha256(directory) == tokenizer.sha256):
            if problem:
                log(f"token cache {directory} failed its check ({problem}); it is not this "
                    f"tokenizer's, so it is left as it is")
            directory = root / f"{corpus.sha256[:16]}-tok{tokenizer.sha256[:16]}"
            cached, problem = _read_cache(directory, corpus, vocab_size)
    if cached is not None and (tokenizer is None or cached.tokenizer.sha256 == tokenizer.sha256):
        return cached
    if problem:
        log(f"token cache {directory} failed its check ({problem}): rebuilding it")

    if tokenizer is None:
        log(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on {corpus.name}")
        tokenizer = Tokenizer.train([corpus.text], vocab_size)
    if tokenizer.vocab_size > vocab_size:
        raise FastGPTError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but vocab_size is {vocab_size}")
    log(f"encoding {len(corpus.text):,} characters")
    ids = np.asarray(tokenizer.encode(corpus.text), dtype=np.uint16)
    n_val = int(len(ids) * VAL_FRACTION)
    crc32, id_min, id_max = _checksum_and_range([ids])
    meta = {
        "format": CACHE_FORMAT,
        "corpus": corpus.name,
        "corpus_sha256": corpus.sha256,
        "corpus_chars": len(corpus.text),
        "vocab_size": vocab_size,
        "tokenizer_vocab_size": tokenizer.vocab_size,
        "tokenizer_sha256": tokenizer.sha256,
        "n_tokens": len(ids),
        "n_train": len(ids) - n_val,
        "n_val": n_val,
        "dtype": "uint16",
        "tokens_crc32": crc32,
        "id_min": id_min,
        "id_max": id_max,
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "meta.json").unlink(missing_ok=True)  # invalidate before touching the rest
    _remove_temporaries(directory, log)
    with atomic_open(directory / "tokens.bin") as f:
        f.write(ids.tobytes())
    tokenizer.save(directory / "tokenizer.json")
    write_atomic(directory / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())
    log(f"cached {len(ids):,} tokens in {directory}")
    return _prepared(tokenizer, directory, meta)


def _tokenizer_sha256(directory: Path) -> str | None:
    """The sha256 of the tokenizer.json in a cache directory, None if it cannot be read."""
    try:
        return Tokenizer.load(directory / "tokenizer.json").sha256
    except (OSError, FastGPTError):
        return None


def _remove_temporaries(directory: Path, log: Log) -> None:
    """Remove what an interrupted prepare left in `directory`: atomic_open's temporaries
    (.tokens.bin.*.tmp and the like: up to a whole tokens.bin each, after a kill -9). The
    cache's meta.json is already gone here: a prepare running beside this one on the same
    cache would have been rebuilding it too, and its write fails with a one-line error."""
    stale = [path for path in directory.glob(".*.tmp") if path.is_file()]
    freed = 0
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            freed += path.stat().st_size
            path.unlink()
    if stale:
        log(f"removed {len(stale)} temporary file(s) ({freed / 1e6:.1f} MB) that an "
            f"interrupted prepare left in {directory}")


def _read_cache(directory: Path, corpus: Corpus, vocab_size: int
                ) -> tuple[PreparedData | None, str]:
    """The cache in `directory` if it passes the check, else None and why ("" if it has no
    meta.json: absent or half-written).

    The check reads tokens.bin once, in CHECK_CHUNK steps, for its crc32 and id range. crc32
    because it was the fastest checksum measured and its job is accidental damage (a file
    zeroed, truncated or overwritten), not tampering: whoever can write tokens.bin can
    rewrite meta.json too. Measured on the 2-core CI machine, page cache warm:
      tiny-shakespeare, 575,345 ids (1.15 MB): crc32 0.22-0.27 ms (sha256 0.63-0.65,
        blake2b 1.20), min+max 0.02 ms; the whole _read_cache 1.0-1.1 ms against a prepare
        of 0.96-1.1 s (0.1%)
      a ~1 GB corpus, 400M ids (800 MB): the chunked crc32 + min + max 0.22-0.46 s (two
        sessions; sha256 alone 0.70 s) against a prepare of ~13-22 min (tokenizer training
        450-580 s/GB, encoding 300-740 s/GB, timed on 1.1 and 8.9 MB): <0.1%
    """
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except FileNotFoundError:
        return None, ""
    except (OSError, ValueError):
        return None, "meta.json is unreadable"
    try:
        tokenizer = Tokenizer.load(directory / "tokenizer.json")
    except (OSError, FastGPTError):
        return None, "tokenizer.json is missing or unreadable"
    if not isinstance(meta, dict):
        return None, "meta.json is not an object"
    expected = {"format": CACHE_FORMAT, "corpus_sha256": corpus.sha256,
                "corpus_chars": len(corpus.text), "vocab_size": vocab_size,
                "tokenizer_sha256": tokenizer.sha256, "tokenizer_vocab_size": tokenizer.vocab_size,
                "dtype": "uint16"}
    for key, value in expected.items():
        if meta.get(key) != value:
            return None, f"meta.json has {key} {meta.get(key)!r}, not {value!r}"
    n, n_train, n_val = (meta.get(key) for key in ("n_tokens", "n_train", "n_val"))
    if not (all(type(count) is int and count >= 0 for count in (n, n_train, n_val))
            and n_val == int(n * VAL_FRACTION) and n_train + n_val == n):
        return None, f"meta.json's n_tokens {n!r}, n_train {n_train!r}, n_val {n_val!r} disagree"
    tokens_path = directory / "tokens.bin"
    try:
        size = tokens_path.stat().st_size
    except OSError:
        return None, "tokens.bin is missing"
    if size != 2 * n:
        return None, f"tokens.bin has {size:,} bytes, not 2 x {n:,} tokens"
    data = _prepared(tokenizer, directory, meta)
    crc32, id_min, id_max = _checksum_and_range(  # train then val: the whole file, in order
        part[i:i + CHECK_CHUNK] for part in (data.train_ids, data.val_ids)
        for i in range(0, len(part), CHECK_CHUNK))
    if id_max is not None and id_max >= tokenizer.vocab_size:
        return None, f"tokens.bin holds id {id_max}, beyond the tokenizer's {tokenizer.vocab_size}"
    if crc32 != meta.get("tokens_crc32"):
        return None, "tokens.bin does not match its checksum"
    if (id_min, id_max) != (meta.get("id_min"), meta.get("id_max")):
        return None, (f"tokens.bin holds ids {id_min}..{id_max}, meta.json says "
                      f"{meta.get('id_min')!r}..{meta.get('id_max')!r}")
    return data, ""


def _checksum_and_range(chunks: Iterable[np.ndarray]) -> tuple[int, int | None, int | None]:
    """The crc32 of the uint16 ids in `chunks` (in order) and their min and max (None if
    there are none)."""
    crc32, id_min, id_max = 0, None, None
    for chunk in chunks:
        if len(chunk):
            crc32 = zlib.crc32(chunk, crc32)
            low, high = int(chunk.min()), int(chunk.max())
            id_min = low if id_min is None else min(id_min, low)
            id_max = high if id_max is None else max(id_max, high)
    return crc32, id_min, id_max


def _prepared(tokenizer: Tokenizer, directory: Path, meta: dict) -> PreparedData:
    """tokens.bin as a uint16 memmap, split at meta's n_train."""
    ids = (np.memmap(directory / "tokens.bin", dtype=np.uint16, mode="r") if meta["n_tokens"]
           else np.zeros(0, dtype=np.uint16))  # numpy cannot memmap an empty file
    n_train = meta["n_train"]
    return PreparedData(tokenizer, ids[:n_train], ids[n_train:], meta, directory)


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
        tokenizer = Tokenizer.from_json(checkpoint["tokenizer"]) if checkpoint else None
        prepared = prepare(corpus, config.vocab_size, config.data_dir or None, tokenizer, log=log)
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

    token_ids: a 1-D sequence of integer ids >= 0: a numpy array, a list or tuple, or a torch
    tensor (made a numpy array once, on the CPU). A memmap is kept, not copied: only the
    windows being read are loaded, and it is not scanned for negative ids (the token cache's
    check covers its ids). Anything else raises TypeError (not a sequence of integers) or
    ValueError (not 1-D, negative ids).
    """

    def __init__(self, token_ids: np.ndarray | torch.Tensor | Sequence[int], context_length: int,
                 split: str = "data"):
        given = type(token_ids).__name__
        if isinstance(token_ids, torch.Tensor):
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
        if (token_ids.dtype.kind == "i" and not isinstance(token_ids, np.memmap)
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
        window = torch.from_numpy(self.token_ids[i:i + self.context_length + 1].astype(np.int64))
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
