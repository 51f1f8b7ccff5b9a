"""`auto` measures: the chooser with an injected clock, its cache, the choice recorded in a
run and honoured on resume, `fastgpt tune` and `fastgpt info` (fastgpt/tune.py and
fastgpt.ops.dispatch's measured choice)."""

from __future__ import annotations

import json

import pytest
import torch

from fastgpt import ops, tune
from fastgpt.checkpoint import load_checkpoint
from fastgpt.cli import main
from fastgpt.ops import dispatch
from fastgpt.train import train
from helpers import tiny_config

SHAPE = "q 2x2x8x4 float32"


def trials(*excluded: str, raises: str | None = None) -> dict:
    """A trial per implementation (doing nothing), named for the clock; `excluded` ones
    replaced by the reason they cannot run; `raises` one raising when run."""
    def make(impl):
        def trial():
            if impl == raises:
                raise RuntimeError("boom\nsecond line")
        trial.implementation = impl
        return trial
    return {impl: f"{impl} cannot run here" if impl in excluded else make(impl)
            for impl in dispatch.IMPLEMENTATIONS}


def clock(times: dict[str, float]):
    """A timer that runs the trial once and answers `times` for its implementation."""
    asked = []

    def timer(trial):
        asked.append(trial.implementation)
        trial()
        return times[trial.implementation]
    timer.asked = asked
    return timer


@pytest.mark.parametrize("times,chosen", [
    ({"fused": 0.5, "torch": 1.0, "reference": 2.0}, "fused"),
    ({"fused": 1.2, "torch": 1.0, "reference": 2.0}, "torch"),
    ({"fused": 0.97, "torch": 1.0, "reference": 0.96}, "torch"),  # within the 5% margin
    ({"fused": 1.5, "torch": 1.0, "reference": 0.9}, "reference"),
])
def test_the_fastest_replaces_torch_only_beyond_the_margin(times, chosen):
    choice = dispatch.choose("causal_attention", SHAPE, trials(), clock(times))
    assert choice.chosen == chosen and choice.times_ms == times and not choice.excluded
    assert choice.speedup() == pytest.approx(times["torch"] / times[chosen])


def test_what_cannot_run_is_excluded_with_its_reason():
    timer = clock({"reference": 2.0, "torch": 1.0, "fused": 0.1})
    choice = dispatch.choose("adamw", SHAPE, trials("fused"), timer)
    assert choice.chosen == "torch" and "fused" not in timer.asked
    assert choice.excluded == {"fused": "fused cannot run here"}
    assert "fused: fused cannot run here" in choice.describe()
    # a trial that fails at these shapes is excluded with its error's first line
    choice = dispatch.choose("adamw", SHAPE, trials(raises="fused"), timer)
    assert choice.chosen == "torch"
    assert choice.excluded == {"fused": "failed in its trial (RuntimeError: boom)"}
    # without torch the fastest of the others
    choice = dispatch.choose("adamw", SHAPE, trials("torch"), clock({"reference": 2.0,
                                                                     "fused": 1.99}))
    assert choice.chosen == "fused"
    with pytest.raises(ops.BackendUnavailable, match="no implementation of adamw can run"):
        dispatch.choose("adamw", SHAPE, trials(*dispatch.IMPLEMENTATIONS), timer)


def cache(tmp_path, log=None):
    return dispatch.ChoiceCache(tmp_path / "choices.json", torch.device("cpu"),
                                log or (lambda line: None))


def never(trial):
    raise AssertionError("a cached choice is not measured again")


def test_a_cached_choice_costs_nothing_and_a_new_shape_is_measured(tmp_path):
    first = dispatch.choose("adamw", SHAPE, trials(), clock({"reference": 2.0, "torch": 1.0,
                                                             "fused": 0.5}), cache(tmp_path))
    again = dispatch.choose("adamw", SHAPE, trials(), never, cache(tmp_path))  # from the file
    assert again.cached and (again.chosen, again.times_ms) == (first.chosen, first.times_ms)
    assert again.describe().endswith(f"[cached] at {SHAPE}")
    timer = clock({"reference": 2.0, "torch": 1.0, "fused": 3.0})
    other = dispatch.choose("adamw", "another shape", trials(), timer, cache(tmp_path))
    assert not other.cached and other.chosen == "torch" and len(timer.asked) == 3
    # a cached choice that cannot run now (its kernel failed its self-check) is measured
    timer = clock({"reference": 2.0, "torch": 1.0})
    assert dispatch.choose("adamw", SHAPE, trials("fused"), timer, cache(tmp_path)).chosen \
        == "torch"
    assert sorted(timer.asked) == ["reference", "torch"]


