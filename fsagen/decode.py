"""Decode-time NSA over an :class:`fsagen.NSAKVCache`: the new tokens of a batch of sequences, one
each, or a few (speculative decoding: draft tokens checked in one step).

The new tokens are each sequence's newest cached rows (the newest at position ``p = length - 1``):
append their k/v to the cache first, then call these with their queries, one row per token.

* :func:`nsa_decode`: the whole gated NSA output of the new tokens, in six generated launches
  and one torch top-k: ``decode_prep`` (positions, compressed counts, key ranges), cmp attention
  over the compressed store (a split-KV launch that also writes the scores), the selection
  (:func:`select_tiles`: block keys from the group-summed probabilities, the top-k, the slc and
  swa tile lists), slc and swa (one split-KV launch for both), and ``decode_combine`` (the exact
  merge of the split runs and the gates). Small steps were once ~30 torch ops of a few
  microseconds each, more than the attention itself (``bench/results/decode_bench.md``).
* :func:`decode_attention`: one branch ("slc" with given ``topk_idx``, "swa", "cmp"), its tile
  lists built by torch ops (:func:`_raw_tiles`; the torch spelling of the selection is
  :func:`select_from_scores`).

The attention launches run the generated split-KV program (``kernels/decode.py``) over tile lists
built on the device from the cache's device-side block table and lengths: nothing reads a
device value on the host, and the work of a call depends only on the cache's geometry, the
number of sequences and the NSA parameters, never on the lengths. So a decode step can be
captured in a CUDA graph once (the sequence list is memoised per cache, so capture creates no
host tensors) and replayed as the cache grows, as long as no page is allocated during capture
(``NSAKVCache.append`` allocates pages: call it outside the graph).
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F

from .glue import alloc, kernel_spec, plan_and_kernel

BRANCHES = ("slc", "swa", "cmp")
LN2 = math.log(2.0)
_TARGET_CTAS = 160  # about 1.2 waves of the H100's 132 SMs (measured: fewer, longer runs beat 264)
# Per cache: tile tables that depend only on its geometry and the sequence list (built once, so a
# step launches no kernel for them).
_STATIC = weakref.WeakKeyDictionary()


def _static(cache, key, build):
    memo = _STATIC.setdefault(cache, {})
    if key not in memo:
        memo[key] = build()
    return memo[key]


# --------------------------------------------------------------------------- tile lists


def _compact(valid):
    """Valid tiles first (stable), and their count: the kernel loops over ``count`` tiles only.
    ``valid [R, Hkv, NT]``; returns (order ``[R, Hkv, NT]`` int64, count int32)."""
    order = torch.sort((~valid).to(torch.uint8), dim=-1, stable=True).indices
    return order, valid.sum(dim=-1, dtype=torch.int32)


def _raw_tiles(cache, seq_idx, pos, page_no):
    """(tile_page, tile_pos, tile_count) of raw-pool pages ``page_no [B, Hkv, NT]`` (page numbers
    within each sequence, -1 = none) of the sequences ``seq_idx`` whose newest position is ``pos``,
    valid pages first."""
    ps = cache.page_size
    table = cache.block_table_dev.index_select(0, seq_idx)  # [B, max_pages]
    valid = (page_no >= 0) & (page_no <= (pos // ps)[:, None, None])
    got = torch.gather(table, 1, page_no.clamp(0, table.shape[1] - 1).flatten(1)).view_as(page_no)
    page = torch.where(valid, got, 0)
    order, count = _compact(valid)
    return torch.gather(page, 2, order), torch.gather(page_no, 2, order) * ps, count


def _slc_pages(cache, pos, topk_idx, block_size):
    """Page numbers ``[B, Hkv, topk * pages per block]`` of the selected blocks (topk_idx
    ``[B, Hkv, topk]``), -1 for padding and blocks past the newest position's own."""
    sub = block_size // cache.page_size
    blk = topk_idx.long()
    blk = torch.where((blk >= 0) & (blk <= (pos // block_size)[:, None, None]), blk, -1)
    if sub == 1:
        return blk
    page_no = (blk[..., None] * sub + torch.arange(sub, device=pos.device)).flatten(2)
    return torch.where(blk.repeat_interleave(sub, dim=-1) >= 0, page_no, -1)


def _swa_pages(cache, pos, window_size):
    """Page numbers ``[B, Hkv, NT]`` covering positions ``(p - window_size, p]``."""
    ps = cache.page_size
    first = (pos - window_size + 1).clamp(min=0) // ps
    page_no = first[:, None] + torch.arange(-(-window_size // ps) + 1, device=pos.device)
    return page_no[:, None, :].expand(-1, cache.num_kv_heads, -1)


def _cmp_static_tiles(cache, seq_idx):
    """(tile_page, tile_pos) of the compressed store viewed as a pool for the sequences ``seq_idx``:
    sequence s's compressed rows are pages ``s * per_seq ..`` (``NSAKVCache.compressed_pool``).
    They depend on the geometry only: built once per cache and sequence list."""
    ps, hkv = cache.page_size, cache.num_kv_heads
    per_seq = cache.max_cmp // ps
    b = seq_idx.shape[0]

    def build():
        i = torch.arange(per_seq, device=seq_idx.device)
        page = (seq_idx[:, None] * per_seq + i[None, :]).to(torch.int32)
        return (page[:, None, :].expand(b, hkv, -1).contiguous(),
                (i * ps).to(torch.int32)[None, None, :].expand(b, hkv, -1).contiguous())

    return _static(cache, ("cmp", seq_idx.data_ptr(), b), build)


def _cmp_tiles(cache, seq_idx, lc):
    """(tile_page, tile_pos, tile_count) of the compressed store: :func:`_cmp_static_tiles` and
    the count of pages holding the ``lc`` compressed tokens of each row."""
    page, pos = _cmp_static_tiles(cache, seq_idx)
    count = ((lc + cache.page_size - 1) // cache.page_size).to(torch.int32)
    return page, pos, count[:, None].expand(seq_idx.shape[0], cache.num_kv_heads)


# --------------------------------------------------------------------------- launches

_TILE_LANES = 128  # kernels/decode.py LANES: decode_tiles sorts at most this many candidates


def _run_split(kern, stage, q, pools, tiles, lo, hi, scale, scores_len=0):
    """One split-KV launch of ``stage`` with the step's compiled kernel; returns the runs
    ``o_part [R, Hq, S, Dv]``, ``lse_part [R, Hq, S]`` and the scores (``scores_len``)."""
    k_pool, v_pool = pools
    tile_page, tile_pos, count = tiles
    rows, (hq, nt) = tile_page.shape[0], (q.shape[1], tile_page.shape[2])
    splits = max(1, min(nt, round(_TARGET_CTAS / max(rows * tile_page.shape[1], 1))))
    per_split = -(-nt // splits)
    o_part = alloc((rows, hq, splits, v_pool.shape[-1]), torch.float32, q.device)
    lse_part = alloc((rows, hq, splits), torch.float32, q.device)
    s_out = alloc((rows, hq, max(scores_len, 1)), torch.float32, q.device)
    flat = lambda pool: pool.view(-1, *pool.shape[2:])  # noqa: E731  [pages * page_size, Hkv, D]
    kern[stage](q, flat(k_pool), flat(v_pool), tile_page, tile_pos, count, lo, hi, o_part, lse_part, s_out,
                per_split, float(scale))
    return o_part, lse_part, s_out


def _launch(q, k_pool, v_pool, tiles, lo, hi, scale, page_size):
    """A split-KV launch over ``tiles = (tile_page, tile_pos, tile_count)`` with q's kernel (for
    :func:`decode_attention`); returns the runs ``o_part [R, Hq, S, Dv]``, ``lse_part [R, Hq, S]``."""
    spec = kernel_spec("dec", "fwd", q, k_pool[0], block_size=page_size)
    kern, _ = plan_and_kernel(spec, device=q.device)
    int32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    o_part, lse_part, _ = _run_split(kern, "decode_fwd", q.contiguous(), (k_pool, v_pool), tuple(map(int32, tiles)),
                                     int32(lo), int32(hi), scale)
    return o_part, lse_part


def combine_splits(o_part: torch.Tensor, lse_part: torch.Tensor, dtype: torch.dtype):
    """Exact merge of split-KV runs: ``lse = logsumexp_s lse_s``, ``o = sum_s exp(lse_s - lse) o_s``
    (a row no run saw: o = 0, lse = -inf)."""
    if lse_part.shape[-1] == 1:  # one run: already normalised (o = 0, lse = -inf where it saw nothing)
        return o_part[..., 0, :].to(dtype), lse_part[..., 0]
    lse = torch.logsumexp(lse_part, dim=-1)
    seen = torch.isfinite(lse)
    w = torch.exp(lse_part - torch.where(seen, lse, 0)[..., None])
    w = torch.where(torch.isfinite(lse_part), w, 0)
    o = (w[..., None] * o_part).sum(dim=-2)
    return o.to(dtype), torch.where(seen, lse, -math.inf)


# --------------------------------------------------------------------------- selection


def group_probs(scores2: torch.Tensor, lse: torch.Tensor, num_cmp: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """cmp's probabilities summed over the G heads of each kv head, ``[B, Hkv, ns]``, from its
    log2-domain scores ``scores2 [B, Hq, ns]`` (entries past a sequence's ``num_cmp`` are ignored,
    whatever they hold) and natural-log lse ``[B, Hq]``. With :func:`select_blocks`, the torch
    spelling of what :func:`select_tiles` runs as generated stages (``decode_block_keys``)."""
    b, hq, ns = scores2.shape
    col = torch.arange(ns, device=scores2.device)
    p = torch.where(col < num_cmp[:, None, None], torch.exp2(scores2 - (lse / LN2)[..., None]), 0.0)
    return p.view(b, num_kv_heads, hq // num_kv_heads, ns).sum(dim=2)


def select_from_scores(scores2: torch.Tensor, lse: torch.Tensor, num_cmp: torch.Tensor, pos: torch.Tensor, *,
                       num_kv_heads: int, **rules) -> torch.Tensor:
    """:func:`select_blocks` of :func:`group_probs` (the whole selection from cmp's scores)."""
    return select_blocks(group_probs(scores2, lse, num_cmp, num_kv_heads), pos, **rules)


def select_blocks(grouped: torch.Tensor, pos: torch.Tensor, *, kernel_size: int, stride: int, block_size: int,
                  topk: int, init_blocks: int, local_blocks: int, num_blocks: int) -> torch.Tensor:
    """Top-k blocks ``[B, Hkv, topk]`` int32 (ascending, -1 padded) of new tokens at positions
    ``pos [B]`` from cmp's probabilities summed over each group's heads, ``grouped [B, Hkv, ns]``
    (0 past a sequence's compressed tokens).

    The prefill rules (``fsagen.reference_cmp.select_blocks_reference``): probabilities folded
    into blocks with the window/block overlap weights (a compressed token's window is
    ``kernel_size / stride`` stride segments; a segment lies in one block), ``init_blocks`` and
    the own block with the ``local_blocks - 1`` before it forced in, ties to the lower block,
    blocks past the own one never chosen. ``num_blocks``: the most blocks a sequence can have
    (a static shape)."""
    b, num_kv_heads, ns = grouped.shape
    nu, per_block = kernel_size // stride, block_size // stride
    nseg = num_blocks * per_block
    total = nu - 1 + nseg
    padded = F.pad(grouped, (nu - 1, max(0, total - (nu - 1) - ns)))[..., :total]
    seg = sum(padded[..., nu - 1 - u: nu - 1 - u + nseg] for u in range(nu))  # seg c' = sum_u p[c' - u]
    score = seg.view(b, num_kv_heads, num_blocks, per_block).sum(dim=-1)
    j = torch.arange(num_blocks, device=grouped.device)
    own = (pos // block_size)[:, None, None]
    forced = (j < init_blocks) | ((j <= own) & (j > own - local_blocks))
    key = torch.where(j <= own, torch.where(forced, math.inf, score.float()), -math.inf)
    # One top-k over unique integer keys: a non-negative float's bits order as the float does
    # (-inf, the blocks past the own one, is negative as an int32), and the low bits rank equal
    # scores by block, lower first: the prefill's tie rule, without a full stable sort.
    enc = (key.view(torch.int32).long() << 24) + ((1 << 24) - 1 - j)
    order = torch.topk(enc, min(topk, num_blocks), dim=-1).indices
    big = num_blocks + 1
    kept = torch.where(order <= own, order, big)
    kept = torch.sort(kept, dim=-1).values
    kept = torch.where(kept == big, -1, kept)
    if kept.shape[-1] < topk:
        kept = F.pad(kept, (0, topk - kept.shape[-1]), value=-1)
    return kept.to(torch.int32)


# --------------------------------------------------------------------------- public


def _check_q(q, cache, seqs, name):
    if not isinstance(q, torch.Tensor) or q.ndim != 3 or q.shape[0] != len(seqs):
        raise ValueError(f"{name}: q must be [B={len(seqs)}, Hq, D], got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    if q.dtype != cache.dtype or q.device != cache.device or q.shape[2] != cache.head_dim \
            or q.shape[1] % cache.num_kv_heads:
        raise ValueError(f"{name}: q must be {cache.dtype} on {cache.device} with D={cache.head_dim} "
                         f"and Hq a multiple of Hkv={cache.num_kv_heads}, got {q.dtype} on {q.device}, "
                         f"shape {tuple(q.shape)}")
    rows = {s: seqs.count(s) for s in seqs}
    if any(cache.lengths[s] < n for s, n in rows.items()):
        raise ValueError(f"{name}: every sequence needs its new tokens' k/v in the cache first (a sequence listed "
                         f"n times decodes its last n tokens); rows per sequence {rows}, cached lengths "
                         f"{ {s: cache.lengths[s] for s in rows} }")


def _rows(cache, seqs):
    """The step's query rows: ``seqs`` lists a sequence once per new token, its tokens in order
    (``[3, 3, 5]``: the last two tokens of sequence 3, the last one of 5). Returns the slots'
    int64 indices and ``back`` int32 (how many of the sequence's later tokens are in the step),
    both on the device and memoised per list (no host tensor on a replayed step)."""
    seq_idx = cache.seq_index(seqs)

    def build():
        later, back = {}, []
        for s in reversed(seqs):
            back.append(later.get(s, 0))
            later[s] = later.get(s, 0) + 1
        return torch.tensor(back[::-1], dtype=torch.int32).to(seq_idx.device)

    return seq_idx, _static(cache, ("back", tuple(seqs)), build)


def _positions(cache, seqs):
    seq_idx, back = _rows(cache, seqs)
    pos = cache.lengths_dev.index_select(0, seq_idx).long() - 1 - back.long()
    return seq_idx, pos


def decode_attention(q: torch.Tensor, cache, seqs, branch: str, *, topk_idx: torch.Tensor | None = None,
                     block_size: int | None = None, window_size: int | None = None, scale: float | None = None):
    """o ``[B, Hq, Dv]`` (q's dtype) and natural-log lse ``[B, Hq]`` float32 of the query rows
    ``seqs`` (q ``[B, Hq, D]``, one row per entry; a sequence listed n times: its last n tokens,
    as in :func:`nsa_decode`) for
    ``branch`` ("slc" with ``topk_idx [Hkv, B, topk]`` and ``block_size``, a multiple of the
    cache's page size; "swa" with ``window_size``; or "cmp")."""
    seqs = [cache._slot(s) for s in seqs]
    if branch not in BRANCHES:
        raise ValueError(f"decode_attention: branch must be one of {BRANCHES}, got {branch!r}")
    _check_q(q, cache, seqs, "decode_attention")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not seqs:  # no rows: nothing to launch
        return q.new_zeros((0, q.shape[1], cache.v_head_dim)), q.new_zeros((0, q.shape[1]), dtype=torch.float32)
    seq_idx, pos = _positions(cache, seqs)
    if branch == "slc":
        if topk_idx is None or not isinstance(block_size, int) or topk_idx.ndim != 3 \
                or tuple(topk_idx.shape[:2]) != (cache.num_kv_heads, len(seqs)):
            raise ValueError(f"decode_attention: slc needs topk_idx [Hkv={cache.num_kv_heads}, B={len(seqs)}, topk] "
                             "and block_size")
        _check_block_size(cache, block_size)
        tiles = _raw_tiles(cache, seq_idx, pos, _slc_pages(cache, pos, topk_idx.to(q.device).permute(1, 0, 2),
                                                           block_size))
        lo, hi, pools = torch.full_like(pos, -1), pos, (cache.k_pages, cache.v_pages)
    elif branch == "swa":
        if not isinstance(window_size, int) or isinstance(window_size, bool) or window_size < 1:
            raise ValueError(f"decode_attention: swa needs window_size >= 1, got {window_size!r}")
        tiles = _raw_tiles(cache, seq_idx, pos, _swa_pages(cache, pos, window_size))
        lo, hi, pools = pos - window_size, pos, (cache.k_pages, cache.v_pages)
    else:
        lc = cache.num_compressed_dev(pos + 1)
        tiles = _cmp_tiles(cache, seq_idx, lc)
        lo, hi, pools = torch.full_like(pos, -1), lc - 1, cache.compressed_pool()
    o_part, lse_part = _launch(q, *pools, tiles, lo, hi, scale, cache.page_size)
    return combine_splits(o_part, lse_part, q.dtype)


def _check_block_size(cache, block_size):
    if block_size < 1 or block_size % cache.page_size:
        raise ValueError(f"decode: block_size={block_size} must be a multiple of the cache's "
                         f"page_size={cache.page_size}")


def nsa_decode(q: torch.Tensor, cache, seqs, gates: torch.Tensor, *, block_size: int, topk: int,
               init_blocks: int, local_blocks: int, window_size: int, scale: float | None = None,
               return_parts: bool = False):
    """Gated NSA output ``[B, Hq, Dv]`` (gates' dtype, as :func:`fsagen.nsa_attention`) of the B
    query rows ``seqs``: one entry per new token, a sequence listed n times decoding its last n
    cached tokens in order (speculative decoding: ``[3, 3, 3, 5]`` checks three draft tokens of
    sequence 3 and one of 5; each row sees its own prefix only). q ``[B, Hq, D]`` (rotated as
    the layer rotates it),
    gates ``[B, Hq, 3]`` or ``[B, 3]`` (cmp, slc, swa). The cache's compression windows
    (``kernel_size``, ``stride``) are the NSA ones. ``return_parts``: also a dict of ``o_cmp``,
    ``o_slc``, ``o_swa``, ``lse_*`` ``[B, Hq]`` and ``topk_idx`` ``[Hkv, B, topk]`` int32, as
    :func:`fsagen.reference_decode.nsa_decode_reference` returns them."""
    from .nsa import check_nsa_config

    seqs = [cache._slot(s) for s in seqs]
    _check_q(q, cache, seqs, "nsa_decode")
    check_nsa_config(kernel_size=cache.kernel_size, stride=cache.stride, block_size=block_size, topk=topk,
                     init_blocks=init_blocks, local_blocks=local_blocks, window_size=window_size, scale=scale)
    _check_block_size(cache, block_size)
    if min(topk, -(-cache.max_len // block_size)) > _TILE_LANES:
        raise ValueError(f"nsa_decode: topk={topk} is more than the {_TILE_LANES} blocks the decode kernels select")
    b, hq, _ = q.shape
    if not isinstance(gates, torch.Tensor) or gates.device != q.device or not gates.dtype.is_floating_point \
            or tuple(gates.shape) not in ((b, hq, 3), (b, 3)):
        raise ValueError(f"nsa_decode: gates must be a floating tensor [B={b}, Hq={hq}, 3] or [B, 3] on {q.device}, "
                         f"got {tuple(gates.shape) if isinstance(gates, torch.Tensor) else type(gates).__name__}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if b == 0:  # no rows: nothing to launch (a CUDA grid of 0 CTAs is an error)
        o = q.new_zeros((0, hq, cache.v_head_dim), dtype=gates.dtype)
        if not return_parts:
            return o
        empty = q.new_zeros((0, hq))
        return o, {"o_cmp": o.to(q.dtype), "o_slc": o.to(q.dtype), "o_swa": o.to(q.dtype), "lse_cmp": empty.float(),
                   "lse_slc": empty.float(), "lse_swa": empty.float(),
                   "topk_idx": q.new_zeros((cache.num_kv_heads, 0, topk), dtype=torch.int32)}
    ps, hkv, dev = cache.page_size, cache.num_kv_heads, q.device
    seq_idx, back = _rows(cache, seqs)
    spec = kernel_spec("dec", "fwd", q, cache.k_pages[0], block_size=ps)
    kern, _ = plan_and_kernel(spec, device=dev)
    i32 = lambda *shape: alloc(shape, torch.int32, dev)  # noqa: E731

    # positions, compressed counts, the launches' key ranges
    pos, lc, cmp_count, cmp_lo, cmp_hi, raw_lo, raw_hi = i32(b), i32(b), i32(b, hkv), i32(b), i32(b), i32(2 * b), i32(2 * b)
    kern["decode_prep"](seq_idx, back, cache.lengths_dev, pos, lc, cmp_count, cmp_lo, cmp_hi, raw_lo, raw_hi,
                        cache.kernel_size, cache.stride, ps, window_size)

    # cmp, writing its scores for the selection
    cmp_page, cmp_pos = _cmp_static_tiles(cache, seq_idx)
    cmp_o, cmp_lse, scores2 = _run_split(kern, "decode_fwd_scores", q, cache.compressed_pool(),
                                         (cmp_page, cmp_pos, cmp_count), cmp_lo, cmp_hi, scale, cache.max_cmp)

    topk_idx, raw_tiles = select_tiles(kern, cache, seq_idx, pos, lc, scores2, cmp_lse, block_size=block_size, topk=topk,
                                       init_blocks=init_blocks, local_blocks=local_blocks, window_size=window_size)

    # slc and swa in one launch: rows [0, B) are the sequences' slc, rows [B, 2B) their swa (q row b % B)
    raw_o, raw_lse, _ = _run_split(kern, "decode_fwd", q, (cache.k_pages, cache.v_pages), raw_tiles, raw_lo, raw_hi,
                                   scale)

    # the split merges and the gates, in one pass
    g = gates if gates.dim() == 3 else gates[:, None, :]
    out = alloc((b, hq, cache.v_head_dim), torch.float32, dev)
    kern["decode_combine"](cmp_o, cmp_lse, raw_o, raw_lse, g.float().contiguous(), out)
    o = out.to(gates.dtype)
    if not return_parts:
        return o
    if topk_idx.shape[-1] < topk:
        topk_idx = F.pad(topk_idx, (0, topk - topk_idx.shape[-1]), value=-1)
    (o_cmp, lse_cmp), (o_raw, lse_raw) = combine_splits(cmp_o, cmp_lse, q.dtype), combine_splits(raw_o, raw_lse, q.dtype)
    return o, {"o_cmp": o_cmp, "o_slc": o_raw[:b], "o_swa": o_raw[b:], "lse_cmp": lse_cmp, "lse_slc": lse_raw[:b],
               "lse_swa": lse_raw[b:], "topk_idx": topk_idx.permute(1, 0, 2).contiguous()}


def select_tiles(kern, cache, seq_idx, pos, num_cmp, scores2, cmp_lse, *, block_size: int, topk: int,
                 init_blocks: int, local_blocks: int, window_size: int):
    """Decode-time selection and the slc+swa launch's tiles, from the cmp launch's scores
    ``scores2 [B, Hq, max_cmp]`` (log2) and split lse ``cmp_lse [B, Hq, S]``: the generated block
    keys, one integer top-k (torch), the generated tile lists. Returns ``topk_idx [B, Hkv, K]``
    int32 (ascending, -1 padded; ``K = min(topk, blocks)``) and ``(tile_page, tile_pos,
    tile_count)`` of rows ``[0, B)`` (slc) and ``[B, 2B)`` (swa). The torch spelling is
    :func:`select_from_scores` with :func:`_slc_pages` / :func:`_swa_pages` / :func:`_raw_tiles`."""
    b, hkv, ps, dev = pos.shape[0], cache.num_kv_heads, cache.page_size, pos.device
    num_blocks = -(-cache.max_len // block_size)
    keys = alloc((b, hkv, num_blocks), torch.int64, dev)
    kern["decode_block_keys"](scores2, cmp_lse, num_cmp, pos, keys, cache.kernel_size // cache.stride,
                              block_size // cache.stride, block_size, init_blocks, local_blocks)
    cand = torch.topk(keys, min(topk, num_blocks), dim=-1, sorted=False).indices
    nt = max(cand.shape[-1] * (block_size // ps), -(-window_size // ps) + 1)
    topk_idx = alloc((b, hkv, cand.shape[-1]), torch.int32, dev)
    tiles = tuple(alloc(shape, torch.int32, dev) for shape in ((2 * b, hkv, nt), (2 * b, hkv, nt), (2 * b, hkv)))
    kern["decode_tiles"](cand, pos, seq_idx, cache.block_table_dev, topk_idx, *tiles, block_size, ps, window_size)
    return topk_idx, tiles
