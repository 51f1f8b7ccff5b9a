"""fastgpt.optim.AdamW against torch.optim.AdamW(foreach=False).

Tolerance: exact (bitwise) equality. fastgpt's step mirrors torch's single-tensor AdamW op
for op (mul_ by 1 - lr*wd, lerp_, mul_/addcmul_, sqrt / bias-correction + eps, addcdiv_,
with the step read back from the same float32 tensor), in the same order, on the same CPU
kernels, so there is no rounding difference to allow for; a reordering or a changed formula
shows up as a mismatch within a step or two.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

from fastgpt import FastGPTError, ops
from fastgpt.optim import AdamW

SHAPES = [(1,), (7,), (33, 17), (1000,), (5, 3)]
GROUPS = [  # (indices into SHAPES, group options)
    ([0, 1], dict(lr=1e-2, weight_decay=0.1)),
    ([2], dict(lr=3e-3, weight_decay=0.0)),
    ([3, 4], dict(lr=5e-4, weight_decay=0.5, betas=(0.8, 0.99), eps=1e-6)),
]
DEFAULTS = dict(lr=1e-3, weight_decay=0.01)


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def groups_for(params):
    return [{"params": [params[i] for i in idx], **opts} for idx, opts in GROUPS]


def make_pair(seed=0):
    """Twin parameter lists and a fastgpt and a torch optimizer over them."""
    ours = make_params(seed)
    theirs = clone_params(ours)
    return (ours, AdamW(groups_for(ours), **DEFAULTS),
            theirs, torch.optim.AdamW(groups_for(theirs), foreach=False, **DEFAULTS))


def set_grads(param_lists, gen):
    """The same random gradients on each list of twin parameters."""
    for twins in zip(*param_lists):
        g = torch.randn(twins[0].shape, generator=gen)
        for p in twins:
            p.grad = g.clone()


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bitwise equal (see the module docstring)."""
    torch.testing.assert_close(a, b, rtol=0.0, atol=0.0)


def assert_same_params_and_state(ours, opt_ours, theirs, opt_theirs):
    for p, q in zip(ours, theirs):
        assert_same(p.detach(), q.detach())
        s, t = opt_ours.state[p], opt_theirs.state[q]
        for key in ("exp_avg", "exp_avg_sq"):
            assert_same(s[key], t[key])
        assert s["step"].item() == t["step"].item()


def test_matches_torch_over_20_steps():
    ours, opt_ours, theirs, opt_theirs = make_pair()
    start = [p.detach().clone() for p in ours]
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 21):
        set_grads([ours, theirs], gen)
        opt_ours.step()
        opt_theirs.step()
        assert_same_params_and_state(ours, opt_ours, theirs, opt_theirs)
        for p in ours:
            assert opt_ours.state[p]["step"].item() == step
    # the run really moved every parameter (so the comparison above is not vacuous)
    for p, p0 in zip(ours, start):
        assert not torch.equal(p.detach(), p0)


def test_weight_decay_is_decoupled_and_per_group():
    """With a zero gradient AdamW's moments stay zero, so the update is the decay alone:
    p * (1 - lr * wd). One rounding (a single fp32 multiply), so exact."""
    params = make_params()
    opt = AdamW(groups_for(params), **DEFAULTS)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for idx, opts in GROUPS:
        for i in idx:
            factor = 1.0 - opts["lr"] * opts["weight_decay"]
            assert_same(params[i].detach(), before[i] * factor)
    assert torch.equal(params[2].detach(), before[2])  # weight_decay 0: untouched


def test_closure_is_called_and_its_loss_returned():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = AdamW([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == 5.0
    assert p.grad is not None
    assert (p.detach().abs() < torch.tensor([1.0, 2.0])).all()


def test_state_layout():
    ours, opt, _, _ = make_pair()
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        set_grads([ours], gen)
        opt.step()
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert sorted(sd["state"]) == list(range(len(SHAPES)))
    for i, shape in enumerate(SHAPES):
        state = sd["state"][i]
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
        step = state["step"]
        assert isinstance(step, torch.Tensor)
        assert step.dtype == torch.float32 and step.device.type == "cpu" and step.dim() == 0
        assert step.item() == 3.0
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].shape == shape and state[key].dtype == torch.float32
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2], [3, 4]]
    assert [g["lr"] for g in sd["param_groups"]] == [1e-2, 3e-3, 5e-4]
    assert [g["weight_decay"] for g in sd["param_groups"]] == [0.1, 0.0, 0.5]


