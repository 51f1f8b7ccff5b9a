"""Byte-level BPE tokenizer, trained with HuggingFace `tokenizers` (Rust, fast).

The 256 byte symbols are always in the vocabulary, so any text (emoji, CJK, \\r\\n, tabs,
NUL) encodes and decodes back to itself exactly. Merges fill the rest of vocab_size.
A Tokenizer also wraps any HuggingFace tokenizer.json (`--tokenizer PATH`): GPT-2's, say.
Token ids are stored as uint16 while the vocabulary fits (<= 65,536), else as uint32.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from fastgpt import FastGPTError
from fastgpt.fileio import write_atomic

if TYPE_CHECKING:
    import numpy as np

UINT16_VOCAB_SIZE = 1 << 16  # ids up to this many tokens are stored as uint16, beyond as uint32
# A sanity bound, not a storage one: 2**20 tokens is 8x Llama-3's 128,256; at d_model 384 its
# embedding and lm_head alone would be 800M parameters.
MAX_VOCAB_SIZE = 1 << 20
BYTE_ALPHABET_SIZE = 256
# A trained tokenizer learns from the corpus's first this many bytes (all of it, if smaller):
# a few hundred MB of text settle the merges of a small vocabulary, while training's time
# and memory grow with it (HF tokenizers counts every distinct word).
TOKENIZER_TRAIN_BYTES = 500_000_000


def padded_vocab_size(tokens: int) -> int:
    """A model's vocab_size for a tokenizer of `tokens` tokens: up to a multiple of 64 (the
    lm_head's rows then tile evenly: nanoGPT pads GPT-2's 50,257 to 50,304)."""
    return -(-tokens // 64) * 64


def ids_dtype(vocab_size: int) -> np.dtype:
    """The narrowest dtype that stores ids below vocab_size: uint16 or uint32."""
    import numpy as np  # here: the CLI imports this module and answers before numpy loads
    return np.dtype(np.uint16 if vocab_size <= UINT16_VOCAB_SIZE else np.uint32)


class Tokenizer:
    # `tokenizers` is imported where it is used, so that the limits above can be imported
    # on a machine without it (the GPU check runs from a bare source tree).
    def __init__(self, hf_tokenizer):
        self._tok = hf_tokenizer

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 512) -> "Tokenizer":
        """Learn byte-level BPE merges from `texts` until the vocabulary has vocab_size
        entries (fewer if the texts run out of pairs to merge)."""
        if not BYTE_ALPHABET_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
            raise FastGPTError(
                f"vocab_size must be between {BYTE_ALPHABET_SIZE} (the byte alphabet) and "
                f"{MAX_VOCAB_SIZE:,}, got {vocab_size}")
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Long texts are cut where the ids do not change (`next_cut`) and encoded in
        parallel. No special tokens are added (a foreign tokenizer's BOS, say)."""
        if len(text) <= CHUNK_CHARS:
            return self._tok.encode(text, add_special_tokens=False).ids
        ids: list[int] = []
        for piece in self.encode_pieces(list(_chunks(text))):
            ids.extend(piece.tolist())
        return ids

    def encode_pieces(self, pieces: list[str]) -> list[np.ndarray]:
        """The ids of each piece (in parallel, on every core), in ids_dtype(vocab_size)."""
        import numpy as np
        dtype = ids_dtype(self.vocab_size)
        return [np.array(encoding.ids, dtype=dtype) for encoding in
                self._tok.encode_batch_fast(pieces, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes that do not form complete UTF-8 characters decode to U+FFFD."""
        return self._tok.decode(list(ids))

    def to_json(self) -> str:
        return self._tok.to_str()

    @classmethod
    def from_json(cls, text: str) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return cls(HFTokenizer.from_str(text))
        except Exception as exc:  # the Rust side raises a bare Exception
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FastGPTError(f"not a valid tokenizer: {reason}") from None

    @property
    def sha256(self) -> str:
        """Identifies the tokenizer: two tokenizers with equal hashes encode identically."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def save(self, path: str | Path) -> None:
        write_atomic(Path(path), self.to_json().encode("utf-8"))

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise FastGPTError(f"tokenizer file {path} does not exist")
        try:
            return cls.from_json(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise FastGPTError(f"{path} is not a tokenizer file (not UTF-8)") from None
        except FastGPTError as exc:
            raise FastGPTError(f"{path} is not a HuggingFace tokenizer.json "
                               f"({str(exc).removeprefix('not a valid tokenizer: ')})") from None


CHUNK_CHARS = 1 << 16  # characters per piece that long texts are cut into
# Where a cut leaves the ids as they are when the text is encoded whole. After a newline
# that sits between a visible ASCII character and an ASCII letter: the byte-level
# pre-tokenizer makes that newline a piece of its own whether or not the text is cut there
# (after whitespace it would not: "\n\n" at the end of a piece is one piece, two in the
# whole text). The fallback, for text without such newlines (minified code, one-line
# files): before a space between a visible ASCII character and an ASCII letter (" word" is
# a piece of its own either way). tests/test_tokenizer.py checks every cut either rule
# allows in argparse's source and play-like lines against encoding the text around it whole.
_SAFE_CUT = re.compile(r"(?<=[!-~]\n)(?=[A-Za-z])")
_FALLBACK_CUT = re.compile(r"(?<=[!-~])(?= [A-Za-z])")


def next_cut(text: str, start: int, fallback: bool = False, end: int | None = None
             ) -> int | None:
    """The first position in [start, end) where `text` may be cut without changing its ids
    (by the newline rule; fallback=True: by the space rule), None if there is none."""
    found = (_FALLBACK_CUT if fallback else _SAFE_CUT).search(
        text, start, len(text) if end is None else end)
    return found.start() if found else None


def _chunks(text: str) -> Iterable[str]:
    start = 0
    while start < len(text):
        cut = next_cut(text, start + CHUNK_CHARS)
        end = cut if cut is not None else len(text)
        yield text[start:end]
        start = end
