"""AdamW with torch.optim.AdamW's maths and state layout, written out; the fused CUDA step
(csrc/adamw.cu) runs the same update for CUDA parameters when it is available.

Per parameter p with gradient g, at step t (counting from 1):
    p <- p * (1 - lr * weight_decay)                 decoupled weight decay
    m <- beta1 * m + (1 - beta1) * g                 first moment  (state "exp_avg")
    v <- beta2 * v + (1 - beta2) * g^2               second moment (state "exp_avg_sq")
    p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

State per parameter: "step" (a float32 CPU scalar tensor, never on the GPU, so a state_dict
loads anywhere), "exp_avg", "exp_avg_sq" (float32, also for bf16/fp16 parameters), so a
state_dict moves between this optimizer and torch.optim.AdamW, between backends and
between devices.

max_grad_norm clips by the global gradient norm inside the step, as
torch.nn.utils.clip_grad_norm_ followed by the step would (one reduction; the scale is
applied inside the update and stays on the device; the .grad tensors are left as they are).

capturable=True (fused backend) keeps each group's step count in device memory and reads
the learning rate from group["lr"] when it is a tensor, so that a step captured in a CUDA
graph replays correctly: run one eager step before capturing (it creates the device
state). state_dict() then copies the device step counts back into the CPU "step" state.
"""

from __future__ import annotations

import torch

from fastgpt.ops import reference, resolve_backend


class AdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 3e-4, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, *,
                 max_grad_norm: float | None = None, capturable: bool = False,
                 backend: str | None = None):
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if max_grad_norm is not None and not max_grad_norm > 0.0:
            raise ValueError(f"max_grad_norm must be > 0 (or None), got {max_grad_norm}")
        if capturable and backend != "fused":
            raise ValueError("capturable=True needs backend='fused' (the reference step "
                             "reads its step count on the host)")
        resolve_backend("adamw", backend)  # an unknown name, or "fused" with no kernel: now
        self.backend = backend
        self.max_grad_norm = max_grad_norm
        self.capturable = capturable
        self._device_steps: dict[tuple[int, torch.device], torch.Tensor] = {}
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = self._clip_scale() if self.max_grad_norm is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                self._init_state(p)
                self.state[p]["step"] += 1
            # one fused call per (device, step count): usually a single one per group
            batches: dict[tuple, list[torch.Tensor]] = {}
            for p in params:
                batches.setdefault((p.device, self.state[p]["step"].item()), []).append(p)
            devices = [device for device, _ in batches]
            if self.capturable and len(devices) != len(set(devices)):
                raise ValueError("capturable=True keeps one step count per group and device, "
                                 "but this group's parameters have taken different numbers "
                                 "of steps (some had no gradient): put them in separate groups")
            for (device, step), batch in batches.items():
                scale = None if grad_scale is None else grad_scale.to(device)
                if resolve_backend("adamw", self.backend, device) == "fused":
                    self._fused_step(batch, group, step, scale)
                else:
                    self._reference_step(batch, group, step, scale)
        return loss

    def state_dict(self) -> dict:
        for (group_index, _), device_step in self._device_steps.items():
            for p in self.param_groups[group_index]["params"]:
                if p in self.state:  # a captured graph advanced the device count only
                    self.state[p]["step"] = device_step.detach().to("cpu", torch.float32)
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load_state_dict, but the moments stay float32 (torch would round them to
        a bf16/fp16 parameter's dtype) and "step" stays a CPU float32 scalar (torch's fused
        or capturable AdamW saves it on the GPU). After loading, re-capture any CUDA graph."""
        for group in state_dict["param_groups"]:
            for flag in ("amsgrad", "maximize"):
                if group.get(flag):
                    raise ValueError(f"this AdamW has no {flag}; the state_dict uses it")
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        for p, saved_id in zip(params, saved_ids):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            state = self.state[p]
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = saved[key].to(device=p.device, dtype=torch.float32, copy=True)
            state["step"] = torch.as_tensor(saved["step"]).detach().to(
                device="cpu", dtype=torch.float32).reshape(())
        self._device_steps.clear()  # rebuilt from the loaded CPU counts at the next step

    def _init_state(self, p: torch.Tensor) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32,
                                                memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32,
                                                   memory_format=torch.contiguous_format)
        for key in ("exp_avg", "exp_avg_sq"):  # e.g. a torch.optim.AdamW state for bf16 params
            if state[key].dtype != torch.float32:
                state[key] = state[key].float()

    def _clip_scale(self) -> torch.Tensor:
        """min(1, max_grad_norm / (global grad norm + 1e-6)) as a float32 tensor left on the
        device: torch.nn.utils.clip_grad_norm_'s formula and its order of reduction (for fp32
        gradients its exact arithmetic; for bf16/fp16 ones the norm is taken in fp32, where
        torch uses the gradients' dtype). One torch._foreach_norm per (device, dtype) of the
        gradients (a multi-tensor launch on a GPU, not one per tensor), then the norm of
        those norms: no host sync."""
        grads = [p.grad for group in self.param_groups for p in group["params"]
                 if p.grad is not None]
        if not grads:
            return torch.ones(())
        device = grads[0].device
        groups: dict[tuple, list[torch.Tensor]] = {}
        for g in grads:
            groups.setdefault((g.device, g.dtype), []).append(g)
        norms = [norm for group in groups.values()
                 for norm in torch._foreach_norm(group, 2.0, dtype=torch.float32)]
        total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), 2.0)
        return torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0).to(torch.float32)

    def _reference_step(self, params: list[torch.Tensor], group: dict, step: float,
                        grad_scale: torch.Tensor | None) -> None:
        beta1, beta2 = group["betas"]
        reference.adamw_step(
            params, [p.grad for p in params], [self.state[p]["exp_avg"] for p in params],
            [self.state[p]["exp_avg_sq"] for p in params], lr=float(group["lr"]),
            beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            step=step, grad_scale=grad_scale)

    def _fused_step(self, params: list[torch.Tensor], group: dict, step: float,
                    grad_scale: torch.Tensor | None) -> None:
        beta1, beta2 = group["betas"]
        lr, lr_tensor, step_tensor = group["lr"], None, None
        if isinstance(lr, torch.Tensor):
            lr_tensor, lr = lr.to(params[0].device, torch.float32).reshape(1), float("nan")
        if self.capturable:
            index = next(i for i, g in enumerate(self.param_groups) if g is group)
            key = (index, params[0].device)
            if key in self._device_steps:
                step_tensor = self._device_steps[key].add_(1)
            else:  # the first (eager) step creates the device count
                step_tensor = torch.tensor([step], dtype=torch.float32, device=params[0].device)
                self._device_steps[key] = step_tensor
        torch.ops.fastgpt.adamw_step(
            params, [p.grad.contiguous() for p in params],
            [self.state[p]["exp_avg"] for p in params],
            [self.state[p]["exp_avg_sq"] for p in params],
            lr, beta1, beta2, group["eps"], group["weight_decay"], int(step), grad_scale,
            lr_tensor, step_tensor)


def param_groups(model: torch.nn.Module, weight_decay: float,
                 decay_all: bool = False) -> list[dict]:
    """Weight decay on the weight matrices only (unless decay_all): biases, LayerNorm
    weights and embeddings go in a group with weight_decay 0."""
    params = list(model.parameters())
    if decay_all:
        return [{"params": params, "weight_decay": weight_decay}]
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decayed = [p for p in params if p.dim() >= 2 and id(p) not in embeddings]
    not_decayed = [p for p in params if p.dim() < 2 or id(p) in embeddings]
    return [{"params": decayed, "weight_decay": weight_decay},
            {"params": not_decayed, "weight_decay": 0.0}]
