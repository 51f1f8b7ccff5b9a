"""Tests for fastgpt.data: corpus sources, the prepared-token cache, the dataset and loader."""

import hashlib
import json
import os
import re
import sysconfig
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import fastgpt.data as data_mod
from fastgpt import FastGPTError
from fastgpt.data import (BatchStream, Corpus, NextTokenDataset, cache_dir, load_corpus,
                          make_loader, prepare)
from fastgpt.tokenizer import Tokenizer


class Lines(list):
    """A `log` callable that collects the lines."""

    def __call__(self, line: str) -> None:
        assert isinstance(line, str)
        self.append(line)

    def mentions(self, word: str) -> bool:
        return any(word in line for line in self)


# --- load_corpus: pystdlib, files, directories -----------------------------------------------

def test_pystdlib_corpus():
    corpus = load_corpus("pystdlib", log=Lines())
    assert corpus.name == "pystdlib"
    assert len(corpus.text) > 100_000
    assert corpus.sha256 == hashlib.sha256(corpus.text.encode("utf-8")).hexdigest()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"), key=lambda p: p.name)
    assert corpus.text.startswith(files[0].read_text(encoding="utf-8"))
    assert corpus.text.endswith(files[-1].read_text(encoding="utf-8"))
    assert load_corpus("pystdlib").text == corpus.text  # stable


def test_corpus_sha256_is_of_utf8_bytes():
    corpus = Corpus("x", "café 😀\n")
    assert corpus.sha256 == hashlib.sha256("café 😀\n".encode("utf-8")).hexdigest()


def test_corpus_from_file(corpus_file, real_text):
    corpus = load_corpus(str(corpus_file), log=Lines())
    assert corpus.text == real_text
    assert corpus.name == str(corpus_file)
    assert corpus.sha256 == hashlib.sha256(corpus_file.read_bytes()).hexdigest()


def test_corpus_from_file_keeps_crlf_and_nul(tmp_path):
    path = tmp_path / "raw.txt"
    path.write_bytes("a\r\nb\x00c\r\n😀".encode("utf-8"))
    assert load_corpus(str(path)).text == "a\r\nb\x00c\r\n😀"


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
    assert corpus.text == "A\nB\nC\nD\nZ\n"
    assert corpus.name == str(root)


def test_corpus_directory_inside_a_hidden_directory_is_read(tmp_path):
    root = tmp_path / ".data" / "corpus"
    _write(root / "one.txt", "one\n")
    _write(root / "two.txt", "two\n")
    assert load_corpus(str(root)).text == "one\ntwo\n"


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
    monkeypatch.setattr(data_mod, "SHAKESPEARE_URL", source.as_uri())
    monkeypatch.setattr(data_mod, "SHAKESPEARE_SHA256",
                        hashlib.sha256(source.read_bytes()).hexdigest())
    return source


def test_shakespeare_download_is_verified_and_cached(fake_shakespeare, monkeypatch, tmp_path):
    cached = cache_dir() / "tinyshakespeare.txt"
    assert not cached.exists()
    log = Lines()
    corpus = load_corpus("shakespeare", log=log)
    assert corpus.name == "shakespeare"
    assert corpus.text == FAKE_SHAKESPEARE
    assert cached.read_bytes() == FAKE_SHAKESPEARE.encode("utf-8")
    assert cached.parent == tmp_path / "cache"  # the per-test FASTGPT_CACHE
    assert log == [f"downloaded tiny-shakespeare to {cached}"]

    # second call: the source is gone, the cache is used and nothing is downloaded
    monkeypatch.setattr(data_mod, "SHAKESPEARE_URL", (tmp_path / "gone.txt").as_uri())
    log2 = Lines()
    again = load_corpus("shakespeare", log=log2)
    assert again.text == FAKE_SHAKESPEARE
    assert again.name == "shakespeare"
    assert log2 == []


def test_shakespeare_wrong_sha256_raises_and_caches_nothing(fake_shakespeare, monkeypatch):
    monkeypatch.setattr(data_mod, "SHAKESPEARE_SHA256", "0" * 64)
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
    assert corpus.text == FAKE_SHAKESPEARE
    assert cached.read_bytes() == FAKE_SHAKESPEARE.encode("utf-8")
    assert len(log) == 2
    assert "does not match the expected sha256" in log[0]
    assert log[1].startswith("downloaded tiny-shakespeare")


