"""fastgpt.model.GPT: size, untrained loss, shapes, causality, dropout, gradients,
initialisation, the loss, and fastgpt.optim.param_groups."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastgpt.model import GPT
from fastgpt.optim import param_groups

SMALL = dict(vocab_size=512, context_length=64, d_model=128, num_heads=4, num_layers=4)
LN_VOCAB = math.log(512)  # 6.2383


@pytest.fixture(scope="module")
def seed_model() -> GPT:
    """The seed-size model (built once: 11M parameters), in eval mode."""
    torch.manual_seed(0)
    return GPT().eval()


def small_model(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(**{**SMALL, **overrides})


def tokens(B, T, vocab=512, seed=0) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def test_seed_size_parameter_count(seed_model):
    assert seed_model.num_parameters() == 11_132_672
    assert sum(p.numel() for p in seed_model.parameters()) == 11_132_672


def test_seed_size_untrained_loss_is_ln_vocab(seed_model):
    """The read-out is tiny, so the untrained model is near the uniform guess. 0.05 nats:
    the logits' spread (std ~1/sqrt(384)) adds ~0.001 nats, and the mean over 1024 random
    targets of the per-token loss (std ~0.05) has a standard error ~0.002; an lm_head at the
    0.02 init would already be off by ~0.08 and a broken model by far more."""
    x, y = tokens(4, 256, seed=1), tokens(4, 256, seed=2)
    with torch.no_grad():
        loss = seed_model.loss(x, y)
    assert loss.shape == () and loss.dtype == torch.float32
    assert abs(loss.item() - LN_VOCAB) < 0.05


def test_seed_size_forward_shorter_than_context(seed_model):
    with torch.no_grad():
        logits = seed_model(tokens(2, 10, seed=1))
    assert logits.shape == (2, 10, 512) and logits.dtype == torch.float32


def test_small_config_untrained_loss_is_ln_vocab():
    """Same bound and reasoning as the seed size (logit std ~1/sqrt(128): ~0.004 nats)."""
    model = small_model().eval()
    x, y = tokens(4, 64, seed=3), tokens(4, 64, seed=4)
    with torch.no_grad():
        loss = model.loss(x, y)
    assert abs(loss.item() - LN_VOCAB) < 0.05


@pytest.mark.parametrize("T", [1, 5, 63, 64])
def test_forward_shape(T):
    model = small_model().eval()
    with torch.no_grad():
        logits = model(tokens(2, T))
    assert logits.shape == (2, T, 512)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_forward_other_vocab():
    model = small_model(vocab_size=97).eval()
    with torch.no_grad():
        logits = model(tokens(3, 10, vocab=97))
    assert logits.shape == (3, 10, 97)


def test_too_long_sequence_raises():
    model = small_model()
    with pytest.raises(ValueError, match="exceeds context_length 64"):
        model(tokens(1, 65))


def test_causal():
    """Logits at position t depend only on tokens <= t. Exact: attention's masked
    probabilities are exactly 0 and every other op works per position with value-independent
    arithmetic, so the rows up to t are computed bit for bit the same."""
    model = small_model().eval()
    x = tokens(2, 32, seed=5)
    with torch.no_grad():
        base = model(x)
        for t in (0, 7, 30):
            changed = x.clone()
            changed[:, t + 1:] = (changed[:, t + 1:] + 1 + torch.arange(31 - t)) % 512
            out = model(changed)
            assert torch.equal(out[:, :t + 1], base[:, :t + 1])
            assert (out[:, t + 1:] - base[:, t + 1:]).abs().max() > 1e-4
            # while changing token t does change position t
            past = x.clone()
            past[:, t] = (past[:, t] + 1) % 512
            assert (model(past)[:, t] - base[:, t]).abs().max() > 1e-4


def test_eval_deterministic_train_random():
    model = small_model()  # dropout 0.1 by default
    x = tokens(2, 16, seed=6)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
        assert torch.equal(a, b)
        model.train()
        c, d = model(x), model(x)
    assert not torch.equal(c, d)
    assert not torch.equal(c, a)


def test_dropout_zero_is_deterministic_in_train_mode():
    model = small_model(dropout=0.0).train()
    x = tokens(2, 16, seed=6)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_gradients_reach_every_parameter():
    model = small_model().train()
    x, y = tokens(2, 16, seed=7), tokens(2, 16, seed=8)
    model.loss(x, y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert (p.grad != 0).any(), name
        assert torch.isfinite(p.grad).all(), name


def _std_bounds(n: int, sigma: float, k: float = 6.0) -> tuple[float, float]:
    """k standard errors around sigma for the sample std of n normal draws (SE =
    sigma / sqrt(2n)); at k=6 a correct init fails with probability ~2e-9 per check."""
    se = sigma / math.sqrt(2 * n)
    return sigma - k * se, sigma + k * se


def _check_normal(w: torch.Tensor, sigma: float, name: str) -> None:
    n = w.numel()
    lo, hi = _std_bounds(n, sigma)
    std = w.std().item()
    assert lo < std < hi, f"{name}: std {std:.6g} not in ({lo:.6g}, {hi:.6g}), want {sigma:.6g}"
    # the mean's standard error is sigma / sqrt(n); 6 of them
    assert abs(w.mean().item()) < 6 * sigma / math.sqrt(n), name


def test_initialisation(seed_model):
    """As the module docstring says. With 384-wide matrices every sample has >= 98k entries,
    so 6 standard errors of the std is < 1.4% of sigma: 0.02 vs 1/384, or vs
    0.02/sqrt(12) ~ 0.0058, are told apart by a wide margin."""
    model = seed_model
    d_model, num_layers = 384, 6
    residual_sigma = 0.02 / math.sqrt(2 * num_layers)
    _check_normal(model.lm_head.weight, 1.0 / d_model, "lm_head.weight")
    _check_normal(model.tok_emb.weight, 0.02, "tok_emb.weight")
    _check_normal(model.pos_emb.weight, 0.02, "pos_emb.weight")
    for i, block in enumerate(model.blocks):
        _check_normal(block.attn.out_proj.weight, residual_sigma, f"blocks.{i}.attn.out_proj")
        _check_normal(block.mlp.down.weight, residual_sigma, f"blocks.{i}.mlp.down")
        for name in ("query", "key", "value"):
            _check_normal(getattr(block.attn, name).weight, 0.02, f"blocks.{i}.attn.{name}")
        _check_normal(block.mlp.up.weight, 0.02, f"blocks.{i}.mlp.up")
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.bias is not None:
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
        if isinstance(module, nn.LayerNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
    for block in model.blocks:
        for name in ("query", "key", "value"):
            assert getattr(block.attn, name).bias is None


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_equals_cross_entropy_of_flattened_logits(reduction):
    """fp32, 1e-6 relative: the same log-softmax values, reduced over 96 positions in a
    different order than torch's (a few ulps of 6e-8)."""
    model = small_model().eval()
    x, y = tokens(3, 32, seed=9), tokens(3, 32, seed=10)
    with torch.no_grad():
        loss = model.loss(x, y, reduction=reduction)
        want = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction=reduction)
    assert loss.shape == want.shape
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0.0)