@pytest.mark.parametrize("change", ["kernel sources", "versions", "device"])
def test_the_cache_misses_when_a_kernel_a_version_or_the_device_changes(tmp_path,
                                                                         monkeypatch, change):
    times = {"reference": 2.0, "torch": 1.0, "fused": 0.5}
    dispatch.choose("adamw", SHAPE, trials(), clock(times), cache(tmp_path))
    if change == "kernel sources":
        monkeypatch.setattr(dispatch, "_kernel_sources_hash", lambda: "an edited kernel")
        dispatch._versions.cache_clear()
        monkeypatch.setattr(dispatch, "_versions", dispatch.functools.cache(
            dispatch._versions.__wrapped__))
    elif change == "versions":
        monkeypatch.setattr(dispatch, "_versions", lambda: "torch 9.9")
    else:
        monkeypatch.setattr(dispatch, "machine", lambda device: "NVIDIA H100 (sm_90)")
    timer = clock(times)
    assert not dispatch.choose("adamw", SHAPE, trials(), timer, cache(tmp_path)).cached
    assert len(timer.asked) == 3
    assert len(json.loads((tmp_path / "choices.json").read_text())["entries"]) == 2


def test_remeasuring_keeps_the_current_choice_within_the_margin(tmp_path):
    dispatch.choose("adamw", SHAPE, trials(), clock({"reference": 0.9, "torch": 1.0,
                                                     "fused": 3.0}), cache(tmp_path))
    # torch now 3% faster than the reference: noise, the reference stays
    again = dispatch.choose("adamw", SHAPE, trials(), clock({"reference": 1.0, "torch": 0.97,
                                                             "fused": 3.0}),
                            cache(tmp_path), remeasure=True)
    assert again.chosen == "reference" and not again.cached
    again = dispatch.choose("adamw", SHAPE, trials(), clock({"reference": 1.0, "torch": 0.9,
                                                             "fused": 3.0}),
                            cache(tmp_path), remeasure=True)
    assert again.chosen == "torch"


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b"[1, 2]"])
def test_a_corrupt_cache_is_measured_again_with_a_one_line_note(tmp_path, content):
    (tmp_path / "choices.json").write_bytes(content)
    notes = []
    timer = clock({"reference": 2.0, "torch": 1.0, "fused": 0.5})
    assert dispatch.choose("adamw", SHAPE, trials(), timer, cache(tmp_path, notes.append)) \
        .chosen == "fused"
    assert len(notes) == 1 and "\n" not in notes[0] and "measuring again" in notes[0]
    assert dispatch.choose("adamw", SHAPE, trials(), never, cache(tmp_path)).cached  # rewritten


def test_the_trials_run_each_op_at_the_config_shapes(tmp_path):
    config = tiny_config(tmp_path, tmp_path / "corpus.txt", dropout=0.1)
    found = tune.trials(config, torch.device("cpu"), micro_batch=2)
    assert set(found) == set(tune.TUNED_OPS)
    for op, (shape, candidates) in found.items():
        if op != "adamw":  # (AdamW's CPU build runs where a test loaded it)
            assert not callable(candidates["fused"]), op  # no GPU; the interpreter is not one
        for impl in ("reference", "torch"):
            candidates[impl]()  # one forward + backward, or one AdamW step
            assert candidates[impl].implementation == impl
    head_dim = config.d_model // config.num_heads
    assert found["causal_attention"][0] == (f"q 2x{config.num_heads}x{config.context_length}"
                                            f"x{head_dim} float32, dropout 0.1")
    # an op the config names is not measured
    timer = clock({"reference": 2.0, "torch": 1.0})
    config = tiny_config(tmp_path, tmp_path / "c", backend="adamw=reference")
    named = tune.choose_backends(config, torch.device("cpu"), 2, print, timer=timer)
    assert set(named) == {"causal_attention", "linear_cross_entropy"}


