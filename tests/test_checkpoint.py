import json
import math
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import fastgpt.checkpoint as checkpoint_module
from fastgpt import FastGPTError
from fastgpt.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from fastgpt.config import make_config
from fastgpt.model import GPT
from fastgpt.tokenizer import Tokenizer
from helpers import gpu, quick

REPO = Path(__file__).resolve().parents[1]
TORCH_ADVICE = ("weights_only set to", "weights_only` set to", "Re-running", "False")


def small_checkpoint(real_text) -> dict:
    config = make_config("cpu", dict(context_length=16, d_model=32, num_heads=2, num_layers=2))
    model = GPT(**config.model_kwargs())
    return {"step": 7, "config": config.to_dict(), "model": model.state_dict(),
            "tokenizer": Tokenizer.train([real_text[:20_000]], 300).to_json()}


def odd_values() -> dict:
    """The kinds of values a checkpoint holds besides fp32 weights."""
    return {"bf16": torch.linspace(-3, 3, 40).to(torch.bfloat16), "scalar": torch.tensor(4.0),
            "int_scalar": torch.tensor(3, dtype=torch.int64), "rng": torch.get_rng_state(),
            "empty": torch.zeros(0, 5), "flags": torch.tensor([True, False]),
            "strided": torch.arange(12.0).reshape(3, 4).t(),  # not contiguous
            "floats": [math.inf, -math.inf, 0.5, -0.0], "nothing": None, "yes": True,
            "by_int": {0: {"step": torch.tensor(1.0)}, 1: {"step": torch.tensor(2.0)}},
            "pair": (0.9, 0.999), "name": "héllo\n"}


def checksum_of(checkpoint: dict) -> str:
    return checkpoint_module.checksum(checkpoint)  # looked up when called, not on import


def stored_checksum(path) -> str:
    return torch.load(path, weights_only=True)["checksum"]["value"]


def member_offset(path, member: zipfile.ZipInfo) -> int:
    """Where `member`'s data starts in the file: after its local header, whose name and
    extra fields (torch pads the extra field to align the data) have their own lengths."""
    data = Path(path).read_bytes()
    header = member.header_offset
    name_length = int.from_bytes(data[header + 26:header + 28], "little")
    extra_length = int.from_bytes(data[header + 28:header + 30], "little")
    offset = header + 30 + name_length + extra_length
    with zipfile.ZipFile(path) as archive:  # torch stores members uncompressed
        assert data[offset:offset + member.file_size] == archive.read(member)
    return offset


def flip_bytes(path, member: zipfile.ZipInfo, count: int, start: int = 0) -> None:
    data = bytearray(Path(path).read_bytes())
    offset = member_offset(path, member) + start
    for i in range(offset, offset + count):
        data[i] ^= 0xFF
    Path(path).write_bytes(bytes(data))


def flip_bytes_in_a_tensor(path, count: int = 64, largest: bool = True) -> None:
    """Flip `count` bytes inside the stored data of one tensor (the largest storage, else the
    smallest one big enough), as a bad disk or copy would: the zip stays valid."""
    with zipfile.ZipFile(path) as archive:
        storages = [m for m in archive.infolist() if "/data/" in m.filename
                    and m.filename.rsplit("/", 1)[-1].isdigit() and m.file_size >= count]
    flip_bytes(path, (max if largest else min)(storages, key=lambda m: m.file_size), count)


def assert_one_line(message: str, *fragments: str) -> None:
    assert "\n" not in message and "\r" not in message, message
    for fragment in fragments:
        assert fragment in message, message


# --- round trips -----------------------------------------------------------------------

def test_round_trip_rebuilds_model_config_and_tokenizer(tmp_path, real_text):
    state = small_checkpoint(real_text)
    save_checkpoint(tmp_path / "c.pt", state)
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert loaded["step"] == 7 and loaded["format"] == checkpoint_module.CHECKPOINT_FORMAT
    model, config, tokenizer = model_from_checkpoint(loaded)
    assert config.d_model == 32
    assert all(torch.equal(model.state_dict()[k], state["model"][k]) for k in state["model"])
    assert tokenizer.decode(tokenizer.encode("hello, world")) == "hello, world"
    assert "checksum" not in state and "format" not in state  # the caller's dict is untouched


