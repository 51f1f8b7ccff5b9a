"""Tests for fastgpt.tokenizer: training, lossless round trips, the chunked encode path,
vocab-size limits, (de)serialisation and determinism."""

import pytest

from fastgpt import FastGPTError
from fastgpt.tokenizer import CHUNK_CHARS, Tokenizer, _chunks, next_cut


@pytest.fixture(scope="module")
def tok(real_text) -> Tokenizer:
    return Tokenizer.train([real_text], vocab_size=512)


# --- training -------------------------------------------------------------------------------

def test_train_gives_exactly_the_requested_vocab_size(tok):
    assert tok.vocab_size == 512
    assert len(tok._tok.get_vocab()) == 512


def test_train_smallest_vocab_is_the_byte_alphabet(real_text):
    small = Tokenizer.train([real_text[:5000]], vocab_size=256)
    assert small.vocab_size == 256
    text = "plain ascii, ünïcödé and 😀"
    # no merges at all: one token per UTF-8 byte
    assert len(small.encode(text)) == len(text.encode("utf-8"))
    assert small.decode(small.encode(text)) == text


def test_training_twice_gives_the_same_sha256(tok, real_text):
    again = Tokenizer.train([real_text], vocab_size=512)
    assert again.sha256 == tok.sha256
    assert again.to_json() == tok.to_json()
    assert again.encode(real_text[:3000]) == tok.encode(real_text[:3000])


def test_different_vocab_size_gives_a_different_sha256(tok, real_text):
    other = Tokenizer.train([real_text], vocab_size=300)
    assert other.vocab_size == 300
    assert other.sha256 != tok.sha256


@pytest.mark.parametrize("vocab_size, why", [
    (1_048_577, ("1,048,576",)), (2_000_000, ("1,048,576",)),
    (255, ("byte alphabet", "256", "got 255")), (100, ("byte alphabet", "256", "got 100")),
    (0, ("byte alphabet", "256", "got 0")), (-1, ("byte alphabet", "256", "got -1"))])
def test_vocab_size_beyond_the_bound_or_below_the_byte_alphabet_is_refused(vocab_size, why):
    with pytest.raises(FastGPTError) as info:
        Tokenizer.train(["some text"], vocab_size=vocab_size)
    message = str(info.value)
    assert str(vocab_size) in message
    for part in why:
        assert part in message


# --- lossless round trips -------------------------------------------------------------------

TRICKY = [
    "",
    " ",
    "   \t \n ",
    "\n\n\n",
    "\r\n",
    "line one\r\nline two\r\n",
    "\ttab\tseparated\t",
    "\x00",
    "nul\x00inside\x00",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧",
    "中文字符 日本語 한국어",
    "e\u0301 combining acute, a\u0308 umlaut, Z\u0336\u0335 stacked",
    "\ufeffBOM then text",
    "mixed: caf\u00e9 \u00fcber \u0394\u03b5\u03bb\u03c4\u03b1 \u2603 \U0001f600\r\n\x00\t end",
    "\u2028line separator\u2029paragraph separator",
    "tokens<|endoftext|>look special but are not",
]


@pytest.mark.parametrize("text", TRICKY, ids=range(len(TRICKY)))
def test_round_trip_is_lossless(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < 512 for i in ids)
    assert tok.decode(ids) == text
    if text:
        assert ids
    else:
        assert ids == []


def test_round_trip_of_real_text(tok, real_text):
    ids = tok.encode(real_text)
    assert tok.decode(ids) == real_text
    # a trained tokenizer compresses real text well below one token per byte
    assert len(ids) < 0.8 * len(real_text.encode("utf-8"))


