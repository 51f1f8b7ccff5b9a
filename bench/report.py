"""Markdown tables from the benchmarks' JSON results (bench_cross_entropy.py, bench_adamw.py,
bench_attention.py, bench_train.py), for bench/results/: gpu_check.sh writes its report and the results
README with it, so that every published number comes from a run's own files.

    python bench/report.py RESULT.json [RESULT.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


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


def cross_entropy(result: dict) -> list[str]:
    rows = result["rows"]
    names = _timed(rows[0])
    fused = "fused" in names
    header = ["dtype", "V"] + [f"{n} ms" for n in names]
    if fused:
        header += ["fused vs eager", "fused vs compiled", "fused MiB", "eager MiB"]
    body = []
    for r in rows:
        line = [r["dtype"], str(r["V"])] + [_ms(r[f"{n}_ms"]) for n in names]
        if fused:
            line += [_ratio(r["eager_ms"], r["fused_ms"]), _ratio(r["compiled_ms"], r["fused_ms"]),
                     _mib(r["fused_peak_bytes"]), _mib(r["eager_peak_bytes"])]
        body.append(line)
    return [f"Cross-entropy forward+backward, N = {rows[0]['N']} rows (ms: median of "
            f"{result['reps']}; MiB: peak allocated beyond the inputs):", ""] + _table(header, body)


def adamw(result: dict) -> list[str]:
    rows = result["rows"]
    names = _timed(rows[0])
    fused = "fastgpt" in names
    header = ["parameters", "clip"] + [f"{n} ms" for n in names]
    if fused:
        header += ["fastgpt vs torch fused", "fastgpt vs foreach", "fastgpt GB/s"]
    body = []
    for r in rows:
        line = [r["set"], "yes" if r["clip"] else "no"] + [_ms(r[f"{n}_ms"]) for n in names]
        if fused:
            line += [_ratio(r["fused_ms"], r["fastgpt_ms"]), _ratio(r["foreach_ms"], r["fastgpt_ms"]),
                     f"{r['fastgpt_GBps']:.0f}"]
        body.append(line)
    return [f"One AdamW step (median of {result['reps']}; with clip: torch's "
            f"clip_grad_norm_ + step against fastgpt's max_grad_norm in the step):", ""] \
        + _table(header, body)


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
          "train": train}


def render(paths: list[Path]) -> str:
    sections = []
    for path in paths:
        result = json.loads(path.read_text())
        lines = RENDER[result["benchmark"]](result)
        sections.append("\n".join([f"#### {result['benchmark']} on {result['device']} "
                                   f"(torch {result['torch']}, CUDA {result['cuda']})", "",
                                   *lines, ""]))
    return "\n".join(sections)


def main() -> int:
    paths = [Path(p) for p in sys.argv[1:]]
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or missing:
        print(f"usage: python bench/report.py RESULT.json ...; missing: {', '.join(missing)}",
              file=sys.stderr)
        return 2
    print(render(paths), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
