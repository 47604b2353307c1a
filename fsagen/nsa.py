"""Native Sparse Attention from the production ops: the three branches and their gated sum.

:func:`nsa_attention` has exactly the semantics and arguments of
:func:`fsagen.reference_nsa.nsa_attention_reference` (../shared/DESIGN.md section 2), composed as

1. :func:`fsagen.compress` (k, v -> k_cmp, v_cmp; mean / weighted / linear),
2. :func:`fsagen.compressed_attention` (cmp branch, with its lse),
3. :func:`fsagen.select_blocks` (integer top-k, no gradient: fed detached inputs),
4. :func:`fsagen.selected_attention` (slc branch over the selected blocks),
5. :func:`fsagen.sliding_window_attention` (swa branch),
6. :func:`fsagen.gating.gate_sum`: ``o = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa`` in the
   gates' dtype (one generated kernel each way when the gates have q's dtype, else torch ops).

One scale (default ``1/sqrt(D)``) serves every branch.  :func:`nsa_attention_from_compressed` is
steps 2-6 on keys compressed by the caller, for layers that transform the compressed keys (e.g.
:class:`fsagen.NativeSparseAttention` rotates them by their window start).

Host synchronisation: compression reads the number of compressed tokens on the host (its one
documented sync); with ``check_values=True`` the ops add their value checks (each one more sync),
with ``check_values=False`` compression's is the only one.

Meta and fake tensors (``FakeTensorMode``): compression cannot read ``cu_seqlens`` there, so a
shape-only stand-in takes its place (``N // stride`` compressed rows, an upper bound of the real
count, still wired to k, v and the compression parameters for autograd); every output of
:func:`nsa_attention` has its exact shape, dtype and device.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from fsagen.compression import compress
from fsagen.ops import selected_attention
from fsagen.gating import check_gates, gate_sum
from fsagen.ops_dense import compressed_attention, select_blocks, sliding_window_attention
from fsagen.reference_cmp import COMPRESS_KINDS, COMPRESS_OPTIONAL, COMPRESS_REQUIRED
from fsagen.validate import check_scale, check_tensor, fail
from fsagen.validate_dense import check_int, check_swa_inputs

__all__ = ["nsa_attention", "nsa_attention_from_compressed", "compress_kv", "check_nsa_config", "shapes_only",
           "PART_NAMES"]

# The keys of the ``parts`` dict that ``return_parts=True`` gives (those of the reference).
PART_NAMES = ("o_cmp", "o_slc", "o_swa", "lse_cmp", "lse_slc", "lse_swa", "topk_idx")

_PARAM_NAMES = tuple(sorted({n for kind in COMPRESS_KINDS for n in COMPRESS_REQUIRED[kind] + COMPRESS_OPTIONAL[kind]}))


# --------------------------------------------------------------------------- argument checks


def check_nsa_config(*, kernel_size, stride, block_size, topk, init_blocks, local_blocks, window_size,
                     compression="mean", compression_params=None, scale=None) -> None:
    """Check the scalar arguments of :func:`nsa_attention` and how they fit together.

    Raises TypeError / ValueError ``"<argument>: <rule>, got <value>"`` before any work is done
    (the ops would reach some of these rules only after compression and cmp attention ran).
    """
    sizes = (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("block_size", block_size, 1), ("topk", topk, 1),
             ("init_blocks", init_blocks, 0), ("local_blocks", local_blocks, 0), ("window_size", window_size, 1))
    for name, value, minimum in sizes:
        check_int(name, value, minimum)
    for name, value in (("kernel_size", kernel_size), ("block_size", block_size)):
        if value % stride:
            fail(ValueError, name, f"must be a multiple of stride={stride}", value)
    if topk < init_blocks + local_blocks:
        fail(ValueError, "topk", f"must be >= init_blocks + local_blocks = {init_blocks + local_blocks}", topk)
    if not isinstance(compression, str) or compression not in COMPRESS_KINDS:
        fail(ValueError, "compression", f"must be one of {list(COMPRESS_KINDS)}", repr(compression))
    if compression_params is not None:
        if not isinstance(compression_params, dict):
            fail(TypeError, "compression_params", "must be a dict or None", type(compression_params).__name__)
        unknown = sorted(set(compression_params) - set(_PARAM_NAMES))
        if unknown:
            fail(ValueError, "compression_params", f"keys must be among {list(_PARAM_NAMES)}", unknown)
    check_scale(scale)


def _check_inputs(q, k, v, gates, cu_seqlens, window_size, scale) -> None:
    """q, k, v and cu_seqlens as the swa op takes them (metadata only: no host sync), then the gates:
    floating ``[N, Hq, 3]`` or ``[N, 3]`` on q's device."""
    check_swa_inputs(q, k, v, cu_seqlens, window_size, scale, check_values=False)
    check_gates(gates, q, "q")


