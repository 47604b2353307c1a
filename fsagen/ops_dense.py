"""torch.library ops of the compressed (cmp) and sliding-window (swa) branches and of top-k block
selection, and their public functions.

* ``fsagen::dense_fwd`` / ``fsagen::dense_bwd``: attention over a contiguous key range per query,
  shared by cmp and swa (``branch`` argument; ``arg_a`` / ``arg_b`` are (kernel_size, stride) for
  cmp and (window_size, 0) for swa). Differentiable through o.
* ``fsagen::select_topk``: block selection from the cmp probabilities, recomputed in-kernel from
  q, k_cmp and cmp's lse. Integer output, not differentiable.

Each op has a fake implementation, so they work under torch.compile; the glue never syncs with the
host, so they can be captured in CUDA graphs (the public functions skip their value checks while a
graph is captured or compiled, as :func:`fsagen.selected_attention` does).
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from fsagen.validate_dense import check_cmp_inputs, check_select_inputs, check_swa_inputs

__all__ = ["compressed_attention", "sliding_window_attention", "select_blocks", "dense_fwd", "dense_bwd",
           "select_topk"]


def _glue(name):
    # TileLang and a GPU are needed only when an op really runs; tests can stub these modules.
    return importlib.import_module(f"fsagen.{name}")


@torch.library.custom_op("fsagen::dense_fwd", mutates_args=())
def dense_fwd(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, branch: str, arg_a: int,
              arg_b: int, scale: float) -> tuple[Tensor, Tensor]:
    """o [N, Hq, Dv] (q.dtype), lse [N, Hq] float32 (natural log, -inf where no key is visible)."""
    o, lse = _glue("dense_attention").forward(branch, q, k, v, cu_q, cu_k, arg_a, arg_b, scale)
    return o.contiguous(), lse.contiguous()


@dense_fwd.register_fake
def _dense_fwd_fake(q, k, v, cu_q, cu_k, branch, arg_a, arg_b, scale):
    n, hq, _ = q.shape
    return q.new_empty((n, hq, v.shape[-1])), q.new_empty((n, hq), dtype=torch.float32)


@torch.library.custom_op("fsagen::dense_bwd", mutates_args=())
def dense_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, cu_q: Tensor,
              cu_k: Tensor, branch: str, arg_a: int, arg_b: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv in the dtypes and shapes of q, k, v."""
    dq, dk, dv = _glue("dense_attention").backward(branch, do, q, k, v, o, lse, cu_q, cu_k, arg_a, arg_b,
                                                    scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@dense_bwd.register_fake
def _dense_bwd_fake(do, q, k, v, o, lse, cu_q, cu_k, branch, arg_a, arg_b, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, branch, arg_a, arg_b, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k)
    ctx.branch, ctx.arg_a, ctx.arg_b, ctx.scale = branch, arg_a, arg_b, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, dlse):
    q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = dense_bwd(do.contiguous(), q, k, v, o, lse, cu_q, cu_k, ctx.branch, ctx.arg_a, ctx.arg_b,
                           ctx.scale)
    return dq, dk, dv, None, None, None, None, None, None


dense_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fsagen::select_topk", mutates_args=())
def select_topk(q: Tensor, k_cmp: Tensor, lse_cmp: Tensor, cu_q: Tensor, cu_k: Tensor, kernel_size: int,
                stride: int, block_size: int, topk: int, init_blocks: int, local_blocks: int,
                scale: float) -> Tensor:
    """topk_idx int32 [Hkv, N, topk]."""
    out = _glue("selection").select(q, k_cmp, lse_cmp, cu_q, cu_k, kernel_size, stride, block_size, topk,
                                        init_blocks, local_blocks, scale)
    return out.contiguous()


@select_topk.register_fake
def _select_topk_fake(q, k_cmp, lse_cmp, cu_q, cu_k, kernel_size, stride, block_size, topk, init_blocks,
                      local_blocks, scale):
    return q.new_empty((k_cmp.shape[1], q.shape[0], topk), dtype=torch.int32)


def _scale(q, scale):
    return float(q.shape[-1]) ** -0.5 if scale is None else float(scale)


def _needs_grad(*tensors) -> tuple[str, ...]:
    # Runs before the checks: a non-tensor must reach them (TypeError naming it), not fail here.
    grad = torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)
    return ("fwd", "bwd") if grad else ("fwd",)


