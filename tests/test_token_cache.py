"""Tests for fastgpt.token_cache: prepare (streamed, sharded), the cache and its check."""

import errno
import hashlib
import json
import re
import zlib
from pathlib import Path

import numpy as np
import pytest

import fastgpt.token_cache as cache_mod
from fastgpt import FastGPTError
from fastgpt.corpus import Corpus
from fastgpt.data import NextTokenDataset
from fastgpt.fileio import cache_dir
from fastgpt.token_cache import TokenIds, prepare
from fastgpt.tokenizer import Tokenizer
from helpers import Lines


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
        "meta.json", "tokenizer.json", "tokens-000000.bin"]
    for ids in (data.train_ids, data.val_ids):
        assert isinstance(ids, TokenIds) and isinstance(ids.shards[0], np.memmap)
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
    assert (data.directory / "tokens-000000.bin").stat().st_size == 2 * n

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
    tokens = first.directory / "tokens-000000.bin"
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
        with open(directory / "tokens-000000.bin", "r+b") as f:
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
    assert (directory / "tokens-000000.bin").stat().st_size == 2 * meta["n_tokens"]
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
    left = [directory / ".tokens-000000.bin.k1ll3d.tmp", directory / ".meta.json.x7.tmp"]
    left[0].write_bytes(b"\0" * 200_000)
    left[1].write_bytes(b"{")
    log = Lines()
    again = prepare(small_corpus, 300, root, log=log)
    assert not any(path.exists() for path in left)
    assert log.mentions(f"removed 2 temporary file(s) (0.2 MB) that an interrupted prepare "
                        f"left in {directory}")
    assert sorted(p.name for p in directory.iterdir()) == ["meta.json", "tokenizer.json",
                                                           "tokens-000000.bin"]
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
    assert log.mentions("failed its check (tokens-000000.bin does not match its checksum): "
                        "rebuilding it")
    assert np.array_equal(np.concatenate([data.train_ids, data.val_ids]), expected)
    # a damaged cache of another tokenizer is said and left; the run's tokens go apart
    del data
    _overwrite_tokens(directory, np.zeros(n))
    other = Tokenizer.train([small_corpus.text], vocab_size=290)
    log = Lines()
    apart = prepare(small_corpus, 300, root, tokenizer=other, log=log)
    assert apart.directory.name == f"{small_corpus.sha256[:16]}-tok{other.sha256[:16]}"
    assert log.mentions(f"token cache {directory} failed its check (tokens-000000.bin does not "
                        f"match its checksum); it is not this tokenizer's, so it is left")


def test_prepare_refuses_tokenizer_larger_than_vocab_size(small_corpus, tmp_path):
    tok = Tokenizer.train([small_corpus.text], vocab_size=320)
    with pytest.raises(FastGPTError, match="320 tokens but the model's vocab_size is 300: "
                                           "give --vocab_size 320 \\(or more\\)"):
        prepare(small_corpus, 300, tmp_path / "prepared", tokenizer=tok, log=Lines())


def test_prepare_records_checksum_and_id_range_and_reuses_an_intact_cache(
        small_corpus, tmp_path, monkeypatch):
    root = tmp_path / "prepared"
    first = prepare(small_corpus, 300, root, log=Lines())
    tokens = (first.directory / "tokens-000000.bin").read_bytes()
    ids = np.frombuffer(tokens, dtype=np.uint16)
    assert first.meta["format"] == cache_mod.CACHE_FORMAT == 3
    assert first.meta["shards"] == [{"file": "tokens-000000.bin", "n_tokens": len(ids),
                                     "crc32": zlib.crc32(tokens), "id_min": int(ids.min()),
                                     "id_max": int(ids.max())}]
    assert ids.max() < first.tokenizer.vocab_size

    def no_training(*args, **kwargs):
        raise AssertionError("the tokenizer was trained again")

    monkeypatch.setattr(Tokenizer, "train", no_training)
    monkeypatch.setattr(cache_mod, "CHECK_CHUNK", 1000)  # the check reads in many steps
    log = Lines()
    again = prepare(small_corpus, 300, root, log=log)
    assert log == []  # no note, no training, no encoding
    assert again.meta == first.meta
    assert isinstance(again.train_ids, TokenIds)
    assert np.array_equal(np.concatenate([again.train_ids, again.val_ids]), ids)


