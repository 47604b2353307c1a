"""torch.library ops of compression's pooling kernels (mean / weighted; ``fsagen.compress`` calls them).

* ``fsagen::compress_pool``: ``(k, v, weight, cu, cu_cmp, num_compressed, kernel_size, stride) ->
  (k_cmp, v_cmp)``: ``X_c[c] = sum_j weight[h, j] * X[c*stride + j]`` per sequence, float32
  ``weight [Hkv, kernel_size]``. Differentiable with respect to k, v and weight.
* ``fsagen::compress_pool_bwd``: ``(dk, dv, dweight)``; dweight (float32) is computed only when
  ``weight_grad`` (zeros otherwise).

Output shapes depend on ``num_compressed`` only (an int argument), so the fake implementations
are exact, and the glue (``fsagen.pooling``) never syncs with the host.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

__all__ = ["compress_pool", "compress_pool_bwd"]


def _glue():
    # TileLang (and a GPU, or the C backend for CPU tensors) is needed only when the op really runs;
    # tests can stub this module.
    return importlib.import_module("fsagen.pooling")


@torch.library.custom_op("fsagen::compress_pool", mutates_args=())
def compress_pool(k: Tensor, v: Tensor, weight: Tensor, cu: Tensor, cu_cmp: Tensor, num_compressed: int,
                  kernel_size: int, stride: int) -> tuple[Tensor, Tensor]:
    """k_cmp ``[Nc, Hkv, D]``, v_cmp ``[Nc, Hkv, Dv]`` in the inputs' dtype."""
    k_cmp, v_cmp = _glue().forward(k, v, weight, cu, cu_cmp, num_compressed, kernel_size, stride)
    return k_cmp.contiguous(), v_cmp.contiguous()


@compress_pool.register_fake
def _compress_pool_fake(k, v, weight, cu, cu_cmp, num_compressed, kernel_size, stride):
    return k.new_empty((num_compressed,) + tuple(k.shape[1:])), v.new_empty((num_compressed,) + tuple(v.shape[1:]))


@torch.library.custom_op("fsagen::compress_pool_bwd", mutates_args=())
def compress_pool_bwd(dk_cmp: Tensor, dv_cmp: Tensor, k: Tensor, v: Tensor, weight: Tensor, cu: Tensor,
                      cu_cmp: Tensor, kernel_size: int, stride: int,
                      weight_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """dk, dv in the shapes and dtypes of k, v; dweight float32 ``[Hkv, kernel_size]``."""
    dk, dv, dw = _glue().backward(dk_cmp, dv_cmp, k, v, weight, cu, cu_cmp, kernel_size, stride, weight_grad)
    return dk.contiguous(), dv.contiguous(), dw.contiguous()


@compress_pool_bwd.register_fake
def _compress_pool_bwd_fake(dk_cmp, dv_cmp, k, v, weight, cu, cu_cmp, kernel_size, stride, weight_grad):
    return torch.empty_like(k), torch.empty_like(v), weight.new_empty(weight.shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    k, v, weight, cu, cu_cmp, _, kernel_size, stride = inputs
    ctx.save_for_backward(k, v, weight, cu, cu_cmp)
    ctx.kernel_size, ctx.stride = kernel_size, stride


def _backward(ctx, dk_cmp, dv_cmp):
    k, v, weight, cu, cu_cmp = ctx.saved_tensors
    weight_grad = ctx.needs_input_grad[2]
    dk, dv, dw = compress_pool_bwd(dk_cmp.contiguous(), dv_cmp.contiguous(), k, v, weight, cu, cu_cmp,
                                   ctx.kernel_size, ctx.stride, weight_grad)
    return dk, dv, (dw if weight_grad else None), None, None, None, None, None


compress_pool.register_autograd(_backward, setup_context=_setup_context)
