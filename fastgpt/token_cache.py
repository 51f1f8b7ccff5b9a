"""The token cache: `prepare` streams a corpus through the tokenizer into shards, and
reads them back (checked) as TokenIds, split 90/10. No torch here: `fastgpt prepare` runs
without importing it (~500 MB of resident memory).

A prepared cache is a directory: meta.json, tokenizer.json and the ids in shards
tokens-000000.bin, tokens-000001.bin, ... (SHARD_TOKENS ids each, the last fewer), raw
uint16 while the tokenizer's vocabulary fits (<= 65,536 tokens), else uint32. The split is
of the whole token stream: the first 90% of the ids train, the last 10% (the last shard, or
the last few) are held out; a window may cross from one shard into the next.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastgpt import FastGPTError
from fastgpt.corpus import Corpus
from fastgpt.fileio import atomic_open, cache_dir, write_atomic
from fastgpt.progress import ByteProgress
from fastgpt.tokenizer import TOKENIZER_TRAIN_BYTES, Tokenizer, ids_dtype, padded_vocab_size

VAL_FRACTION = 0.1
CACHE_FORMAT = 3  # bump when the layout of a prepared cache changes (3: shards, uint32)
CHECK_CHUNK = 1 << 22  # ids per step of the cache check: 8-16 MiB, whatever the file's size
SHARD_TOKENS = 100_000_000  # ids per shard: 200 MB in uint16
# Characters per encode_batch call (64 pieces of 64K): HF tokenizers holds ~110 bytes per
# token of a batch's results (ids, tokens, masks) until it returns, so a batch bounds the
# memory; 64 pieces keep 64 cores busy.
ENCODE_BATCH_CHARS = 1 << 22

Log = Callable[[str], None]


class TokenIds:
    """A prepared cache's ids: its shards (memmaps) as one 1-D sequence, or a range of it.

    ids[i:j] is a TokenIds over the same shards (nothing copied); ids[index] with an array
    of integers gathers them as a numpy array of the shards' dtype, whichever shards they
    fall in; np.asarray(ids) reads the whole range. A training batch's gather (32 windows of
    257 ids, CI machine): 32 us from one memmap; through TokenIds 44 us over one shard, 107
    over two, 164 over ten (a mask per shard the batch touches; with np.unique's sort to
    find them, 214 over two): host time that a GPU step hides.
    """

    def __init__(self, shards: Sequence[np.ndarray], start: int = 0, stop: int | None = None):
        self.shards = list(shards)
        self.bounds = np.cumsum([0] + [len(shard) for shard in self.shards])  # int64
        total = int(self.bounds[-1])
        self.start, self.stop = start, total if stop is None else stop
        if not 0 <= self.start <= self.stop <= total:
            raise ValueError(f"range {self.start}:{self.stop} outside 0:{total}")
        self.dtype = self.shards[0].dtype if self.shards else np.dtype(np.uint16)
        self.ndim, self.shape = 1, (self.stop - self.start,)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index):
        if isinstance(index, slice):
            first, last, step = index.indices(len(self))
            if step != 1:
                raise IndexError("TokenIds slices take no step")
            return TokenIds(self.shards, self.start + first, self.start + max(first, last))
        index = np.asarray(index)
        if index.dtype.kind not in "iu":
            raise IndexError(f"TokenIds takes a slice or integer indices, got {index.dtype}")
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} ids")
        position = index.astype(np.int64) + self.start
        if len(self.shards) == 1:
            return self.shards[0][position]
        shard = np.searchsorted(self.bounds, position, side="right") - 1
        out = np.empty(index.shape, dtype=self.dtype)
        for s in np.flatnonzero(np.bincount(shard.ravel(), minlength=len(self.shards))):
            where = shard == s  # (np.unique would sort: 3x slower)
            out[where] = self.shards[s][position[where] - self.bounds[s]]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.concatenate(list(self.parts()) or [np.zeros(0, self.dtype)])
        return out if dtype is None else out.astype(dtype)

    def parts(self) -> Iterator[np.ndarray]:
        """The range in order, as views of the shards it covers."""
        for s, shard in enumerate(self.shards):
            low = max(self.start - int(self.bounds[s]), 0)
            high = min(self.stop - int(self.bounds[s]), len(shard))
            if low < high:
                yield shard[low:high]


@dataclass
class PreparedData:
    """A tokenized corpus: the tokenizer, the token ids (TokenIds over the shards' memmaps)
    split 90/10, and the cache's meta."""
    tokenizer: Tokenizer
    train_ids: TokenIds
    val_ids: TokenIds
    meta: dict
    directory: Path


def cache_name(corpus: Corpus, vocab_size: int, tokenizer: Tokenizer | None = None,
               tokenizer_train_bytes: int = TOKENIZER_TRAIN_BYTES) -> str:
    """The cache directory's name: <corpus sha256[:16]>-v<vocab_size>, -t<bytes> added when
    the tokenizer trains on part of the corpus only; -tok<its sha256[:16]> for a given
    tokenizer."""
    if tokenizer is not None:
        return f"{corpus.sha256[:16]}-tok{tokenizer.sha256[:16]}"
    part = f"-t{tokenizer_train_bytes}" if corpus.n_bytes > tokenizer_train_bytes else ""
    return f"{corpus.sha256[:16]}-v{vocab_size}{part}"


def prepare(corpus: Corpus, vocab_size: int, data_dir: str | Path | None = None,
            tokenizer: Tokenizer | None = None, log: Log = print,
            tokenizer_train_bytes: int = TOKENIZER_TRAIN_BYTES,
            shard_tokens: int = SHARD_TOKENS) -> PreparedData:
    """Train (or take) the tokenizer, encode the corpus once and cache the ids; memory stays
    bounded whatever the corpus's size (the corpus is streamed in pieces, the ids written
    as they come).

    The cache lives in data_dir/`cache_name(...)`. meta.json is written last, so a cache
    without one is half-written and built again from the start, never read. A cache with
    one is used only if it passes `_read_cache`'s check (meta.json matches the corpus, the
    tokenizer and itself; each shard its size, crc32 and id range); one that fails is
    rebuilt with a one-line note. Passing `tokenizer` (as a resumed run or --tokenizer
    does) reuses a cache only if it was built with that exact tokenizer.
    """
    root = Path(data_dir) if data_dir else cache_dir() / "prepared"
    directory = root / cache_name(corpus, vocab_size, None, tokenizer_train_bytes)
    cached, problem = _read_cache(directory, corpus, vocab_size)
    if tokenizer is not None and (cached is None or cached.tokenizer.sha256 != tokenizer.sha256):
        # another tokenizer's tokens go to a cache of their own; a damaged cache of this very
        # tokenizer (a resumed run's, as a rule) is rebuilt in place, below
        if not (problem and _tokenizer_sha256(directory) == tokenizer.sha256):
            if problem:
                log(f"token cache {directory} failed its check ({problem}); it is not this "
                    f"tokenizer's, so it is left as it is")
            directory = root / cache_name(corpus, vocab_size, tokenizer)
            cached, problem = _read_cache(directory, corpus, vocab_size)
    if cached is not None and (tokenizer is None or cached.tokenizer.sha256 == tokenizer.sha256):
        return cached
    if problem:
        log(f"token cache {directory} failed its check ({problem}): rebuilding it")

    trained_on = None  # bytes the tokenizer learned from (None: it was given)
    if tokenizer is None:
        limit = min(corpus.n_bytes, tokenizer_train_bytes)
        part = ("" if limit == corpus.n_bytes
                else f" (its first {limit / 1e6:,.0f} MB: tokenizer_train_bytes)")
        log(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on {corpus.name}{part}")
        with ByteProgress("tokenizer", limit, log) as progress:
            tokenizer = Tokenizer.train(_counted(corpus.pieces(max_bytes=tokenizer_train_bytes),
                                                 progress), vocab_size)
        trained_on = progress.done  # to the first cut past the limit
        release_free_memory()  # the trainer's word counts, before encoding
    if tokenizer.vocab_size > vocab_size:
        raise FastGPTError(
            f"the tokenizer has {tokenizer.vocab_size:,} tokens but the model's vocab_size is "
            f"{vocab_size:,}: give --vocab_size {padded_vocab_size(tokenizer.vocab_size)} "
            f"(or more)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "meta.json").unlink(missing_ok=True)  # invalidate before the rest
        _remove_temporaries(directory, log)
        for old in directory.glob("tokens*.bin"):  # a previous build's shards
            old.unlink()
        log(f"encoding {corpus.n_bytes / 1e6:,.1f} MB on every core into {directory}")
        shards, forced_cuts = _encode_to_shards(corpus, tokenizer, directory, shard_tokens, log)
        tokenizer.save(directory / "tokenizer.json")
    except OSError as exc:
        raise _write_error(exc, directory, corpus) from None
    n = sum(shard["n_tokens"] for shard in shards)
    n_val = int(n * VAL_FRACTION)
    meta = {
        "format": CACHE_FORMAT,
        "corpus": corpus.name,
        "corpus_sha256": corpus.sha256,
        "corpus_bytes": corpus.n_bytes,
        "corpus_chars": corpus.n_chars,
        "vocab_size": vocab_size,
        "tokenizer_vocab_size": tokenizer.vocab_size,
        "tokenizer_sha256": tokenizer.sha256,
        "tokenizer_trained_on_bytes": trained_on,
        "n_tokens": n,
        "n_train": n - n_val,
        "n_val": n_val,
        "dtype": ids_dtype(tokenizer.vocab_size).name,
        "shards": shards,
        "forced_cuts": forced_cuts,
    }
    try:
        write_atomic(directory / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())
    except OSError as exc:
        raise _write_error(exc, directory, corpus) from None
    log(f"cached {n:,} tokens in {len(shards)} shard(s) in {directory}")
    return _prepared(tokenizer, directory, meta)


def _counted(pieces: Iterable[tuple[str, int]], progress: "ByteProgress") -> Iterator[str]:
    for piece, read in pieces:
        progress.reached(read)
        yield piece


def _encode_to_shards(corpus: Corpus, tokenizer: Tokenizer, directory: Path,
                      shard_tokens: int, log: Log) -> tuple[list[dict], int]:
    """Encode `corpus` in batches of ENCODE_BATCH_CHARS (HF tokenizers spreads a batch over
    every core, and releases the GIL meanwhile: the next batch is read and cut as this one
    encodes) and write the ids to shards. The shards' meta records, and the cuts forced
    where the text had no safe one (see corpus.MAX_PIECE_CHARS)."""
    corpus.forced_cuts = 0
    writer = _ShardWriter(directory, ids_dtype(tokenizer.vocab_size), shard_tokens)
    with ByteProgress("encoding", corpus.n_bytes, log) as progress, \
            ThreadPoolExecutor(max_workers=1) as encoder, writer:
        pending = None  # (the batch being encoded, bytes read when it was complete)
        for number, (batch, read) in enumerate(_batched(corpus.pieces(), ENCODE_BATCH_CHARS)):
            if number == 0 and len(batch) > 1:
                _say_if_cuts_change_ids(tokenizer, batch, log)
            future = encoder.submit(tokenizer.encode_pieces, batch)
            if pending is not None:
                writer.write_all(pending[0].result())
                progress.reached(pending[1])
                release_free_memory()
            pending = (future, read)
        if pending is not None:
            writer.write_all(pending[0].result())
            progress.reached(pending[1])
    return writer.shards, corpus.forced_cuts


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    return getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc's; None elsewhere


def release_free_memory() -> None:
    """Hand the allocator's free pages back to the system (glibc's malloc_trim; nothing
    elsewhere). The threads that encode (HF tokenizers' and ours) leave freed memory spread
    over glibc's per-thread arenas, and a prepare's resident memory crept up batch after
    batch: 100 MB of Python source peaked at 677 MB without it, 460 MB with it (CI
    machine, in-process), its 24 calls taking 0.79 s of the 37 s (2%; the longest 54 ms)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _batched(pieces: Iterable[tuple[str, int]], chars: int) -> Iterator[tuple[list[str], int]]:
    """Pieces gathered into lists of about `chars` characters, with the bytes read by the
    end of each."""
    batch, size, read = [], 0, 0
    for piece, read in pieces:
        batch.append(piece)
        size += len(piece)
        if size >= chars:
            yield batch, read
            batch, size = [], 0
    if batch:
        yield batch, read


def _say_if_cuts_change_ids(tokenizer: Tokenizer, pieces: list[str], log: Log) -> None:
    """Check the first cut between two pieces: the ids of the text around it, encoded whole
    and cut. A tokenizer whose pre-tokenizer or normalizer depends on where a text starts
    (SentencePiece's prefix, say) gives other ids at each cut: said once, not refused."""
    left, right = pieces[0][-256:], pieces[1][:256]
    whole = tokenizer.encode_pieces([left + right])[0]
    cut = np.concatenate(tokenizer.encode_pieces([left, right]))
    if not np.array_equal(whole, cut):
        log("note: this tokenizer encodes text differently at the start of a piece (a "
            "prefix or normalizer): the ids at each cut, every ~64K characters, differ from "
            "encoding the corpus whole")


class _ShardWriter:
    """Writes ids to tokens-000000.bin, tokens-000001.bin, ... (shard_tokens each), each
    through atomic_open (a kill leaves a .tmp file, never a short shard under its name),
    and keeps each shard's record: file, n_tokens, crc32, id_min, id_max."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int):
        self.directory, self.dtype, self.shard_tokens = directory, dtype, shard_tokens
        self.shards: list[dict] = []
        self._open = None  # (atomic_open context, file, record)

    def __enter__(self) -> "_ShardWriter":
        return self

    def write_all(self, arrays: Iterable[np.ndarray]) -> None:
        for ids in arrays:
            while len(ids):
                if self._open is None:
                    name = f"tokens-{len(self.shards):06d}.bin"
                    context = atomic_open(self.directory / name)
                    self._open = (context, context.__enter__(),
                                  {"file": name, "n_tokens": 0, "crc32": 0, "id_min": None,
                                   "id_max": None})
                _, file, record = self._open
                part = ids[:self.shard_tokens - record["n_tokens"]]
                ids = ids[len(part):]
                file.write(memoryview(np.ascontiguousarray(part, self.dtype)))
                record["n_tokens"] += len(part)
                record["crc32"], record["id_min"], record["id_max"] = _checksum_and_range(
                    [part], record["crc32"], record["id_min"], record["id_max"])
                if record["n_tokens"] == self.shard_tokens:
                    self._close(None)

    def _close(self, exc: BaseException | None) -> None:
        context, _, record = self._open
        self._open = None
        if exc is None:
            context.__exit__(None, None, None)
            self.shards.append(record)
        else:
            context.__exit__(type(exc), exc, exc.__traceback__)

    def __exit__(self, kind, exc, traceback) -> None:
        if self._open is not None:
            self._close(exc)


def _write_error(exc: OSError, directory: Path, corpus: Corpus) -> FastGPTError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return FastGPTError(
            f"no space left for the token cache in {directory} ({exc.strerror}; it needs "
            f"about {corpus.n_bytes * 0.8 / 1e6:,.0f} MB for this corpus): free some, or give "
            f"--data_dir on another disk; nothing half-written will be used")
    return FastGPTError(f"cannot write the token cache in {directory}: "
                        f"{exc.strerror or exc}")


def _tokenizer_sha256(directory: Path) -> str | None:
    """The sha256 of the tokenizer.json in a cache directory, None if it cannot be read."""
    try:
        return Tokenizer.load(directory / "tokenizer.json").sha256
    except (OSError, FastGPTError):
        return None


def _remove_temporaries(directory: Path, log: Log) -> None:
    """Remove what an interrupted prepare left in `directory`: atomic_open's temporaries
    (.tokens-000000.bin.*.tmp and the like: up to a whole shard each, after a kill -9).
    The cache's meta.json is already gone here: a prepare running beside this one on the
    same cache would have been rebuilding it too, and its write fails with a one-line
    error."""
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

    The check reads every shard once, in CHECK_CHUNK steps, for its crc32 and id range.
    crc32 because it was the fastest checksum measured and its job is accidental damage (a
    file zeroed, truncated or overwritten), not tampering: whoever can write a shard can
    rewrite meta.json too. Measured on the 2-core CI machine, page cache warm:
      tiny-shakespeare, 575,345 ids (1.15 MB): crc32 0.22-0.27 ms (sha256 0.63-0.65,
        blake2b 1.20), min+max 0.02 ms; the whole _read_cache 1.0-1.1 ms against a prepare
        of 0.96-1.1 s (0.1%)
      a ~1 GB corpus, 400M ids (800 MB): the chunked crc32 + min + max 0.22-0.46 s (two
        sessions; sha256 alone 0.70 s): a small fraction of its prepare
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
    dtype = ids_dtype(tokenizer.vocab_size)
    expected = {"format": CACHE_FORMAT, "corpus_sha256": corpus.sha256,
                "corpus_bytes": corpus.n_bytes, "vocab_size": vocab_size,
                "tokenizer_sha256": tokenizer.sha256, "tokenizer_vocab_size": tokenizer.vocab_size,
                "dtype": dtype.name}
    for key, value in expected.items():
        if meta.get(key) != value:
            return None, f"meta.json has {key} {meta.get(key)!r}, not {value!r}"
    n, n_train, n_val = (meta.get(key) for key in ("n_tokens", "n_train", "n_val"))
    shards = meta.get("shards")
    if not (all(type(count) is int and count >= 0 for count in (n, n_train, n_val))
            and n_val == int(n * VAL_FRACTION) and n_train + n_val == n
            and isinstance(shards, list) and all(isinstance(s, dict) for s in shards)
            and sum(s.get("n_tokens", -1) for s in shards) == n):
        return None, (f"meta.json's n_tokens {n!r}, n_train {n_train!r}, n_val {n_val!r} and "
                      f"shards disagree")
    for number, shard in enumerate(shards):
        name, count = shard.get("file"), shard.get("n_tokens")
        if name != f"tokens-{number:06d}.bin" or type(count) is not int or count < 1:
            return None, f"meta.json's shard {number} is {shard!r}"
        try:
            size = (directory / name).stat().st_size
        except OSError:
            return None, f"{name} is missing"
        if size != dtype.itemsize * count:
            return None, f"{name} has {size:,} bytes, not {dtype.itemsize} x {count:,} tokens"
        ids = np.memmap(directory / name, dtype=dtype, mode="r")
        crc32, id_min, id_max = _checksum_and_range(
            ids[i:i + CHECK_CHUNK] for i in range(0, count, CHECK_CHUNK))
        if id_max >= tokenizer.vocab_size:
            return None, f"{name} holds id {id_max}, beyond the tokenizer's {tokenizer.vocab_size}"
        if crc32 != shard.get("crc32"):
            return None, f"{name} does not match its checksum"
        if (id_min, id_max) != (shard.get("id_min"), shard.get("id_max")):
            return None, (f"{name} holds ids {id_min}..{id_max}, meta.json says "
                          f"{shard.get('id_min')!r}..{shard.get('id_max')!r}")
    return _prepared(tokenizer, directory, meta), ""


def _checksum_and_range(chunks: Iterable[np.ndarray], crc32: int = 0, id_min: int | None = None,
                        id_max: int | None = None) -> tuple[int, int | None, int | None]:
    """The crc32 of the ids in `chunks` (in order; continuing from `crc32`) and their min and
    max (None if there are none)."""
    for chunk in chunks:
        if len(chunk):
            crc32 = zlib.crc32(chunk, crc32)
            low, high = int(chunk.min()), int(chunk.max())
            id_min = low if id_min is None else min(id_min, low)
            id_max = high if id_max is None else max(id_max, high)
    return crc32, id_min, id_max


def _prepared(tokenizer: Tokenizer, directory: Path, meta: dict) -> PreparedData:
    """The shards as memmaps, one TokenIds split at meta's n_train."""
    dtype = np.dtype(meta["dtype"])
    ids = TokenIds([np.memmap(directory / shard["file"], dtype=dtype, mode="r")
                    for shard in meta["shards"]])  # no shard is empty: numpy cannot map one
    n_train = meta["n_train"]
    return PreparedData(tokenizer, ids[:n_train], ids[n_train:], meta, directory)
