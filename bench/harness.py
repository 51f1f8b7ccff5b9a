"""The loop every benchmark here runs: cases -> a measure function per case -> rows -> a
printed table -> the JSON result file -> the failures, listed at the end.

    failures = []
    def measure(case: dict) -> dict | list[dict]: ...   # times one case; appends to failures
    return run_benchmarks("adamw", "AdamW step", card_of(device), reps, cases, measure,
                          Table([Column("parameters", "set", width=20, left=True), ...]),
                          args.out, failures)

A case is a dict of what tells it apart ({"dtype": "bfloat16", "V": 512}); its row is a
dict with those keys, the timings (NAME_ms, in milliseconds) and whatever else was
measured. The result file, {"benchmark", "device", "torch", "cuda", "reps", "rows"}, is
what bench/report.py renders and bench/gpu_check.py collects. A case that raises is a
failure too: its traceback is printed and the other cases still run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Column:
    """One column of the printed table: `title` over cells `width` characters wide, right-
    aligned (left where `left`). A row's cell is format(value, fmt), value being row[key]
    (or key(row) where key is a function), or `missing` where the value is None."""
    title: str
    key: str | Callable[[dict], object]
    fmt: str = ""
    width: int = 12
    left: bool = False
    missing: str = "n/a"

    def cell(self, row: dict) -> str:
        value = self.key(row) if callable(self.key) else row.get(self.key)
        return self.missing if value is None else format(value, self.fmt)


class Table:
    """Rows printed as fixed-width text, one line each as they come, or as Markdown."""

    def __init__(self, columns: list[Column], markdown: bool = False):
        self.columns, self.markdown = columns, markdown

    def _join(self, cells: list[str]) -> str:
        if self.markdown:
            return "| " + " | ".join(cells) + " |"
        return " ".join(cell.ljust(c.width) if c.left else cell.rjust(c.width)
                        for c, cell in zip(self.columns, cells)).rstrip()

    def header(self) -> str:
        line = self._join([c.title for c in self.columns])
        if self.markdown:
            line += "\n|" + "".join("---|" if c.left else "---:|" for c in self.columns)
        return line

    def line(self, row: dict) -> str:
        return self._join([c.cell(row) for c in self.columns])


def benchmark_parser(doc: str, reps: int | None = None, warmup: int | None = None
                     ) -> argparse.ArgumentParser:
    """A parser of the flags the benchmarks share: --out, and --reps and --warmup where
    their defaults are given. `doc`: the script's docstring (its first line describes it)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", help="JSON file for the results")
    if reps is not None:
        parser.add_argument("--reps", type=int, default=reps,
                            help=f"timed runs, the median is kept (default {reps})")
    if warmup is not None:
        parser.add_argument("--warmup", type=int, default=warmup,
                            help=f"untimed runs first (default {warmup})")
    return parser


def card_of(device: torch.device) -> str:
    """What the timings ran on: the GPU's name, or the CPU and its threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"CPU ({platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads)")


def write_result(path: str | None, benchmark: str, device: str, reps: int, rows: list) -> None:
    """Write the rows with the card and versions to `path` (nothing if path is None)."""
    if not path:
        return
    result = {"benchmark": benchmark, "device": device, "torch": torch.__version__,
              "cuda": torch.version.cuda, "reps": reps, "rows": rows}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def device_for(op: str) -> torch.device | None:
    """Where a benchmark of `op` runs: the GPU if there is one, else the CPU (its
    reference-only mode). None, with the reason on stderr, when there is a GPU but fastgpt's
    fused `op` cannot run on it (the benchmark then exits 1)."""
    from fastgpt import ops

    if not torch.cuda.is_available():
        return torch.device("cpu")
    ok, why = ops.available()[op]
    if not ok:
        print(f"the fused {op} cannot run here: {why}", file=sys.stderr)
        return None
    return torch.device("cuda")


def report_failures(failures: list[str]) -> int:
    """List the failures on stderr; the exit status: 1 if there are any, else 0."""
    if not failures:
        return 0
    print("\nFAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
    return 1


def _label(case: dict) -> str:
    return " ".join(f"{key}={value}" for key, value in case.items())


def run_benchmarks(benchmark: str, title: str, card: str, reps: int, cases: Iterable[dict],
                   measure: Callable[[dict], dict | list[dict]], table: Table | None,
                   out: str | None, failures: list[str] | None = None) -> int:
    """Time every case and report it; the exit status (1 if anything failed).

    benchmark: the result file's name for it (report.py's key). title: what is timed,
    printed with `card` (card_of(device)) and torch's version. measure(case): the case's
    row, or its rows (variants timed in turns give one each); it may print lines of its own
    and append to `failures` (the script's list: a checked target missed, a wrong result).
    table: prints each row as it comes (None: measure prints its own)."""
    failures = [] if failures is None else failures
    print(f"{title} on {card}; torch {torch.__version__}")
    if table is not None:
        print(table.header())
    rows = []
    for case in cases:
        try:
            measured = measure(case)
        except Exception as exc:  # report it, go on with the other cases, fail at the end
            traceback.print_exc()
            failures.append(f"{_label(case)}: {type(exc).__name__}: {str(exc).strip()[:300]}")
            continue
        for row in measured if isinstance(measured, list) else [measured]:
            if table is not None:
                print(table.line(row))
            rows.append(row)
    write_result(out, benchmark, card, reps, rows)
    return report_failures(failures)