def test_round_trip_of_long_tricky_text_above_chunk_threshold(tok):
    unit = "héllo 世界 😀\r\n\tx\x00 e\u0301\nZebra  \n\nAlpha\n"
    text = unit * (3 * CHUNK_CHARS // len(unit) + 1)
    assert len(text) > 3 * CHUNK_CHARS
    assert len(list(_chunks(text))) >= 3  # the chunked path is really taken
    assert tok.decode(tok.encode(text)) == text


def test_chunks_cover_the_text_and_cut_only_before_a_letter(real_text):
    text = real_text * 3
    chunks = list(_chunks(text))
    assert "".join(chunks) == text
    assert len(chunks) >= 3
    for chunk in chunks[:-1]:
        assert len(chunk) > CHUNK_CHARS
        assert chunk.endswith("\n")
    for chunk in chunks[1:]:
        assert chunk[0].isascii() and chunk[0].isalpha()


def test_chunked_encode_equals_encoding_whole(tok, real_text):
    text = real_text * 3
    assert len(text) > CHUNK_CHARS
    assert len(list(_chunks(text))) >= 3
    ids = tok.encode(text)
    assert ids == tok._tok.encode(text).ids
    assert tok.decode(ids) == text


def test_short_text_encode_equals_hf_encode(tok, real_text):
    text = real_text[:CHUNK_CHARS]
    assert tok.encode(text) == tok._tok.encode(text).ids


def test_chunked_encode_equals_whole_around_blank_lines_and_trailing_spaces(real_text):
    tok1000 = Tokenizer.train([real_text], vocab_size=1000)
    assert tok1000._tok.token_to_id("ĊĊ") is not None  # merges that a bad cut would split
    # A cut after whitespace would change the pieces: "\n\n" at a chunk's end is one
    # piece, in the whole text two. Lines with blank lines and trailing spaces everywhere:
    lines = ["a b", "", "Bye  ", "x\t", "", "", "Word", " lead", "end."]
    text = "\n".join(lines[i % len(lines)] for i in range(4 * CHUNK_CHARS // 4))
    assert len(list(_chunks(text))) >= 3
    assert tok1000.decode(tok1000.encode(text)) == text
    assert tok1000.encode(text) == tok1000._tok.encode(text).ids
    blank_then_letter = "a b\n" * (CHUNK_CHARS // 4) + "\nBye"
    assert tok1000.encode(blank_then_letter) == tok1000._tok.encode(blank_then_letter).ids


def test_decoding_a_partial_utf8_character_does_not_raise(tok):
    prefix_ids = tok.encode("ab")
    emoji_ids = tok.encode("😀")
    assert len(emoji_ids) == 4  # one token per byte of U+1F600 (F0 9F 98 80)
    assert tok.decode(prefix_ids + emoji_ids) == "ab😀"
    for k in range(1, 4):
        out = tok.decode(prefix_ids + emoji_ids[:k])
        assert out == "ab\ufffd", k
    # a truncated character in the middle is replaced, the rest survives
    middle = tok.decode(prefix_ids + emoji_ids[:2] + tok.encode(" ok"))
    assert middle.startswith("ab\ufffd")
    assert middle.endswith(" ok")
    assert tok.decode([]) == ""


# --- serialisation --------------------------------------------------------------------------

def test_save_load_round_trip_keeps_sha256_and_encodings(tok, tmp_path, real_text):
    path = tmp_path / "sub" / "tokenizer.json"
    tok.save(path)
    assert path.read_text(encoding="utf-8") == tok.to_json()
    loaded = Tokenizer.load(path)
    assert loaded.sha256 == tok.sha256
    assert loaded.vocab_size == 512
    for text in TRICKY + [real_text[:5000]]:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(tok.encode(text)) == text
    assert not list(path.parent.glob("*.tmp"))  # the atomic write left no temp file


def test_from_json_round_trip(tok):
    again = Tokenizer.from_json(tok.to_json())
    assert again.sha256 == tok.sha256
    assert again.encode("hello world\n") == tok.encode("hello world\n")


def test_load_missing_file_raises(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(FastGPTError) as info:
        Tokenizer.load(path)
    assert str(path) in str(info.value)
    assert "does not exist" in str(info.value)


@pytest.mark.parametrize("garbage", ["garbage", "", "{}", "null", "[1, 2]", '{"model": 3}'])
def test_from_json_of_garbage_raises(garbage):
    with pytest.raises(FastGPTError) as info:
        Tokenizer.from_json(garbage)
    assert str(info.value).startswith("not a valid tokenizer")


def test_load_of_garbage_file_raises(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("this is not json", encoding="utf-8")
    with pytest.raises(FastGPTError) as info:
        Tokenizer.load(path)
    assert str(info.value) == (f"{path} is not a HuggingFace tokenizer.json (expected ident at "
                               f"line 1 column 2)")


@pytest.mark.parametrize("vocab_size", [512, 4096])
def test_every_cut_either_rule_allows_leaves_the_ids_unchanged(real_text, vocab_size):
    """At each cut that next_cut allows (the newline rule, and the space rule that Python
    source falls back on), encoding the text around it whole equals encoding the two sides
    apart: checked at every allowed cut of argparse's source and of play-like lines."""
    play = "".join(f"KING {i}:\nGo to, sir. Thou art {i} and well met!\n\n  Exeunt.\n"
                   for i in range(300))
    text = real_text + play
    tok = Tokenizer.train([text], vocab_size)
    for fallback in (False, True):
        cuts, at = [], 1
        while (cut := next_cut(text, at, fallback=fallback)) is not None:
            cuts.append(cut)
            at = cut + 1
        assert len(cuts) > (500 if fallback else 300)
        for cut in cuts:
            window = text[max(cut - 200, 0):cut + 200]
            k = cut - max(cut - 200, 0)
            assert tok._tok.encode(window).ids == (tok._tok.encode(window[:k]).ids
                                                   + tok._tok.encode(window[k:]).ids), cut
