import os
import pickle

import pytest
import torch

import fastgpt.checkpoint as checkpoint_module
from fastgpt import FastGPTError
from fastgpt.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from fastgpt.config import make_config
from fastgpt.model import GPT
from fastgpt.tokenizer import Tokenizer


def small_checkpoint(real_text) -> dict:
    config = make_config("cpu", dict(context_length=16, d_model=32, num_heads=2, num_layers=2))
    model = GPT(**config.model_kwargs())
    return {"step": 7, "config": config.to_dict(), "model": model.state_dict(),
            "tokenizer": Tokenizer.train([real_text[:20_000]], 300).to_json()}


def test_round_trip_rebuilds_model_config_and_tokenizer(tmp_path, real_text):
    state = small_checkpoint(real_text)
    save_checkpoint(tmp_path / "c.pt", state)
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert loaded["step"] == 7 and loaded["format"] == checkpoint_module.CHECKPOINT_FORMAT
    model, config, tokenizer = model_from_checkpoint(loaded)
    assert config.d_model == 32
    assert all(torch.equal(model.state_dict()[k], state["model"][k]) for k in state["model"])
    assert tokenizer.decode(tokenizer.encode("hello, world")) == "hello, world"


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, real_text, monkeypatch):
    state = small_checkpoint(real_text)
    path = tmp_path / "last.pt"
    save_checkpoint(path, state)
    before = path.read_bytes()

    def torch_save_that_dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", torch_save_that_dies_halfway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {**state, "step": 8})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind


class RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (os.makedirs, ("/tmp/fastgpt-test-pwned-" + str(os.getpid()),))


def test_loading_never_runs_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "step": 0, "config": {}, "model": RunsCodeWhenUnpickled(),
                "tokenizer": ""}, path)
    with pytest.raises(FastGPTError, match="not a readable fastgpt checkpoint"):
        load_checkpoint(path)
    assert not os.path.exists("/tmp/fastgpt-test-pwned-" + str(os.getpid()))


@pytest.mark.parametrize("content, message", [
    (b"", "not a readable"),
    (b"this is not a zip file at all", "not a readable"),
])
def test_corrupt_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(FastGPTError, match=message) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_truncated_missing_and_foreign_checkpoints(tmp_path, real_text):
    good = tmp_path / "good.pt"
    save_checkpoint(good, small_checkpoint(real_text))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(FastGPTError, match="not a readable"):
        load_checkpoint(truncated)
    with pytest.raises(FastGPTError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(FastGPTError, match="not a fastgpt checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    torch.save({**small_checkpoint(real_text), "format": 99}, tmp_path / "future.pt")
    with pytest.raises(FastGPTError, match="format 99"):
        load_checkpoint(tmp_path / "future.pt")


def test_incompatible_weights_are_a_clear_error(tmp_path, real_text):
    state = small_checkpoint(real_text)
    state["model"]["lm_head.weight"] = torch.zeros(3, 3)
    save_checkpoint(tmp_path / "c.pt", state)
    with pytest.raises(FastGPTError, match="does not fit"):
        model_from_checkpoint(load_checkpoint(tmp_path / "c.pt"), tmp_path / "c.pt")
