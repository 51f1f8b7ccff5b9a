"""Tests for fastgpt.corpus: the corpus sources, read as a stream (UTF-8 checked, sha256)."""

import hashlib
import os
import re
import sysconfig
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import fastgpt.corpus as corpus_mod
from fastgpt import FastGPTError
from fastgpt.corpus import Corpus, load_corpus
from fastgpt.fileio import cache_dir
from helpers import Lines




# --- load_corpus: pystdlib, files, directories -----------------------------------------------

def test_pystdlib_corpus():
    corpus = load_corpus("pystdlib", log=Lines())
    assert corpus.name == "pystdlib"
    assert len(corpus.read_text()) > 100_000
    assert corpus.sha256 == hashlib.sha256(corpus.read_text().encode("utf-8")).hexdigest()
    assert corpus.n_bytes == len(corpus.read_text().encode("utf-8"))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"), key=lambda p: p.name)
    assert corpus.read_text().startswith(files[0].read_text(encoding="utf-8"))
    assert corpus.read_text().endswith(files[-1].read_text(encoding="utf-8"))
    assert load_corpus("pystdlib").read_text() == corpus.read_text()  # stable


def test_corpus_sha256_is_of_utf8_bytes():
    corpus = Corpus("x", "café 😀\n")
    assert corpus.sha256 == hashlib.sha256("café 😀\n".encode("utf-8")).hexdigest()


def test_corpus_from_file(corpus_file, real_text):
    corpus = load_corpus(str(corpus_file), log=Lines())
    assert corpus.read_text() == real_text
    assert corpus.name == str(corpus_file)
    assert corpus.sha256 == hashlib.sha256(corpus_file.read_bytes()).hexdigest()


def test_corpus_from_file_keeps_crlf_and_nul(tmp_path):
    path = tmp_path / "raw.txt"
    path.write_bytes("a\r\nb\x00c\r\n😀".encode("utf-8"))
    assert load_corpus(str(path)).read_text() == "a\r\nb\x00c\r\n😀"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))


def test_corpus_from_directory_sorted_recursive_hidden_skipped(tmp_path):
    root = tmp_path / "corpus"
    _write(root / "b.txt", "B\n")
    _write(root / "a.txt", "A\n")
    _write(root / "z.md", "Z\n")
    _write(root / "sub" / "c.txt", "C\n")
    _write(root / "sub" / "deeper" / "d.txt", "D\n")
    _write(root / "sub" / "0-empty.txt", "")
    # hidden files and everything inside hidden directories are skipped
    _write(root / ".hidden.txt", "HIDDEN\n")
    _write(root / ".git" / "0.txt", "GIT\n")
    _write(root / "sub" / ".secret", "SECRET\n")
    _write(root / "sub" / ".cache" / "x.txt", "CACHE\n")
    # a non-UTF-8 hidden file would raise if it were read
    (root / ".bin").write_bytes(b"\xff\xfe")
    corpus = load_corpus(str(root), log=Lines())
    assert corpus.read_text() == "A\nB\nC\nD\nZ\n"
    assert corpus.name == str(root)


def test_corpus_directory_inside_a_hidden_directory_is_read(tmp_path):
    root = tmp_path / ".data" / "corpus"
    _write(root / "one.txt", "one\n")
    _write(root / "two.txt", "two\n")
    assert load_corpus(str(root)).read_text() == "one\ntwo\n"


def test_missing_corpus_path_raises(tmp_path):
    missing = tmp_path / "does-not-exist.txt"
    with pytest.raises(FastGPTError) as info:
        load_corpus(str(missing))
    message = str(info.value)
    assert str(missing) in message
    assert "not a file, a directory" in message
    assert "pystdlib" in message  # lists the named sources


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not Path("/dev/zero").exists(),
                    reason="needs a FIFO and /dev/zero")
