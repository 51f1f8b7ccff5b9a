"""`fastgpt prepare` on a corpus of a given size: wall time, MB/s, peak resident memory, and
the split between training the tokenizer and encoding.

    python bench/bench_prepare.py [--mb 100] [--vocab_size 512] [--out results.json]

The corpus is the running Python's own standard library: its .py files (sorted by path,
non-UTF-8 ones skipped) concatenated, repeated until --mb megabytes, into one file in a
temporary directory. `fastgpt prepare --corpus FILE --data_dir DIR` runs in a child
process (an empty token cache: a full prepare), its log lines time-stamped as they come.
The child reports its own peak resident memory as it exits: VmHWM of /proc/self/status on
Linux, the high-water mark of the program it runs. (getrusage's ru_maxrss of the children,
used before, counts the moment between fork and exec, when the child's resident memory is
this process's: with torch imported here, ~700 MB, whatever the prepare took.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source tree
from harness import Column, Table, benchmark_parser, run_benchmarks  # noqa: E402


def stdlib_corpus(path: Path, megabytes: float) -> int:
    """Write `megabytes` of the standard library's .py files to `path`; its size in bytes."""
    sources = []
    for file in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            sources.append(file.read_bytes().decode("utf-8").encode("utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
    want, written = int(megabytes * 1e6), 0
    with open(path, "wb") as f:
        while written < want:
            for data in sources:
                data = data[:want - written]
                f.write(data)
                written += len(data)
                if written >= want:
                    break
    return written


# `fastgpt ARGS`, then its peak resident memory in KiB on a last line of its own
REPORTING_PEAK = """
import resource, sys
from fastgpt.cli import main
try:
    code = main(sys.argv[1:])
finally:
    try:
        status = open("/proc/self/status").read()
        peak = int(status.split("VmHWM:")[1].split()[0])
    except (OSError, IndexError):  # not Linux: the process's maximum (KiB on Linux, BSDs)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"peak_rss_kib {peak}", flush=True)
sys.exit(code)
"""


def run_prepare(corpus: Path, data_dir: Path, vocab_size: int) -> dict:
    """Wall time, the seconds to the "encoding" log line (tokenizer training before it),
    and peak RSS of one `fastgpt prepare` in a child process."""
    command = [sys.executable, "-u", "-c", REPORTING_PEAK, "prepare", "--corpus", str(corpus),
               "--data_dir", str(data_dir), "--vocab_size", str(vocab_size)]
    started = time.perf_counter()
    marks: dict[str, float] = {}
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in child.stdout:
        lines.append(line.rstrip())
        for word in ("training", "encoding", "cached"):
            if line.startswith(word) and word not in marks:
                marks[word] = time.perf_counter() - started
    if child.wait() != 0:
        raise RuntimeError("fastgpt prepare failed:\n" + "\n".join(lines[-20:]))
    wall = time.perf_counter() - started
    peak_kib = int(lines[-1].split()[1])
    training = marks.get("encoding", wall) - marks.get("training", 0.0)
    return {"wall_s": wall, "train_tokenizer_s": training,
            "encode_s": marks.get("cached", wall) - marks.get("encoding", wall),
            "peak_rss_mb": peak_kib * 1024 / 1e6, "log": lines}


def main() -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--mb", type=float, default=100.0, help="corpus size in MB")
    parser.add_argument("--vocab_size", type=int, default=512)
    args = parser.parse_args()

    def measure(case: dict) -> dict:
        with tempfile.TemporaryDirectory() as work:
            corpus = Path(work) / "corpus.txt"
            size = stdlib_corpus(corpus, case["MB"])
            row = run_prepare(corpus, Path(work) / "cache", case["vocab"])
        row.pop("log")
        return {**case, **row, "MB_per_s": size / 1e6 / row["wall_s"]}

    table = Table([Column("MB", "MB", ".0f", width=6), Column("vocab", "vocab", width=6),
                   Column("wall s", "wall_s", ".1f"), Column("MB/s", "MB_per_s", ".2f"),
                   Column("tokenizer s", "train_tokenizer_s", ".1f"),
                   Column("encode s", "encode_s", ".1f"),
                   Column("peak RSS MB", "peak_rss_mb", ".0f", width=12)])
    return run_benchmarks("prepare", "fastgpt prepare of the standard library's source",
                          f"CPU ({os.cpu_count()} cores)", 1,
                          [{"MB": args.mb, "vocab": args.vocab_size}], measure, table,
                          args.out)


if __name__ == "__main__":
    raise SystemExit(main())
