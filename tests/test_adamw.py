"""The fused AdamW step (csrc/adamw.cu) and its CPU build.

On a CPU, the extension's CPU build runs the kernel's per-element arithmetic
(csrc/adamw_math.h, shared with the CUDA kernel) against torch.optim.AdamW; the CUDA build
is compiled with nvcc once per session (conftest's cuda_build, in a subprocess: one process
can load only one build) to prove it builds without spills and registers its ops (the
attention kernel's too); the CUDA kernel itself runs on the CPU in tests/test_cuda_on_cpu.py. Tolerance:
fp32, 1e-6 of each tensor's largest entry. The two paths differ only where the compiler fuses a multiply and an add
(one rounding instead of two, about 6e-8 of the value each); over 20 steps the parameters
differ by a few 1e-7 at most (measured ~2e-7), since Adam's updates are lr-sized and the
moments renormalise each step.
"""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastgpt import ops
from fastgpt.ops.dispatch import adamw_self_check as self_check
from fastgpt.optim import AdamW
from helpers import gpu, quick


@pytest.fixture
def cpu_build(cpu_extension):
    return torch.ops.fastgpt.adamw_step


SIZES = [(1,), (7,), (33, 17), (1000,), (5, 3)]


def make_params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=gen).to(dtype)) for s in SIZES]


def groups_for(params):
    return [{"params": params[:2], "lr": 1e-2, "weight_decay": 0.1},
            {"params": params[2:4], "weight_decay": 0.0},
            {"params": params[4:], "lr": 3e-3, "weight_decay": 0.05}]


def run_steps(pairs, steps, seed=1, clip=None):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=gen) for p in pairs[0][0]]
        for params, opt in pairs:
            for p, g in zip(params, grads):
                p.grad = g.to(p.dtype).clone()
            if clip is not None and not isinstance(opt, AdamW):
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()


def assert_close_rel(got, want, rel=1e-6):  # see the module docstring
    scale = max(want.abs().max().item(), 1e-30)
    assert (got.double() - want.double()).abs().max().item() <= rel * scale


def test_cpu_build_matches_torch_adamw_over_20_steps(cpu_build):
    ours, theirs = make_params(), make_params()
    opt_ours = AdamW(groups_for(ours), lr=1e-3, backend="fused")
    opt_theirs = torch.optim.AdamW(groups_for(theirs), lr=1e-3, foreach=False)
    run_steps([(ours, opt_ours), (theirs, opt_theirs)], 20)
    for p, q in zip(ours, theirs):
        assert_close_rel(p.detach(), q.detach())
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close_rel(opt_ours.state[p][key], opt_theirs.state[q][key])
        assert opt_ours.state[p]["step"].item() == 20


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_max_grad_norm_equals_clip_grad_norm_then_step(cpu_build, backend):
    ours, theirs = make_params(), make_params()
    opt_ours = AdamW(groups_for(ours), lr=1e-3, max_grad_norm=0.5, backend=backend)
    opt_theirs = torch.optim.AdamW(groups_for(theirs), lr=1e-3, foreach=False)
    run_steps([(ours, opt_ours), (theirs, opt_theirs)], 5, clip=0.5)
    for p, q in zip(ours, theirs):
        assert_close_rel(p.detach(), q.detach())


def test_state_dicts_move_between_the_fused_step_and_torch(cpu_build):
    ours, theirs = make_params(), make_params()
    opt_ours = AdamW(groups_for(ours), lr=1e-3, backend="fused")
    run_steps([(ours, opt_ours)], 3)
    import copy
    theirs_opt = torch.optim.AdamW(groups_for(theirs), lr=1e-3, foreach=False)
    with torch.no_grad():
        for p, q in zip(ours, theirs):
            q.copy_(p)
    theirs_opt.load_state_dict(copy.deepcopy(opt_ours.state_dict()))
    run_steps([(ours, opt_ours), (theirs, theirs_opt)], 3, seed=5)
    for p, q in zip(ours, theirs):
        assert_close_rel(p.detach(), q.detach())


