"""Float64 PyTorch oracle of the slc (selected-block) attention branch.

Semantics (docs/DESIGN section 2): packed varlen inputs, query at position ``p`` of its sequence
attends over the union of the keys of its selected blocks whose position is ``<= p``.  Entries
that are negative (``-1`` padding) or name a block after the query's own block (``> p // bs``) are
ignored; duplicated indices are treated as a set (rejecting them is the validator's job, not the
oracle's).  A query that sees no key gets ``o = 0`` and ``lse = -inf``.

Two implementations:

* :func:`slc_reference` -- vectorised: per sequence and chunk of queries it builds a boolean
  ``[Hkv, C, Lk]`` mask from the selection and runs masked dense attention in float64.  When any
  input requires grad, each chunk runs under activation checkpointing so that the autograd graph
  of a long sequence does not hold every probability matrix at once (memory stays O(chunk)).
  The math is plain autograd either way, so ``torch.autograd.grad`` gives the reference
  dq, dk, dv.
* :func:`slc_reference_naive` -- a per-query python loop, used only by tests to check the
  vectorised one.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["slc_reference", "slc_reference_naive", "selection_mask"]

# Number of float64 score elements (Hq * C * Lk) one chunk may hold; a chunk's working set is a
# small multiple of this (~5 x 8 bytes x 2**23 = 320 MB at most).
_CHUNK_ELEMS = 1 << 23


def _default_scale(d: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(d) if scale is None else float(scale)


def selection_mask(
    topk_idx_seq: torch.Tensor, q_start: int, q_end: int, num_keys: int, block_size: int
) -> torch.Tensor:
    """Boolean mask ``[Hkv, q_end - q_start, num_keys]``: query (at position p) may see key j.

    ``topk_idx_seq`` is ``[Hkv, L, topk]``, the rows of one sequence; ``q_start:q_end`` picks the
    queries (positions within the sequence); keys are positions ``0 .. num_keys - 1``.
    """
    idx = topk_idx_seq[:, q_start:q_end].long()
    hkv, c, _ = idx.shape
    device = idx.device
    pos = torch.arange(q_start, q_end, device=device)
    nblk = (num_keys + block_size - 1) // block_size
    valid = (idx >= 0) & (idx <= (pos // block_size)[None, :, None]) & (idx < nblk)
    # Invalid entries scatter into a spare column that is dropped afterwards.
    idx = torch.where(valid, idx, torch.full_like(idx, nblk))
    sel = torch.zeros(hkv, c, nblk + 1, dtype=torch.bool, device=device)
    sel.scatter_(2, idx, True)
    key_pos = torch.arange(num_keys, device=device)
    mask = sel[:, :, key_pos // block_size]
    return mask & (key_pos[None, None, :] <= pos[None, :, None])


def _masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [C, Hq, D], k [Lk, Hkv, D], v [Lk, Hkv, Dv], mask [Hkv, C, Lk] -> o [C, Hq, Dv], lse [C, Hq].

    Rows with no visible key give o = 0, lse = -inf, and finite (zero) gradients.  The large
    [Hkv, C, G, Lk] tensor is touched by as few passes as possible (in-place where autograd
    allows it) and normalisation happens after the PV product, on the small output: this is
    what makes N = 4096 take seconds rather than tens of seconds on a CPU.
    """
    c, hq, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    g = hq // hkv
    qh = (q * scale).reshape(c, hkv, g, d).permute(1, 0, 2, 3).reshape(hkv, c * g, d)
    s = torch.bmm(qh, k.permute(1, 2, 0)).view(hkv, c, g, -1)  # [Hkv, C, G, Lk]
    s = s.masked_fill_(~mask[:, :, None, :], -math.inf)
    mx = s.detach().amax(dim=-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    e = torch.exp_(s.sub_(mx))  # masked entries: exp(-inf) = 0
    denom = e.sum(dim=-1, keepdim=True)  # [Hkv, C, G, 1]
    seen = denom > 0
    denom_safe = torch.where(seen, denom, torch.ones_like(denom))
    o = torch.bmm(e.view(hkv, c * g, -1), v.permute(1, 0, 2)).view(hkv, c, g, dv) / denom_safe
    o = o.permute(1, 0, 2, 3).reshape(c, hq, dv)
    lse = torch.where(seen, torch.log(denom_safe) + mx, torch.full_like(mx, -math.inf))
    lse = lse.squeeze(-1).permute(1, 0, 2).reshape(c, hq)
    return o, lse


def _chunk_attention(q, k, v, topk_idx_seq, q_start, q_end, block_size, scale):
    num_keys = q_end  # causal: the chunk's last query sees keys < q_end at most
    mask = selection_mask(topk_idx_seq, q_start, q_end, num_keys, block_size)
    return _masked_attention(q[q_start:q_end], k[:num_keys], v[:num_keys], mask, scale)


def slc_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    topk_idx: torch.Tensor,
    cu_seqlens: torch.Tensor,
    block_size: int,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised float64 slc attention.

    Args: q [N, Hq, D], k [N, Hkv, D], v [N, Hkv, Dv] (any float dtype; computed in float64),
    topk_idx [Hkv, N, topk] integer (block indices relative to the token's own sequence, -1 pad),
    cu_seqlens [B + 1] integer, block_size, scale (default 1/sqrt(D)).

    Returns (o [N, Hq, Dv] float64, lse [N, Hq] float64, natural log, -inf where nothing is seen).
    Differentiable with respect to q, k, v.
    """
    scale = _default_scale(q.shape[-1], scale)
    n, hq, _ = q.shape
    hkv = k.shape[1]
    q64, k64, v64 = q.double(), k.double(), v.double()
    use_ckpt = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    bounds = [int(x) for x in cu_seqlens.tolist()]
    outs, lses = [], []
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        length = s1 - s0
        if length <= 0:
            continue
        qs, ks, vs = q64[s0:s1], k64[s0:s1], v64[s0:s1]
        idx_seq = topk_idx[:, s0:s1]
        chunk = max(1, min(length, _CHUNK_ELEMS // max(1, hq * length)))
        for c0 in range(0, length, chunk):
            c1 = min(length, c0 + chunk)
            args = (qs, ks, vs, idx_seq, c0, c1, block_size, scale)
            if use_ckpt:
                o, lse = checkpoint(_chunk_attention, *args, use_reentrant=False)
            else:
                o, lse = _chunk_attention(*args)
            outs.append(o)
            lses.append(lse)
    if not outs:
        o = q64.new_zeros(n, hq, v.shape[-1])
        lse = q64.new_full((n, hq), -math.inf)
        return o, lse
    o, lse = torch.cat(outs), torch.cat(lses)
    if o.shape[0] != n:
        raise ValueError(f"cu_seqlens: must end at N={n}, covers {o.shape[0]} tokens")
    assert lse.shape == (n, hq) and hkv > 0
    return o, lse


def slc_reference_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    topk_idx: torch.Tensor,
    cu_seqlens: torch.Tensor,
    block_size: int,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query, per-head python loop; same contract as :func:`slc_reference`. Tests only."""
    scale = _default_scale(q.shape[-1], scale)
    n, hq, _ = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    q64, k64, v64 = q.double(), k.double(), v.double()
    bounds = [int(x) for x in cu_seqlens.tolist()]
    idx = topk_idx.tolist()
    o_rows, lse_rows = [], []
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        for t in range(s0, s1):
            p = t - s0
            o_heads, lse_heads = [], []
            for h in range(hq):
                kh = h // g
                blocks = {b for b in idx[kh][t] if 0 <= b <= p // block_size}
                keys = sorted(s0 + j for b in blocks for j in range(b * block_size, (b + 1) * block_size) if j <= p)
                if not keys:
                    o_heads.append(q64.new_zeros(v.shape[-1]))
                    lse_heads.append(q64.new_tensor(-math.inf))
                    continue
                kk = k64[keys, kh]
                vv = v64[keys, kh]
                s = (kk @ q64[t, h]) * scale
                lse = torch.logsumexp(s, dim=0)
                o_heads.append(torch.softmax(s, dim=0) @ vv)
                lse_heads.append(lse)
            o_rows.append(torch.stack(o_heads))
            lse_rows.append(torch.stack(lse_heads))
    if not o_rows:
        return q64.new_zeros(n, hq, v.shape[-1]), q64.new_full((n, hq), -math.inf)
    return torch.stack(o_rows), torch.stack(lse_rows)
