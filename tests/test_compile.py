"""torch.compile of the training step (`fastgpt train --compile`, train.training_module).

On the CPU inductor compiles C++; a small model keeps each compile to seconds. Tolerance of
compiled against eager: the same maths with sums in another order and fused, so fp32
rounding: the loss within 1e-6 relative, each gradient within 1e-5 of its largest entry
(measured here: ~1e-7 and ~1e-6); dropout is off, since a compiled graph draws its masks
with inductor's own generator.
"""

import pytest
import torch
import torch._dynamo

from fastgpt import ops
from fastgpt.checkpoint import load_checkpoint
from fastgpt.model import GPT
from fastgpt.metrics import read_metrics
from fastgpt.train import resume_config, train, training_module
from helpers import require_or_skip, tiny_config


def small_gpt(dropout=0.0):
    torch.manual_seed(0)
    return GPT(vocab_size=64, context_length=16, d_model=32, num_heads=2, num_layers=2,
               dropout=dropout)


def batch(seed=0):
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(seed))
    return x, torch.roll(x, -1, dims=1)


@pytest.fixture
def backend(request):
    previous = ops.set_backend(request.param)
    yield request.param
    ops.set_backend(previous)


@pytest.mark.parametrize("backend", ["reference", "torch", "linear_cross_entropy=fused"],
                         indirect=True)
def test_forward_and_loss_trace_to_one_graph(backend):
    if backend != "reference" and not ops.available()["linear_cross_entropy"][0]:
        require_or_skip(f"the fused linear_cross_entropy cannot run here: "
                        f"{ops.available()['linear_cross_entropy'][1]}")
    model = small_gpt(dropout=0.1)
    explained = torch._dynamo.explain(model.loss)(*batch())
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), \
        [b.reason for b in explained.break_reasons]


def test_the_fused_attention_traces_through_its_fakes(cpu_extension, monkeypatch):
    # The kernels run only on a GPU, but their ops (the CPU build registers the schemas)
    # trace here through the fakes: forward and backward (AOTAutograd's joint graph),
    # dropout's seed drawn inside the graph. The graph is captured, never run.
    from fastgpt.ops import cuda_attention
    from torch._dynamo.backends.common import aot_autograd
    from fastgpt.ops import dispatch
    chosen = dispatch.resolve_backend
    monkeypatch.setattr(dispatch, "resolve_backend", lambda op, backend, device=None: (
        "fused" if op == "causal_attention" else chosen(op, backend, device)))
    monkeypatch.setattr(cuda_attention, "unsupported", lambda q, k, v: None)
    graphs = []

    class Captured(Exception):
        pass

    def capture(graph, example_inputs):
        graphs.append(graph)
        raise Captured

    model = small_gpt(dropout=0.1)
    compiled = torch.compile(model.loss, fullgraph=True,
                             backend=aot_autograd(fw_compiler=capture))
    with pytest.raises(Exception, match="Captured"):
        compiled(*batch())
    assert len(graphs) == 1
    targets = [str(node.target) for node in graphs[0].graph.nodes]
    assert targets.count("fastgpt.attention_forward_seeded.default") == 2  # one per layer


@pytest.mark.parametrize("backend", ["reference", "linear_cross_entropy=fused"], indirect=True)
@pytest.mark.slow
def test_the_compiled_step_gives_the_eager_loss_and_gradients(backend, monkeypatch):
    if backend != "reference" and not ops.available()["linear_cross_entropy"][0]:
        require_or_skip(f"the fused linear_cross_entropy cannot run here: "
                        f"{ops.available()['linear_cross_entropy'][1]}")
    from fastgpt.ops import triton_ce
    launches = []
    launch = triton_ce.launch
    monkeypatch.setattr(triton_ce, "launch", lambda *a, **k: launches.append(1) or launch(*a, **k))
    results = []
    for compile in (False, True):
        model = small_gpt()
        loss = training_module(model, compile=compile)(*batch())
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
        # the backend asked for is the one that ran, compiled too (a graph traced with
        # another backend earlier in this process is not reused)
        assert bool(launches) == (backend != "reference")
        launches.clear()
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=0)  # see the module docstring
    for got, want in zip(compiled_grads, eager_grads):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.slow
def test_a_compiled_run_trains_like_an_eager_one_and_resumes_in_either_mode(
        tmp_path, corpus_file, capsys):
    runs = tmp_path / "runs"
    settings = dict(max_steps=6, eval_interval=3, dropout=0.0)
    train(tiny_config(runs, corpus_file, name="eager", **settings))
    train(tiny_config(runs, corpus_file, name="compiled", compile=True,
                      **{**settings, "max_steps": 3}))
    said = capsys.readouterr().out
    assert said.count("torch.compile: the first step, which compiles the forward, loss and "
                      "backward, took") == 1
    checkpoint = load_checkpoint(runs / "compiled" / "last.pt")
    gpt = GPT(**tiny_config(runs, corpus_file).model_kwargs())
    assert list(checkpoint["model"]) == list(gpt.state_dict())  # no _orig_mod. prefix
    assert checkpoint["config"]["compile"] is True
    # the compiled run's checkpoint resumes eagerly, and gives the eager run's losses
    train(resume_config(str(runs), "compiled", {"compile": False, "max_steps": 6}),
          resume=True)
    losses = {name: [r.get("loss", r.get("val_loss")) for r in
                     read_metrics(runs / name / "metrics.jsonl")] for name in ("eager",
                                                                                "compiled")}
    assert len(losses["compiled"]) == len(losses["eager"])
    for got, want in zip(losses["compiled"], losses["eager"]):
        assert got == pytest.approx(want, rel=1e-5)  # fp32 rounding over 6 steps
    # and an eager checkpoint resumes compiled
    train(resume_config(str(runs), "eager", {"compile": True, "max_steps": 8}), resume=True)
    assert load_checkpoint(runs / "eager" / "last.pt")["step"] == 8
