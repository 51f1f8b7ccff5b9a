"""The command line: the happy paths through real processes, and every listed user mistake
ending in one line on stderr and a non-zero exit, never a traceback."""

import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

from fastgpt import __version__, cli
from fastgpt.checkpoint import save_checkpoint
from fastgpt.cli import main
from fastgpt.rundir import RunDir
from fastgpt.train import train
from helpers import tiny_cli_args, tiny_config


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a command that defaults to ./runs writes nothing in the repo


def run_main(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fastgpt") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.slow
def test_console_script_and_module_run_info():
    script = shutil.which("fastgpt")
    assert script, "the fastgpt console script is not installed"
    for command in ([script, "info"], [sys.executable, "-m", "fastgpt", "info"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert f"torch      {torch.__version__}" in result.stdout
        for op in ("cross_entropy", "adamw", "causal_attention", "linear_cross_entropy"):
            assert op in result.stdout


@pytest.mark.slow
def test_prepare_train_sample_end_to_end(tmp_path, corpus_file):
    runs = tmp_path / "runs"
    result = subprocess.run([sys.executable, "-m", "fastgpt", "prepare", "--corpus",
                             str(corpus_file)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "tokens" in result.stdout and "train" in result.stdout
    result = subprocess.run([sys.executable, "-m", "fastgpt", "train",
                             *tiny_cli_args(runs, corpus_file, max_steps=3)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "done at step 3" in result.stdout + result.stderr
    result = subprocess.run([sys.executable, "-m", "fastgpt", "sample", "--run", "tiny",
                             "--runs_dir", str(runs), "--prompt", "import ",
                             "--max_new_tokens", "10", "--seed", "7", "--device", "cpu"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # the text the command printed is the one its checkpoint gives for that prompt, length
    # and seed (best.pt, which --run prefers), and the seed mattered
    from fastgpt.sample import sample_from_checkpoint
    best = runs / "tiny" / "best.pt"
    assert best.exists()
    (text,) = sample_from_checkpoint(str(best), prompt="import ", max_new_tokens=10, seed=7,
                                     device="cpu")
    assert text.startswith("import ") and len(text) > len("import ")
    assert result.stdout == text + "\n"
    assert sample_from_checkpoint(str(best), prompt="import ", max_new_tokens=10, seed=8,
                                  device="cpu") != [text]
    assert "10 new tokens in" in result.stderr


# negative numbers in any float syntax reach the field checks (argparse alone would take
# -1e-3 for an option)
NEGATIVE_NUMBERS = [
    (["train", "--lr", "-1e-3"], ["lr must be a positive number, got -0.001"]),
    (["train", "--lr", "-1E+3"], ["lr must be a positive number, got -1000.0"]),
    (["train", "--lr", "-3."], ["lr must be a positive number, got -3.0"]),
    (["train", "--lr", "-inf"], ["lr must be a positive number, got -inf"]),
    (["train", "--weight_decay", "-1e-2"], ["weight_decay must be a finite number >= 0"]),
    (["train", "--min-lr", "-nan"], ["min_lr must be a finite number >= 0, got nan"]),
    (["train", "--max_steps", "-1e3"], ["max_steps expects int, got '-1e3'"]),
    (["sample", "--checkpoint", "/nonexistent/last.pt", "--temperature", "-1e-1"],
     ["temperature must be a finite number >= 0", "got -0.1"]),
    (["sample", "--checkpoint", "/nonexistent/last.pt", "--temperature", "nan"],
     ["temperature must be a finite number >= 0", "got nan"]),  # checked before loading
    (["train", "--name", "-x"], ["argument --name: expected one argument"]),  # not a number
    (["train", "--resume", "-1e-3"], ["unrecognized arguments: -1e-3"]),  # a flag takes none
]


@pytest.mark.parametrize("argv, fragments", [
    (["train", "--preset", "nope"], ["invalid choice: 'nope'"]),
    (["train", "--no_such_field", "3"], ["unrecognized arguments: --no_such_field"]),
    (["train", "--num_heads", "5"], ["num_heads (5) must divide d_model (384)"]),
    (["train", "--d_model", "big"], ["d_model expects int"]),
    (["train", "--corpus", "/nonexistent/corpus.txt"], ["is not a file, a directory"]),
    (["sample"], ["--run NAME", "--checkpoint PATH"]),
    (["sample", "--checkpoint", "/nonexistent/last.pt"], ["no checkpoint at"]),
] + NEGATIVE_NUMBERS)
def test_user_mistakes(capsys, argv, fragments):
    code, _, err = run_main(capsys, *argv)
    assert_one_line_error(code, err, *fragments)


def test_corpus_mistakes(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_one_line_error(*run_main(capsys, "train", "--corpus", str(empty))[::2], "is empty")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café au lait\n".encode("latin-1") * 100)
    assert_one_line_error(*run_main(capsys, "train", "--corpus", str(latin1))[::2],
                          "is not UTF-8", "offset 3")
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be: that is the question.\n" * 20)
    assert_one_line_error(*run_main(capsys, "train", "--corpus", str(short))[::2],
                          "split has", "context_length + 1 = 257")


def test_checkpoint_mistakes(capsys, tmp_path, corpus_file):
    runs = tmp_path / "runs"
    code, _, err = run_main(capsys, "train", *tiny_cli_args(runs, corpus_file), "--resume")
    assert_one_line_error(code, err, "no checkpoint", "without --resume")

    train(tiny_config(runs, corpus_file, max_steps=2))
    capsys.readouterr()
    code, _, err = run_main(capsys, "train", *tiny_cli_args(runs, corpus_file))
    assert_one_line_error(code, err, "already holds a run", "--resume")
    code, _, err = run_main(capsys, "train", *tiny_cli_args(runs, corpus_file, d_model=64),
                            "--resume")
    assert_one_line_error(code, err, "cannot resume with d_model=64")

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes((runs / "tiny" / "last.pt").read_bytes()[:1000])
    code, _, err = run_main(capsys, "sample", "--checkpoint", str(corrupt))
    assert_one_line_error(code, err, "not a readable fastgpt checkpoint")

    incompatible = tmp_path / "incompatible.pt"
    state = torch.load(runs / "tiny" / "last.pt", weights_only=True)
    state["config"]["d_model"] = 64  # the weights no longer fit the config
    save_checkpoint(incompatible, state)  # with a checksum that matches
    code, _, err = run_main(capsys, "sample", "--checkpoint", str(incompatible))
    assert_one_line_error(code, err, "does not fit")


def test_sample_refuses_a_temperature_that_is_not_a_finite_number(capsys, tmp_path,
                                                                   corpus_file):
    train(tiny_config(tmp_path / "runs", corpus_file, max_steps=1))
    capsys.readouterr()
    checkpoint = str(tmp_path / "runs" / "tiny" / "last.pt")
    for temperature in ("nan", "inf", "-inf", "-1"):
        code, _, err = run_main(capsys, "sample", "--checkpoint", checkpoint,
                                "--temperature", temperature, "--max_new_tokens", "3")
        assert_one_line_error(code, err, "temperature must be a finite number >= 0",
                              f"got {float(temperature)}")
    code, out, err = run_main(capsys, "sample", "--checkpoint", checkpoint, "--temperature",
                              "0", "--max_new_tokens", "3")
    assert code == 0 and out
    assert "3 new tokens in " in err and "with the key/value cache" in err
    code, uncached, err = run_main(capsys, "sample", "--checkpoint", checkpoint,
                                   "--temperature", "0", "--max_new_tokens", "3",
                                   "--no_kv_cache")
    assert code == 0 and uncached == out and "without the key/value cache" in err


def test_option_values_reach_the_config(capsys, monkeypatch):
    configs = []
    monkeypatch.setattr(cli, "cmd_train", lambda args: configs.append(cli._config(args)) or 0)
    code, _, err = run_main(capsys, "train", "--preset", "cpu", "--lr", "2e-3", "--seed", "-5",
                            "--min_lr", "1e-5", "--name", "-1e5")
    assert code == 0, err
    assert (configs[0].lr, configs[0].seed, configs[0].min_lr, configs[0].name) == (
        2e-3, -5, 1e-5, "-1e5")


HEAVY = ("torch", "triton", "numpy", "tokenizers")
# `python -c WITHOUT_HEAVY ARGS...` runs `fastgpt ARGS...` where `import torch` (and the other
# heavy packages) raises ImportError: None in sys.modules makes an import fail
WITHOUT_HEAVY = (f"import sys; sys.modules.update(dict.fromkeys({HEAVY!r}))\n"
                 "from fastgpt.cli import main; sys.exit(main(sys.argv[1:]))")


def test_parsing_and_validating_a_config_import_nothing_heavy():
    code = f"""if True:
        import sys
        from fastgpt import __version__, cli
        parser = cli.build_parser()
        config = cli._config(parser.parse_args(["train", "--preset", "cpu", "--lr", "1e-3"]))
        assert config.lr == 1e-3 and config.name == "cpu"
        assert parser.parse_args(["sample", "--run", "x"]).run == "x"
        assert cli.main(["train", "--lr", "-1e-3"]) == 1  # a mistake answers before torch
        print("heavy:", [m for m in {HEAVY!r} if m in sys.modules])
    """
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "heavy: []" in result.stdout, result.stdout
    assert "lr must be a positive number" in result.stderr


@pytest.mark.parametrize("argv, expected, returncode", [
    (["--version"], f"fastgpt {__version__}", 0), (["--help"], "train", 0),
    (["train", "--help"], "--lr", 0), (["train", "--lr", "-1e-3"], "lr must be a positive", 1),
    (["train", "--seed", str(2**64)], "seed must be an integer from -2**63 to 2**63-1", 1),
    (["sample", "--run", "x", "--seed", str(2**64)], "seed must be an integer from -2**63", 1),
    (["sample", "--run", "x", "--seed", str(-2**63 - 1)], "got -9223372036854775809", 1),
    # argv bytes that are not UTF-8 reach sys.argv as surrogate escapes
    (["sample", "--run", "x", "--prompt", b"ab\xff"],
     "fastgpt: error: --prompt is not UTF-8 text (byte 0xff at offset 2)", 1),
])
def test_help_version_and_mistakes_run_where_torch_cannot_be_imported(argv, expected,
                                                                      returncode):
    result = subprocess.run([sys.executable, "-c", WITHOUT_HEAVY, *argv], capture_output=True,
                            text=True, timeout=120)
    assert "Traceback" not in result.stderr, result.stderr
    assert expected in result.stdout + result.stderr
    assert result.returncode == returncode
    if returncode:
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.fixture
def commands_run_nothing(monkeypatch):
    """Each command returns 0 at once: parsing is under test (train --max_step 100 as
    --max_steps would train)."""
    for command in ("prepare", "train", "sample", "verify", "info"):
        monkeypatch.setattr(cli, f"cmd_{command}", lambda args: 0)


@pytest.mark.parametrize("argv", [
    ["--vers"], ["prepare", "--max_step", "1"], ["train", "--max_step", "100"],
    ["train", "--resum"], ["sample", "--max_new", "5"], ["verify", "--hel"], ["info", "--hel"],
])
def test_no_option_is_taken_for_a_prefix_of_another(capsys, commands_run_nothing, argv):
    code, out, err = run_main(capsys, *argv)
    assert code == 2 and out == ""  # no version, no help printed, nothing run
    assert_one_line_error(code, err)
    if len(argv) > 1:
        assert f"unrecognized arguments: {' '.join(argv[1:])}" in err


@pytest.mark.parametrize("argv, fragments", [
    (["train", "--max_step", "100"], ["fastgpt train: error: unrecognized arguments: "
                                      "--max_step 100; did you mean --max_steps? "
                                      "(see fastgpt train --help)"]),
    (["train", "--max_stpes", "100"], ["did you mean --max_steps?", "fastgpt train --help"]),
    (["train", "--max-stpes=100"], ["arguments: --max-stpes=100; did you mean --max-steps?"]),
    (["train", "--lrr", "1", "--max_stpes", "3"],
     ["did you mean --lr (for --lrr), --max_steps (for --max_stpes)?"]),
    (["prepare", "--vocab", "300"], ["did you mean --vocab_size?", "fastgpt prepare --help"]),
    (["sample", "--max_new", "5"], ["did you mean --max_new_tokens?",
                                    "(see fastgpt sample --help)"]),
    (["train", "--preset", "cpuu"], ["fastgpt train: error: argument --preset: invalid "
                                     "choice: 'cpuu'; did you mean 'cpu'? (choose from "
                                     "'seed', 'cpu') (see fastgpt train --help)"]),
    (["trian", "--lr", "1"], ["fastgpt: error: argument command: invalid choice: 'trian'; "
                              "did you mean 'train'?", "(see fastgpt --help)"]),
    (["train", "--preset", "nope"], ["invalid choice: 'nope' (choose from"]),  # nothing close
    (["train", "--zzz"], ["unrecognized arguments: --zzz (see fastgpt train --help)"]),
])
def test_a_mistyped_name_gets_a_guess_and_the_commands_help(capsys, commands_run_nothing,
                                                             argv, fragments):
    code, _, err = run_main(capsys, *argv)
    assert code == 2
    assert_one_line_error(code, err, *fragments)


def test_a_second_train_on_a_locked_run_fails_before_importing_torch(tmp_path, corpus_file):
    runs = tmp_path / "runs"
    with RunDir(runs / "tiny"):  # as a live run holds it
        before = sorted(p.name for p in runs.rglob("*"))
        for resume in ([], ["--resume"]):
            result = subprocess.run(
                [sys.executable, "-c", WITHOUT_HEAVY, "train",
                 *tiny_cli_args(runs, corpus_file), *resume],
                capture_output=True, text=True, timeout=120)
            assert result.returncode == 1
            assert result.stderr == (f"fastgpt: error: {runs / 'tiny'} is in use by another "
                                     f"fastgpt run (PID {os.getpid()}); wait for it to end, "
                                     f"or use another --name\n")
        assert sorted(p.name for p in runs.rglob("*")) == before == [".lock", "tiny"]


def test_under_torchrun_only_rank_0_checks_the_lock(capsys, tmp_path, monkeypatch):
    # rank 0 takes the lock (train.py): a slower rank must not take it for another run's
    trained = []
    monkeypatch.setitem(sys.modules, "fastgpt.train", types.SimpleNamespace(
        train=lambda config, resume: trained.append(config.name), resume_config=None))
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["train", "--runs_dir", str(tmp_path / "runs"), "--name", "tiny"]
    with RunDir(tmp_path / "runs" / "tiny"):
        monkeypatch.setenv("RANK", "1")
        assert run_main(capsys, *argv)[0] == 0 and trained == ["tiny"]
        monkeypatch.setenv("RANK", "0")
        assert_one_line_error(*run_main(capsys, *argv)[::2], "is in use by another fastgpt run")
    assert trained == ["tiny"]


def test_a_prompt_that_is_not_utf8_is_refused_before_the_checkpoint_loads(capsys):
    code, _, err = run_main(capsys, "sample", "--checkpoint", "/nonexistent/last.pt",
                            "--prompt", "caf\udce9")  # b"caf\xe9" (latin-1) as argv gives it
    assert_one_line_error(code, err, "--prompt is not UTF-8 text (byte 0xe9 at offset 3)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what info says on a CPU")
@pytest.mark.slow
def test_info_on_a_cpu_says_verify_runs_the_triton_kernel_through_the_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "fastgpt", "info"], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if "cross_entropy" in line)
    assert "unavailable" in line and "needs a CUDA GPU to train with it" in line
    assert "`fastgpt verify` runs it here through Triton's interpreter" in line
    assert "TRITON_INTERPRET=1" in line
    for op in ("cross_entropy", "adamw", "causal_attention", "linear_cross_entropy"):
        assert any(line.split()[:3] == [op, "torch", "available:"]
                   for line in result.stdout.splitlines()), op
