"""Markdown from the GPU check's files: the benchmarks' JSON results (bench_cross_entropy.py,
bench_linear_cross_entropy.py, bench_adamw.py, bench_attention.py, bench_train.py) as tables, and a whole run directory of
bench/gpu_check.py as the published report, so that every published number comes from a
run's own files.

    python bench/report.py RESULT.json [RESULT.json ...]     # the tables, on stdout
    python bench/report.py --from DIR [DIR ...] [--results RESULTS]    # a run's report

--from assembles whatever stages DIR holds (with several: a run and its reruns, the last
to finish a stage giving its record): those a killed run was running are marked "cut
off", those it never reached "not reached (budget)". It writes RESULTS (default
bench/results/) <date>-<gpu>.md and .json, the run's log and benchmark results beside them,
and rewrites RESULTS/README.md. It needs no GPU and no torch: the files of a run cut short
on the GPU machine are assembled on any machine.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

from stages import rank, read_json  # bench/stages.py (no torch at import)

BENCH = Path(__file__).resolve().parent


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _ms(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _ratio(slow, fast) -> str:
    return "n/a" if not slow or not fast else f"{slow / fast:.2f}x"


def _mib(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def _timed(row: dict) -> list[str]:
    return [key[:-3] for key in row if key.endswith("_ms")]


def _speed_table(rows: list[dict], case: dict, ours: str, comparisons: dict) -> list[str]:
    """A Markdown table of a benchmark's rows: the case's columns, every variant's ms, and,
    where `ours` was timed, the comparisons' columns ({title: the cell of a row})."""
    names = _timed(rows[0])
    columns = {**case, **{f"{n} ms": lambda r, n=n: _ms(r[f"{n}_ms"]) for n in names}}
    if ours in names:
        columns.update(comparisons)
    return _table(list(columns), [[cell(r) for cell in columns.values()] for r in rows])


def cross_entropy(result: dict) -> list[str]:
    rows = result["rows"]
    case = {"dtype": lambda r: r["dtype"], "V": lambda r: str(r["V"])}
    fused = {"fused vs eager": lambda r: _ratio(r["eager_ms"], r["fused_ms"]),
             "fused vs compiled": lambda r: _ratio(r["compiled_ms"], r["fused_ms"]),
             "fused MiB": lambda r: _mib(r["fused_peak_bytes"]),
             "eager MiB": lambda r: _mib(r["eager_peak_bytes"])}
    return [f"Cross-entropy forward+backward, N = {rows[0]['N']} rows (ms: median of "
            f"{result['reps']}; MiB: peak allocated beyond the inputs):", ""] \
        + _speed_table(rows, case, "fused", fused)


def linear_cross_entropy(result: dict) -> list[str]:
    rows = result["rows"]
    names = _timed(rows[0])
    header = (["N", "d", "V"] + [f"{n} ms" for n in names] + [f"{n} MiB" for n in names]
              + ["v1 MiB / eager", "v1 ms / compiled", "v2 tiles skipped", "targets met"])
    body = []
    for r in rows:
        def share(key, fmt):
            return "n/a" if r.get(key) is None else format(r[key], fmt)
        skipped = ("n/a" if r.get("v2_tiles") is None
                   else f"{r['v2_skipped_tiles']} of {r['v2_tiles']}")
        body.append([str(r["N"]), str(r["d"]), str(r["V"])]
                    + [_ms(r[f"{n}_ms"]) for n in names]
                    + [_mib(r[f"{n}_peak_bytes"]) for n in names]
                    + [share("v1_memory_vs_eager", ".3f"), share("v1_time_vs_compiled", ".3f"),
                       skipped, "yes" if r["meets_targets"] else "no"])
    return [f"Linear + cross-entropy forward+backward, {rows[0]['dtype']} (ms: median of "
            f"{result['reps']}; MiB: peak allocated beyond the inputs; targets: v1's peak at "
            f"most 1/4 of eager's, its time at most 1.1x compiled's):", ""] + _table(header, body)


def adamw(result: dict) -> list[str]:
    case = {"parameters": lambda r: r["set"], "clip": lambda r: "yes" if r["clip"] else "no"}
    fused = {"fastgpt vs torch fused": lambda r: _ratio(r["fused_ms"], r["fastgpt_ms"]),
             "fastgpt vs foreach": lambda r: _ratio(r["foreach_ms"], r["fastgpt_ms"]),
             "fastgpt GB/s": lambda r: f"{r['fastgpt_GBps']:.0f}"}
    return [f"One AdamW step (median of {result['reps']}; with clip: torch's "
            f"clip_grad_norm_ + step against fastgpt's max_grad_norm in the step):", ""] \
        + _speed_table(result["rows"], case, "fastgpt", fused)


