"""Training throughput of the whole step (forward, loss, backward, AdamW): the chapter's
loop, stock PyTorch at its best, and fastgpt's fused kernels.

    python bench/bench_train.py [--configs seed gpt2-small] [--variants 1 2 inline]
                                [--out results.json]

Variants, all from the same initial weights (seed 1337) on the same batches:
  1       the chapter's loop as fastgpt runs it (fastgpt.train.train_step): eager fp32,
          reference ops, fastgpt's AdamW (reference)
  2       (1) under bf16 autocast
  3       stock PyTorch: bf16 autocast, F.scaled_dot_product_attention, F.cross_entropy,
          torch.optim.AdamW(fused=True), torch.compile of forward + loss
  4       fastgpt with every fused kernel that runs here (ops.fused_where_available()), bf16
  5       (4) compiled as `fastgpt train --compile` compiles it (fastgpt.train.training_module:
          the forward, the loss and their backward through torch.compile; the optimizer
          outside)
  inline  the chapter's plain loop written out below (get_batch by torch.randint,
          F.cross_entropy, torch.optim.AdamW(model.parameters())), fp32: an outside
          baseline for the overhead of fastgpt's own loop (compare with 1)
Configs: seed (the chapter's model, batch 32 x 256), gpt2-small (d_model 768, 12 layers,
12 heads, context 1024, vocab 50257, batch 8), cpu (the cpu preset's model and batch), tiny.
Default: every variant at seed and gpt2-small on a GPU; 1, 2 and inline at cpu on a CPU
(a CPU without bf16 matrix units runs bf16 matmuls ~90x slower than fp32, measured on the
project's CI machine: a seed-sized bf16 step takes minutes there). Variants 3-5 run on a
CPU too if asked, 4 and 5 through Triton's interpreter.

Per variant: ms/step and tokens/s (the median over --runs runs of --steps steps each, after
--warmup untimed steps, with CUDA events on a GPU; the variants take turns run by run),
MFU, peak memory (what the variant allocates beyond what was allocated before it), and the
val loss of its weights after all its steps, judged by one fp32 reference evaluator. The script exits 1
when a variant fails or when a variant other than the inline baseline ends further than
LOSS_TOLERANCE from variant 1's loss: no speed may come from wrong maths.

MFU = FLOPs per token x tokens/s / the card's peak, with FLOPs per token = 6 N (N: the
parameters outside the two embedding tables) + 12 L d T (attention scores and values,
causal half not discounted), as nanoGPT and PaLM count. The peak is measured here by a
large matmul (bf16 on a GPU, fp32 on a CPU) and printed with the card's name.

The data are the UTF-8 bytes of a corpus (default: the Python standard library's modules,
present everywhere) as token ids, so the benchmark needs no tokenizer and no network.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import sys
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source tree
from fastgpt import ops  # noqa: E402
from fastgpt.config import make_config  # noqa: E402
from fastgpt.corpus import load_corpus  # noqa: E402
from fastgpt.data import BatchStream, NextTokenDataset  # noqa: E402
from fastgpt.model import GPT, CausalSelfAttention  # noqa: E402
from fastgpt.optim import AdamW, param_groups  # noqa: E402
from fastgpt.train import autocast, estimate_loss, train_step, training_module  # noqa: E402
from harness import (  # noqa: E402  (bench/harness.py)
    Column, Table, benchmark_parser, card_of, run_benchmarks)
from timing import LOSS_TOLERANCE, median_ms, time_ms  # noqa: E402  (bench/timing.py)

SEED = 1337
LR = 3e-4
WEIGHT_DECAY = 0.01
EVAL_BATCHES = 4


def model_sizes(sizes: dict) -> dict:
    """A config's GPT arguments (all but the batch size)."""
    return {k: v for k, v in sizes.items() if k != "batch_size"}


def preset_sizes(preset: str) -> dict:
    config = make_config(preset)
    return {**config.model_kwargs(), "batch_size": config.batch_size}


