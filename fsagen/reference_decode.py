"""Float64 reference of NSA decoding: the output of a few new query rows of one sequence, computed
from that sequence's raw and compressed keys alone (what a KV cache holds), row by row.

It does not call the prefill reference: ``tests/test_reference_decode.py`` checks that its rows
equal the last rows of :func:`fsagen.reference_nsa.nsa_attention_reference` over the whole prefix,
which is the contract every decode kernel is held to. The branch rules are the prefill ones
(``../shared/DESIGN.md`` section 2):

* cmp: a query at position p sees compressed token i iff ``i*stride + kernel_size - 1 <= p``;
* selection: block scores from cmp's probabilities summed over the G heads of a group and folded
  into blocks with the overlap weights, forced ``init_blocks`` and the own block with the
  ``local_blocks - 1`` before it, top-k with ties to the lower block, blocks after the own one
  dropped;
* slc: the keys of the selected blocks up to p; swa: keys ``(p - window_size, p]``;
* ``o = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa``.
"""
from __future__ import annotations

import math

import torch

from .reference_cmp import _forced, _top_blocks, num_compressed, selection_weights
from .reference_common import check_int, check_ndim, fail, masked_softmax_attention
from .reference_nsa import gate_combine_reference


def _check_decode_inputs(q, k, v, k_cmp, v_cmp, positions, kernel_size, stride):
    for name, t in (("q", q), ("k", k), ("v", v), ("k_cmp", k_cmp), ("v_cmp", v_cmp)):
        check_ndim(name, t, 3, "[rows, heads, dim]")
    length, hkv = k.shape[:2]
    if q.shape[1] % hkv:
        fail("q", f"heads must be a multiple of k's kv heads ({hkv})", f"shape {tuple(q.shape)}")
    lc = num_compressed(length, kernel_size, stride)
    if k_cmp.shape[0] != lc or v_cmp.shape[0] != lc:
        fail("k_cmp", f"must hold the sequence's {lc} compressed tokens (length {length})",
             f"{k_cmp.shape[0]} and {v_cmp.shape[0]} rows")
    if positions.ndim != 1 or positions.shape[0] != q.shape[0]:
        fail("positions", f"must be 1-D with one position per query row ({q.shape[0]})", f"shape {tuple(positions.shape)}")
    if q.shape[0] and (int(positions.min()) < 0 or int(positions.max()) >= length):
        fail("positions", f"must lie in [0, {length}) (keys present)", positions.tolist())


def nsa_decode_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    positions: torch.Tensor,
    gates: torch.Tensor,
    *,
    kernel_size: int,
    stride: int,
    block_size: int,
    topk: int,
    init_blocks: int,
    local_blocks: int,
    window_size: int,
    scale: float | None = None,
    return_parts: bool = False,
):
    """NSA output of query rows ``q [T, Hq, D]`` at ``positions [T]`` of one sequence whose keys
    so far are ``k [L, Hkv, D]``, ``v [L, Hkv, Dv]`` with compressed keys ``k_cmp``/``v_cmp``
    ``[Lc, Hkv, *]`` (``Lc = num_compressed(L)``); gates ``[T, Hq, 3]`` or ``[T, 3]``.

    Returns o ``[T, Hq, Dv]`` float64 (and with ``return_parts`` a dict of ``o_cmp``, ``o_slc``,
    ``o_swa``, ``lse_*`` ``[T, Hq]`` and ``topk_idx`` ``[Hkv, T, topk]`` int32).
    """
    _check_decode_inputs(q, k, v, k_cmp, v_cmp, positions, kernel_size, stride)
    check_int("window_size", window_size, 1)
    check_int("topk", topk, max(1, init_blocks + local_blocks))
    q64, k64, v64, kc64, vc64 = (t.double() for t in (q, k, v, k_cmp, v_cmp))
    rows, hq = q.shape[:2]
    length, hkv = k.shape[:2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    pos = positions.to(device=q.device, dtype=torch.long)
    lc, nblk = k_cmp.shape[0], -(-length // block_size)

    last = torch.arange(lc, device=q.device) * stride + kernel_size - 1
    o_cmp, lse_cmp, p = masked_softmax_attention(q64, kc64, vc64, last[None, :] <= pos[:, None], scale)

    grouped = p.reshape(hkv, hq // hkv, rows, lc).sum(dim=1)
    w = selection_weights(lc, nblk, kernel_size, stride, block_size, device=q.device)
    forced = _forced(rows, nblk, block_size, init_blocks, local_blocks, q.device, positions=pos)
    topk_idx = _top_blocks(grouped @ w, forced, block_size, topk, positions=pos)

    key = torch.arange(length, device=q.device)
    causal = key[None, :] <= pos[:, None]
    g = hq // hkv
    o_slc = q64.new_zeros(rows, hq, v.shape[-1])
    lse_slc = q64.new_full((rows, hq), -math.inf)
    for h in range(hkv):
        chosen = torch.zeros(rows, nblk + 1, dtype=torch.bool, device=q.device)
        chosen.scatter_(1, topk_idx[h].long().clamp(min=-1) % (nblk + 1), True)  # -1 -> the spare column
        visible = chosen[:, :nblk][:, key // block_size] & causal
        heads = slice(h * g, (h + 1) * g)
        o_h, lse_h, _ = masked_softmax_attention(q64[:, heads], k64[:, h:h + 1], v64[:, h:h + 1], visible, scale)
        o_slc[:, heads], lse_slc[:, heads] = o_h, lse_h

    window = causal & (key[None, :] > pos[:, None] - window_size)
    o_swa, lse_swa, _ = masked_softmax_attention(q64, k64, v64, window, scale)

    o = gate_combine_reference(o_cmp, o_slc, o_swa, gates)
    if not return_parts:
        return o
    return o, {"o_cmp": o_cmp, "o_slc": o_slc, "o_swa": o_swa, "lse_cmp": lse_cmp, "lse_slc": lse_slc,
               "lse_swa": lse_swa, "topk_idx": topk_idx}