def test_bf16_params_keep_fp32_state(cpu_build):
    params = make_params(torch.bfloat16)
    opt = AdamW(params, lr=1e-3, backend="fused")
    run_steps([(params, opt)], 2)
    assert all(opt.state[p]["exp_avg"].dtype == torch.float32 for p in params)
    assert all(p.dtype == torch.bfloat16 for p in params)
    reference = make_params(torch.bfloat16)
    opt_ref = AdamW(reference, lr=1e-3, backend="reference")
    run_steps([(reference, opt_ref)], 2)
    for p, q in zip(params, reference):  # same fp32 maths, one rounding to bf16 each step
        torch.testing.assert_close(p.detach().float(), q.detach().float(), rtol=2 ** -7, atol=0)


@pytest.mark.parametrize("mutate, message", [
    (lambda a: a.update(grads=a["grads"][:-1]), "must have the same length"),
    (lambda a: a.update(exp_avgs=[t.double() for t in a["exp_avgs"]]), "must be float32"),
    (lambda a: a.update(grads=[g.half() for g in a["grads"]]), "grad 0 is Half"),
    (lambda a: a.update(exp_avg_sqs=[torch.zeros(4, 3).t()] + a["exp_avg_sqs"][1:]),
     "must be contiguous"),
    (lambda a: a.update(grad_scale=torch.ones(2)), "grad_scale must be a one-element"),
])
def test_bad_inputs_are_clear_errors(cpu_build, mutate, message):
    params = [torch.zeros(3, 4), torch.zeros(5)]
    args = dict(params=params, grads=[torch.zeros_like(p) for p in params],
                exp_avgs=[torch.zeros_like(p) for p in params],
                exp_avg_sqs=[torch.zeros_like(p) for p in params], grad_scale=None)
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        cpu_build(args["params"], args["grads"], args["exp_avgs"], args["exp_avg_sqs"],
                  1e-3, 0.9, 0.999, 1e-8, 0.0, 1, args["grad_scale"])


def test_torch_compile_traces_the_step_through_its_fake_and_updates_in_place(cpu_build):
    """The schema declares what the op writes (params and both moments, not the grads: what
    torch.compile's functionalization orders the graph by), the step traces into one graph
    (fullgraph: no break) through the op's fake, and the compiled call updates the tensors
    in place exactly as the eager call does."""
    schema = torch.ops.fastgpt.adamw_step.default._schema
    written = {a.name for a in schema.arguments if a.alias_info and a.alias_info.is_write}
    assert written == {"params", "exp_avgs", "exp_avg_sqs"}, schema

    def step(params, grads, exp_avgs, exp_avg_sqs):
        cpu_build(params, grads, exp_avgs, exp_avg_sqs, 1e-2, 0.9, 0.999, 1e-8, 0.1, 3, None)

    gen = torch.Generator().manual_seed(0)
    start = [[torch.randn(n, generator=gen) for n in (5, 1000)] for _ in range(4)]
    start[3] = [t.abs() for t in start[3]]  # exp_avg_sq >= 0
    eager, compiled = ([[t.clone() for t in ts] for ts in start] for _ in range(2))
    step(*eager)
    torch._dynamo.reset()
    torch.compile(step, backend="aot_eager", fullgraph=True)(*compiled)
    for name, e, c, s in zip(("params", "grads", "exp_avgs", "exp_avg_sqs"), eager, compiled,
                             start):
        for a, b, before in zip(e, c, s):
            assert torch.equal(a, b), name
            assert torch.equal(a, before) == (name == "grads"), name  # grads only read


def cuda_tool(name: str) -> str:
    """A CUDA binary tool, found as bench/kernel_report.py finds it (its pip package, the
    toolkit, or the copy Triton ships: this CI machine's toolkit has no cuobjdump)."""
    bench = str(Path(__file__).resolve().parent.parent / "bench")
    sys.path.insert(0, bench)
    try:
        path = importlib.import_module("kernel_report").find_tool(name)
    finally:
        sys.path.remove(bench)
    if path is None:
        pytest.fail(f"no {name} in its pip package, the CUDA toolkit or Triton's package")
    return path