# model sizes and the micro-batch per step
CONFIGS = {
    "seed": preset_sizes("seed"),
    "cpu": preset_sizes("cpu"),
    "gpt2-small": dict(vocab_size=50257, context_length=1024, d_model=768, num_heads=12,
                       num_layers=12, dropout=0.1, batch_size=8),
    "tiny": dict(vocab_size=512, context_length=64, d_model=64, num_heads=2, num_layers=2,
                 dropout=0.1, batch_size=8),  # a smoke test of the script itself
}
VARIANTS = {
    "1": "chapter loop, fp32, reference ops",
    "2": "chapter loop, bf16 autocast, reference ops",
    "3": "stock torch: bf16, SDPA, F.cross_entropy, AdamW(fused), compile",
    "4": "fastgpt fused kernels, bf16",
    "5": "fastgpt fused kernels, bf16, compiled (training_module, as --compile)",
    "inline": "inline chapter loop (outside baseline), fp32",
}


class SDPAttention(CausalSelfAttention):
    """fastgpt's attention module (same parameters) computed by torch's
    scaled_dot_product_attention: the stock variant's attention."""

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        if cache is not None:
            raise ValueError("the benchmark's SDPA attention takes no key/value cache")
        B, T, C = x.shape
        H = self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, H, C // H).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            heads(self.query(x)), heads(self.key(x)), heads(self.value(x)), is_causal=True,
            dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.out_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


def flops_per_token(model: GPT, sizes: dict) -> float:
    embeddings = model.tok_emb.weight.numel() + model.pos_emb.weight.numel()
    n = model.num_parameters() - embeddings
    return 6 * n + 12 * sizes["num_layers"] * sizes["d_model"] * sizes["context_length"]


def measure_peak_flops(device: torch.device) -> tuple[float, str]:
    """(FLOP/s of a large square matmul on `device`, its dtype): bf16 on a GPU, fp32 on a CPU."""
    cuda = device.type == "cuda"
    n, dtype = (8192, torch.bfloat16) if cuda else (2048, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ b, reps=20 if cuda else 5, warmup=3, cuda=cuda)
    return 2 * n ** 3 / (ms / 1e3), str(dtype).replace("torch.", "")


def byte_tokens(corpus: str) -> tuple[np.ndarray, np.ndarray]:
    """The corpus's UTF-8 bytes as uint16 token ids, split 90/10 into train and val."""
    ids = np.frombuffer(load_corpus(corpus, log=lambda _: None).read_text().encode("utf-8"),
                        dtype=np.uint8).astype(np.uint16)
    split = int(len(ids) * 0.9)
    return ids[:split], ids[split:]


