"""`auto` at a run's own shapes: each op a training step calls is timed once per
implementation that can run here (fastgpt.ops.dispatch.choose: the fastest, if it beats
PyTorch's own op by the margin; cached per machine, versions and shapes), before the model
is compiled; `fastgpt tune` prints the table.

The trials are the training step's own calls: attention on (micro-batch, heads, context,
head dim) in the autocast dtype with the run's dropout, the linear + cross-entropy of the
lm_head over micro-batch x context rows, AdamW over the model's parameter shapes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastgpt import distributed
from fastgpt.config import TrainConfig
from fastgpt.ops import dispatch

TUNED_OPS = ("causal_attention", "linear_cross_entropy", "adamw")  # what a step calls


def why_not(op: str, impl: str, device: torch.device) -> str | None:
    """Why `impl` of `op` cannot be a candidate here (None: it can)."""
    if impl == "torch":
        ok, why = dispatch.torch_status(op)
        return None if ok else why
    if impl == "fused":
        ok, why = dispatch.status(op)
        if not ok:
            return why
        if device.type != "cuda":
            if dispatch.triton_interpreting() and op != "adamw":
                return "runs through Triton's interpreter here (for tests): not a candidate"
            if not dispatch.fused_runs_on(op, device):
                return f"needs CUDA tensors, got {device.type} ones"
    return None


def trials(config: TrainConfig, device: torch.device, micro_batch: int,
           ops: tuple[str, ...] = TUNED_OPS) -> dict[str, tuple[str, dict]]:
    """{op: (shape, {implementation: a trial, or why it cannot run})} at the run's shapes."""
    from fastgpt import ops as fastgpt_ops
    from fastgpt.model import GPT

    generator = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if config.bf16 else torch.float32
    B, T, d, V = micro_batch, config.context_length, config.d_model, config.vocab_size
    H, D = config.num_heads, config.d_model // config.num_heads
    out: dict[str, tuple[str, dict]] = {}

    def randn(*shape, grad=True, dtype=torch.float32):
        return torch.randn(*shape, device=device, dtype=dtype,
                           generator=generator).requires_grad_(grad)

    for op in ops:
        if op == "causal_attention":
            q, k, v = (randn(B, H, T, D, dtype=dtype) for _ in range(3))
            g = randn(B, H, T, D, grad=False, dtype=dtype)
            shape = f"q {B}x{H}x{T}x{D} {str(dtype).removeprefix('torch.')}, " \
                    f"dropout {config.dropout}"

            def make(impl, q=q, k=k, v=v, g=g):
                def trial():
                    y = fastgpt_ops.causal_attention(q, k, v, dropout_p=config.dropout,
                                                     backend=impl)
                    torch.autograd.grad(y, (q, k, v), g)
                return trial
        elif op == "linear_cross_entropy":
            # in the autocast dtype, as lm_head's inputs reach the op under bf16 autocast
            hidden, weight, bias = (randn(*s, dtype=dtype) for s in ((B * T, d), (V, d), (V,)))
            targets = torch.randint(0, V, (B * T,), device=device, generator=generator)
            shape = f"hidden {B * T}x{d} {str(dtype).removeprefix('torch.')}, vocab {V}"

            def make(impl, hidden=hidden, weight=weight, bias=bias, targets=targets):
                def trial():
                    loss = fastgpt_ops.linear_cross_entropy(hidden, weight, targets, bias,
                                                            backend=impl)
                    torch.autograd.grad(loss, (hidden, weight, bias))
                return trial
        elif op == "adamw":
            with torch.device("meta"):
                shapes = [p.shape for p in GPT(**config.model_kwargs()).parameters()]
            params = [randn(*s, grad=False) for s in shapes]
            grads = [randn(*s, grad=False) for s in shapes]
            moments = [[torch.zeros(s, device=device) for s in shapes] for _ in range(2)]
            shape = f"{len(shapes)} tensors, {sum(p.numel() for p in params):,} float32"
            steps = iter(range(1, 1 << 30))

            def make(impl, params=params, grads=grads, moments=moments, steps=steps):
                def trial():
                    fastgpt_ops.adamw_step(params, grads, *moments, lr=config.lr,
                                           beta1=config.beta1, beta2=config.beta2,
                                           eps=config.eps, weight_decay=config.weight_decay,
                                           step=next(steps), backend=impl)
                return trial
        else:
            raise ValueError(f"no trial for op {op!r}")
        out[op] = (shape, {impl: why_not(op, impl, device) or _named(make(impl), impl)
                           for impl in dispatch.IMPLEMENTATIONS})
    return out