def test_odd_values_round_trip_and_verify(tmp_path, real_text):
    state = {**small_checkpoint(real_text), "extra": odd_values()}
    save_checkpoint(tmp_path / "c.pt", state)
    loaded = load_checkpoint(tmp_path / "c.pt", log=pytest.fail)  # verified: no warning
    for key, value in odd_values().items():
        got = loaded["extra"][key]
        if isinstance(value, torch.Tensor):
            assert got.dtype == value.dtype and torch.equal(got, value), key
        else:
            assert got == value, key
    assert loaded["checksum"]["algorithm"] == checkpoint_module.CHECKSUM_ALGORITHM


def test_checksum_is_stable_across_save_load_round_trips(tmp_path, real_text):
    save_checkpoint(tmp_path / "a.pt", {**small_checkpoint(real_text), "extra": odd_values()})
    first = stored_checksum(tmp_path / "a.pt")
    loaded = load_checkpoint(tmp_path / "a.pt")
    assert checksum_of(loaded) == first  # recomputed from what was read back
    save_checkpoint(tmp_path / "b.pt", loaded)  # its "checksum" key is recomputed, not kept
    assert stored_checksum(tmp_path / "b.pt") == first
    save_checkpoint(tmp_path / "c.pt", {**loaded, "checksum": {"algorithm": "crc32",
                                                                "value": "00000000"}})
    assert stored_checksum(tmp_path / "c.pt") == first


def test_the_walk_sorts_dict_keys_but_not_lists_or_tuples(real_text):
    """Every dict is walked in sorted key order (str keys, int keys of optimizer states,
    nested ones): insertion order does not change the checksum. Lists and tuples keep
    their order, which does."""
    state = {**small_checkpoint(real_text), "extra": odd_values()}
    reordered = {k: state[k] for k in reversed(list(state))}
    reordered["model"] = {k: v for k, v in reversed(state["model"].items())}
    reordered["extra"] = {**state["extra"], "by_int": {1: state["extra"]["by_int"][1],
                                                       0: state["extra"]["by_int"][0]}}
    assert list(reordered) != list(state)
    assert checksum_of(reordered) == checksum_of(state)
    for changed in ([*reversed(state["extra"]["floats"])],  # a list's order counts
                    tuple(state["extra"]["floats"])):  # a tuple is not a list
        extra = {**state["extra"], "floats": changed}
        assert checksum_of({**state, "extra": extra}) != checksum_of(state)


@pytest.mark.parametrize("a, b", [
    (1, True), (1, 1.0), (0, None), ("1", 1), (b"1", "1"), ([1, 2], (1, 2)), ([[1], 2], [1, [2]]),
    ({1: "a"}, {"1": "a"}), ("ab", ["a", "b"]), (0.0, -0.0), (math.inf, math.nan),
    (torch.tensor(1.0), torch.tensor([1.0])), (torch.zeros(2, 3), torch.zeros(3, 2)),
    (torch.zeros(2), torch.zeros(2, dtype=torch.int32)),
    (torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.float16)),
])
def test_the_walk_tells_apart_values_that_compare_or_print_alike(a, b):
    assert checksum_of({"x": a}) != checksum_of({"x": b})


@gpu
@quick
def test_checksum_does_not_depend_on_the_tensors_device(tmp_path, real_text):
    state = {**small_checkpoint(real_text), "extra": odd_values()}
    on_gpu = {**state, "model": {k: v.cuda() for k, v in state["model"].items()},
              "extra": {**state["extra"], "bf16": state["extra"]["bf16"].cuda(),
                        "scalar": state["extra"]["scalar"].cuda()}}
    assert checksum_of(on_gpu) == checksum_of(state)
    save_checkpoint(tmp_path / "cpu.pt", state)
    save_checkpoint(tmp_path / "gpu.pt", on_gpu)
    assert stored_checksum(tmp_path / "gpu.pt") == stored_checksum(tmp_path / "cpu.pt")
    loaded = load_checkpoint(tmp_path / "gpu.pt")
    assert all(v.device.type == "cpu" for v in loaded["model"].values())
    assert on_gpu["model"]["lm_head.weight"].is_cuda  # the caller's tensors stay where they were