@pytest.mark.slow
def test_cuda_build_compiles_without_spills_and_registers_its_ops(cuda_build):
    log = cuda_build.log
    for op in ("adamw_step", "attention_forward", "attention_backward"):
        assert f"CUDA kernel {op} True" in log, log[-3000:]
    reports = [line for line in log.splitlines() if "spill stores" in line]
    assert reports, "no ptxas resource report in the build log"
    assert all("0 bytes spill stores, 0 bytes spill loads" in line for line in reports), reports
    # the attention kernels keep nothing in local memory either (a dynamically indexed
    # array would put a stack frame there)
    attention = [line for line in log.splitlines()
                 if "Function properties for" in line and "attention" in line]
    # fp32: forward, dK/dV, deterministic dQ and the Dr kernel; bf16 and fp16: forward, Dr,
    # dK/dV, dQ's cast, deterministic dQ; each for head dims 32, 64, 128, on sm_80 and sm_90
    assert len(attention) == (4 + 5 * 2) * 3 * 2, attention
    frames = [log.splitlines()[i + 1] for i, line in enumerate(log.splitlines())
              if line in attention]
    assert all("0 bytes stack frame" in line for line in frames), frames
    # the attention kernels compile in one translation unit per head dim, each nvcc run
    # compiling its architectures in parallel
    for name in ("attention.cu", "attention_d32.cu", "attention_d64.cu", "attention_d128.cu"):
        assert f"csrc/{name} -o" in log, name
    assert "--threads 0" in log
    # SASS for sm_80 and sm_90, and compute_90 PTX for the GPUs after them
    cuobjdump = cuda_tool("cuobjdump")
    library = cuda_build.library
    elves = subprocess.run([cuobjdump, "--list-elf", library], capture_output=True,
                           text=True, check=True).stdout
    ptx = subprocess.run([cuobjdump, "--list-ptx", library], capture_output=True,
                         text=True, check=True).stdout
    assert ".sm_80." in elves and ".sm_90." in elves, elves
    assert ".sm_90." in ptx and ".sm_80." not in ptx, ptx


# --- on a GPU ---------------------------------------------------------------------------



@gpu
@quick
def test_the_kernel_builds_and_passes_its_self_check_on_this_gpu():
    ok, why = ops.available()["adamw"]
    assert ok, why  # a broken kernel must fail the GPU run, not skip its tests


@gpu
@quick
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_matches_torch(dtype):
    sizes = [1, 3, 4, 5, 17, 1000, 65535, 65537, 10 ** 6 + 3, 10 ** 7]
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(n + 1, generator=gen) for n in sizes]
    # storage offset 1 for every other tensor: the vector path for aligned tensors, the
    # scalar path for unaligned ones
    offsets = [i % 2 for i in range(len(sizes))]
    ours = [torch.nn.Parameter(b.to("cuda", dtype)[o:o + n])
            for b, o, n in zip(base, offsets, sizes)]
    theirs = [torch.nn.Parameter(b.to("cuda", torch.float32)[o:o + n].clone())
              for b, o, n in zip(base, offsets, sizes)]
    opt_ours = AdamW(ours, lr=1e-3, weight_decay=0.1, backend="fused")
    opt_theirs = torch.optim.AdamW(theirs, lr=1e-3, weight_decay=0.1, foreach=False)
    for _ in range(5):
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape, device="cuda")
            p.grad, q.grad = g.to(dtype), g.to(dtype).float()
        opt_ours.step()
        opt_theirs.step()
        if dtype == torch.bfloat16:  # torch keeps fp32 master copies here: round them alike
            with torch.no_grad():
                for q in theirs:
                    q.copy_(q.to(torch.bfloat16).float())
    for p, q in zip(ours, theirs):
        if dtype == torch.float32:
            assert_close_rel(p.detach(), q.detach())
        else:  # one bf16 rounding per step of a value both compute in fp32
            torch.testing.assert_close(p.detach().float(), q.detach(), rtol=2 ** -7, atol=1e-6)