def _run(params_opts, gen, steps):
    for _ in range(steps):
        set_grads([p for p, _ in params_opts], gen)
        for _, opt in params_opts:
            opt.step()


@pytest.mark.parametrize("direction", ["fastgpt->torch", "torch->fastgpt"])
def test_state_dict_round_trip_with_torch(direction):
    """Train 7 steps with one optimizer, move its state into the other kind over cloned
    parameters, then continue both for 5 steps on the same gradients."""
    src_cls, dst_cls = ((AdamW, torch.optim.AdamW) if direction == "fastgpt->torch"
                        else (torch.optim.AdamW, AdamW))
    extra = lambda cls: {"foreach": False} if cls is torch.optim.AdamW else {}  # noqa: E731

    src_params = make_params()
    src = src_cls(groups_for(src_params), **DEFAULTS, **extra(src_cls))
    gen = torch.Generator().manual_seed(3)
    _run([(src_params, src)], gen, 7)

    dst_params = clone_params(src_params)
    # built with other hyperparameters: load_state_dict must bring the saved ones
    dst = dst_cls([{"params": g["params"]} for g in groups_for(dst_params)], lr=0.5,
                  weight_decay=0.9, **extra(dst_cls))
    # deep-copied: state_dict() hands out the live state tensors, and load_state_dict keeps
    # them when no dtype/device cast is needed, so without a copy both would share moments
    dst.load_state_dict(copy.deepcopy(src.state_dict()))
    for g_dst, (_, opts) in zip(dst.param_groups, GROUPS):
        assert g_dst["lr"] == opts["lr"] and g_dst["weight_decay"] == opts["weight_decay"]
    for p in dst_params:
        assert dst.state[p]["step"].item() == 7.0

    _run([(src_params, src), (dst_params, dst)], gen, 5)
    for p, q in zip(src_params, dst_params):
        assert_same(q.detach(), p.detach())
        for key in ("exp_avg", "exp_avg_sq"):
            assert_same(dst.state[q][key], src.state[p][key])
        assert dst.state[q]["step"].item() == 12.0


def test_state_dict_through_torch_save_weights_only():
    params = make_params()
    opt = AdamW(groups_for(params), **DEFAULTS)
    gen = torch.Generator().manual_seed(4)
    _run([(params, opt)], gen, 4)

    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True, map_location="cpu")

    params2 = clone_params(params)
    opt2 = AdamW(groups_for(params2), **DEFAULTS)
    opt2.load_state_dict(loaded)
    for p in params2:
        step = opt2.state[p]["step"]
        assert step.dtype == torch.float32 and step.device.type == "cpu" and step.item() == 4.0

    _run([(params, opt), (params2, opt2)], gen, 5)
    for p, q in zip(params, params2):
        assert_same(q.detach(), p.detach())
        for key in ("exp_avg", "exp_avg_sq"):
            assert_same(opt2.state[q][key], opt.state[p][key])