# --- damage is caught ------------------------------------------------------------------

def test_flipped_bytes_in_a_tensor_are_caught(tmp_path, real_text):
    """The issue's fault: 64 bytes flipped inside a tensor's stored data. torch.load reads
    the file without a word; load_checkpoint refuses it in one line naming the file."""
    path = tmp_path / "c.pt"
    state = small_checkpoint(real_text)
    save_checkpoint(path, state)
    flip_bytes_in_a_tensor(path)
    damaged = torch.load(path, weights_only=True)  # what resume and sample used to get
    changed = [k for k in state["model"] if not torch.equal(damaged["model"][k], state["model"][k])]
    assert len(changed) == 1
    with pytest.raises(FastGPTError) as info:
        load_checkpoint(path)
    assert_one_line(str(info.value), f"{path} is corrupt", "do not match the checksum",
                    "it was not used")
    assert "best.pt" not in str(info.value)  # said only of a last.pt


def test_flipped_bytes_in_a_bf16_or_0_dim_tensor_are_caught(tmp_path, real_text):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {**small_checkpoint(real_text),
                           "extra": {"bf16": torch.linspace(-3, 3, 40).to(torch.bfloat16),
                                     "scalar": torch.tensor(4.0)}})
    flip_bytes_in_a_tensor(path, count=4, largest=False)  # the 4-byte storage of the scalar
    assert torch.load(path, weights_only=True)["extra"]["scalar"].item() != 4.0
    with pytest.raises(FastGPTError, match="is corrupt"):
        load_checkpoint(path)
    state = {"bf16": torch.linspace(-3, 3, 40).to(torch.bfloat16), "scalar": torch.tensor(4.0)}
    bit = state["bf16"].clone()
    bit.view(torch.int16)[7] ^= 1  # the lowest mantissa bit of one bf16 value
    assert checksum_of({**state, "bf16": bit}) != checksum_of(state)
    assert checksum_of({**state, "scalar": torch.tensor(4.0 + 2 ** -21)}) != checksum_of(state)


@pytest.mark.parametrize("change", [
    lambda c: c.update(step=8),
    lambda c: c["config"].update(lr=c["config"]["lr"] * 2),
    lambda c: c.update(tokenizer=c["tokenizer"].replace("e", "f", 1)),
    lambda c: c.update(best_val_loss=math.inf),
    lambda c: c["model"].pop("lm_head.bias"),
    lambda c: c.update(format=True),  # == 1, but not the same value
])
def test_a_changed_plain_value_or_key_is_caught(tmp_path, real_text, change):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {**small_checkpoint(real_text), "best_val_loss": 2.5})
    contents = torch.load(path, weights_only=True)
    change(contents)
    torch.save(contents, path)  # the stored checksum kept, the contents changed
    with pytest.raises(FastGPTError) as info:
        load_checkpoint(path)
    assert_one_line(str(info.value), f"{path} is corrupt")