def train(result: dict) -> list[str]:
    body = []
    for r in result["rows"]:
        memory = "n/a" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.2f}"
        drift = "" if r["loss_drift_vs_1"] is None else f"{r['loss_drift_vs_1']:+.2%}"
        body.append([r["config"], r["variant"], r["what"], f"`{r['backend']}`",
                     f"{r['ms_per_step']:.2f}", f"{r['tokens_per_s']:,.0f}", f"{r['mfu']:.1%}",
                     memory, f"{r['val_loss']:.4f}", drift])
    header = ["config", "variant", "what", "ops", "ms/step", "tokens/s", "MFU", "peak GiB",
              "val loss", "vs 1"]
    if not result["rows"]:
        return ["Training step: no variant ran."]
    first = result["rows"][0]
    return [f"Training step, forward + loss + backward + AdamW ({first['steps']} steps per "
            f"variant; ms: median of {result['reps']} runs; val loss: the weights after them, "
            f"by one fp32 reference evaluator; MFU: 6N + 12LdT FLOPs per token against the "
            f"{first['peak_dtype']} matmul peak measured in the run, "
            f"{first['peak_tflops']:.3g} TFLOP/s):", ""] + _table(header, body)


def attention(result: dict) -> list[str]:
    rows = result["rows"]
    providers = [key[:-len("_fwd_bwd_ms")] for key in rows[0] if key.endswith("_fwd_bwd_ms")]
    fused = "fastgpt" in providers
    header = ["dtype", "B x H x T x D", "check"] + [f"{n} ms" for n in providers]
    if fused:
        header += ["fastgpt TFLOP/s", "vs best SDPA", "vs reference"]
    body = []
    for r in rows:
        check = {True: "ok", False: "WRONG", None: "-"}[r["correct"]]
        line = [r["dtype"], f"{r['B']}x{r['H']}x{r['T']}x{r['D']}", check]
        line += [_ms(r[f"{n}_fwd_bwd_ms"]) for n in providers]
        if fused:
            tflops = r["fastgpt_fwd_bwd_tflops"]
            line += ["n/a" if tflops is None else f"{tflops:.1f}"]
            line += ["n/a" if r.get(f"fastgpt_vs_{b}_fwd_bwd") is None
                     else f"{r[f'fastgpt_vs_{b}_fwd_bwd']:.2f}x" for b in ("sdpa", "reference")]
        body.append(line)
    return [f"Causal attention forward+backward (ms: median of {result['reps']}; TFLOP/s as "
            f"FlashAttention counts: 3.5 x 2BHT^2D; ratios: the baseline's time over "
            f"fastgpt's; n/a: out of memory or not available; forward and backward apart in "
            f"the JSON):", ""] + _table(header, body)


RENDER = {"cross_entropy": cross_entropy, "adamw": adamw, "attention": attention,
          "train": train, "linear_cross_entropy": linear_cross_entropy}


def render(paths: list[Path]) -> str:
    sections = []
    for path in paths:
        result = json.loads(path.read_text())
        lines = RENDER[result["benchmark"]](result)
        sections.append("\n".join([f"#### {result['benchmark']} on {result['device']} "
                                   f"(torch {result['torch']}, CUDA {result['cuda']})", "",
                                   *lines, ""]))
    return "\n".join(sections)


ENVIRONMENT = "environment"  # the stage whose result is what the run ran on, not a table
STATUS = {"pass": "PASS", "fail": "FAIL", "timeout": "TIMEOUT", "skip": "SKIP",
          "running": "CUT OFF"}


def run_records(*run_dirs: Path) -> list[dict]:
    """Every stage planned in the runs, in their planned order: its record (from the last
    run that finished it: a rerun of the stages a first run did not reach or finish adds
    to it), or {"stage", "status": "not reached"} where no run has one (a run killed
    before it)."""
    return [record for record, _ in _merged(run_dirs)]


def _merged(run_dirs) -> list[tuple[dict, Path | None]]:
    """run_records, each with the directory its record came from (None: not reached). Of
    several runs' records of a stage the one that says most is kept, the later of equals
    (a rerun that fails where the first run passed is the news)."""
    planned, records = [], {}
    for run_dir in run_dirs:
        for entry in (read_json(run_dir / "plan.json") or {"stages": []})["stages"]:
            name = entry["stage"]
            if name not in records:
                planned.append(name)
                records[name] = ({**entry, "status": "not reached"}, None)
            record = read_json(run_dir / f"{name}.json")
            if record and rank(record) >= rank(records[name][0]):
                records[name] = (record, run_dir)
    return [records[name] for name in planned]


def stage_table(records: list[dict]) -> str:
    rows = []
    for r in records:
        status = STATUS.get(r["status"], r["status"].upper())
        if r["status"] == "running":
            note = "the run was killed while this stage ran"
        elif r["status"] == "not reached":
            note = "not reached (budget: the run ended before it)"
        elif r["status"] == "timeout":
            note = f"overran its share ({r.get('timeout_s', '?')} s) and was killed"
        else:
            note = r.get("reason", "")
        seconds = r.get("seconds")
        time_s = "" if seconds is None or r["status"] == "skip" else f"{seconds:.0f} s"
        rows.append([r["stage"], status, time_s, note])
    return "\n".join(_table(["stage", "result", "time", "note"], rows))