def test_params_without_grad_are_skipped():
    """A parameter without a gradient is not touched; one that sits a step out keeps its
    moments and, when it comes back, takes its group's step count (one per group and
    device: fastgpt.optim's docstring); the others step exactly as torch's."""
    ours, opt_ours, theirs, opt_theirs = make_pair()
    gen = torch.Generator().manual_seed(5)
    frozen = ours[1].detach().clone()
    for step in range(4):
        set_grads([ours, theirs], gen)
        ours[1].grad = None
        theirs[1].grad = None
        if step == 2:  # a param whose grad comes and goes (group 2, with ours[4])
            ours[3].grad = theirs[3].grad = None
            sat_out = (ours[3].detach().clone(), opt_ours.state[ours[3]]["exp_avg"].clone())
        opt_ours.step()
        opt_theirs.step()
        if step == 2:
            assert torch.equal(ours[3].detach(), sat_out[0])
            assert torch.equal(opt_ours.state[ours[3]]["exp_avg"], sat_out[1])
    # never had a grad: untouched (not even weight decay), no state
    assert torch.equal(ours[1].detach(), frozen)
    assert ours[1] not in opt_ours.state or not opt_ours.state[ours[1]]
    assert opt_ours.state[ours[3]]["step"].item() == 4.0  # its group's count
    assert opt_theirs.state[theirs[3]]["step"].item() == 3.0  # torch's: its own
    assert opt_ours.state[ours[0]]["step"].item() == 4.0
    assert not torch.equal(ours[3].detach(), sat_out[0])  # it stepped again at step 3
    for i in (0, 2, 4):
        assert_same(ours[i].detach(), theirs[i].detach())


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1e-3), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(eps=-1e-8), "eps"),
    (dict(eps=float("nan")), "eps"),
    (dict(betas=(1.0, 0.999)), "betas"),
    (dict(betas=(0.9, 1.0)), "betas"),
    (dict(betas=(-0.1, 0.999)), "betas"),
    (dict(betas=(0.9, -0.5)), "betas"),
    (dict(betas=(0.9, float("nan"))), "betas"),
    (dict(weight_decay=-0.01), "weight_decay"),
    (dict(weight_decay=float("nan")), "weight_decay"),
])
def test_invalid_hyperparameters(kwargs, match):
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=match):
        AdamW([p], **kwargs)


def test_zero_lr_and_weight_decay_are_valid():
    p = torch.nn.Parameter(torch.ones(3))
    opt = AdamW([p], lr=0.0, weight_decay=0.0, eps=0.0, betas=(0.0, 0.0))
    p.grad = torch.ones(3)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3))


def test_backends():
    p = torch.nn.Parameter(torch.zeros(3))
    assert AdamW([p], backend="reference").backend == "reference"
    assert AdamW([p], backend="auto").backend == "auto"  # resolved per device at each step
    assert AdamW([p]).backend is None  # the process default
    with pytest.raises(ValueError, match="backend must be one of"):
        AdamW([p], backend="apex")
    ok, why = ops.available()["adamw"]
    if ok:
        assert AdamW([p], backend="fused").backend == "fused"
    else:
        with pytest.raises(ops.BackendUnavailable) as info:
            AdamW([p], backend="fused")
        assert isinstance(info.value, FastGPTError)
        assert "adamw" in str(info.value) and why in str(info.value)


def test_reference_backend_matches_torch():
    """backend="reference" takes the same path as "auto" here: exact against torch."""
    ours = make_params()
    theirs = clone_params(ours)
    opt_ours = AdamW(groups_for(ours), backend="reference", **DEFAULTS)
    opt_theirs = torch.optim.AdamW(groups_for(theirs), foreach=False, **DEFAULTS)
    _run([(ours, opt_ours), (theirs, opt_theirs)], torch.Generator().manual_seed(6), 3)
    assert_same_params_and_state(ours, opt_ours, theirs, opt_theirs)


class AtenOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops called (not those they call inside)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float32, torch.bfloat16)])
def test_clipping_takes_one_norm_launch_per_dtype_and_equals_clip_grad_norm(dtypes):
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtypes[i % len(dtypes)]))
              for i, s in enumerate(SHAPES * 18)]  # 90 tensors, as many as the seed GPT
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 3).to(p.dtype)
    opt = AdamW(params, max_grad_norm=0.5, backend="reference")
    with AtenOps() as counted:
        scale = opt._clip_scale()
    # one multi-tensor norm per (device, dtype), one norm of the norms: no per-tensor norms
    assert counted.calls.count("_foreach_norm") == len(dtypes)
    assert counted.calls.count("linalg_vector_norm") == 1
    assert not {"item", "_local_scalar_dense"} & set(counted.calls)  # no host read
    copies = [torch.nn.Parameter(p.detach().float()) for p in params]
    for p, c in zip(params, copies):
        c.grad = p.grad.float()
    total = torch.nn.utils.clip_grad_norm_(copies, 0.5, foreach=False)
    want = torch.clamp(0.5 / (total + 1e-6), max=1.0)
    if dtypes == (torch.float32,):
        assert scale.item() == want.item()  # clip_grad_norm_'s arithmetic exactly
    else:  # the bf16 gradients' norms in fp32 here: the same sums in another order
        assert scale.item() == pytest.approx(want.item(), rel=1e-6)
    assert scale.dtype == torch.float32 and scale.item() < 1.0