@pytest.mark.parametrize("best", ["intact", "damaged", "absent", "unchecked"])
def test_a_corrupt_last_pt_says_whether_best_pt_is_intact(tmp_path, real_text, best):
    run = tmp_path / "runs" / "x"
    state = small_checkpoint(real_text)
    if best != "absent":
        save_checkpoint(run / "best.pt", {**state, "step": 5})
    if best == "damaged":
        flip_bytes_in_a_tensor(run / "best.pt")
    if best == "unchecked":  # written by a fastgpt before checksums
        torch.save({"format": 1, **state, "step": 5}, run / "best.pt")
    save_checkpoint(run / "last.pt", state)
    flip_bytes_in_a_tensor(run / "last.pt")
    with pytest.raises(FastGPTError) as info:
        load_checkpoint(run / "last.pt")
    message = str(info.value)
    assert_one_line(message, f"{run / 'last.pt'} is corrupt", "it was not used")
    expected = {"intact": f"{run / 'best.pt'} (step 5) is intact: to continue from it, copy "
                          f"it over last.pt (cp {run / 'best.pt'} {run / 'last.pt'}) and resume",
                "damaged": f"{run / 'best.pt'} is damaged too",
                "absent": "there is no best.pt beside it",
                "unchecked": f"{run / 'best.pt'} (step 5) loads but carries no checksum"}
    assert expected[best] in message


def test_a_truncated_last_pt_says_whether_best_pt_is_intact(tmp_path, real_text):
    run = tmp_path / "x"
    save_checkpoint(run / "best.pt", {**small_checkpoint(real_text), "step": 5})
    save_checkpoint(run / "last.pt", small_checkpoint(real_text))
    (run / "last.pt").write_bytes((run / "last.pt").read_bytes()[:5000])
    with pytest.raises(FastGPTError) as info:
        load_checkpoint(run / "last.pt")
    assert_one_line(str(info.value), "not a readable fastgpt checkpoint",
                    f"{run / 'best.pt'} (step 5) is intact")


def test_an_old_checkpoint_without_checksum_loads_with_a_one_line_warning(tmp_path, real_text,
                                                                           capsys):
    path = tmp_path / "old.pt"
    state = small_checkpoint(real_text)
    torch.save({"format": 1, **state}, path)  # what fastgpt wrote before checksums
    warnings = []
    loaded = load_checkpoint(path, log=warnings.append)
    assert loaded["step"] == 7 and torch.equal(loaded["model"]["lm_head.weight"],
                                               state["model"]["lm_head.weight"])
    assert len(warnings) == 1
    assert_one_line(warnings[0], str(path), "no checksum", "older fastgpt")
    assert capsys.readouterr().err == ""
    load_checkpoint(path)  # the default log: stderr, one line
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"fastgpt: warning: {path} ")


def test_a_checksum_of_an_unknown_kind_or_shape_is_refused(tmp_path, real_text):
    path = tmp_path / "c.pt"
    state = {"format": 1, **small_checkpoint(real_text)}
    torch.save({**state, "checksum": {"algorithm": "md17", "value": "00"}}, path)
    with pytest.raises(FastGPTError, match="checksum of a kind this fastgpt does not know"):
        load_checkpoint(path)
    torch.save({**state, "checksum": "00"}, path)
    with pytest.raises(FastGPTError, match="checksum entry is malformed"):
        load_checkpoint(path)


# --- writes that fail ------------------------------------------------------------------

