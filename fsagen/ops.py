"""torch.library custom ops of the slc branch and the public ``selected_attention``.

``fsagen::slc_fwd`` and ``fsagen::slc_bwd`` wrap the dispatch glue (``fsagen.slc``, imported on
first call so that this module loads without TileLang or a GPU).  Each op has a fake
implementation (shapes, dtypes and devices only, no data access) and ``slc_fwd`` has an autograd
formula that calls ``slc_bwd``; together they make the ops usable under

* ``torch.compile`` (dynamo sees opaque ops with known output metadata; no graph breaks), and
* CUDA graphs: the ops never synchronise with the host (the glue builds its indices with
  fixed-shape GPU ops), and :func:`selected_attention` skips its value checks of ``topk_idx`` /
  ``cu_seqlens`` automatically while a graph is being captured or compiled.

``torch.library.opcheck`` can run on both ops (the GPU tests do).

``lse`` is returned for inspection (and for a later combination of branches) but is not
differentiable: gradients flow through ``o`` only.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from fsagen.validate import check_slc_inputs

__all__ = ["selected_attention", "slc_fwd", "slc_bwd", "LOOP_ORDERS"]

LOOP_ORDERS = ("auto", "kv_outer", "q_outer")


def _glue():
    # fsagen.slc needs TileLang and a GPU; resolved through sys.modules so tests can stub it.
    return importlib.import_module("fsagen.slc")


def _order(loop_order: str) -> str | None:
    return None if loop_order == "auto" else loop_order


@torch.library.custom_op("fsagen::slc_fwd", mutates_args=())
def slc_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    topk_idx: Tensor,
    cu_seqlens: Tensor,
    block_size: int,
    scale: float,
    loop_order: str,
) -> tuple[Tensor, Tensor]:
    """o [N, Hq, Dv] (q.dtype), lse [N, Hq] float32 (natural log, -inf where nothing is seen)."""
    o, lse = _glue().slc_forward(q, k, v, topk_idx, cu_seqlens, block_size, scale, _order(loop_order))
    # The fake impl promises contiguous outputs; make sure the real ones agree.
    return o.contiguous(), lse.contiguous()


@slc_fwd.register_fake
def _slc_fwd_fake(q, k, v, topk_idx, cu_seqlens, block_size, scale, loop_order):
    n, hq, _ = q.shape
    o = q.new_empty((n, hq, v.shape[-1]))
    lse = q.new_empty((n, hq), dtype=torch.float32)
    return o, lse


@torch.library.custom_op("fsagen::slc_bwd", mutates_args=())
def slc_bwd(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    topk_idx: Tensor,
    cu_seqlens: Tensor,
    block_size: int,
    scale: float,
    loop_order: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv in the dtypes and shapes of q, k, v."""
    dq, dk, dv = _glue().slc_backward(
        do, q, k, v, o, lse, topk_idx, cu_seqlens, block_size, scale, _order(loop_order)
    )
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@slc_bwd.register_fake
def _slc_bwd_fake(do, q, k, v, o, lse, topk_idx, cu_seqlens, block_size, scale, loop_order):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, topk_idx, cu_seqlens, block_size, scale, loop_order = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, topk_idx, cu_seqlens)
    ctx.block_size, ctx.scale, ctx.loop_order = block_size, scale, loop_order
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, dlse):
    q, k, v, o, lse, topk_idx, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = slc_bwd(
        do.contiguous(), q, k, v, o, lse, topk_idx, cu_seqlens, ctx.block_size, ctx.scale, ctx.loop_order
    )
    # One gradient per input of slc_fwd: topk_idx, cu_seqlens and the scalars get None.
    return dq, dk, dv, None, None, None, None, None


slc_fwd.register_autograd(_backward, setup_context=_setup_context)


def selected_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    topk_idx: Tensor,
    block_size: int,
    cu_seqlens: Tensor,
    scale: float | None = None,
    *,
    return_lse: bool = False,
    loop_order: str | None = None,
    check_indices: bool = True,
):
    """Attention of each query over its top-k selected KV blocks (NSA's slc branch), varlen.

    Args:
        q: ``[N, Hq, D]`` bf16 or fp16, packed sequences.
        k, v: ``[N, Hkv, D]`` in q's dtype; ``Hq % Hkv == 0`` (GQA: query head h reads kv head
            ``h // (Hq // Hkv)``).
        topk_idx: ``[Hkv, N, topk]`` int32, block indices relative to the token's own sequence,
            distinct per row, ``-1`` as padding; blocks after the query's own are ignored.
        block_size: tokens per KV block.
        cu_seqlens: ``[B + 1]`` int32 sequence offsets, from 0 to N.
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_lse: also return the natural-log sum-exp ``[N, Hq]`` float32 (not differentiable).
        loop_order: ``None``/``"auto"`` (the schedule picks), ``"kv_outer"`` (FSA order) or
            ``"q_outer"`` (NSA order).
        check_indices: check the *values* of ``cu_seqlens`` and ``topk_idx`` (one host sync).
            Skipped anyway during CUDA-graph capture and torch.compile tracing.

    Non-contiguous inputs are copied with ``.contiguous()`` (the kernels assume packed layouts).
    Returns ``o`` ``[N, Hq, D]`` in q's dtype, or ``(o, lse)``.
    """
    order = "auto" if loop_order is None else loop_order
    if order not in LOOP_ORDERS:
        raise ValueError(f"loop_order: must be None or one of {LOOP_ORDERS}, got {loop_order!r}")
    needs_grad = torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in (q, k, v))
    check_slc_inputs(
        q, k, v, topk_idx, cu_seqlens, block_size, scale,
        check_index_values=check_indices,
        phases=("fwd", "bwd") if needs_grad else ("fwd",),
    )
    scale = float(q.shape[-1]) ** -0.5 if scale is None else float(scale)
    o, lse = torch.ops.fsagen.slc_fwd(
        q.contiguous(), k.contiguous(), v.contiguous(), topk_idx.contiguous(), cu_seqlens.contiguous(),
        int(block_size), scale, order,
    )
    return (o, lse) if return_lse else o
