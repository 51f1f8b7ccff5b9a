"""Does the fused path learn as well as the reference? Trains a preset twice with fastgpt's
own trainer, once on the reference ops and once on every fused kernel that runs here, and
puts both val-loss curves side by side in one table and one plot.

    python bench/quality.py [--presets cpu] [--corpus auto] [--set max_steps=200 ...]

Both runs share the seed, the data and the config; only the backend differs. The fused run
takes ops.fused_where_available(): on a GPU the Triton cross-entropy and the CUDA AdamW
step; on a CPU the Triton kernel through Triton's interpreter and, when a C++ compiler is
at hand, the CPU build of the AdamW step (the same arithmetic, csrc/adamw_math.h). Passes
when each preset's final val loss is within LOSS_TOLERANCE (1%) of the reference's; exits 1
otherwise. Default presets: cpu on a CPU (about 13 minutes on 2 cores: the interpreted
kernel makes the fused run 2.5x slower), cpu and seed on a GPU.

Writes into --out-dir (default runs/quality-<time>): both runs (metrics.jsonl, checkpoints),
quality.png, quality.md (the table) and quality.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before fastgpt imports a kernel
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source tree
from fastgpt import FastGPTError, ops  # noqa: E402
from fastgpt.config import PRESETS, make_config, parse_value  # noqa: E402
from fastgpt.metrics import read_metrics  # noqa: E402
from fastgpt.train import train  # noqa: E402
from timing import LOSS_TOLERANCE  # noqa: E402  (bench/timing.py)


def fused_backend(build_cpu_extension: bool) -> str:
    """The backend spec of the fused run; on a CPU, first the CPU build of fastgpt._C."""
    if not torch.cuda.is_available() and build_cpu_extension:
        from fastgpt.ops import extension

        try:
            extension.build(cuda=False)
        except Exception as exc:  # no compiler: the AdamW step stays on the reference
            print(f"the CPU build of fastgpt._C failed ({str(exc).strip()[:200]}); "
                  f"AdamW runs on the reference")
    for op, (ok, why) in ops.available().items():
        print(f"  {op}: {'fused' if ok else 'reference'} ({why})")
    return ops.fused_where_available()


def val_curve(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in read_metrics(run_dir / "metrics.jsonl")
            if r["kind"] == "eval"}


def compare(preset: str, overrides: dict, fused: str, out_dir: Path, corpus: str) -> dict:
    """Train `preset` on both backends; the curves, the final losses and the verdict."""
    result = {"preset": preset, "overrides": overrides, "fused_backend": fused}
    for path, backend in (("reference", "reference"), ("fused", fused)):
        config = make_config(preset, {**overrides, "corpus": corpus, "backend": backend,
                                      "runs_dir": str(out_dir), "name": f"{preset}-{path}"})
        print(f"\n{preset}, {path} ({backend}): {config.max_steps} steps")
        start = time.perf_counter()
        train(config, progress=False)
        result[f"{path}_seconds"] = round(time.perf_counter() - start, 1)
        result[f"{path}_curve"] = val_curve(out_dir / config.name)
    reference, fused_curve = result["reference_curve"], result["fused_curve"]
    last = max(reference)
    result["reference_final"], result["fused_final"] = reference[last], fused_curve[last]
    result["relative_difference"] = (fused_curve[last] - reference[last]) / reference[last]
    result["passed"] = abs(result["relative_difference"]) <= LOSS_TOLERANCE
    return result


def table(result: dict) -> str:
    lines = [f"### {result['preset']} preset: val loss, reference vs fused "
             f"(`{result['fused_backend']}`)", "",
             "| step | reference | fused | difference |", "|---:|---:|---:|---:|"]
    for step, ref in sorted(result["reference_curve"].items()):
        fused = result["fused_curve"].get(step, math.nan)
        lines.append(f"| {step} | {ref:.4f} | {fused:.4f} | {(fused - ref) / ref:+.3%} |")
    verdict = "PASS" if result["passed"] else "FAIL"
    lines += ["", f"Final: reference {result['reference_final']:.4f}, fused "
              f"{result['fused_final']:.4f} ({result['relative_difference']:+.3%}; tolerance "
              f"{LOSS_TOLERANCE:.0%}): **{verdict}**. Wall time: reference "
              f"{result['reference_seconds']} s, fused {result['fused_seconds']} s.", ""]
    return "\n".join(lines)


def plot(results: list[dict], path: Path, card: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no quality.png (the table has the same numbers)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, result in zip(axes[0], results):
        for run, style in (("reference", "-"), ("fused", "--")):
            curve = result[f"{run}_curve"]
            ax.plot(list(curve), list(curve.values()), style, marker=".", label=run)
        ax.set_title(f"{result['preset']} preset on {card}: final val "
                     f"{result['relative_difference']:+.2%}")
        ax.set_xlabel("step")
        ax.set_ylabel("val loss (nats per token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", choices=list(PRESETS),
                        help="default: cpu on a CPU; cpu and seed on a GPU")
    parser.add_argument("--corpus", default="auto",
                        help="auto | shakespeare | pystdlib | a UTF-8 file or directory")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="config overrides for both runs, e.g. max_steps=200")
    parser.add_argument("--out-dir", help="default: runs/quality-<date>-<time>")
    parser.add_argument("--no-cpu-extension", action="store_true",
                        help="on a CPU, do not build fastgpt._C's CPU AdamW step")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    presets = args.presets or (["cpu", "seed"] if cuda else ["cpu"])
    try:
        overrides = {}
        for item in args.set:
            field, sep, value = item.partition("=")
            if not sep:
                raise FastGPTError(f"--set takes FIELD=VALUE, got {item!r}")
            overrides[field] = parse_value(field, value)
        for reserved in ("backend", "name", "runs_dir", "corpus"):
            if reserved in overrides:
                raise FastGPTError(f"--set {reserved}=... is chosen by quality.py itself")
        out_dir = Path(args.out_dir or f"runs/quality-{time.strftime('%Y%m%d-%H%M%S')}")
        card = torch.cuda.get_device_name() if cuda else "CPU"
        print(f"quality on {card}; fused run's kernels:")
        fused = fused_backend(not args.no_cpu_extension)
        if fused == "reference":
            raise FastGPTError("no fused kernel can run here, so there is nothing to compare")
        results = [compare(preset, overrides, fused, out_dir, args.corpus) for preset in presets]
    except FastGPTError as exc:
        print(f"quality: {exc}", file=sys.stderr)
        return 2
    report = "\n".join(table(r) for r in results)
    (out_dir / "quality.md").write_text(f"# Loss quality on {card}\n\n{report}")
    (out_dir / "quality.json").write_text(json.dumps(
        {"card": card, "torch": torch.__version__, "tolerance": LOSS_TOLERANCE,
         "results": results}, indent=2) + "\n")
    plot(results, out_dir / "quality.png", card)
    print("\n" + report)
    print(f"wrote {out_dir}/quality.md, quality.json"
          + (", quality.png" if (out_dir / "quality.png").exists() else ""))
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