def compressed_attention(q: Tensor, k_cmp: Tensor, v_cmp: Tensor, cu_seqlens: Tensor, cu_seqlens_cmp: Tensor,
                         kernel_size: int, stride: int, scale: float | None = None, *,
                         return_lse: bool = False, check_values: bool = True):
    """Attention of raw queries over compressed keys (NSA's cmp branch), packed varlen.

    Query t of a sequence sees compressed token i of the same sequence iff its window ends at or
    before t (``i * stride + kernel_size - 1 <= t``); a query that sees none returns 0 (lse -inf).

    Args:
        q: ``[N, Hq, D]`` bf16/fp16. k_cmp, v_cmp: ``[Nc, Hkv, D]`` (e.g. from :func:`fsagen.compress`).
        cu_seqlens: int32 ``[B + 1]`` raw offsets; cu_seqlens_cmp: int32 ``[B + 1]`` compressed
            offsets (``compress`` returns them; checked against cu_seqlens when check_values).
        scale: default ``1 / sqrt(D)``. return_lse: also return the float32 natural-log lse
            ``[N, Hq]`` (not differentiable), which :func:`select_blocks` needs.
        check_values: check the offsets' values (one host sync); skipped during graph capture
            and torch.compile tracing.

    Non-contiguous inputs are copied. Returns o ``[N, Hq, D]`` (q's dtype), or ``(o, lse)``.
    """
    check_cmp_inputs(q, k_cmp, v_cmp, cu_seqlens, cu_seqlens_cmp, kernel_size, stride, scale,
                     check_values=check_values, phases=_needs_grad(q, k_cmp, v_cmp))
    o, lse = torch.ops.fsagen.dense_fwd(q.contiguous(), k_cmp.contiguous(), v_cmp.contiguous(),
                                        cu_seqlens.contiguous(), cu_seqlens_cmp.contiguous(), "cmp",
                                        int(kernel_size), int(stride), _scale(q, scale))
    return (o, lse) if return_lse else o


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, window_size: int,
                             scale: float | None = None, *, return_lse: bool = False,
                             check_values: bool = True):
    """Causal sliding-window attention (NSA's swa branch), packed varlen.

    Query t sees keys ``[t - window_size + 1, t]`` of its own sequence: exactly ``window_size``
    keys, itself included (``window_size = 1`` is attention to itself).

    Args: q ``[N, Hq, D]`` bf16/fp16; k, v ``[N, Hkv, D]``; cu_seqlens int32 ``[B + 1]``;
    window_size >= 1; scale (default ``1 / sqrt(D)``); return_lse, check_values as in
    :func:`compressed_attention`. Returns o ``[N, Hq, D]``, or ``(o, lse)``.
    """
    check_swa_inputs(q, k, v, cu_seqlens, window_size, scale, check_values=check_values,
                     phases=_needs_grad(q, k, v))
    o, lse = torch.ops.fsagen.dense_fwd(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens.contiguous(),
                                        cu_seqlens.contiguous(), "swa", int(window_size), 0, _scale(q, scale))
    return (o, lse) if return_lse else o


def select_blocks(q: Tensor, k_cmp: Tensor, lse_cmp: Tensor, cu_seqlens: Tensor, cu_seqlens_cmp: Tensor,
                  kernel_size: int, stride: int, block_size: int, topk: int, init_blocks: int = 1,
                  local_blocks: int = 2, scale: float | None = None, *, check_values: bool = True) -> Tensor:
    """Top-k selection blocks per (kv head, query), ready for :func:`fsagen.selected_attention`.

    Block j of size ``block_size`` scores ``sum_i w(i, j) * sum_{h in group} p[t, h, i]`` over the
    cmp probabilities p (recomputed from q, k_cmp and ``lse_cmp``, never stored), ``w`` counting the
    stride segments of compressed token i's window inside block j. The first ``init_blocks`` blocks
    and the query's own block with the ``local_blocks - 1`` before it are always kept; then the
    highest scores, ties to the lower block. Blocks after the query's own are never returned.

    Args: q, k_cmp, cu_seqlens, cu_seqlens_cmp, kernel_size, stride and scale exactly as given to
    :func:`compressed_attention`, whose ``lse`` is ``lse_cmp`` (float32 ``[N, Hq]``); block_size
    (a multiple of stride); topk >= init_blocks + local_blocks.

    Returns int32 ``[Hkv, N, topk]``: block indices within each query's sequence, ascending,
    ``-1`` padded.
    """
    check_select_inputs(q, k_cmp, lse_cmp, cu_seqlens, cu_seqlens_cmp, kernel_size, stride, block_size, topk,
                        init_blocks, local_blocks, scale, check_values=check_values)
    return torch.ops.fsagen.select_topk(q.contiguous(), k_cmp.contiguous(), lse_cmp.contiguous(),
                                        cu_seqlens.contiguous(), cu_seqlens_cmp.contiguous(), int(kernel_size),
                                        int(stride), int(block_size), int(topk), int(init_blocks),
                                        int(local_blocks), _scale(q, scale))
