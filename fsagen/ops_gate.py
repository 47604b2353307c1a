"""torch.library ops of the gated sum's kernels (``fsagen.gating.gate_sum`` calls them).

* ``fsagen::gate_sum``: ``(o_cmp, o_slc, o_swa, gates) -> o``, ``o = sum_b gates[..., b] * o_b``
  with o_b ``[N, Hq, D]`` and gates ``[N, Hq, 3]`` or ``[N, 3]``, all of one dtype (bf16 / fp16),
  formed in float32 and rounded once. Differentiable with respect to all four inputs.
* ``fsagen::gate_sum_bwd``: ``(d_cmp, d_slc, d_swa, d_gates)`` in the inputs' shapes and dtypes.

Shapes follow the inputs', so the fake implementations are exact; nothing reads a value on the host.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

__all__ = ["gate_sum", "gate_sum_bwd"]


def _glue():
    # TileLang (and a GPU, or the C backend for CPU tensors) is needed only when the op really runs.
    return importlib.import_module("fsagen.gating")


@torch.library.custom_op("fsagen::gate_sum", mutates_args=())
def gate_sum(o_cmp: Tensor, o_slc: Tensor, o_swa: Tensor, gates: Tensor) -> Tensor:
    """o ``[N, Hq, D]`` in the inputs' dtype."""
    return _glue().forward(o_cmp, o_slc, o_swa, gates)


@gate_sum.register_fake
def _gate_sum_fake(o_cmp, o_slc, o_swa, gates):
    return torch.empty_like(o_cmp)


@torch.library.custom_op("fsagen::gate_sum_bwd", mutates_args=())
def gate_sum_bwd(do: Tensor, o_cmp: Tensor, o_slc: Tensor, o_swa: Tensor,
                 gates: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gradients of o_cmp, o_slc, o_swa and gates."""
    return _glue().backward(do, o_cmp, o_slc, o_swa, gates)


@gate_sum_bwd.register_fake
def _gate_sum_bwd_fake(do, o_cmp, o_slc, o_swa, gates):
    return torch.empty_like(o_cmp), torch.empty_like(o_slc), torch.empty_like(o_swa), torch.empty_like(gates)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, do):
    return gate_sum_bwd(do.contiguous(), *ctx.saved_tensors)


gate_sum.register_autograd(_backward, setup_context=_setup_context)