@gpu
@quick
def test_more_tensors_than_one_launch_holds():
    params = [torch.nn.Parameter(torch.randn(1000 + i, device="cuda")) for i in range(300)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = AdamW(params, lr=1e-3, backend="fused")
    opt_ref = torch.optim.AdamW(ref, lr=1e-3, foreach=False)
    for p, q in zip(params, ref):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    opt.step()
    opt_ref.step()
    for p, q in zip(params, ref):
        assert_close_rel(p.detach(), q.detach())


def test_lr_and_step_read_from_tensors(cpu_build):
    """The capturable path: lr and step in (device) memory, bias corrections in fp32."""
    results = []
    for from_tensors in (False, True):
        params = make_params()
        grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) for p in params]
        states = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
        with torch.no_grad():
            for step in (1, 2, 3):
                cpu_build(params, grads, [m for m, _ in states], [v for _, v in states],
                          float("nan") if from_tensors else 1e-3, 0.9, 0.999, 1e-8, 0.1,
                          -7 if from_tensors else step, None,
                          torch.tensor([1e-3]) if from_tensors else None,
                          torch.tensor([float(step)]) if from_tensors else None)
        results.append(params)
    for p, q in zip(*results):
        # the same double-precision constants, but lr held in an fp32 tensor rounds 1e-3:
        # a 3e-8 relative change of each update, far inside fp32's 1e-6 here
        assert_close_rel(q.detach(), p.detach())


def test_capturable_bookkeeping(cpu_build):
    ours, plain = make_params(), make_params()
    lr = torch.tensor(1e-3)
    opt = AdamW(ours, lr=lr, backend="fused", capturable=True)
    opt_plain = AdamW(plain, lr=1e-3, backend="fused")
    run_steps([(ours, opt), (plain, opt_plain)], 4)
    for p, q in zip(ours, plain):
        assert_close_rel(p.detach(), q.detach())
    lr.fill_(0.0)  # a schedule updates the tensor in place; with lr 0 only decay is... 0 too
    before = [p.detach().clone() for p in ours]
    run_steps([(ours, opt)], 1)
    assert all(torch.equal(p.detach(), b) for p, b in zip(ours, before))
    state = opt.state_dict()
    assert all(s["step"].item() == 5 and s["step"].device.type == "cpu"
               for s in state["state"].values())
    with pytest.raises(ValueError, match="capturable=True needs backend='fused'"):
        AdamW(make_params(), capturable=True)


@gpu
@quick
def test_a_captured_step_replays_like_eager_steps():
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(n, generator=gen) for n in (1, 1000, 70000)]
    captured = [torch.nn.Parameter(s.cuda()) for s in start]
    eager = [torch.nn.Parameter(s.cuda()) for s in start]
    for p, q in zip(captured, eager):  # static gradients, as a captured step needs
        p.grad = torch.randn(p.shape, generator=gen).cuda()
        q.grad = p.grad.clone()
    lr = torch.tensor(1e-3, device="cuda")
    opt = AdamW(captured, lr=lr, backend="fused", capturable=True, max_grad_norm=1.0)
    opt_eager = AdamW(eager, lr=1e-3, backend="fused", max_grad_norm=1.0)
    opt.step()  # the eager step that creates the state
    opt_eager.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for _ in range(4):
        graph.replay()
        opt_eager.step()
    torch.cuda.synchronize()
    for p, q in zip(captured, eager):
        assert_close_rel(p.detach(), q.detach())
    assert all(s["step"].item() == 5 for s in opt.state_dict()["state"].values())