def test_the_loss_goes_through_the_backend_asked_for(monkeypatch):
    """model.loss(backend=...) reaches the op asked for: "fused" the chunked Triton path (through
    its interpreter on a CPU), "reference" the reference, each within 1e-6 of
    F.cross_entropy of the same logits in fp64 (fp32 sums in other orders over 16 rows), and
    "auto" on CPU tensors the reference (on CUDA ones the kernel)."""
    from fastgpt import ops
    from helpers import require_or_skip
    ok, why = ops.status("linear_cross_entropy")
    if not ok:
        require_or_skip(f"the fused linear_cross_entropy cannot run here: {why}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = small_model().to(device).eval()
    x, y = tokens(2, 8, seed=11).to(device), tokens(2, 8, seed=12).to(device)
    exact = F.cross_entropy(model(x).double().flatten(0, 1), y.flatten()).item()
    losses = {backend: model.loss(x, y, backend=backend)
              for backend in ("fused", "reference", "auto")}
    for backend, loss in losses.items():
        assert abs(loss.item() - exact) <= 1e-6 * abs(exact), backend
    kernel = "ChunkedLinearCrossEntropyBackward"
    assert losses["fused"].grad_fn.name() == kernel
    assert losses["reference"].grad_fn.name() != kernel
    assert (losses["auto"].grad_fn.name() == kernel) == (device == "cuda")
    # where no kernel can run, asking for one is a clear error (the kernel's own tests are
    # in test_linear_cross_entropy.py)
    monkeypatch.setattr(ops.dispatch, "status", lambda op: (False, "not here"))
    with pytest.raises(ops.BackendUnavailable, match="not here"):
        model.loss(x, y, backend="fused")


def test_param_groups_split():
    model = small_model()
    groups = param_groups(model, 0.1)
    assert len(groups) == 2
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0

    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    # every parameter exactly once
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids)) == len(names)
    assert set(all_ids) == set(names)

    expected_decay = {"lm_head.weight"} | {
        f"blocks.{i}.{m}.weight" for i in range(SMALL["num_layers"])
        for m in ("attn.query", "attn.key", "attn.value", "attn.out_proj", "mlp.up", "mlp.down")}
    assert decay_names == expected_decay
    assert {"tok_emb.weight", "pos_emb.weight", "ln_f.weight", "ln_f.bias",
            "lm_head.bias"} <= no_decay_names
    for name in no_decay_names:
        assert (name.endswith(".bias") or ".ln" in name or name.startswith("ln_f")
                or "emb" in name), name
    for name, p in model.named_parameters():
        if name.endswith(".bias") or "ln" in name.split(".")[-2]:
            assert name in no_decay_names, name


def test_param_groups_decay_all():
    model = small_model()
    groups = param_groups(model, 0.1, decay_all=True)
    assert len(groups) == 1
    assert groups[0]["weight_decay"] == 0.1
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in model.parameters()]


def test_param_groups_feed_adamw():
    from fastgpt.optim import AdamW
    model = small_model()
    opt = AdamW(param_groups(model, 0.1), lr=1e-3)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