def test_a_device_or_fifo_is_refused_in_one_line(tmp_path):
    """--corpus /dev/zero read until memory ran out (a MemoryError traceback); a FIFO hung."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for path in ("/dev/zero", str(fifo)):
        with pytest.raises(FastGPTError) as info:
            load_corpus(path)
        assert str(info.value) == (
            f"corpus {path} is not a regular file or a directory (a device, FIFO or socket "
            f"cannot be a corpus): give a UTF-8 text file or a directory of them")


def test_empty_corpus_file_raises(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    with pytest.raises(FastGPTError) as info:
        load_corpus(str(path))
    assert str(info.value) == f"corpus {path} is empty"


def test_empty_corpus_directory_raises(tmp_path):
    root = tmp_path / "empty_dir"
    root.mkdir()
    with pytest.raises(FastGPTError) as info:
        load_corpus(str(root))
    assert str(root) in str(info.value)
    assert "no (non-hidden) files" in str(info.value)


def test_directory_of_only_hidden_files_raises(tmp_path):
    root = tmp_path / "only_hidden"
    _write(root / ".a", "x")
    _write(root / ".dir" / "b.txt", "y")
    with pytest.raises(FastGPTError, match="no \\(non-hidden\\) files"):
        load_corpus(str(root))


def test_directory_of_empty_files_raises(tmp_path):
    root = tmp_path / "blank"
    _write(root / "a.txt", "")
    _write(root / "b.txt", "")
    with pytest.raises(FastGPTError, match="is empty"):
        load_corpus(str(root))


def test_non_utf8_file_raises_with_file_and_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"caf\xe9")
    with pytest.raises(FastGPTError) as info:
        load_corpus(str(path))
    message = str(info.value)
    assert str(path) in message
    assert "not UTF-8" in message
    assert "offset 3" in message
    assert "0xe9" in message


def test_non_utf8_file_in_directory_names_that_file(tmp_path):
    root = tmp_path / "mixed"
    _write(root / "a_good.txt", "fine\n")
    bad = root / "sub" / "b_bad.txt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes("naïve ".encode("utf-8") + b"caf\xe9 au lait")
    with pytest.raises(FastGPTError) as info:
        load_corpus(str(root))
    message = str(info.value)
    assert str(bad) in message
    assert f"offset {len('naïve '.encode('utf-8')) + 3}" in message


# --- load_corpus: shakespeare and auto, without network ---------------------------------------

FAKE_SHAKESPEARE = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 40


@pytest.fixture
def fake_shakespeare(tmp_path, monkeypatch):
    source = tmp_path / "remote" / "input.txt"
    source.parent.mkdir()
    source.write_bytes(FAKE_SHAKESPEARE.encode("utf-8"))
    monkeypatch.setattr(corpus_mod, "SHAKESPEARE_URL", source.as_uri())
    monkeypatch.setattr(corpus_mod, "SHAKESPEARE_SHA256",
                        hashlib.sha256(source.read_bytes()).hexdigest())
    return source


def test_shakespeare_download_is_verified_and_cached(fake_shakespeare, monkeypatch, tmp_path):
    cached = cache_dir() / "tinyshakespeare.txt"
    assert not cached.exists()
    log = Lines()
    corpus = load_corpus("shakespeare", log=log)
    assert corpus.name == "shakespeare"
    assert corpus.read_text() == FAKE_SHAKESPEARE
    assert cached.read_bytes() == FAKE_SHAKESPEARE.encode("utf-8")
    assert cached.parent == tmp_path / "cache"  # the per-test FASTGPT_CACHE
    assert log == [f"downloaded tiny-shakespeare to {cached}"]

    # second call: the source is gone, the cache is used and nothing is downloaded
    monkeypatch.setattr(corpus_mod, "SHAKESPEARE_URL", (tmp_path / "gone.txt").as_uri())
    log2 = Lines()
    again = load_corpus("shakespeare", log=log2)
    assert again.read_text() == FAKE_SHAKESPEARE
    assert again.name == "shakespeare"
    assert log2 == []


def test_shakespeare_wrong_sha256_raises_and_caches_nothing(fake_shakespeare, monkeypatch):
    monkeypatch.setattr(corpus_mod, "SHAKESPEARE_SHA256", "0" * 64)
    with pytest.raises(FastGPTError) as info:
        load_corpus("shakespeare", log=Lines())
    assert "wrong sha256" in str(info.value)
    assert fake_shakespeare.as_uri() in str(info.value)
    assert not (cache_dir() / "tinyshakespeare.txt").exists()


def test_shakespeare_corrupt_cache_is_downloaded_again(fake_shakespeare):
    cached = cache_dir() / "tinyshakespeare.txt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"truncated")
    log = Lines()
    corpus = load_corpus("shakespeare", log=log)
    assert corpus.read_text() == FAKE_SHAKESPEARE
    assert cached.read_bytes() == FAKE_SHAKESPEARE.encode("utf-8")
    assert len(log) == 2
    assert "does not match the expected sha256" in log[0]
    assert log[1].startswith("downloaded tiny-shakespeare")


def test_shakespeare_unreachable_raises(monkeypatch):
    monkeypatch.setattr(corpus_mod, "SHAKESPEARE_URL", "file:///nonexistent/input.txt")
    with pytest.raises(FastGPTError, match="cannot download tiny-shakespeare"):
        load_corpus("shakespeare", log=Lines())


def test_auto_falls_back_to_pystdlib_when_offline(monkeypatch):
    monkeypatch.setattr(corpus_mod, "SHAKESPEARE_URL", "file:///nonexistent/input.txt")
    log = Lines()
    corpus = load_corpus("auto", log=log)
    assert corpus.name == "pystdlib"
    assert corpus.read_text() == load_corpus("pystdlib").read_text()
    assert len(log) == 1
    assert "pystdlib" in log[0]
    assert not (cache_dir() / "tinyshakespeare.txt").exists()


def test_auto_uses_shakespeare_when_downloadable(fake_shakespeare):
    log = Lines()
    corpus = load_corpus("auto", log=log)
    assert corpus.name == "shakespeare"
    assert corpus.read_text() == FAKE_SHAKESPEARE
    assert log.mentions("downloaded tiny-shakespeare")
    assert log[-1] == "corpus: shakespeare (auto: found or downloaded)"


def _offline(monkeypatch) -> list:
    """Every download fails as a refused connection; returns the URLs tried."""
    tried = []

    def refuse(url, *args, **kwargs):
        tried.append(url)
        raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return tried


def test_shakespeare_offline_error_names_the_cache_path_and_corpus_path(monkeypatch):
    tried = _offline(monkeypatch)
    with pytest.raises(FastGPTError) as info:
        load_corpus("shakespeare", log=Lines())
    message = str(info.value)
    path = cache_dir() / "tinyshakespeare.txt"
    assert message == (
        f"cannot download tiny-shakespeare from {corpus_mod.SHAKESPEARE_URL} "
        f"([Errno 111] Connection refused); a copy placed at {path} is used instead (checked "
        f"by sha256), or --corpus PATH trains on any UTF-8 text file or directory "
        f"(--corpus pystdlib works offline)")
    assert "\n" not in message
    assert tried == [corpus_mod.SHAKESPEARE_URL]

    # following the advice: a copy at the path the message names is used, still offline
    named = Path(re.search(r"a copy placed at (.+) is used instead", message).group(1))
    named.parent.mkdir(parents=True)
    named.write_bytes(FAKE_SHAKESPEARE.encode("utf-8"))
    monkeypatch.setattr(corpus_mod, "SHAKESPEARE_SHA256",
                        hashlib.sha256(FAKE_SHAKESPEARE.encode("utf-8")).hexdigest())
    log = Lines()
    corpus = load_corpus("shakespeare", log=log)
    assert corpus.name == "shakespeare" and corpus.read_text() == FAKE_SHAKESPEARE
    assert log == [] and len(tried) == 1  # no second download tried


def test_auto_offline_logs_one_short_line(monkeypatch):
    _offline(monkeypatch)
    log = Lines()
    assert load_corpus("auto", log=log).name == "pystdlib"
    assert log == [f"corpus: pystdlib (offline fallback: cannot download tiny-shakespeare from "
                   f"{corpus_mod.SHAKESPEARE_URL} ([Errno 111] Connection refused))"]


# --- reading as a stream: blocks, pieces, the sha256 ------------------------------------------

def test_a_file_read_in_small_blocks_gives_its_text_sha256_and_sizes(tmp_path, monkeypatch):
    """Reads of 7 bytes cut 2-, 3- and 4-byte characters apart: the decoder carries them."""
    text = "héllo 世界 😀\r\n\tx\x00 e\u0301\n" * 50
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode("utf-8"))
    monkeypatch.setattr(corpus_mod, "READ_BYTES", 7)
    corpus = load_corpus(str(path))
    blocks = list(corpus.blocks())
    assert len(blocks) > 100
    assert "".join(block for block, _ in blocks) == text
    assert all(size == len(block.encode("utf-8")) for block, size in blocks)
    assert corpus.sha256 == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert (corpus.n_bytes, corpus.n_chars) == (len(text.encode("utf-8")), len(text))


@pytest.mark.parametrize("data, offset, byte", [
    ("ab€".encode("utf-8") * 5 + b"\xff" + b"tail", 25, 0xff),  # in a later read
    ("ab€".encode("utf-8") * 5 + "€".encode("utf-8")[:2], 25, 0xe2),  # cut off at the end
    (b"1234567\x80", 7, 0x80),  # a continuation byte with no lead, first in its read
])
def test_non_utf8_offset_is_of_the_file_whatever_the_reads(tmp_path, monkeypatch, data, offset,
                                                          byte):
    path = tmp_path / "bad.txt"
    path.write_bytes(data)
    monkeypatch.setattr(corpus_mod, "READ_BYTES", 7)
    with pytest.raises(FastGPTError) as info:
        load_corpus(str(path))
    assert str(info.value) == (f"{path} is not UTF-8 text (byte 0x{byte:02x} at offset "
                               f"{offset}); convert it first, e.g. iconv -f latin1 -t utf-8")
    with pytest.raises(UnicodeDecodeError) as whole:
        data.decode("utf-8")
    assert whole.value.start == offset  # the offset whole-file decoding reports


def test_a_corpus_file_that_cannot_be_read_is_one_line(tmp_path):
    """A file listed, then gone (or unreadable) when it is streamed."""
    gone = tmp_path / "gone.txt"
    with pytest.raises(FastGPTError) as info:
        Corpus("vanished", files=(gone,)).sha256
    assert str(info.value) == f"cannot read corpus file {gone}: No such file or directory"


def test_pieces_cover_the_text_and_are_cut_after_a_newline_before_a_letter(monkeypatch):
    monkeypatch.setattr(corpus_mod, "READ_BYTES", 1000)  # pieces span many reads
    monkeypatch.setattr(corpus_mod, "FALLBACK_CHARS", 10**9)  # the newline rule alone
    monkeypatch.setattr(corpus_mod, "MAX_PIECE_CHARS", 10**9)
    text = "".join(f"First Citizen {i}:\nBefore we proceed,\n\n  hear me {i}.\n"
                   for i in range(3000))  # cuts before "First" and "Before" only
    corpus = Corpus("x", text)
    pieces = [piece for piece, _ in corpus.pieces(piece_chars=5000)]
    assert "".join(pieces) == text
    assert len(pieces) > 10
    for piece in pieces[:-1]:
        assert len(piece) >= 5000 and piece.endswith("\n") and piece[-2] != "\n"
    assert all(piece[0].isascii() and piece[0].isalpha() for piece in pieces[1:])
    assert corpus.forced_cuts == 0


def test_pieces_fall_back_to_the_space_rule_then_to_a_forced_cut(monkeypatch):
    monkeypatch.setattr(corpus_mod, "FALLBACK_CHARS", 400)
    monkeypatch.setattr(corpus_mod, "MAX_PIECE_CHARS", 1000)
    monkeypatch.setattr(corpus_mod, "READ_BYTES", 300)
    one_line = "x = f(a, b) and g(c)" * 200  # no newline at all: space-rule cuts
    corpus = Corpus("minified", one_line)
    pieces = [piece for piece, _ in corpus.pieces(piece_chars=100)]
    assert "".join(pieces) == one_line and len(pieces) > 10
    assert all(piece[0] == " " and piece[1].isalpha() for piece in pieces[1:])
    assert all(len(piece) <= 400 for piece in pieces)
    assert corpus.forced_cuts == 0
    no_spaces = "abc.def(" * 500  # neither rule ever allows a cut
    corpus = Corpus("dense", no_spaces)
    pieces = [piece for piece, _ in corpus.pieces(piece_chars=100)]
    assert "".join(pieces) == no_spaces
    assert [len(piece) for piece in pieces] == [1000] * 4
    assert corpus.forced_cuts == 3  # the text's end is no cut


def test_pieces_count_bytes_and_stop_after_max_bytes_at_a_cut():
    text = "".join(f"Zwölf {i} €\nBoxen\n" for i in range(5000))  # multi-byte characters
    corpus = Corpus("x", text)
    got = list(corpus.pieces(piece_chars=2000))
    assert [done for _, done in got] == [len("".join(p for p, _ in got[:i + 1]).encode("utf-8"))
                                         for i in range(len(got))]
    assert got[-1][1] == corpus.n_bytes
    first = list(corpus.pieces(piece_chars=2000, max_bytes=10_000))
    assert first == got[:len(first)]
    assert first[-1][1] >= 10_000 > first[-2][1]