@gpu
def test_resume_on_the_gpu_from_a_cpu_saved_state_dict(tmp_path):
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(n, generator=gen) for n in (7, 5000)]
    grads = [[torch.randn(n, generator=gen) for n in (7, 5000)] for _ in range(6)]
    whole = [torch.nn.Parameter(s.cuda()) for s in start]
    opt = AdamW(whole, lr=1e-3, backend="fused")
    for k in range(6):
        for p, g in zip(whole, grads[k]):
            p.grad = g.cuda()
        opt.step()
        if k == 2:
            torch.save({"params": [p.detach().cpu() for p in whole],
                        "optimizer": opt.state_dict()}, tmp_path / "half.pt")
    saved = torch.load(tmp_path / "half.pt", map_location="cpu", weights_only=True)
    resumed = [torch.nn.Parameter(p.cuda()) for p in saved["params"]]
    opt2 = AdamW(resumed, lr=1e-3, backend="fused")
    opt2.load_state_dict(saved["optimizer"])
    for k in range(3, 6):
        for p, g in zip(resumed, grads[k]):
            p.grad = g.cuda()
        opt2.step()
    for p, q in zip(whole, resumed):
        assert torch.equal(p.detach(), q.detach())


def test_self_check_runs_the_fused_step_against_the_reference(cpu_build, monkeypatch):
    self_check(torch.device("cpu"))  # the CPU build runs the kernel's arithmetic

    def off_by_a_bit(params, *args):
        cpu_build(params, *args)
        with torch.no_grad():
            params[-1].add_(1e-2)

    monkeypatch.setattr(torch.ops.fastgpt, "adamw_step", off_by_a_bit)
    with pytest.raises(RuntimeError, match="differs from the reference"):
        self_check(torch.device("cpu"))


def test_bf16_state_survives_a_state_dict_round_trip():
    # torch's load_state_dict would round the fp32 moments to the bf16 params' dtype
    params = make_params(torch.bfloat16)
    opt = AdamW(params, lr=1e-3, backend="reference")
    run_steps([(params, opt)], 2)
    saved = torch.load(_save(opt.state_dict()), weights_only=True)
    again = AdamW(params, lr=1e-3, backend="reference")
    again.load_state_dict(saved)
    for p in params:
        for key in ("exp_avg", "exp_avg_sq"):
            assert again.state[p][key].dtype == torch.float32
            assert torch.equal(again.state[p][key], opt.state[p][key])
        assert again.state[p]["step"].device.type == "cpu" and again.state[p]["step"].item() == 2
    torch_state = torch.optim.AdamW(params, amsgrad=True).state_dict()
    with pytest.raises(ValueError, match="no amsgrad"):
        again.load_state_dict(torch_state)


def _save(state):
    import io
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_capturable_counts_per_group_when_a_param_sits_out(cpu_build):
    """One device step count per group and device: a parameter that sits a step out takes
    the group's count when it comes back (as on the reference path), and the state_dict
    says so for every parameter."""
    params, plain = make_params(), make_params()
    opt = AdamW(params, lr=1e-3, backend="fused", capturable=True)
    opt_plain = AdamW(plain, lr=1e-3, backend="reference")
    run_steps([(params, opt), (plain, opt_plain)], 1)
    for group in (params, plain):
        group[0].grad = None  # params[0] sits this step out
        for p in group[1:]:
            p.grad = torch.ones_like(p)
    opt.step()
    opt_plain.step()
    for group in (params, plain):
        for p in group:
            p.grad = torch.ones_like(p)
    opt.step()
    opt_plain.step()
    assert all(s["step"].item() == 3 for s in opt.state_dict()["state"].values())
    for p, q in zip(params, plain):
        assert_close_rel(p.detach(), q.detach())


@gpu
@quick
def test_a_tensor_cut_between_two_launches():
    # 20 small tensors fill 20 blocks; a 3e7-element tensor needs 458 more, so it is cut at
    # the 320-block limit and continues in the next launch's slot 0
    sizes = [1000] * 20 + [3 * 10 ** 7] + [1000] * 19
    gen = torch.Generator(device="cuda").manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(n, device="cuda", generator=gen)) for n in sizes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for p, q in zip(ours, theirs):
        p.grad = torch.randn(p.shape, device="cuda", generator=gen)
        q.grad = p.grad.clone()
    AdamW(ours, lr=1e-3, backend="fused").step()
    torch.optim.AdamW(theirs, lr=1e-3, foreach=False).step()
    for p, q in zip(ours, theirs):
        assert_close_rel(p.detach(), q.detach())