def _edit_meta(directory: Path, **changes) -> None:
    meta = json.loads((directory / "meta.json").read_text())
    meta.update(changes)
    for key in [key for key, value in changes.items() if value is None]:
        del meta[key]
    (directory / "meta.json").write_text(json.dumps(meta))


def _edit_shard(directory: Path, number: int = 0, **changes) -> None:
    meta = json.loads((directory / "meta.json").read_text())
    meta["shards"][number].update(changes)
    (directory / "meta.json").write_text(json.dumps(meta))


def _overwrite_tokens(directory: Path, ids: np.ndarray) -> None:
    with open(directory / "tokens-000000.bin", "r+b") as f:  # in place, same size
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
        reason = "tokens-000000.bin does not match its checksum"
    elif damage.startswith("ids_beyond_vocab"):
        garbage = np.full(n, 60000)
        _overwrite_tokens(directory, garbage)
        if damage.endswith("new_crc32"):  # the range check alone catches it
            _edit_shard(directory, crc32=zlib.crc32(garbage.astype(np.uint16).tobytes()))
        reason = "tokens-000000.bin holds id 60000, beyond the tokenizer's 300"
    elif damage == "two_ids_swapped":  # same size, same id range: only the checksum differs
        i = int(np.flatnonzero(expected[:-1] != expected[1:])[-1])  # in the last step
        swapped = expected.copy()
        swapped[[i, i + 1]] = swapped[[i + 1, i]]
        _overwrite_tokens(directory, swapped)
        reason = "tokens-000000.bin does not match its checksum"
    elif damage == "edited_n_train":  # the train split would be "too small" for a run
        _edit_meta(directory, n_train=3)
        reason = (f"meta.json's n_tokens {n}, n_train 3, n_val {meta['n_val']} and shards "
                  f"disagree")
    elif damage == "edited_id_max":
        shard = meta["shards"][0]
        _edit_shard(directory, id_max=shard["id_max"] + 1)
        reason = (f"tokens-000000.bin holds ids {shard['id_min']}..{shard['id_max']}, meta.json "
                  f"says {shard['id_min']}..{shard['id_max'] + 1}")
    else:  # what fastgpt wrote before the cache was sharded: one tokens.bin
        _edit_meta(directory, format=2, shards=None, tokens_crc32=1, id_min=0, id_max=299)
        reason = "meta.json has format 2, not 3"

    monkeypatch.setattr(cache_mod, "CHECK_CHUNK", 1000)
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


# --- streaming, shards, uint32 ----------------------------------------------------------------

def _all_ids(data) -> np.ndarray:
    return np.concatenate([np.asarray(data.train_ids), np.asarray(data.val_ids)])


