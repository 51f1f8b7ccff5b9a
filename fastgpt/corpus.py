"""Corpus sources, read as a stream: a corpus of gigabytes is never held in memory whole.

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

import codecs
import functools
import hashlib
import sysconfig
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fastgpt import FastGPTError
from fastgpt.fileio import cache_dir, write_atomic
from fastgpt.tokenizer import CHUNK_CHARS, next_cut

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt")
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_FILE = "tinyshakespeare.txt"  # in cache_dir()
DOWNLOAD_TIMEOUT_S = 20
READ_BYTES = 1 << 20  # bytes per read of a corpus file
# A piece with no newline cut (`next_cut`) in FALLBACK_CHARS characters (Python source has
# few: most lines start indented) is cut by the space rule; one with neither in
# MAX_PIECE_CHARS is cut where it stands (`Corpus.forced_cuts` counts those: the ids around
# such a cut may differ from encoding the text whole). HF tokenizers takes ~150 bytes of
# memory per byte of a piece while encoding it: MAX_PIECE_CHARS bounds that (~150 MB a core).
FALLBACK_CHARS = 1 << 18
MAX_PIECE_CHARS = 1 << 20

Log = Callable[[str], None]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Corpus:
    """A corpus: its name, and its text held in memory (`text`, small corpora and tests) or
    in `files`, read in order, a block at a time."""
    name: str
    text: str | None = None
    files: tuple[Path, ...] = ()

    def __post_init__(self):
        self.forced_cuts = 0  # pieces() cuts that may change ids (MAX_PIECE_CHARS)

    def blocks(self) -> Iterator[tuple[str, int]]:
        """The text, in order, as (text, its size in UTF-8 bytes) blocks of about READ_BYTES
        bytes. A file that is not UTF-8 raises FastGPTError naming it and the byte offset."""
        if self.text is not None:
            for start in range(0, len(self.text), READ_BYTES):
                block = self.text[start:start + READ_BYTES]
                yield block, _utf8_size(block)
            return
        for path in self.files:
            yield from _read_utf8_blocks(path)

    @functools.cached_property
    def _scan(self) -> tuple[str, int, int]:
        """sha256 of the UTF-8 bytes, their count and the count of characters: one pass."""
        digest, n_bytes, n_chars = hashlib.sha256(), 0, 0
        for block, size in self.blocks():
            digest.update(block.encode("utf-8"))
            n_bytes, n_chars = n_bytes + size, n_chars + len(block)
        return digest.hexdigest(), n_bytes, n_chars

    @property
    def sha256(self) -> str:
        return self._scan[0]

    @property
    def n_bytes(self) -> int:
        return self._scan[1]

    @property
    def n_chars(self) -> int:
        return self._scan[2]

    def read_text(self) -> str:
        """The whole text as one string: for small corpora only."""
        return self.text if self.text is not None else "".join(b for b, _ in self.blocks())

    def pieces(self, piece_chars: int | None = None, max_bytes: int | None = None
               ) -> Iterator[tuple[str, int]]:
        """The text as (piece, UTF-8 bytes of the text up to the piece's end) in pieces of at
        least piece_chars characters (the last may be shorter), each cut where the ids do not
        change (`next_cut`), so that encoding the pieces one by one gives the ids of encoding
        the text whole. piece_chars: CHUNK_CHARS unless given. With max_bytes: stop after
        the piece that reaches that many bytes."""
        piece_chars = piece_chars or CHUNK_CHARS
        buffer, start, done = "", 0, 0
        for block, _ in self.blocks():
            buffer, start = buffer[start:] + block, 0
            while True:
                cut = next_cut(buffer, start + piece_chars)
                if cut is None or cut > start + FALLBACK_CHARS:
                    if len(buffer) <= start + FALLBACK_CHARS:
                        break  # too little text read to tell
                    cut = next_cut(buffer, start + piece_chars, fallback=True,
                                   end=start + MAX_PIECE_CHARS)
                    if cut is None:
                        if len(buffer) <= start + MAX_PIECE_CHARS:
                            break
                        cut = start + MAX_PIECE_CHARS
                        self.forced_cuts += 1
                piece = buffer[start:cut]
                done += _utf8_size(piece)
                yield piece, done
                start = cut
                if max_bytes is not None and done >= max_bytes:
                    return
        if start < len(buffer):
            piece = buffer[start:]
            yield piece, done + _utf8_size(piece)


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))  # isascii() is O(1)


def _read_utf8_blocks(path: Path) -> Iterator[tuple[str, int]]:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with open(path, "rb") as f:
            while True:
                data = f.read(READ_BYTES)
                pending = len(decoder.getstate()[0])  # bytes of a character cut by the read
                try:
                    text = decoder.decode(data, final=not data)
                except UnicodeDecodeError as exc:
                    raise FastGPTError(
                        f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at "
                        f"offset {offset - pending + exc.start}); convert it first, e.g. "
                        f"iconv -f latin1 -t utf-8") from None
                if not data:
                    return
                offset += len(data)
                # the bytes `text` came from: this read's, plus those carried in, less those
                # carried on to the next
                yield text, pending + len(data) - len(decoder.getstate()[0])
    except OSError as exc:
        raise FastGPTError(f"cannot read corpus file {path}: {exc.strerror or exc}") from None


def load_corpus(spec: str = "auto", log: Log = print) -> Corpus:
    """Resolve a corpus source (see the module docstring); nothing is read but its file list
    (and tiny-shakespeare, checked by sha256)."""
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
            return Corpus("shakespeare", files=(path,))
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
    return Corpus("shakespeare", files=(path,))


def _pystdlib() -> Corpus:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = tuple(sorted(stdlib.glob("*.py"), key=lambda p: p.name))
    corpus = Corpus("pystdlib", files=files)
    if not files or not corpus.n_bytes:
        raise FastGPTError(f"no .py modules found in the standard library at {stdlib}")
    return corpus


def _from_path(path: Path) -> Corpus:
    if not path.exists():
        raise FastGPTError(
            f"corpus {str(path)!r} is not a file, a directory, or one of: auto, shakespeare, pystdlib")
    if not (path.is_file() or path.is_dir()):  # /dev/zero would fill memory, a FIFO hang
        raise FastGPTError(f"corpus {path} is not a regular file or a directory (a device, "
                           f"FIFO or socket cannot be a corpus): give a UTF-8 text file or a "
                           f"directory of them")
    if path.is_dir():
        files = tuple(sorted(p for p in path.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(path).parts)))
        if not files:
            raise FastGPTError(f"corpus directory {path} has no (non-hidden) files")
    else:
        files = (path,)
    corpus = Corpus(str(path), files=files)
    if not corpus.n_bytes:  # reads it once: a non-UTF-8 file is refused here, in one line
        raise FastGPTError(f"corpus {path} is empty")
    return corpus