def test_shakespeare_unreachable_raises(monkeypatch):
    monkeypatch.setattr(data_mod, "SHAKESPEARE_URL", "file:///nonexistent/input.txt")
    with pytest.raises(FastGPTError, match="cannot download tiny-shakespeare"):
        load_corpus("shakespeare", log=Lines())


def test_auto_falls_back_to_pystdlib_when_offline(monkeypatch):
    monkeypatch.setattr(data_mod, "SHAKESPEARE_URL", "file:///nonexistent/input.txt")
    log = Lines()
    corpus = load_corpus("auto", log=log)
    assert corpus.name == "pystdlib"
    assert corpus.text == load_corpus("pystdlib").text
    assert len(log) == 1
    assert "pystdlib" in log[0]
    assert not (cache_dir() / "tinyshakespeare.txt").exists()


def test_auto_uses_shakespeare_when_downloadable(fake_shakespeare):
    log = Lines()
    corpus = load_corpus("auto", log=log)
    assert corpus.name == "shakespeare"
    assert corpus.text == FAKE_SHAKESPEARE
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
        f"cannot download tiny-shakespeare from {data_mod.SHAKESPEARE_URL} "
        f"([Errno 111] Connection refused); a copy placed at {path} is used instead (checked "
        f"by sha256), or --corpus PATH trains on any UTF-8 text file or directory "
        f"(--corpus pystdlib works offline)")
    assert "\n" not in message
    assert tried == [data_mod.SHAKESPEARE_URL]

    # following the advice: a copy at the path the message names is used, still offline
    named = Path(re.search(r"a copy placed at (.+) is used instead", message).group(1))
    named.parent.mkdir(parents=True)
    named.write_bytes(FAKE_SHAKESPEARE.encode("utf-8"))
    monkeypatch.setattr(data_mod, "SHAKESPEARE_SHA256",
                        hashlib.sha256(FAKE_SHAKESPEARE.encode("utf-8")).hexdigest())
    log = Lines()
    corpus = load_corpus("shakespeare", log=log)
    assert corpus.name == "shakespeare" and corpus.text == FAKE_SHAKESPEARE
    assert log == [] and len(tried) == 1  # no second download tried


def test_auto_offline_logs_one_short_line(monkeypatch):
    _offline(monkeypatch)
    log = Lines()
    assert load_corpus("auto", log=log).name == "pystdlib"
    assert log == [f"corpus: pystdlib (offline fallback: cannot download tiny-shakespeare from "
                   f"{data_mod.SHAKESPEARE_URL} ([Errno 111] Connection refused))"]


# --- prepare ----------------------------------------------------------------------------------

@pytest.fixture
def small_corpus(real_text) -> Corpus:
    return Corpus("small", real_text[:20_000])


def test_prepare_split_meta_and_lossless(real_text, tmp_path):
    corpus = Corpus("argparse", real_text)
    log = Lines()
    data = prepare(corpus, 512, tmp_path / "prepared", log=log)
    assert log.mentions("training")
    assert log.mentions("encoding")

    assert data.directory == tmp_path / "prepared" / f"{corpus.sha256[:16]}-v512"
    assert sorted(p.name for p in data.directory.iterdir()) == [
        "meta.json", "tokenizer.json", "tokens.bin"]
    for ids in (data.train_ids, data.val_ids):
        assert isinstance(ids, np.memmap)
        assert ids.dtype == np.uint16

    n = data.meta["n_tokens"]
    n_val = int(n * 0.1)
    assert len(data.train_ids) == n - n_val
    assert len(data.val_ids) == n_val
    assert data.meta["n_train"] == n - n_val
    assert data.meta["n_val"] == n_val
    assert data.meta["corpus_sha256"] == corpus.sha256
    assert data.meta["tokenizer_sha256"] == data.tokenizer.sha256
    assert data.meta["vocab_size"] == 512
    assert data.meta["dtype"] == "uint16"
    assert json.loads((data.directory / "meta.json").read_text()) == data.meta
    assert (data.directory / "tokens.bin").stat().st_size == 2 * n

    all_ids = np.concatenate([data.train_ids, data.val_ids]).tolist()
    assert all_ids == data.tokenizer.encode(real_text)
    assert max(all_ids) < 512
    assert data.tokenizer.decode(all_ids) == real_text


