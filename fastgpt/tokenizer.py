"""Byte-level BPE tokenizer, trained with HuggingFace `tokenizers` (Rust, fast).

The 256 byte symbols are always in the vocabulary, so any text (emoji, CJK, \\r\\n, tabs,
NUL) encodes and decodes back to itself exactly. Merges fill the rest of vocab_size.
Token ids are stored as uint16, hence vocab_size <= 65536.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

from fastgpt import FastGPTError
from fastgpt.fileio import write_atomic

MAX_VOCAB_SIZE = 65536  # ids are stored as uint16
BYTE_ALPHABET_SIZE = 256


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
                f"{MAX_VOCAB_SIZE} (token ids are stored as uint16), got {vocab_size}")
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
        """Long texts are cut into chunks and encoded in parallel. Each cut falls after a
        newline that sits between a visible ASCII character and an ASCII letter: the
        byte-level pre-tokenizer makes that newline a piece of its own whether or not the
        text is cut there, so the ids equal those of encoding the text whole. (After
        whitespace it would not: "\n\n" at the end of a chunk is one piece, two in the
        whole text.)"""
        if len(text) <= _CHUNK_CHARS:
            return self._tok.encode(text).ids
        ids: list[int] = []
        for encoding in self._tok.encode_batch(list(_chunks(text))):
            ids.extend(encoding.ids)
        return ids

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
            raise FastGPTError(f"not a valid tokenizer: {exc}") from None

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


_CHUNK_CHARS = 1 << 16
_SAFE_CUT = re.compile(r"(?<=[!-~])\n(?=[A-Za-z])")


def _chunks(text: str) -> Iterable[str]:
    start = 0
    while start < len(text):
        cut = _SAFE_CUT.search(text, start + _CHUNK_CHARS)
        end = cut.end() if cut else len(text)
        yield text[start:end]
        start = end