@pytest.mark.parametrize("rules", ["newline", "space_fallback"])
def test_streamed_prepare_equals_whole_text_preparation(real_text, tmp_path, monkeypatch,
                                                        rules):
    """Many pieces, several encode batches, a dozen shards: the tokenizer and the ids equal
    those of training on the text whole and encoding it whole with HF tokenizers."""
    import fastgpt.corpus as corpus_mod
    text = real_text * 2 + "First Citizen:\nBefore we proceed\n" * 3000
    monkeypatch.setattr(corpus_mod, "CHUNK_CHARS", 3000)
    monkeypatch.setattr(corpus_mod, "READ_BYTES", 5000)
    if rules == "space_fallback":  # Python source has few newline cuts: spaces cut it
        monkeypatch.setattr(corpus_mod, "FALLBACK_CHARS", 6000)
    monkeypatch.setattr(cache_mod, "ENCODE_BATCH_CHARS", 9000)
    corpus = Corpus("x", text)
    assert len(list(corpus.pieces())) > 30
    data = prepare(corpus, 400, tmp_path, shard_tokens=10_000, log=Lines())
    whole = Tokenizer.train([text], 400)
    assert data.tokenizer.sha256 == whole.sha256
    assert _all_ids(data).tolist() == whole._tok.encode(text).ids
    assert len(data.meta["shards"]) == -(-data.meta["n_tokens"] // 10_000) >= 10
    assert data.meta["forced_cuts"] == 0


def test_tiny_shakespeare_tokenizer_and_ids_are_as_before(tmp_path):
    """The chapter's corpus at vocab 512: the tokenizer.json and ids that fastgpt made
    before prepare streamed (trained on the text whole, encoded whole), bit for bit."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"needs {path} (../shared beside the checkout)")
    from fastgpt.corpus import load_corpus
    data = prepare(load_corpus(str(path)), 512, tmp_path, log=Lines())
    text = path.read_text(encoding="utf-8")
    before = Tokenizer.train([text], 512)
    assert (data.directory / "tokenizer.json").read_text() == before.to_json()
    ids = _all_ids(data)
    assert ids.dtype == np.uint16 and len(ids) == 575_345
    assert ids.tolist() == before._tok.encode(text).ids
    # the sha256 of tokens.bin that fastgpt c9f4736 (before streaming) wrote: the ids alone
    # (tokenizer.json's bytes could change with the HF tokenizers version, not the ids)
    assert hashlib.sha256((data.directory / "tokens-000000.bin").read_bytes()).hexdigest() == (
        "b6e064f0f99271a94cb8391cb5748a404d508598c7fa5e6fe96ede1e3d16c86f")


def test_windows_across_shard_boundaries_read_as_from_one_array(small_corpus, tmp_path):
    data = prepare(small_corpus, 300, tmp_path, shard_tokens=997, log=Lines())
    assert len(data.meta["shards"]) > 5
    flat = _all_ids(data)
    ids = TokenIds(data.train_ids.shards)
    assert len(ids) == len(flat) and np.array_equal(np.asarray(ids), flat)
    for i, j in [(990, 1010), (0, 997), (996, 998), (1994, 3000), (len(flat) - 5, len(flat))]:
        assert np.array_equal(np.asarray(ids[i:j]), flat[i:j])
    starts = np.array([[990], [995], [0], [1990]]) + np.arange(20)
    assert np.array_equal(ids[starts], flat[starts])
    n_train = data.meta["n_train"]  # the split: the last 10% of the stream, across shards
    assert np.array_equal(np.asarray(data.val_ids), flat[n_train:])
    assert np.array_equal(data.val_ids[np.array([0, 5, len(data.val_ids) - 1])],
                          flat[n_train + np.array([0, 5, len(data.val_ids) - 1])])
    with pytest.raises(IndexError):
        data.val_ids[np.array([len(data.val_ids)])]
    # the datasets and the training's batch stream see exactly what one array gives
    import torch
    from fastgpt.data import BatchStream
    for split, part in (("train", data.train_ids), ("val", data.val_ids)):
        sharded, single = NextTokenDataset(part, 32, split), NextTokenDataset(np.asarray(part), 32)
        assert len(sharded) == len(single)
        for i in (0, 960, 965, len(single) - 1):
            assert all(torch.equal(a, b) for a, b in zip(sharded[i], single[i]))
    a = BatchStream(NextTokenDataset(data.train_ids, 32), 16, seed=3, pin_memory=False)
    b = BatchStream(NextTokenDataset(np.asarray(data.train_ids), 32), 16, seed=3,
                    pin_memory=False)
    for _ in range(len(a.loader) + 3):  # into the second epoch
        assert all(torch.equal(x, y) for x, y in zip(next(a), next(b)))


def _word_level_tokenizer(path: Path, words: int) -> Tokenizer:
    """A HuggingFace WordLevel tokenizer.json: w0 .. w{words-1} are ids 0 .. words-1."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers
    vocab = {f"w{i}": i for i in range(words)}
    vocab["[UNK]"] = words
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    path.write_text(hf.to_str())
    return Tokenizer.load(path)


def test_a_vocabulary_past_65536_is_stored_as_uint32(tmp_path):
    tokenizer = _word_level_tokenizer(tmp_path / "tokenizer.json", 70_000)
    assert tokenizer.vocab_size == 70_001
    rng = np.random.default_rng(0)
    expected = rng.integers(0, 70_000, 6000)
    expected[:3] = [69_999, 65_536, 0]
    lines = [" ".join(f"w{i}" for i in expected[k:k + 12]) for k in range(0, 6000, 12)]
    corpus = Corpus("words", "\n".join(lines) + "\n")
    data = prepare(corpus, 70_016, tmp_path / "prepared", tokenizer=tokenizer, log=Lines(),
                   shard_tokens=2500)
    assert data.meta["dtype"] == "uint32" and data.train_ids.dtype == np.uint32
    assert [s["n_tokens"] for s in data.meta["shards"]] == [2500, 2500, 1000]
    assert (data.directory / "tokens-000000.bin").stat().st_size == 4 * 2500
    assert _all_ids(data).tolist() == expected.tolist()
    assert max(s["id_max"] for s in data.meta["shards"]) == 69_999
    again = Lines()
    assert prepare(corpus, 70_016, tmp_path / "prepared", tokenizer=tokenizer, log=again).meta \
        == data.meta and again == []  # the uint32 cache passes its check
    x, y = NextTokenDataset(data.train_ids, 8)[0]
    assert x.tolist() == expected[:8].tolist() and x.max() == 69_999


def test_a_vocabulary_that_cannot_fit_the_model_is_one_line(tmp_path):
    from fastgpt.config import make_config
    path = tmp_path / "tokenizer.json"
    _word_level_tokenizer(path, 70_000)
    assert make_config("cpu", {"tokenizer": str(path)}).vocab_size == 70_016  # padded
    assert make_config("cpu", {"tokenizer": str(path), "vocab_size": 70_001}).vocab_size == 70_001
    with pytest.raises(FastGPTError) as info:
        make_config("cpu", {"tokenizer": str(path), "vocab_size": 512})
    assert str(info.value) == (f"vocab_size 512 cannot hold the 70,001 tokens of {path}: leave "
                               f"--vocab_size out (it becomes 70,016) or give at least 70,001")
    (tmp_path / "bad.json").write_text('{"model": "nope"}')
    with pytest.raises(FastGPTError, match=r"bad.json is not a HuggingFace tokenizer.json \("):
        make_config("cpu", {"tokenizer": str(tmp_path / "bad.json")})
    with pytest.raises(FastGPTError, match="tokenizer file .*missing.json does not exist"):
        make_config("cpu", {"tokenizer": str(tmp_path / "missing.json")})


# --- memory, kills, full disks ----------------------------------------------------------------

def _peak_python_memory(corpus_path: Path, data_dir: Path) -> tuple[int, int]:
    """tracemalloc's peak during a prepare of the file (numpy's buffers and Python's
    strings are traced; HF tokenizers' own Rust allocations are not), and its tokens."""
    import tracemalloc

    from fastgpt.corpus import load_corpus
    corpus = load_corpus(str(corpus_path))
    corpus.sha256  # the scan, before the measurement: it holds one read at a time too
    tracemalloc.start()
    try:
        data = prepare(corpus, 300, data_dir, log=Lines())
        return tracemalloc.get_traced_memory()[1], data.meta["n_tokens"]
    finally:
        tracemalloc.stop()


def test_prepare_never_holds_the_whole_corpus_or_all_its_ids(real_text, tmp_path, monkeypatch):
    """Fails if prepare reads the corpus whole or gathers its ids before writing them: the
    peak of Python-side memory stays a fraction of the corpus and does not grow with it."""
    import fastgpt.corpus as corpus_mod
    monkeypatch.setattr(corpus_mod, "CHUNK_CHARS", 2048)
    monkeypatch.setattr(corpus_mod, "FALLBACK_CHARS", 4096)  # Python source: pieces of ~2K
    monkeypatch.setattr(corpus_mod, "READ_BYTES", 1 << 15)
    monkeypatch.setattr(cache_mod, "ENCODE_BATCH_CHARS", 8192)
    peaks = {}
    for megabytes in (2, 8):
        path = tmp_path / f"corpus{megabytes}.txt"
        copies = -(-megabytes * 1_000_000 // len(real_text.encode("utf-8")))
        path.write_text(real_text * copies, encoding="utf-8")
        peaks[megabytes], n_tokens = _peak_python_memory(path, tmp_path / f"cache{megabytes}")
        size = path.stat().st_size
        assert peaks[megabytes] < size / 4, (peaks, size)  # the text alone would be 1x
        assert peaks[megabytes] < n_tokens  # all ids as uint16 would be 2 bytes each
    assert peaks[8] < 1.5 * peaks[2], peaks


KILLED_PREPARE = """
import sys
import fastgpt.corpus as corpus_mod, fastgpt.token_cache as cache_mod
from fastgpt.corpus import load_corpus
corpus_mod.CHUNK_CHARS = 2048
cache_mod.ENCODE_BATCH_CHARS = 4096
print("start", flush=True)
cache_mod.prepare(load_corpus(sys.argv[1]), 300, sys.argv[2], log=lambda line: None,
                  shard_tokens=5000)
print("done", flush=True)
"""


@pytest.mark.slow
def test_a_prepare_killed_at_any_moment_leaves_nothing_trusted(real_text, tmp_path):
    """SIGKILL at random moments of a prepare (training, encoding, between shards, before
    meta.json): the next prepare never reads a partial cache, and builds the right one."""
    import random
    import subprocess
    import sys
    import time

    from fastgpt.corpus import load_corpus
    path = tmp_path / "corpus.txt"
    path.write_text(real_text * 4, encoding="utf-8")
    expected = prepare(load_corpus(str(path)), 300, tmp_path / "clean", log=Lines(),
                       shard_tokens=5000)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", KILLED_PREPARE, str(path), str(tmp_path / "timed")],
                   check=True, capture_output=True)
    full_s = time.perf_counter() - started
    rng = random.Random(1234)
    cache = tmp_path / "killed"
    for attempt in range(4):
        child = subprocess.Popen([sys.executable, "-c", KILLED_PREPARE, str(path), str(cache)],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline() == "start\n"
        time.sleep(rng.uniform(0.0, 0.6 * full_s))
        child.kill()
        child.wait()
        directory = cache / expected.directory.name
        cached, _ = cache_mod._read_cache(directory, load_corpus(str(path)), 300)
        assert cached is None or cached.meta == expected.meta  # never a partial cache
    log = Lines()
    again = prepare(load_corpus(str(path)), 300, cache, log=log, shard_tokens=5000)
    assert again.meta == expected.meta
    assert np.array_equal(_all_ids(again), _all_ids(expected))
    assert not list(again.directory.glob(".*.tmp"))


class _FullDisk:
    """atomic_open's file, failing with ENOSPC once `room` bytes are written."""

    def __init__(self, file, room: list[int]):
        self.file, self.room = file, room

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self.room[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room[0] -= size
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_a_full_disk_during_prepare_is_one_line_and_leaves_nothing_used(small_corpus,
                                                                       tmp_path, monkeypatch):
    import contextlib
    real_open, room = cache_mod.atomic_open, [3000]

    @contextlib.contextmanager
    def full_open(path):
        with real_open(path) as file:
            yield _FullDisk(file, room)

    monkeypatch.setattr(cache_mod, "atomic_open", full_open)
    root = tmp_path / "prepared"
    with pytest.raises(FastGPTError) as info:
        prepare(small_corpus, 300, root, log=Lines(), shard_tokens=1000)
    directory = root / cache_mod.cache_name(small_corpus, 300)
    assert str(info.value) == (
        f"no space left for the token cache in {directory} (No space left on device; it needs "
        f"about 0 MB for this corpus): free some, or give --data_dir on another disk; nothing "
        f"half-written will be used")
    assert not (directory / "meta.json").exists()
    assert not list(directory.glob(".*.tmp"))  # the shard being written is removed
    monkeypatch.setattr(cache_mod, "atomic_open", real_open)  # space again
    log = Lines()
    data = prepare(small_corpus, 300, root, log=log, shard_tokens=1000)
    assert log.mentions("encoding") and data.meta["n_tokens"] > 1000


def test_the_tokenizer_learns_from_the_first_tokenizer_train_bytes(real_text, tmp_path,
                                                                   monkeypatch):
    import fastgpt.corpus as corpus_mod
    monkeypatch.setattr(corpus_mod, "CHUNK_CHARS", 2000)
    monkeypatch.setattr(corpus_mod, "FALLBACK_CHARS", 4000)
    text = real_text + "Zebra quagga okapi\n" * 20_000  # the animals come after the limit
    corpus = Corpus("x", text)
    limit = len(real_text.encode("utf-8")) // 2
    data = prepare(corpus, 400, tmp_path, tokenizer_train_bytes=limit, log=(log := Lines()))
    assert data.directory.name == f"{corpus.sha256[:16]}-v400-t{limit}"
    first = [piece for piece, _ in corpus.pieces(max_bytes=limit)]
    trained_on = sum(len(piece.encode("utf-8")) for piece in first)
    assert limit <= trained_on < limit + 8000
    assert data.meta["tokenizer_trained_on_bytes"] == trained_on
    assert data.tokenizer.sha256 == Tokenizer.train(first, 400).sha256
    assert data.tokenizer._tok.token_to_id("Zebra") is None  # never seen by the trainer
    assert log.mentions(f"(its first {limit / 1e6:,.0f} MB: tokenizer_train_bytes)")
    whole = prepare(corpus, 400, tmp_path, log=Lines())  # the default reads it all
    assert whole.directory.name == f"{corpus.sha256[:16]}-v400"
    assert whole.tokenizer._tok.token_to_id("Zebra") is not None


def test_prepare_says_how_far_it_is_once_a_minute_off_a_terminal(small_corpus, tmp_path,
                                                                monkeypatch):
    from fastgpt.progress import ByteProgress
    monkeypatch.setattr(ByteProgress, "LINE_EVERY_S", 0.0)  # every update says it
    log = Lines()
    prepare(small_corpus, 300, tmp_path, log=log)
    n = len(small_corpus.text.encode("utf-8")) / 1e6
    for phase in ("tokenizer", "encoding"):
        lines = [line for line in log if line.startswith(f"{phase}: ")]
        assert lines, log
        assert re.fullmatch(rf"{phase}: 0 of {n:,.0f} MB \([0-9.]+ MB/s\), about \d+ s to go",
                            lines[-1]), lines[-1]


def test_a_token_cache_that_cannot_be_written_is_one_line(small_corpus, tmp_path):
    blocked = tmp_path / "a_file"
    blocked.write_text("not a directory")
    with pytest.raises(FastGPTError) as info:
        prepare(small_corpus, 300, blocked, log=Lines())
    directory = blocked / cache_mod.cache_name(small_corpus, 300)
    assert str(info.value) == f"cannot write the token cache in {directory}: Not a directory"
