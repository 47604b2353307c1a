"""Decode-time attention of one new token per sequence over an :class:`fsagen.NSAKVCache`.

Each sequence's newest cached row is the new token (position ``p = length - 1``): append its k/v
to the cache first, then call these with its query. The branches run the generated split-KV
program (``kernels/decode.py``) over tiles listed here, on the GPU, from the cache's block table:

* ``decode_attention(..., "slc", topk_idx=...)``: the pages of the selected blocks (block size a
  multiple of the cache's page size), keys ``<= p``;
* ``"swa"``: the pages covering ``(p - window_size, p]``;
* ``"cmp"``: the sequence's compressed tokens (all visible to the newest token).

The split runs are combined exactly in torch (log-sum-exp over the splits: ``[B, Hq, splits]``).
"""
from __future__ import annotations

import math

import torch

from .glue import alloc, kernel_spec, plan_and_kernel

BRANCHES = ("slc", "swa", "cmp")
_TARGET_CTAS = 264  # two waves of the H100's 132 SMs


def _tiles(branch, cache, seqs, dev, topk_idx, block_size, window_size):
    """(tile_page, tile_pos ``[B, Hkv, NT]`` int32, key_lo, key_hi ``[B]`` int32, K pool, V pool)."""
    ps, hkv = cache.page_size, cache.num_kv_heads
    lengths = torch.tensor([cache.lengths[s] for s in seqs], dtype=torch.int64, device=dev)
    pos = lengths - 1
    table = cache.block_table[seqs].to(device=dev, dtype=torch.int64)  # [B, max_pages]

    def pages_at(page_no):  # page_no [B, ...] -> pool page or -1 past the table / the length
        valid = (page_no >= 0) & (page_no <= (pos // ps).view(-1, *[1] * (page_no.ndim - 1)))
        idx = page_no.clamp(0, table.shape[1] - 1).reshape(len(seqs), -1)
        got = torch.gather(table, 1, idx).reshape(page_no.shape)
        return torch.where(valid, got, -1)

    if branch == "slc":
        if block_size % ps:
            raise ValueError(f"decode_attention: block_size={block_size} must be a multiple of the cache's "
                             f"page_size={ps}")
        sub = block_size // ps
        blk = topk_idx.to(device=dev, dtype=torch.int64).permute(1, 0, 2)  # [B, Hkv, topk]
        own = (pos // block_size).view(-1, 1, 1)
        blk = torch.where((blk >= 0) & (blk <= own), blk, -1)
        page_no = (blk[..., None] * sub + torch.arange(sub, device=dev)).flatten(2)  # [B, Hkv, topk*sub]
        page_no = torch.where(blk[..., None].expand(-1, -1, -1, sub).flatten(2) >= 0, page_no, -1)
        tile_page, tile_pos = pages_at(page_no), page_no * ps
        lo, hi = torch.full_like(pos, -1), pos
        k_pool, v_pool = cache.k_pages, cache.v_pages
    elif branch == "swa":
        first = (pos - window_size + 1).clamp(min=0) // ps
        page_no = first[:, None] + torch.arange(-(-window_size // ps) + 1, device=dev)
        page_no = page_no[:, None, :].expand(-1, hkv, -1)
        tile_page, tile_pos = pages_at(page_no), page_no * ps
        lo, hi = pos - window_size, pos
        k_pool, v_pool = cache.k_pages, cache.v_pages
    else:  # cmp
        per_seq = cache.max_cmp // ps
        lc = torch.tensor([cache.num_compressed(cache.lengths[s]) for s in seqs], dtype=torch.int64, device=dev)
        i = torch.arange(per_seq, device=dev)
        seq_ids = torch.tensor(seqs, dtype=torch.int64, device=dev)
        page = torch.where(i[None, :] * ps < lc[:, None], seq_ids[:, None] * per_seq + i[None, :], -1)
        tile_page, tile_pos = page[:, None, :].expand(-1, hkv, -1), (i * ps)[None, None, :].expand(len(seqs), hkv, -1)
        lo, hi = torch.full_like(pos, -1), lc - 1
        k_pool, v_pool = cache.compressed_pool()
    as_i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    return as_i32(tile_page), as_i32(tile_pos), as_i32(lo), as_i32(hi), k_pool, v_pool


def decode_attention(q: torch.Tensor, cache, seqs, branch: str, *, topk_idx: torch.Tensor | None = None,
                     block_size: int | None = None, window_size: int | None = None,
                     splits: int | None = None, scale: float | None = None):
    """o ``[B, Hq, Dv]`` (q's dtype) and natural-log lse ``[B, Hq]`` float32 of the new token of
    each sequence in ``seqs`` (q ``[B, Hq, D]``, one row per sequence, in that order) for
    ``branch`` ("slc" with ``topk_idx [Hkv, B, topk]`` and ``block_size``, "swa" with
    ``window_size``, or "cmp"). ``splits``: key-tile runs per (sequence, kv head) (default: enough
    CTAs for two waves)."""
    seqs = [cache._slot(s) for s in seqs]
    if branch not in BRANCHES:
        raise ValueError(f"decode_attention: branch must be one of {BRANCHES}, got {branch!r}")
    if not isinstance(q, torch.Tensor) or q.ndim != 3 or q.shape[0] != len(seqs):
        raise ValueError(f"decode_attention: q must be [B={len(seqs)}, Hq, D], got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    if q.dtype != cache.dtype or q.device != cache.device or q.shape[2] != cache.head_dim \
            or q.shape[1] % cache.num_kv_heads:
        raise ValueError(f"decode_attention: q must be {cache.dtype} on {cache.device} with D={cache.head_dim} "
                         f"and Hq a multiple of Hkv={cache.num_kv_heads}, got {q.dtype} on {q.device}, "
                         f"shape {tuple(q.shape)}")
    if any(cache.lengths[s] == 0 for s in seqs):
        raise ValueError("decode_attention: every sequence needs its new token's k/v in the cache first")
    if branch == "slc" and (topk_idx is None or block_size is None or topk_idx.ndim != 3
                            or tuple(topk_idx.shape[:2]) != (cache.num_kv_heads, len(seqs))):
        raise ValueError(f"decode_attention: slc needs topk_idx [Hkv={cache.num_kv_heads}, B={len(seqs)}, topk] "
                         "and block_size")
    if branch == "swa" and (not isinstance(window_size, int) or window_size < 1):
        raise ValueError(f"decode_attention: swa needs window_size >= 1, got {window_size!r}")
    b, hq, _ = q.shape
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    tile_page, tile_pos, lo, hi, k_pool, v_pool = _tiles(branch, cache, seqs, q.device, topk_idx, block_size,
                                                         window_size)
    nt = tile_page.shape[2]
    if splits is None:
        splits = max(1, min(nt, -(-_TARGET_CTAS // (b * cache.num_kv_heads))))
    per_split = -(-nt // splits)
    spec = kernel_spec("dec", "fwd", q, k_pool[0], block_size=cache.page_size)
    kern, _ = plan_and_kernel(spec)
    o_part = alloc((b, hq, splits, cache.v_head_dim), torch.float32, q.device)
    lse_part = alloc((b, hq, splits), torch.float32, q.device)
    kern["decode_fwd"](q.contiguous(), k_pool, v_pool, tile_page, tile_pos, lo, hi, o_part, lse_part,
                       per_split, scale)
    return combine_splits(o_part, lse_part, q.dtype)


def combine_splits(o_part: torch.Tensor, lse_part: torch.Tensor, dtype: torch.dtype):
    """Exact merge of split-KV runs: ``lse = logsumexp_s lse_s``, ``o = sum_s exp(lse_s - lse) o_s``
    (a row no run saw: o = 0, lse = -inf)."""
    lse = torch.logsumexp(lse_part, dim=-1)
    seen = torch.isfinite(lse)
    w = torch.exp(lse_part - torch.where(seen, lse, 0)[..., None])
    w = torch.where(torch.isfinite(lse_part), w, 0)
    o = (w[..., None] * o_part).sum(dim=-2)
    return o.to(dtype), torch.where(seen, lse, -math.inf)