def _stem(environment: dict) -> str:
    gpu = re.sub(r"[^A-Za-z0-9.]+", "-", environment.get("gpu") or "unknown-gpu").strip("-")
    return f"{environment.get('date', 'undated')}-{gpu}"


def _commit(environment: dict) -> str:
    commit = environment.get("commit")
    if commit is None or environment.get("dirty") is None and not environment.get("commit_from"):
        return f"commit {commit or 'not recorded'}"  # unknown, and why
    if environment.get("commit_from"):
        return f"commit `{commit[:12]}` (as {environment['commit_from']} stated: no git there)"
    return f"commit `{commit[:12]}`" + (" (with uncommitted changes)" if environment["dirty"]
                                        else "")


def assemble(run_dirs: Path | list[Path], results_dir: Path) -> list[Path]:
    """The report of the run in `run_dirs` (a directory, or a run and its reruns), written
    to `results_dir` (see the module's docstring). Returns the files written."""
    run_dirs = [run_dirs] if isinstance(run_dirs, Path) else list(run_dirs)
    environment = next((e for e in (read_json(d / f"{ENVIRONMENT}.result.json") for d in run_dirs)
                        if e), {})
    merged = _merged(run_dirs)
    records = [record for record, _ in merged]
    stem = _stem(environment)
    results_dir.mkdir(parents=True, exist_ok=True)
    written, tables, results = [], [], {}
    for r, run_dir in merged:
        path = (run_dir or run_dirs[0]) / f"{r['stage']}.result.json"
        if run_dir is None or not path.exists() or r["stage"] == ENVIRONMENT:
            continue
        result = read_json(path)
        if result is None or result.get("benchmark") not in RENDER:
            tables.append(f"#### {r['stage']}: its result file is unreadable (cut off while "
                          f"it was written?)\n")
            continue
        results[r["stage"]] = result
        tables.append(render([path]))
        copy = results_dir / f"{stem}-{r['stage']}.json"
        if copy.resolve() != path.resolve():
            shutil.copyfile(path, copy)
            written.append(copy)
    logs = [d / "log.txt" for d in run_dirs if (d / "log.txt").exists()]
    log_copy = results_dir / f"{stem}.log"
    if logs and [log.resolve() for log in logs] != [log_copy.resolve()]:
        log_copy.write_bytes(b"".join(log.read_bytes() for log in logs))
        written.append(log_copy)
    where = (f"{environment.get('gpu') or 'unknown GPU'}, "
             f"{environment.get('date', 'undated')}, {_commit(environment)}")
    versions = ", ".join(f"{k} {environment[k]}" for k in ("driver", "cuda", "torch", "triton",
                                                           "python") if k in environment)
    table = stage_table(records)
    body = "\n".join(tables) if tables else "No benchmark finished in this run.\n"
    report = [f"# GPU check: {where}", "", f"Versions: {versions or 'not recorded'}.", "",
              table, "", "## Results", "", body, "",
              f"The log of every stage: [{stem}.log]({stem}.log)." if logs else ""]
    (results_dir / f"{stem}.md").write_text("\n".join(report) + "\n")
    (results_dir / f"{stem}.json").write_text(json.dumps(
        {"environment": environment, "stages": records, "results": results}, indent=2) + "\n")
    readme = ["# Results", "",
              f"The latest `bash bench/gpu_check.sh` run: {where}. Its report, with every "
              f"stage's log: [{stem}.md]({stem}.md). Loss quality (`bench/quality.py`) runs "
              f"with `--full`; see bench/README.md."]
    if (results_dir / "cpu.md").exists():  # hand-kept, never rewritten here
        readme += ["", "The CPU figures (training step, quality run) are in [cpu.md](cpu.md)."]
    readme += ["", table, "", body]
    (results_dir / "README.md").write_text("\n".join(readme) + "\n")
    written += [results_dir / f"{stem}.md", results_dir / f"{stem}.json",
                results_dir / "README.md"]
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Markdown from the GPU check's files")
    parser.add_argument("paths", nargs="*", type=Path, metavar="RESULT.json")
    parser.add_argument("--from", dest="run_dirs", type=Path, nargs="+", metavar="DIR",
                        help="a gpu_check run directory (and its reruns'): assemble the report")
    parser.add_argument("--results", type=Path, default=BENCH / "results",
                        help="where --from writes the report (default: bench/results/)")
    args = parser.parse_args(argv)
    if args.run_dirs:
        for run_dir in args.run_dirs:
            if not (run_dir / "plan.json").is_file():
                print(f"report: {run_dir} is not a gpu_check run directory (no plan.json)",
                      file=sys.stderr)
                return 2
        for path in assemble(args.run_dirs, args.results):
            print(f"wrote {path}")
        return 0
    missing = [str(p) for p in args.paths if not p.is_file()]
    if not args.paths or missing:
        print(f"usage: python bench/report.py RESULT.json ...; missing: {', '.join(missing)}",
              file=sys.stderr)
        return 2
    print(render(args.paths), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
