"""AdamW with torch.optim.AdamW's maths and state layout; each step is one
fastgpt.ops.adamw_step per parameter group and device: the reference (the maths written
out), torch's fused AdamW or the fused CUDA step (csrc/adamw.cu), as the backend says.

Per parameter p with gradient g, at step t (counting from 1):
    p <- p * (1 - lr * weight_decay)                 decoupled weight decay
    m <- beta1 * m + (1 - beta1) * g                 first moment  (state "exp_avg")
    v <- beta2 * v + (1 - beta2) * g^2               second moment (state "exp_avg_sq")
    p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

State per parameter: "step" (a float32 CPU scalar tensor, never on the GPU, so a state_dict
loads anywhere), "exp_avg", "exp_avg_sq" (float32, also for bf16/fp16 parameters), so a
state_dict moves between this optimizer and torch.optim.AdamW, between backends and
between devices. The step is counted once per parameter group and device, not per
parameter (the parameters of a group-device share one "step" tensor; state_dict() gives
each its own copy): a step's host work is a few list comprehensions per group, not a loop
of tensor updates per parameter. So a parameter that sits a step out (no gradient) keeps
its moments but takes its group's count when it comes back (torch.optim.AdamW counts per
parameter; the two agree whenever every parameter has a gradient at every step, as in
training). Loading a state_dict whose parameters of one group-device differ in "step" takes
their largest.

max_grad_norm clips by the global gradient norm inside the step, as
torch.nn.utils.clip_grad_norm_ followed by the step would (one reduction; the scale is
applied inside the update and stays on the device; the reference and the fused kernel leave
the .grad tensors as they are, torch's fused AdamW leaves the clipped ones there).

capturable=True (fused backend) keeps each group's step count in device memory and reads
the learning rate from group["lr"] when it is a tensor, so that a step captured in a CUDA
graph replays correctly: run one eager step before capturing (it creates the device
state). state_dict() then copies the device step counts back into the CPU "step" state.
"""

from __future__ import annotations

import torch

from fastgpt.ops import adamw_step, resolve_backend


class _Batch:
    """The tensors one adamw_step call takes for a (group, device), cached between steps."""

    def __init__(self, params: list[torch.Tensor], state: dict):
        self.ids = [id(p) for p in params]
        self.params = params
        self.exp_avgs = [state[p]["exp_avg"] for p in params]
        self.exp_avg_sqs = [state[p]["exp_avg_sq"] for p in params]
        self.step = state[params[0]]["step"]  # shared by the group-device's parameters


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
        # where clipping: the last step's global gradient norm, before clipping, a float32
        # tensor on the device (reading it waits for the step); else None
        self.grad_norm: torch.Tensor | None = None
        self.capturable = capturable
        self._batches: dict[tuple[int, torch.device], _Batch] = {}
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
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            device = params[0].device
            if any(p.device != device for p in params):  # rare: one call per device
                by_device: dict[torch.device, list[torch.Tensor]] = {}
                for p in params:
                    by_device.setdefault(p.device, []).append(p)
            else:
                by_device = {device: params}
            for device, on_device in by_device.items():
                self._step_batch((index, device), on_device, group, grad_scale)
        return loss

    def _batch(self, key: tuple[int, torch.device], params: list[torch.Tensor]) -> _Batch:
        batch = self._batches.get(key)
        if batch is None or batch.ids != [id(p) for p in params]:
            shared = None if batch is None else batch.step
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                if self.state[p].get("step") is not None:
                    shared = self.state[p]["step"] if shared is None else shared
            shared = torch.tensor(0.0) if shared is None else shared
            for p in params:
                self._init_state(p, shared)
            batch = self._batches[key] = _Batch(params, self.state)
        return batch

    def _step_batch(self, key: tuple[int, torch.device], params: list[torch.Tensor],
                    group: dict, grad_scale: torch.Tensor | None) -> None:
        batch = self._batch(key, params)
        step = int(batch.step.add_(1).item())  # a CPU tensor: no device sync
        device = key[1]
        step_tensor = None
        if self.capturable:
            if key in self._device_steps:
                step_tensor = self._device_steps[key].add_(1)
            else:  # the first (eager) step creates the device count
                step_tensor = torch.tensor([step], dtype=torch.float32, device=device)
                self._device_steps[key] = step_tensor
        beta1, beta2 = group["betas"]
        adamw_step(batch.params, [p.grad for p in batch.params], batch.exp_avgs,
                   batch.exp_avg_sqs, lr=group["lr"], beta1=beta1, beta2=beta2,
                   eps=group["eps"], weight_decay=group["weight_decay"], step=step,
                   grad_scale=None if grad_scale is None else grad_scale.to(device),
                   step_tensor=step_tensor, backend=self.backend)

    def state_dict(self) -> dict:
        for key, device_step in self._device_steps.items():  # graph replays count there
            if key in self._batches:
                self._batches[key].step.copy_(device_step.detach().reshape(()))
        packed = super().state_dict()
        for index, state in packed["state"].items():  # a tensor of its own per parameter
            if "step" in state:
                packed["state"][index] = {**state, "step": state["step"].clone()}
        return packed

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load_state_dict, but the moments stay float32 (torch would round them to
        a bf16/fp16 parameter's dtype) and "step" stays a CPU float32 scalar (torch's fused
        or capturable AdamW saves it on the GPU), one per group and device (the largest
        saved). After loading, re-capture any CUDA graph."""
        for group in state_dict["param_groups"]:
            for flag in ("amsgrad", "maximize"):
                if group.get(flag):
                    raise ValueError(f"this AdamW has no {flag}; the state_dict uses it")
        super().load_state_dict(state_dict)
        self._batches.clear()  # rebuilt at the next step, as are the device counts
        self._device_steps.clear()
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [(index, p) for index, group in enumerate(self.param_groups)
                  for p in group["params"]]
        counts: dict[tuple[int, torch.device], float] = {}
        for (index, p), saved_id in zip(params, saved_ids):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            state = self.state[p]
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = saved[key].to(device=p.device, dtype=torch.float32, copy=True)
            step = float(torch.as_tensor(saved["step"]).detach().cpu())
            counts[(index, p.device)] = max(step, counts.get((index, p.device), 0.0))
        shared = {key: torch.tensor(count, dtype=torch.float32) for key, count in counts.items()}
        for index, p in params:
            if (index, p.device) in shared and self.state[p]:
                self.state[p]["step"] = shared[(index, p.device)]

    def _init_state(self, p: torch.Tensor, step: torch.Tensor) -> None:
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32,
                                                memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32,
                                                   memory_format=torch.contiguous_format)
        state["step"] = step
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
        self.grad_norm = total  # read by training at its log steps, with the loss
        return torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0).to(torch.float32)


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