def _named(trial: dispatch.Trial, impl: str) -> dispatch.Trial:
    trial.implementation = impl  # what a timer (or a test's clock) is timing
    return trial


def choose_backends(config: TrainConfig, device: torch.device, micro_batch: int,
                    log: Callable[[str], None], ctx: distributed.Context = distributed.SINGLE,
                    remeasure: bool = False,
                    timer: dispatch.Timer | None = None) -> dict[str, dispatch.Choice]:
    """Measure (or read from the cache) the implementation of every op that the config's
    backend leaves to `auto`; under torchrun rank 0 measures and every rank gets its
    choices. Returns {op: Choice} for the ops measured."""
    wanted = dispatch.parse_backend(config.backend or dispatch.get_backend())
    auto = tuple(op for op in TUNED_OPS if wanted[op] == "auto")
    choices: dict[str, dispatch.Choice] = {}
    if ctx.is_main and auto:
        cache = dispatch.ChoiceCache(dispatch.choice_cache_path(), device, log)
        timer = timer or (lambda trial: dispatch.median_ms(trial, device))
        for op, (shape, candidates) in trials(config, device, micro_batch, auto).items():
            choices[op] = dispatch.choose(op, shape, candidates, timer, cache, remeasure)
    if ctx.enabled:
        choices = distributed.broadcast_from_main(ctx, choices)
    return choices


def backend_spec(config: TrainConfig, choices: dict[str, dispatch.Choice]) -> str:
    """The config's backend with every measured op's choice written in: one name per op."""
    chosen = dispatch.parse_backend(config.backend or dispatch.get_backend())
    chosen.update({op: choice.chosen for op, choice in choices.items()})
    return ",".join(f"{op}={impl}" for op, impl in chosen.items())


def table(choices: dict[str, dispatch.Choice]) -> list[str]:
    """`fastgpt tune`'s table: every candidate's time, the choice, the speed-up over torch."""
    head = f"{'op':<21} {'reference':>11} {'torch':>11} {'fused':>11}  {'chosen':<9} vs torch"
    lines = [head, "-" * len(head)]
    for op, c in choices.items():
        cells = [f"{c.times_ms[impl]:.3g} ms" if impl in c.times_ms else "-"
                 for impl in dispatch.IMPLEMENTATIONS]
        speedup = c.speedup()
        lines.append(f"{op:<21} {cells[0]:>11} {cells[1]:>11} {cells[2]:>11}  {c.chosen:<9} "
                     + (f"{speedup:.2f}x" if speedup else "-"))
    lines += [f"{op} at {c.shape}" + ("".join(f"; {impl}: {why}" for impl, why
                                               in c.excluded.items()))
              for op, c in choices.items()]
    return lines


def backends_for_run(config: TrainConfig, checkpoint: dict | None, device: torch.device,
                     micro_batch: int, log: Callable[[str], None],
                     ctx: distributed.Context = distributed.SINGLE) -> dict[str, str]:
    """{op: implementation} for a run, set as the process default (before anything is
    traced): on --resume with the same --backend, what the checkpoint recorded (exact
    resume; an implementation that cannot run here is measured again, saying so); else the
    config's names with `auto` measured at the run's shapes, one line per op measured."""
    recorded = (checkpoint or {}).get("backends")
    if recorded and checkpoint["config"].get("backend", "") == config.backend:
        gone = {op: why for op, impl in recorded.items()
                if impl != "auto" and (why := why_not(op, impl, device))}
        spec = ",".join(f"{op}={impl}" for op, impl in recorded.items() if op not in gone)
        for op, why in gone.items():
            log(f"{op}: the checkpoint ran {recorded[op]}, which cannot run here ({why}); "
                f"measuring again")
        if not gone:
            dispatch.set_backend(spec)
            log(f"backends as the checkpoint recorded them: {spec}")
            return dict(recorded)
        config = TrainConfig.from_dict({**config.to_dict(), "backend": spec})
    choices = choose_backends(config, device, micro_batch, log, ctx)
    for choice in choices.values():
        log(choice.describe())
    spec = backend_spec(config, choices)
    dispatch.set_backend(spec)
    return dispatch.parse_backend(spec)