# --------------------------------------------------------------------------- compression


def shapes_only(*tensors: Tensor) -> bool:
    """Meta or fake tensors outside torch.compile: values cannot be read, shapes only."""
    if torch.compiler.is_compiling():
        return False
    return any(isinstance(t, FakeTensor) or t.device.type == "meta" for t in tensors)


def compress_kv(k: Tensor, v: Tensor, cu_seqlens: Tensor, kernel_size: int, stride: int, compression: str = "mean",
                compression_params: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`fsagen.compress` with the arguments of :func:`nsa_attention`; on meta / fake tensors,
    where no count can be read, with ``N // stride`` compressed rows (an upper bound of the real
    count, since ks >= s), still wired to k, v and the parameters for autograd."""
    params = dict(compression_params or {})
    if shapes_only(k, v, cu_seqlens):
        params.update(num_compressed=k.shape[0] // stride, check_values=False)
    return compress(k, v, cu_seqlens, kernel_size, stride, compression, **params)


# --------------------------------------------------------------------------- the branches


def nsa_attention_from_compressed(q: Tensor, k: Tensor, v: Tensor, k_cmp: Tensor, v_cmp: Tensor, gates: Tensor,
                                  cu_seqlens: Tensor, cu_seqlens_cmp: Tensor, *, kernel_size: int, stride: int,
                                  block_size: int, topk: int, init_blocks: int, local_blocks: int,
                                  window_size: int, scale: float | None = None, return_parts: bool = False,
                                  check_values: bool = True):
    """Steps 2-6 of :func:`nsa_attention` on compressed keys ``k_cmp``, ``v_cmp`` ``[Nc, Hkv, D]``
    with offsets ``cu_seqlens_cmp`` (as :func:`fsagen.compress` returns them, possibly transformed
    row by row afterwards).  Other arguments and the result as in :func:`nsa_attention`."""
    check_nsa_config(kernel_size=kernel_size, stride=stride, block_size=block_size, topk=topk,
                     init_blocks=init_blocks, local_blocks=local_blocks, window_size=window_size, scale=scale)
    _check_inputs(q, k, v, gates, cu_seqlens, window_size, scale)
    for name, t in (("k_cmp", k_cmp), ("v_cmp", v_cmp)):  # the ops check the rest (D, dtype, rows, offsets)
        check_tensor(name, t)
        if t.dim() != 3 or t.shape[1] != k.shape[1]:
            fail(ValueError, name, f"must be [Nc, Hkv={k.shape[1]}, D]: compressed keys have k's kv heads",
                 f"shape {tuple(t.shape)}")
    scale = float(q.shape[-1]) ** -0.5 if scale is None else float(scale)
    o_cmp, lse_cmp = compressed_attention(q, k_cmp, v_cmp, cu_seqlens, cu_seqlens_cmp, kernel_size, stride, scale,
                                          return_lse=True, check_values=check_values)
    topk_idx = select_blocks(q.detach(), k_cmp.detach(), lse_cmp.detach(), cu_seqlens, cu_seqlens_cmp,
                             kernel_size, stride, block_size, topk, init_blocks, local_blocks, scale,
                             check_values=check_values)
    o_slc, lse_slc = selected_attention(q, k, v, topk_idx, block_size, cu_seqlens, scale, return_lse=True,
                                        check_indices=check_values)
    o_swa, lse_swa = sliding_window_attention(q, k, v, cu_seqlens, window_size, scale, return_lse=True,
                                              check_values=check_values)
    o = gate_sum(o_cmp, o_slc, o_swa, gates)
    if not return_parts:
        return o
    return o, dict(zip(PART_NAMES, (o_cmp, o_slc, o_swa, lse_cmp, lse_slc, lse_swa, topk_idx)))


def nsa_attention(q: Tensor, k: Tensor, v: Tensor, gates: Tensor, cu_seqlens: Tensor, *, kernel_size: int,
                  stride: int, block_size: int, topk: int, init_blocks: int, local_blocks: int, window_size: int,
                  compression: str = "mean", compression_params: dict | None = None, scale: float | None = None,
                  return_parts: bool = False, check_values: bool = True):
    """Native Sparse Attention over packed varlen sequences: cmp, slc and swa, gated.

    Semantics and arguments are those of :func:`fsagen.reference_nsa.nsa_attention_reference`:

    Args:
        q: ``[N, Hq, D]`` bf16 / fp16; k, v: ``[N, Hkv, D]`` in q's dtype (the kernels need
            ``Dv == D`` for now), ``Hq % Hkv == 0``.
        gates: ``[N, Hq, 3]`` (per token and head) or ``[N, 3]`` (per token), any floating dtype,
            on q's device, branches in the order cmp, slc, swa.  The gated sum is computed in
            the gates' dtype, so ``o`` has the gates' dtype (pass gates in q's dtype to get o in
            q's dtype, or float32 gates for a float32 sum).
        cu_seqlens: int32 ``[B + 1]`` offsets from 0 to N.
        kernel_size, stride: compression windows (``kernel_size % stride == 0``); compressed
            token i of a sequence covers raw tokens ``[i*stride, i*stride + kernel_size)``.
        block_size (a multiple of stride), topk (>= init_blocks + local_blocks), init_blocks,
            local_blocks: block selection (:func:`fsagen.select_blocks`).
        window_size: >= 1; query t sees keys ``[t - window_size + 1, t]`` in swa.
        compression: ``"mean"``, ``"weighted"`` (``compression_params["weight"] [Hkv, ks]``) or
            ``"linear"`` (``proj_k``, ``proj_v`` ``[Hkv, ks*D, D]``, optional ``pos_emb``
            ``[Hkv, ks, D]``); see :func:`fsagen.compress`.
        scale: one softmax scale for every branch, default ``1/sqrt(D)``.
        return_parts: also return the parts dict (below).
        check_values: passed to the ops (their host-synchronising checks of the offsets and of
            the selection); compression reads ``cu_seqlens`` on the host in any case.

    Returns ``o [N, Hq, D]`` in the gates' dtype, differentiable with respect to q, k, v, gates
    and the compression parameters (not through the integer selection).  With
    ``return_parts=True``: ``(o, parts)``, parts holding ``o_cmp``, ``o_slc``, ``o_swa``
    ``[N, Hq, D]`` (q's dtype), ``lse_cmp``, ``lse_slc``, ``lse_swa`` float32 ``[N, Hq]`` (not
    differentiable) and ``topk_idx`` int32 ``[Hkv, N, topk]``.

    Raises TypeError / ValueError ``"<argument>: <rule>, got <value>"``; the scalar arguments,
    the metadata of q, k, v, gates and cu_seqlens, and how they fit together are checked first,
    before any work (``UnsupportedSpec`` where the GPU's schedule has no kernel for the shapes).
    """
    check_nsa_config(kernel_size=kernel_size, stride=stride, block_size=block_size, topk=topk,
                     init_blocks=init_blocks, local_blocks=local_blocks, window_size=window_size,
                     compression=compression, compression_params=compression_params, scale=scale)
    _check_inputs(q, k, v, gates, cu_seqlens, window_size, scale)
    k_cmp, v_cmp, cu_cmp = compress_kv(k, v, cu_seqlens, kernel_size, stride, compression, compression_params)
    return nsa_attention_from_compressed(q, k, v, k_cmp, v_cmp, gates, cu_seqlens, cu_cmp, kernel_size=kernel_size,
                                         stride=stride, block_size=block_size, topk=topk, init_blocks=init_blocks,
                                         local_blocks=local_blocks, window_size=window_size, scale=scale,
                                         return_parts=return_parts, check_values=check_values)