def test_the_choice_is_recorded_and_honoured_on_resume(tmp_path, corpus_file, monkeypatch,
                                                       capsys):
    monkeypatch.delenv("FASTGPT_BACKEND")
    fastest = {"torch": 1.0, "reference": 2.0, "fused": 3.0}  # (AdamW's CPU build, if loaded)
    monkeypatch.setattr(dispatch, "median_ms", lambda trial, device: fastest[trial.implementation])
    seen = []
    real_resolve = dispatch.resolve_backend

    def recording(op, backend, device=None):
        chosen = real_resolve(op, backend, device)
        seen.append((op, chosen))
        return chosen

    monkeypatch.setattr(dispatch, "resolve_backend", recording)
    runs = tmp_path / "runs"
    train(tiny_config(runs, corpus_file, max_steps=2, eval_interval=2))
    out = capsys.readouterr().out
    assert "causal_attention: torch (torch 1 ms, reference 2 ms; fused: " in out, out
    recorded = {"cross_entropy": "auto", "adamw": "torch", "causal_attention": "torch",
                "linear_cross_entropy": "torch"}
    assert load_checkpoint(runs / "tiny" / "last.pt")["backends"] == recorded
    assert json.loads((runs / "tiny" / "config.json").read_text())["backends"] == recorded
    assert set(seen) == {("causal_attention", "torch"), ("linear_cross_entropy", "torch"),
                         ("adamw", "torch")}
    # the reference is now faster and the cache says so: a resume still runs torch's ops
    fastest.update(torch=2.0, reference=1.0)
    config = tiny_config(runs, corpus_file)
    tune.choose_backends(config, torch.device("cpu"), config.batch_size, print, remeasure=True)
    seen.clear()
    train(tiny_config(runs, corpus_file, max_steps=4, eval_interval=2), resume=True)
    assert "backends as the checkpoint recorded them" in capsys.readouterr().out
    assert {impl for _, impl in seen} == {"torch"}
    # unless --backend says otherwise
    seen.clear()
    train(tiny_config(runs, corpus_file, max_steps=6, eval_interval=2, backend="reference"),
          resume=True)
    assert {impl for _, impl in seen} == {"reference"}


def table_row(line: str) -> tuple[str, tuple[dict[str, float | None], str]]:
    """(op, ({implementation: ms or None}, chosen)) of a row of `fastgpt tune`'s table."""
    op, *rest = line.split()
    times = {}
    for impl in dispatch.IMPLEMENTATIONS:
        if rest[0] == "-":
            times[impl], rest = None, rest[1:]
        else:
            assert rest[1] == "ms", line
            times[impl], rest = float(rest[0]), rest[2:]
    return op, (times, rest[0])


@pytest.mark.slow
def test_tune_prints_its_table_and_info_the_cached_choices(monkeypatch, capsys):
    monkeypatch.delenv("FASTGPT_BACKEND")
    assert main(["tune", "--preset", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["op", "reference", "torch", "fused", "chosen", "vs", "torch"]
    rows = dict(table_row(line) for line in lines[3:6])
    assert set(rows) == set(tune.TUNED_OPS)
    for op, (times, chosen) in rows.items():
        assert times["reference"] > 0 and times["torch"] > 0, op
        # no GPU: no fused candidate, but AdamW's CPU build where a test loaded it
        assert times["fused"] is None or op == "adamw", op
        assert chosen in dispatch.IMPLEMENTATIONS and times[chosen] is not None
    assert lines[-1].startswith("saved: `fastgpt train` with these shapes on this machine runs")
    assert main(["info"]) == 0
    info = capsys.readouterr().out
    for op, (_, chosen) in rows.items():
        assert f"  {op}: {chosen} (" in info
    monkeypatch.setenv("FASTGPT_BACKEND", "reference")
    assert main(["tune", "--preset", "cpu"]) == 0
    assert "nothing to measure: the backend 'reference' names every op's implementation" \
        in capsys.readouterr().out