def test_prepare_default_dir_is_in_cache(small_corpus):
    data = prepare(small_corpus, 300, log=Lines())
    assert data.directory == cache_dir() / "prepared" / f"{small_corpus.sha256[:16]}-v300"


def test_prepare_second_call_reuses_cache(small_corpus, tmp_path):
    root = tmp_path / "prepared"
    first_log = Lines()
    first = prepare(small_corpus, 300, root, log=first_log)
    assert first_log.mentions("training") and first_log.mentions("encoding")
    tokens = first.directory / "tokens.bin"
    mtime = tokens.stat().st_mtime_ns

    second_log = Lines()
    second = prepare(small_corpus, 300, root, log=second_log)
    assert not second_log.mentions("training")
    assert not second_log.mentions("encoding")
    assert second.directory == first.directory
    assert second.meta == first.meta
    assert second.tokenizer.sha256 == first.tokenizer.sha256
    assert np.array_equal(second.train_ids, first.train_ids)
    assert np.array_equal(second.val_ids, first.val_ids)
    assert tokens.stat().st_mtime_ns == mtime  # not rewritten


def test_prepare_different_corpus_or_vocab_uses_different_directory(small_corpus, real_text,
                                                                    tmp_path):
    root = tmp_path / "prepared"
    other = Corpus("other", real_text[20_000:40_000])
    a = prepare(small_corpus, 300, root, log=Lines())
    b = prepare(other, 300, root, log=Lines())
    c = prepare(small_corpus, 320, root, log=Lines())
    assert len({a.directory, b.directory, c.directory}) == 3
    assert b.meta["corpus_sha256"] == other.sha256
    assert c.meta["vocab_size"] == 320
    assert c.tokenizer.vocab_size == 320
    assert a.tokenizer.sha256 != c.tokenizer.sha256
    assert b.tokenizer.decode(np.concatenate([b.train_ids, b.val_ids]).tolist()) == other.text
    # the first cache is still intact and used
    log = Lines()
    again = prepare(small_corpus, 300, root, log=log)
    assert again.directory == a.directory
    assert not log.mentions("training") and not log.mentions("encoding")


