"""The GPU check's stage records: bench/gpu_check.py writes them as it runs, bench/report.py
reads them after. A record, DIR/STAGE.json, is {"stage", "status", "seconds", ...} with
status "running" while the stage runs, then "pass", "fail", "timeout" or "skip" (with the
"reason"). No torch at import: a report is assembled on any machine."""

from __future__ import annotations

import json
import os
from pathlib import Path

BUDGET_SKIP = "budget:"  # how the reason of a stage the budget could not fit begins


def write_json(path: Path, value: dict) -> None:
    """Atomically: a reader (or a kill) sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    """The file's JSON, or None where it is missing or unreadable (cut off mid-write)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def rank(record: dict) -> int:
    """How much a record says: an outcome (pass, fail, timeout) over a skip for a reason
    of its own (a missing tool) over a skip for the budget over a cut-off run over none."""
    status = record.get("status")
    if status == "skip":
        return 1 if record.get("reason", "").startswith(BUDGET_SKIP) else 2
    return {"pass": 3, "fail": 3, "timeout": 3, "running": 0}.get(status, -1)


def finished(record: dict) -> bool:
    """Whether a stage's record is an outcome to keep: passed, failed, overran, or skipped
    for a reason other than the budget (a run cut off, or short of time, did not finish
    it)."""
    return rank(record) >= 2
