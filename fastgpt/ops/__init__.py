"""The ops the model and trainer call, one module each: attention (causal_attention), the
loss (cross_entropy on logits, or linear_cross_entropy from the hidden states without the
logits) and the AdamW step (adamw_step, which fastgpt.optim.AdamW calls).

Each op has three implementations: the pure-PyTorch reference (reference.py: the maths
written out), PyTorch's own op ("torch") and fastgpt's fused kernel ("fused"); each takes
`backend` to pick one, and dispatch.py says how a backend name resolves (its docstring
lists them), what can run here and why not.

The Triton kernels also run on CPU tensors through Triton's interpreter when
TRITON_INTERPRET=1 is set before fastgpt's kernels are imported (slow: for tests).

(`fastgpt.ops.cross_entropy` and `fastgpt.ops.linear_cross_entropy` are the functions;
their modules, e.g. for monkeypatching, are sys.modules["fastgpt.ops.cross_entropy"].)
"""

from __future__ import annotations

from fastgpt.backends import (  # noqa: F401  (re-exported: fastgpt.ops.parse_backend etc.)
    BACKENDS, KERNELS, TORCH_OPS, BackendUnavailable, UnknownBackend, check_backend,
    parse_backend)
from fastgpt.ops import reference  # noqa: F401
from fastgpt.ops.adamw import adamw_step  # noqa: F401
from fastgpt.ops.attention import causal_attention  # noqa: F401
from fastgpt.ops.cross_entropy import cross_entropy  # noqa: F401
from fastgpt.ops.dispatch import (  # noqa: F401
    available, fused_where_available, get_backend, interpreter_problem, resolve_backend,
    set_backend, status, torch_status, triton_interpreting)
from fastgpt.ops.linear_cross_entropy import linear_cross_entropy  # noqa: F401
