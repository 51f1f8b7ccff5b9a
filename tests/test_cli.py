"""The command line: the happy paths through real processes, and every listed user mistake
ending in one line on stderr and a non-zero exit, never a traceback."""

import shutil
import subprocess
import sys

import pytest
import torch

from fastgpt.cli import main
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


def test_console_script_and_module_run_info():
    script = shutil.which("fastgpt")
    assert script, "the fastgpt console script is not installed"
    for command in ([script, "info"], [sys.executable, "-m", "fastgpt", "info"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert f"torch      {torch.__version__}" in result.stdout
        for op in ("cross_entropy", "adamw", "causal_attention"):
            assert op in result.stdout


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
                             "--max_new_tokens", "10"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("import ")


@pytest.mark.parametrize("argv, fragments", [
    (["train", "--preset", "nope"], ["invalid choice: 'nope'"]),
    (["train", "--no_such_field", "3"], ["unrecognized arguments: --no_such_field"]),
    (["train", "--num_heads", "5"], ["num_heads (5) must divide d_model (384)"]),
    (["train", "--d_model", "big"], ["d_model expects int"]),
    (["train", "--corpus", "/nonexistent/corpus.txt"], ["is not a file, a directory"]),
    (["sample"], ["--run NAME", "--checkpoint PATH"]),
    (["sample", "--checkpoint", "/nonexistent/last.pt"], ["no checkpoint at"]),
])
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
    torch.save(state, incompatible)
    code, _, err = run_main(capsys, "sample", "--checkpoint", str(incompatible))
    assert_one_line_error(code, err, "does not fit")
