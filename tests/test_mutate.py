"""tests/mutate.py, cheaply: its list still fits the code, and one mutation run end to end.
The whole run (every mutation, about half an hour on 2 cores) is not part of the suite:
`python tests/mutate.py` before resolving kernel work."""

import subprocess
import sys
from pathlib import Path

import pytest

import mutate


def test_every_pattern_occurs_once_and_every_test_file_exists():
    names = [m.name for m in mutate.MUTATIONS]
    assert len(set(names)) == len(names)
    for m in mutate.MUTATIONS:
        source = (mutate.ROOT / m.file).read_text()
        assert source.count(m.pattern) == 1, (m.name, m.file, source.count(m.pattern))
        assert m.replacement != m.pattern, m.name
        for arg in m.tests:
            if arg.startswith("tests/"):
                assert (mutate.ROOT / arg.split("::")[0]).is_file(), (m.name, arg)
    families = {family: sum(m.file in files for m in mutate.MUTATIONS) for family, files in {
        "cross-entropy": ("fastgpt/ops/triton_ce.py",),
        "attention kernels": ("csrc/attention_fp32.cuh",),
        "AdamW": ("csrc/adamw_math.h", "csrc/adamw_cpu.cpp", "csrc/adamw.cuh"),
        "resume": ("fastgpt/train.py", "fastgpt/checkpoint.py")}.items()}
    assert all(n >= (2 if family == "resume" else 3) for family, n in families.items()), families


@pytest.mark.slow
def test_a_mutation_is_caught_in_the_scratch_copy():
    """The machinery end to end on its cheapest entry: the copy, its import check, the
    baseline and the mutated run (about 20 s)."""
    result = subprocess.run([sys.executable, str(Path(mutate.__file__)), "--only",
                             "model-loss-ignores-backend"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "model-loss-ignores-backend" in result.stdout and "caught" in result.stdout
    assert "mutate: 1/1 caught" in result.stdout