@pytest.mark.parametrize("damage", ["delete_meta", "truncate_tokens", "garbage_meta"])
def test_prepare_rebuilds_half_written_cache(small_corpus, tmp_path, damage):
    root = tmp_path / "prepared"
    first = prepare(small_corpus, 300, root, log=Lines())
    directory, meta = first.directory, dict(first.meta)
    expected = np.concatenate([first.train_ids, first.val_ids]).copy()
    del first  # drop the memmap before touching its file
    if damage == "delete_meta":
        (directory / "meta.json").unlink()
    elif damage == "truncate_tokens":
        with open(directory / "tokens.bin", "r+b") as f:
            f.truncate(2 * (meta["n_tokens"] // 2))
    else:
        (directory / "meta.json").write_text("{not json")

    log = Lines()
    rebuilt = prepare(small_corpus, 300, root, log=log)
    assert log.mentions("encoding")  # rebuilt, not read
    # without meta.json the cache is half-written: rebuilt as if absent; else with a note
    assert log.mentions("failed its check") == (damage != "delete_meta")
    assert rebuilt.directory == directory
    assert rebuilt.meta == meta
    assert (directory / "tokens.bin").stat().st_size == 2 * meta["n_tokens"]
    assert np.array_equal(np.concatenate([rebuilt.train_ids, rebuilt.val_ids]), expected)
    assert rebuilt.tokenizer.decode(expected.tolist()) == small_corpus.text


def test_prepare_with_identical_tokenizer_reuses_cache(small_corpus, tmp_path):
    root = tmp_path / "prepared"
    first = prepare(small_corpus, 300, root, log=Lines())
    same = Tokenizer.from_json(first.tokenizer.to_json())
    log = Lines()
    second = prepare(small_corpus, 300, root, tokenizer=same, log=log)
    assert log == []
    assert second.directory == first.directory
    assert second.meta == first.meta
    assert sorted(p.name for p in root.iterdir()) == [first.directory.name]


def test_prepare_with_different_tokenizer_encodes_with_it(small_corpus, tmp_path):
    root = tmp_path / "prepared"
    default = prepare(small_corpus, 512, root, log=Lines())
    tok300 = Tokenizer.train([small_corpus.text], vocab_size=300)
    assert tok300.sha256 != default.tokenizer.sha256

    log = Lines()
    data = prepare(small_corpus, 512, root, tokenizer=tok300, log=log)
    assert not log.mentions("training")
    assert log.mentions("encoding")
    assert data.directory != default.directory
    assert data.directory.name == f"{small_corpus.sha256[:16]}-tok{tok300.sha256[:16]}"
    assert data.tokenizer.sha256 == tok300.sha256
    assert data.meta["tokenizer_sha256"] == tok300.sha256
    assert data.meta["tokenizer_vocab_size"] == 300
    ids = np.concatenate([data.train_ids, data.val_ids]).tolist()
    assert ids == tok300.encode(small_corpus.text)
    assert max(ids) < 300
    assert ids != np.concatenate([default.train_ids, default.val_ids]).tolist()

    # both caches stay valid: each call gets its own back without re-encoding
    log_a, log_b = Lines(), Lines()
    again_default = prepare(small_corpus, 512, root, log=log_a)
    again_tok = prepare(small_corpus, 512, root, tokenizer=tok300, log=log_b)
    assert log_a == [] and log_b == []
    assert again_default.directory == default.directory
    assert again_tok.directory == data.directory


def test_prepare_removes_what_a_killed_prepare_left(small_corpus, tmp_path):
    """A prepare killed (kill -9) while writing leaves atomic_open's temporary beside a
    cache without meta.json; the next prepare of that cache removes it, saying so."""
    root = tmp_path / "prepared"
    directory = prepare(small_corpus, 300, root, log=Lines()).directory
    (directory / "meta.json").unlink()  # as the killed prepare had left it
    left = [directory / ".tokens.bin.k1ll3d.tmp", directory / ".meta.json.x7.tmp"]
    left[0].write_bytes(b"\0" * 200_000)
    left[1].write_bytes(b"{")
    log = Lines()
    again = prepare(small_corpus, 300, root, log=log)
    assert not any(path.exists() for path in left)
    assert log.mentions(f"removed 2 temporary file(s) (0.2 MB) that an interrupted prepare "
                        f"left in {directory}")
    assert sorted(p.name for p in directory.iterdir()) == ["meta.json", "tokenizer.json",
                                                           "tokens.bin"]
    assert again.meta["n_tokens"] > 0


def test_a_damaged_cache_met_by_a_resumed_run_is_rebuilt_in_place_with_a_note(small_corpus,
                                                                               tmp_path):
    root = tmp_path / "prepared"
    first = prepare(small_corpus, 300, root, log=Lines())
    directory, n = first.directory, first.meta["n_tokens"]
    expected = np.concatenate([first.train_ids, first.val_ids]).copy()
    resumed = Tokenizer.from_json(first.tokenizer.to_json())  # what a checkpoint holds
    del first
    _overwrite_tokens(directory, np.zeros(n))
    log = Lines()
    data = prepare(small_corpus, 300, root, tokenizer=resumed, log=log)
    assert data.directory == directory  # in place, not a second cache beside it
    assert sorted(p.name for p in root.iterdir()) == [directory.name]
    assert log.mentions("failed its check (tokens.bin does not match its checksum): "
                        "rebuilding it")
    assert np.array_equal(np.concatenate([data.train_ids, data.val_ids]), expected)
    # a damaged cache of another tokenizer is said and left; the run's tokens go apart
    del data
    _overwrite_tokens(directory, np.zeros(n))
    other = Tokenizer.train([small_corpus.text], vocab_size=290)
    log = Lines()
    apart = prepare(small_corpus, 300, root, tokenizer=other, log=log)
    assert apart.directory.name == f"{small_corpus.sha256[:16]}-tok{other.sha256[:16]}"
    assert log.mentions(f"token cache {directory} failed its check (tokens.bin does not "
                        f"match its checksum); it is not this tokenizer's, so it is left")


def test_prepare_refuses_tokenizer_larger_than_vocab_size(small_corpus, tmp_path):
    tok = Tokenizer.train([small_corpus.text], vocab_size=320)
    with pytest.raises(FastGPTError, match="320 tokens but vocab_size is 300"):
        prepare(small_corpus, 300, tmp_path / "prepared", tokenizer=tok, log=Lines())


def test_prepare_records_checksum_and_id_range_and_reuses_an_intact_cache(
        small_corpus, tmp_path, monkeypatch):
    root = tmp_path / "prepared"
    first = prepare(small_corpus, 300, root, log=Lines())
    tokens = (first.directory / "tokens.bin").read_bytes()
    ids = np.frombuffer(tokens, dtype=np.uint16)
    assert first.meta["format"] == data_mod.CACHE_FORMAT == 2
    assert first.meta["tokens_crc32"] == zlib.crc32(tokens)
    assert (first.meta["id_min"], first.meta["id_max"]) == (ids.min(), ids.max())
    assert first.meta["id_max"] < first.tokenizer.vocab_size

    def no_training(*args, **kwargs):
        raise AssertionError("the tokenizer was trained again")

    monkeypatch.setattr(Tokenizer, "train", no_training)
    monkeypatch.setattr(data_mod, "CHECK_CHUNK", 1000)  # the check reads in many steps
    log = Lines()
    again = prepare(small_corpus, 300, root, log=log)
    assert log == []  # no note, no training, no encoding
    assert again.meta == first.meta
    assert isinstance(again.train_ids, np.memmap)
    assert np.array_equal(np.concatenate([again.train_ids, again.val_ids]), ids)


def _edit_meta(directory: Path, **changes) -> None:
    meta = json.loads((directory / "meta.json").read_text())
    meta.update(changes)
    for key in [key for key, value in changes.items() if value is None]:
        del meta[key]
    (directory / "meta.json").write_text(json.dumps(meta))


def _overwrite_tokens(directory: Path, ids: np.ndarray) -> None:
    with open(directory / "tokens.bin", "r+b") as f:  # in place, same size
        f.write(ids.astype(np.uint16).tobytes())


@pytest.mark.parametrize("damage", ["zeroed", "ids_beyond_vocab", "ids_beyond_vocab_new_crc32",
                                    "two_ids_swapped", "edited_n_train", "edited_id_max",
                                    "old_format"])
def test_prepare_rebuilds_a_cache_that_fails_its_check(small_corpus, tmp_path, monkeypatch,
                                                       damage):
    root = tmp_path / "prepared"
    first = prepare(small_corpus, 300, root, log=Lines())
    directory, meta = first.directory, dict(first.meta)
    expected = np.concatenate([first.train_ids, first.val_ids]).copy()
    del first  # drop the memmap before touching its file
    n = meta["n_tokens"]
    if damage == "zeroed":
        _overwrite_tokens(directory, np.zeros(n))
        reason = "tokens.bin does not match its checksum"
    elif damage.startswith("ids_beyond_vocab"):
        garbage = np.full(n, 60000)
        _overwrite_tokens(directory, garbage)
        if damage.endswith("new_crc32"):  # the range check alone catches it
            _edit_meta(directory, tokens_crc32=zlib.crc32(garbage.astype(np.uint16).tobytes()))
        reason = "tokens.bin holds id 60000, beyond the tokenizer's 300"
    elif damage == "two_ids_swapped":  # same size, same id range: only the checksum differs
        i = int(np.flatnonzero(expected[:-1] != expected[1:])[-1])  # in the last step
        swapped = expected.copy()
        swapped[[i, i + 1]] = swapped[[i + 1, i]]
        _overwrite_tokens(directory, swapped)
        reason = "tokens.bin does not match its checksum"
    elif damage == "edited_n_train":  # the train split would be "too small" for a run
        _edit_meta(directory, n_train=3)
        reason = f"meta.json's n_tokens {n}, n_train 3, n_val {meta['n_val']} disagree"
    elif damage == "edited_id_max":
        _edit_meta(directory, id_max=meta["id_max"] + 1)
        reason = (f"tokens.bin holds ids {meta['id_min']}..{meta['id_max']}, meta.json says "
                  f"{meta['id_min']}..{meta['id_max'] + 1}")
    else:  # what fastgpt wrote before the cache recorded a checksum
        _edit_meta(directory, format=1, tokens_crc32=None, id_min=None, id_max=None)
        reason = "meta.json has format 1, not 2"

    monkeypatch.setattr(data_mod, "CHECK_CHUNK", 1000)
    log = Lines()
    rebuilt = prepare(small_corpus, 300, root, log=log)
    assert log[:1] == [f"token cache {directory} failed its check ({reason}): rebuilding it"]
    assert sum("failed its check" in line for line in log) == 1
    assert log.mentions("encoding")
    assert rebuilt.directory == directory
    assert rebuilt.meta == meta
    assert np.array_equal(np.concatenate([rebuilt.train_ids, rebuilt.val_ids]), expected)
    assert len(NextTokenDataset(rebuilt.train_ids, 64, "train")) == meta["n_train"] - 64
    again = Lines()
    prepare(small_corpus, 300, root, log=again)
    assert again == []  # the rebuilt cache passes


# --- NextTokenDataset -------------------------------------------------------------------------

def test_dataset_items_are_shifted_windows():
    ids = (np.arange(50, dtype=np.uint16) * 7 + 3) % 1000
    ids = ids.astype(np.uint16)
    ds = NextTokenDataset(ids, context_length=8)
    assert len(ds) == 50 - 8
    for i in (0, 1, 17, len(ds) - 1):
        x, y = ds[i]
        assert x.dtype == torch.int64 and y.dtype == torch.int64
        assert x.shape == (8,) and y.shape == (8,)
        assert x.tolist() == ids[i:i + 8].tolist()
        assert y.tolist() == ids[i + 1:i + 9].tolist()


def test_dataset_on_memmap(tmp_path):
    values = np.array([65535, 0, 1, 40000, 2, 3, 65534, 9, 8, 7], dtype=np.uint16)
    path = tmp_path / "tokens.bin"
    path.write_bytes(values.tobytes())
    mm = np.memmap(path, dtype=np.uint16, mode="r")
    ds = NextTokenDataset(mm, context_length=4, split="train")
    assert len(ds) == 6
    x, y = ds[0]
    assert x.tolist() == [65535, 0, 1, 40000]  # uint16 values widened, not wrapped
    assert y.tolist() == [0, 1, 40000, 2]
    x, y = ds[5]
    assert x.tolist() == [3, 65534, 9, 8]
    assert y.tolist() == [65534, 9, 8, 7]
    assert x.dtype == torch.int64


@pytest.mark.parametrize("index", [6, 7, 100, -1, -6])
def test_dataset_index_out_of_range_raises_index_error(index):
    ds = NextTokenDataset(np.arange(10, dtype=np.uint16), context_length=4)
    with pytest.raises(IndexError):
        ds[index]


def test_dataset_exactly_context_plus_one_tokens_has_one_item():
    ds = NextTokenDataset(np.arange(5, dtype=np.uint16), context_length=4)
    assert len(ds) == 1
    x, y = ds[0]
    assert x.tolist() == [0, 1, 2, 3] and y.tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("n", [0, 3, 4])
def test_dataset_split_too_short_raises(n):
    with pytest.raises(FastGPTError) as info:
        NextTokenDataset(np.arange(n, dtype=np.uint16), context_length=4, split="val")
    message = str(info.value)
    assert "context_length" in message
    assert f"the val split has {n} tokens" in message
    assert "= 5" in message


def _memmap_of(ids: np.ndarray, tmp_path: Path) -> np.memmap:
    path = tmp_path / "ids.bin"
    path.write_bytes(ids.astype(np.uint16).tobytes())
    return np.memmap(path, dtype=np.uint16, mode="r")


@pytest.mark.parametrize("kind", [
    "list", "tuple", "int64 array", "int32 array", "uint16 array", "memmap", "int64 tensor",
    "int32 tensor", "uint16 tensor",
    pytest.param("cuda tensor", marks=[
        pytest.mark.gpu, pytest.mark.gpu_quick,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_dataset_accepts_any_1d_integer_sequence(kind, tmp_path):
    ids = ((np.arange(40) * 37 + 11) % 500).astype(np.uint16)
    token_ids = {
        "list": lambda: ids.tolist(),
        "tuple": lambda: tuple(ids.tolist()),
        "int64 array": lambda: ids.astype(np.int64),
        "int32 array": lambda: ids.astype(np.int32),
        "uint16 array": lambda: ids,
        "memmap": lambda: _memmap_of(ids, tmp_path),
        "int64 tensor": lambda: torch.tensor(ids.tolist()),
        "int32 tensor": lambda: torch.tensor(ids.tolist(), dtype=torch.int32),
        "uint16 tensor": lambda: torch.tensor(ids.tolist()).to(torch.uint16),
        "cuda tensor": lambda: torch.tensor(ids.tolist(), device="cuda"),
    }[kind]()
    reference = NextTokenDataset(ids, context_length=6)
    ds = NextTokenDataset(token_ids, context_length=6)
    assert len(ds) == len(reference) == 34
    for i in range(len(ds)):
        (x, y), (rx, ry) = ds[i], reference[i]
        assert x.dtype == y.dtype == torch.int64
        assert torch.equal(x, rx) and torch.equal(y, ry)
    starts = torch.tensor([0, 9, 33, 9])
    for got, want in zip(ds.batch(starts), reference.batch(starts)):
        assert got.dtype == torch.int64 and torch.equal(got, want)
    assert isinstance(ds.token_ids, np.ndarray)  # a tensor is converted once, not per batch
    if kind == "memmap":
        assert ds.token_ids is token_ids  # kept as it is, not copied


def test_dataset_empty_list_is_a_too_short_split():
    with pytest.raises(FastGPTError, match="the train split has 0 tokens"):
        NextTokenDataset([], context_length=4, split="train")


@pytest.mark.parametrize("token_ids, error, message", [
    ([0.0, 1.0, 2.0, 3.0, 4.0, 5.0], TypeError,
     "token_ids must be integers, got list with dtype float64"),
    (np.arange(6, dtype=np.float32), TypeError,
     "token_ids must be integers, got ndarray with dtype float32"),
    (torch.arange(6, dtype=torch.float32), TypeError,
     "token_ids must be integers, got Tensor with dtype torch.float32"),
    (torch.arange(6, dtype=torch.bfloat16), TypeError,
     "token_ids must be integers, got Tensor with dtype torch.bfloat16"),
    ([True, False, True, False, True, True], TypeError,
     "token_ids must be integers, got list with dtype bool"),
    (torch.ones(6, dtype=torch.bool), TypeError,
     "token_ids must be integers, got Tensor with dtype torch.bool"),
    (["a", "b", "c", "d", "e", "f"], TypeError,
     "token_ids must be integers, got list with dtype <U1"),
    ("hello world", TypeError, "token_ids must be a 1-D sequence of integers, got str"),
    (b"hello world", TypeError, "token_ids must be a 1-D sequence of integers, got bytes"),
    (None, TypeError, "token_ids must be a 1-D sequence of integers, got NoneType"),
    (7, TypeError, "token_ids must be a 1-D sequence of integers, got int"),
    (np.zeros((3, 6), dtype=np.int64), ValueError,
     "token_ids must be 1-D, got ndarray with shape (3, 6)"),
    ([[1, 2, 3], [4, 5, 6]], ValueError, "token_ids must be 1-D, got list with shape (2, 3)"),
    (torch.zeros(2, 6, dtype=torch.int64), ValueError,
     "token_ids must be 1-D, got Tensor with shape (2, 6)"),
    ([[1, 2, 3], [4, 5]], ValueError, "token_ids must be 1-D, got a ragged list"),
    ([3, 1, 4, 1, -5, 9], ValueError, "token ids must be >= 0, got -5 in list"),
    (np.array([3, -7, 4, 1, 5, 9]), ValueError, "token ids must be >= 0, got -7 in ndarray"),
    (torch.tensor([3, 1, 4, -2, 5, 9]), ValueError, "token ids must be >= 0, got -2 in Tensor"),
])
def test_dataset_rejects_what_is_not_1d_integer_ids(token_ids, error, message):
    with pytest.raises(error) as info:
        NextTokenDataset(token_ids, context_length=4)
    assert str(info.value) == message


# --- make_loader ------------------------------------------------------------------------------

def _batches(seed: int, drop_last: bool = True, n: int = 50, T: int = 4, B: int = 8):
    ds = NextTokenDataset(np.arange(n, dtype=np.uint16), context_length=T)
    loader = make_loader(ds, B, torch.Generator().manual_seed(seed), drop_last=drop_last)
    return list(loader)


def test_loader_batches_shape_and_dtype():
    batches = _batches(0)
    assert len(batches) == 46 // 8  # 5
    for x, y in batches:
        assert x.shape == (8, 4) and y.shape == (8, 4)
        assert x.dtype == torch.int64 and y.dtype == torch.int64
        assert torch.equal(y, x + 1)  # ids are arange: the target is the next token
    starts = torch.cat([x[:, 0] for x, _ in batches]).tolist()
    assert len(set(starts)) == 40  # no window drawn twice


def test_loader_same_seed_same_order_different_seed_different_order():
    a = _batches(1234)
    b = _batches(1234)
    c = _batches(4321)
    starts = lambda batches: [x[:, 0].tolist() for x, _ in batches]  # noqa: E731
    assert starts(a) == starts(b)
    assert starts(a) != starts(c)
    # shuffled, not sequential
    assert starts(a) != [list(range(i, i + 8)) for i in range(0, 40, 8)]


def test_loader_drop_last():
    dropped = _batches(0, drop_last=True)
    kept = _batches(0, drop_last=False)
    assert [x.shape[0] for x, _ in dropped] == [8] * 5
    assert [x.shape[0] for x, _ in kept] == [8] * 5 + [6]
    starts = sorted(torch.cat([x[:, 0] for x, _ in kept]).tolist())
    assert starts == list(range(46))  # every window exactly once per epoch


def test_batch_reads_the_same_windows_as_items():
    ds = NextTokenDataset((np.arange(300, dtype=np.uint16) * 7) % 512, context_length=9)
    starts = torch.tensor([0, 13, 290, 5, 290])  # the last window, and one twice
    x, y = ds.batch(starts)
    assert x.shape == y.shape == (5, 9) and x.is_contiguous() and y.is_contiguous()
    for row, i in enumerate(starts.tolist()):
        assert torch.equal(x[row], ds[i][0]) and torch.equal(y[row], ds[i][1])


def test_loader_draws_one_randperm_per_pass():
    ds = NextTokenDataset(np.arange(50, dtype=np.uint16), context_length=4)
    loader = make_loader(ds, 8, torch.Generator().manual_seed(3), drop_last=False)
    first, second = list(loader), list(loader)  # the generator moves on between passes
    order = torch.randperm(46, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.cat([x[:, 0] for x, _ in first]), order)
    assert not torch.equal(torch.cat([x[:, 0] for x, _ in second]), order)
    assert len(loader) == 6 and len(make_loader(ds, 8, torch.Generator())) == 5


def test_a_data_position_from_the_old_sampler_resumes_with_a_warning(capsys):
    stream = BatchStream(NextTokenDataset(np.arange(100, dtype=np.uint16), 4), 8, 0, False)
    next(stream)
    state = stream.state_dict()
    resumed = BatchStream(NextTokenDataset(np.arange(100, dtype=np.uint16), 4), 8, 0, False)
    resumed.load_state_dict(state)
    assert torch.equal(next(resumed)[0], next(stream)[0])
    assert "older fastgpt" not in capsys.readouterr().out
    del state["sampler"]  # as a checkpoint written before data.ShuffledBatches
    resumed.load_state_dict(state)
    assert "drawn by an older fastgpt" in capsys.readouterr().out