def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, real_text, monkeypatch):
    state = small_checkpoint(real_text)
    path = tmp_path / "last.pt"
    save_checkpoint(path, state)
    before = path.read_bytes()

    def torch_save_that_dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", torch_save_that_dies_halfway)
    with pytest.raises(FastGPTError) as info:
        save_checkpoint(path, {**state, "step": 8})
    assert str(info.value) == (f"could not write {path} (No space left on device): the "
                               f"previous last.pt is intact")
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind
    with pytest.raises(FastGPTError, match="there was no previous best.pt"):
        save_checkpoint(tmp_path / "best.pt", state)
    assert os.listdir(tmp_path) == ["last.pt"]


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("not a write problem")])
def test_other_errors_of_a_save_propagate_and_leave_no_temporary_file(tmp_path, real_text,
                                                                      monkeypatch, error):
    path = tmp_path / "last.pt"
    save_checkpoint(path, small_checkpoint(real_text))
    before = path.read_bytes()

    def torch_save_that_is_interrupted(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise error

    monkeypatch.setattr(checkpoint_module.torch, "save", torch_save_that_is_interrupted)
    with pytest.raises(type(error)):
        save_checkpoint(path, small_checkpoint(real_text))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.pt"]


SAVE_WITH_A_FILE_SIZE_LIMIT = """
import json, resource, signal, sys
import torch
from fastgpt import FastGPTError
from fastgpt.checkpoint import save_checkpoint
path, limit = sys.argv[1], int(sys.argv[2])
state = {"step": 2, "config": {}, "tokenizer": "{}", "model": {"w": -torch.arange(100_000.0)}}
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    save_checkpoint(path, state)
except FastGPTError as exc:
    print(json.dumps(str(exc)))
"""


@pytest.mark.parametrize("limit", ["half", "all_but_the_end", "no_previous_file"])
@pytest.mark.slow
def test_a_write_that_really_fails_is_a_one_line_error(tmp_path, limit):
    """A real failed write, as on a full disk: RLIMIT_FSIZE below the checkpoint's size makes
    the writes fail with EFBIG, in torch.save (where its zip writer turns the OSError into a
    RuntimeError) or in the flush after it."""
    path = tmp_path / "last.pt"
    if limit != "no_previous_file":
        save_checkpoint(path, {"step": 1, "config": {}, "tokenizer": "{}",
                               "model": {"w": torch.arange(100_000.0)}})
    before = path.read_bytes() if path.exists() else None
    size = 400_000 if before is None else len(before)
    cap = size - 100 if limit == "all_but_the_end" else size // 2
    done = subprocess.run([sys.executable, "-c", SAVE_WITH_A_FILE_SIZE_LIMIT, str(path), str(cap)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0 and done.stderr == "", done.stderr
    message = json.loads(done.stdout)
    previous = ("there was no previous last.pt" if before is None
                else "the previous last.pt is intact")
    assert_one_line(message, f"could not write {path} (File too large)", previous)
    assert (path.read_bytes() if path.exists() else None) == before
    assert os.listdir(tmp_path) == ([] if before is None else ["last.pt"])


# --- files that are not checkpoints ----------------------------------------------------

class RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (os.makedirs, ("/tmp/fastgpt-test-pwned-" + str(os.getpid()),))


def test_loading_never_runs_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "step": 0, "config": {}, "model": RunsCodeWhenUnpickled(),
                "tokenizer": ""}, path)
    with pytest.raises(FastGPTError) as info:
        load_checkpoint(path)
    assert not os.path.exists("/tmp/fastgpt-test-pwned-" + str(os.getpid()))
    message = str(info.value)
    assert_one_line(message, f"{path} was refused: it holds Python objects that would run code",
                    "so it is not a fastgpt checkpoint", "weights_only=True", "os.makedirs")
    assert not any(advice in message for advice in TORCH_ADVICE), message


def test_a_pickled_object_outside_a_zip_is_refused_too(tmp_path):
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(RunsCodeWhenUnpickled()))
    with pytest.raises(FastGPTError) as info:
        load_checkpoint(path)
    assert not os.path.exists("/tmp/fastgpt-test-pwned-" + str(os.getpid()))
    assert_one_line(str(info.value), str(path))
    assert not any(advice in str(info.value) for advice in TORCH_ADVICE)


