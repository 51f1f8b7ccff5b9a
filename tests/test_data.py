"""Tests for fastgpt.data: the dataset and loader (over a cache's shards: test_token_cache.py)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fastgpt import FastGPTError
from fastgpt.data import BatchStream, NextTokenDataset, make_loader


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