def build_variant(name: str, sizes: dict, device: torch.device, train_ids: np.ndarray):
    """(model, step function) for a variant; the model starts from the shared seed."""
    torch.manual_seed(SEED)
    model = GPT(**model_sizes(sizes)).to(device)
    batch_size, T = sizes["batch_size"], sizes["context_length"]
    batches = BatchStream(NextTokenDataset(train_ids, T, "train"), batch_size, SEED,
                          pin_memory=device.type == "cuda")
    groups = param_groups(model, WEIGHT_DECAY)

    if name in ("1", "2", "4", "5"):  # fastgpt's own step; backend_of(name) picks the ops
        optimizer = AdamW(groups, lr=LR)
        step = training_module(model, compile=name == "5")  # as `fastgpt train --compile`
        return model, lambda: train_step(step, optimizer, batches, device, bf16=name != "1")
    if name == "3":
        for block in model.blocks:
            block.attn.__class__ = SDPAttention
        optimizer = torch.optim.AdamW(groups, lr=LR, fused=True)

        @torch.compile
        def forward_and_loss(x, y):
            return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

        def stock_step():
            x, y = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, True):
                loss = forward_and_loss(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()
        return model, stock_step
    if name == "inline":
        # The chapter's loop, as a reader writes it.
        data = torch.from_numpy(train_ids.astype(np.int64))
        generator = torch.Generator().manual_seed(SEED)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR)

        def get_batch():
            ix = torch.randint(len(data) - T, (batch_size,), generator=generator)
            x = torch.stack([data[i:i + T] for i in ix])
            y = torch.stack([data[i + 1:i + T + 1] for i in ix])
            return x.to(device), y.to(device)

        def chapter_step():
            xb, yb = get_batch()
            logits = model(xb)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), yb.view(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss.detach()
        return model, chapter_step
    raise ValueError(f"unknown variant {name!r}")


def backend_of(name: str) -> str:
    """The ops backend a variant runs under (the stock variant calls torch directly)."""
    return ops.fused_where_available() if name in ("4", "5") else "reference"


def val_loss(weights: dict, sizes: dict, device: torch.device, val_ids: np.ndarray) -> float:
    """The fp32 reference evaluator: a fresh GPT with `weights`, eval mode, fixed batches."""
    model = GPT(**model_sizes(sizes)).to(device)
    model.load_state_dict(weights)
    previous = ops.set_backend("reference")
    try:
        dataset = NextTokenDataset(val_ids, sizes["context_length"], "val")
        return estimate_loss(model, {"val": dataset}, sizes["batch_size"], EVAL_BATCHES,
                             device, seed=SEED + 1)["val"]
    finally:
        ops.set_backend(previous)


class Variant:
    """A variant built and warmed up, ready for timed runs; peak_memory_bytes is what it
    allocated beyond what was allocated before it was built (its own footprint)."""

    def __init__(self, name: str, sizes: dict, device: torch.device, train_ids, args):
        self.name, self.cuda, self.steps = name, device.type == "cuda", args.steps
        self.backend = backend_of(name)
        if self.cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        with self.backend_set():
            self.model, self.step = build_variant(name, sizes, device, train_ids)
            for _ in range(args.warmup):  # compiles and autotunes happen here
                self.step()
            self.times = [self.timed_run()]
        self.peak_memory_bytes = torch.cuda.max_memory_allocated() - base if self.cuda else None

    @contextlib.contextmanager
    def backend_set(self):
        previous = ops.set_backend(self.backend)
        try:
            yield
        finally:
            ops.set_backend(previous)

    def timed_run(self) -> float:
        """ms per step over one run of `steps` steps."""
        def run():
            for _ in range(self.steps):
                self.step()
        with self.backend_set():
            return time_ms(run, self.cuda) / self.steps


def time_in_turns(names: list[str], sizes: dict, device: torch.device, data, args,
                  failures: list[str], config: str) -> list[dict]:
    """Build and warm up each variant, then time them in turns (run r of every variant
    before run r + 1 of any), so that a machine's drift (clocks, neighbours) is shared
    rather than charged to whichever variant ran last."""
    train_ids, val_ids = data
    variants = []

    def failed(name: str, exc: Exception) -> None:
        traceback.print_exc()
        failures.append(f"{config}/{name}: {type(exc).__name__}: {str(exc)[:300]}")
        print(f"{name:<8} FAILED ({type(exc).__name__}: {str(exc).strip()[:200]})")

    for name in names:
        try:
            variants.append(Variant(name, sizes, device, train_ids, args))
        except Exception as exc:  # report it, go on with the others, fail at the end
            failed(name, exc)
    for _ in range(args.runs - 1):
        for variant in list(variants):
            try:
                variant.times.append(variant.timed_run())
            except Exception as exc:
                failed(variant.name, exc)
                variants.remove(variant)
    tokens = sizes["batch_size"] * sizes["context_length"]
    rows = []
    for v in variants:
        ms = statistics.median(v.times)
        rows.append({
            "variant": v.name, "what": VARIANTS[v.name],
            "backend": "torch" if v.name in ("3", "inline") else v.backend,
            "ms_per_step": ms, "tokens_per_s": tokens / (ms / 1e3),
            "peak_memory_bytes": v.peak_memory_bytes,
            "steps": args.warmup + args.runs * args.steps,
            "val_loss": val_loss(v.model.state_dict(), sizes, device, val_ids)})
    return rows


TABLE = Table([
    Column("config", "config", width=10, left=True),
    Column("variant", "variant", width=8, left=True),
    Column("ms/step", "ms_per_step", ".2f", width=9),
    Column("tokens/s", "tokens_per_s", ",.0f", width=11),
    Column("MFU", "mfu", ".1%", width=7),
    Column("peak GiB", lambda r: r["peak_memory_bytes"] and r["peak_memory_bytes"] / 2**30,
           ".2f", width=9),
    Column("val loss", "val_loss", ".4f", width=9),
    Column("vs 1", "loss_drift_vs_1", "+.2%", width=7, missing=""),
    Column("what", lambda r: f"{r['what']} [{r['backend']}]", width=0, left=True)])


def measure_config(names: list[str], device: torch.device, data, args, peak: tuple[float, str],
                   card: str, failures: list[str], case: dict) -> list[dict]:
    """The rows of one config, a variant each: timed in turns, with MFU against the
    measured matmul `peak` (FLOP/s, dtype) and each val loss against variant 1's (a
    failure beyond LOSS_TOLERANCE)."""
    config = case["config"]
    sizes = CONFIGS[config]
    torch.manual_seed(SEED)
    probe = GPT(**model_sizes(sizes))
    per_token = flops_per_token(probe, sizes)
    untrained = val_loss(probe.state_dict(), sizes, device, data[1])
    del probe
    print(f"{config}: {sizes}; {per_token / 1e6:.1f} MFLOP/token; val loss untrained "
          f"{untrained:.4f}")
    rows = time_in_turns(names, sizes, device, data, args, failures, config)
    reference_loss = next((row["val_loss"] for row in rows if row["variant"] == "1"), None)
    if reference_loss is None:
        failures.append(f"{config}: variant 1 failed, so no loss could be checked")
    for row in rows:
        drift = (None if reference_loss is None
                 else (row["val_loss"] - reference_loss) / reference_loss)
        row.update(config=config, card=card, mfu=per_token * row["tokens_per_s"] / peak[0],
                   flops_per_token=per_token, peak_tflops=peak[0] / 1e12, peak_dtype=peak[1],
                   untrained_val_loss=untrained, loss_drift_vs_1=drift)
        if drift is not None and row["variant"] != "inline" and not abs(drift) <= LOSS_TOLERANCE:
            failures.append(f"{config}/{row['variant']}: val loss {row['val_loss']:.4f} is "
                            f"{drift:+.2%} from variant 1's {reference_loss:.4f} "
                            f"(tolerance {LOSS_TOLERANCE:.0%})")
    return rows


def main() -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS),
                        help="default: seed gpt2-small on a GPU, cpu on a CPU")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        help="default: all on a GPU, 1 2 inline on a CPU")
    parser.add_argument("--steps", type=int, help="steps per timed run (GPU 5, CPU 1)")
    parser.add_argument("--runs", type=int, help="timed runs, the median is kept (GPU 5, CPU 3)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (GPU 5, CPU 1)")
    parser.add_argument("--corpus", default="pystdlib",
                        help="pystdlib (default), shakespeare, or a UTF-8 file or directory")
    parser.add_argument("--device", choices=["cuda", "cpu"],
                        help="default: cuda if there is a GPU")
    args = parser.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    args.configs = args.configs or (["seed", "gpt2-small"] if cuda else ["cpu"])
    args.variants = args.variants or (list(VARIANTS) if cuda else ["1", "2", "inline"])
    if "1" not in args.variants:
        args.variants.insert(0, "1")  # the reference that every loss is checked against
    args.steps = args.steps or (5 if cuda else 1)
    args.runs = args.runs or (5 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    if not cuda:
        print("no CUDA GPU: timing on the CPU" + (" (variants 1, 2 and the inline baseline)"
                                                  if args.variants == ["1", "2", "inline"] else ""))
    peak = measure_peak_flops(device)
    print(f"MFU against the measured {peak[1]} matmul peak of {peak[0] / 1e12:.2f} TFLOP/s; "
          f"kernels here: {ops.fused_where_available()}")
    data = byte_tokens(args.corpus)
    card, failures = card_of(device), []
    measure = functools.partial(measure_config, args.variants, device, data, args, peak, card,
                                failures)
    return run_benchmarks("train", "training step", card, args.runs,
                          [{"config": config} for config in args.configs], measure, TABLE,
                          args.out, failures)


if __name__ == "__main__":
    raise SystemExit(main())