def _pickle_damaged(path: Path) -> None:
    """Flip bytes in data.pkl (the structure the tensors hang in): torch's unpickler fails."""
    with zipfile.ZipFile(path) as archive:
        pickled = next(m for m in archive.infolist() if m.filename.endswith("/data.pkl"))
    flip_bytes(path, pickled, count=8, start=pickled.file_size // 2)


@pytest.mark.parametrize("damage, reason", [
    (lambda path: path.write_bytes(b""), "the file is empty"),
    (lambda path: path.write_bytes(b"this is not a zip file at all"), "not a zip archive"),
    (lambda path: path.write_bytes(bytes(4096)), "not a zip archive"),  # torch: a legacy .tar
    (lambda path: path.write_bytes(pickle.dumps({"a": 1})), "not a zip archive"),
    (lambda path: path.write_bytes(path.read_bytes()[:path.stat().st_size // 2]),
     "failed finding central directory"),
    (lambda path: path.write_bytes(path.read_bytes()[:1000]), "failed finding central directory"),
    (_pickle_damaged, ""),
])
def test_corrupt_files_are_one_line_errors_without_torchs_advice(tmp_path, real_text, damage,
                                                                  reason, capsys):
    path = tmp_path / "bad.pt"
    save_checkpoint(path, small_checkpoint(real_text))
    damage(path)
    with pytest.raises(FastGPTError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert_one_line(message, str(path), reason)
    assert not any(advice in message for advice in TORCH_ADVICE), message
    assert "it was refused" in message and len(message) < 300
    assert capsys.readouterr().err == ""  # torch's warnings about odd pickles are not shown


def test_truncated_missing_and_foreign_checkpoints(tmp_path, real_text):
    good = tmp_path / "good.pt"
    save_checkpoint(good, small_checkpoint(real_text))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(FastGPTError, match=r"not a readable fastgpt checkpoint \(corrupt or trunc"):
        load_checkpoint(truncated)
    with pytest.raises(FastGPTError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(FastGPTError, match="not a fastgpt checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(FastGPTError, match="not a fastgpt checkpoint"):
        load_checkpoint(tmp_path / "list.pt")
    torch.save({**small_checkpoint(real_text), "format": 99}, tmp_path / "future.pt")
    with pytest.raises(FastGPTError, match="format 99"):
        load_checkpoint(tmp_path / "future.pt")


def test_incompatible_weights_are_a_clear_error(tmp_path, real_text):
    state = small_checkpoint(real_text)
    state["model"]["lm_head.weight"] = torch.zeros(3, 3)
    save_checkpoint(tmp_path / "c.pt", state)
    with pytest.raises(FastGPTError, match="does not fit"):
        model_from_checkpoint(load_checkpoint(tmp_path / "c.pt"), tmp_path / "c.pt")


# --- a checkpoint belongs to its run directory ------------------------------------------


@pytest.mark.parametrize("other", ["d_model", "corpus"])
def test_a_last_pt_copied_from_another_run_is_refused_in_one_line(tmp_path, corpus_file,
                                                                   real_text, capsys, other):
    # another run's last.pt over this one's: another d_model, or the same shape trained on
    # another corpus. Resumed, metrics.jsonl would mix two models.
    from fastgpt.cli import main
    from fastgpt.train import resume_config, train
    from helpers import tiny_config
    runs = tmp_path / "runs"
    train(tiny_config(runs, corpus_file, max_steps=2, eval_interval=2))
    if other == "d_model":
        train(tiny_config(runs, corpus_file, name="other", d_model=64, max_steps=2,
                          eval_interval=2))
    else:
        other_corpus = tmp_path / "other.txt"
        other_corpus.write_text(real_text[len(real_text) // 2:])
        train(tiny_config(runs, other_corpus, name="other", max_steps=2, eval_interval=2))
    mine = runs / "tiny"
    (mine / "last.pt").write_bytes((runs / "other" / "last.pt").read_bytes())
    before = {name: (mine / name).read_bytes() for name in ("metrics.jsonl", "config.json")}
    capsys.readouterr()

    with pytest.raises(FastGPTError) as refused:
        resume_config(str(runs), "tiny", {"max_steps": 4})
    assert_one_line(str(refused.value), f"{mine / 'last.pt'} does not belong to {mine}",
                    "d_model" if other == "d_model" else "corpus")
    with pytest.raises(FastGPTError, match="does not belong"):  # train() checks it too
        train(tiny_config(runs, corpus_file, **({"d_model": 64} if other == "d_model" else {}),
                          max_steps=4, eval_interval=2), resume=True)
    assert main(["train", "--resume", "--name", "tiny", "--runs_dir", str(runs)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "does not belong" in error, error
    assert {name: (mine / name).read_bytes() for name in before} == before
