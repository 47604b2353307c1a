"""Float64 PyTorch oracles of compression, compressed (cmp) attention and top-k block selection.

Semantics: ../shared/DESIGN.md section 2.  Packed varlen layout as in :mod:`fsagen.reference`:
k/v ``[N, Hkv, D]``, q ``[N, Hq, D]``, ``cu_seqlens`` int ``[B + 1]``, positions restart at 0 in
each sequence, query head h reads kv head ``h // G`` with ``G = Hq / Hkv``.

* :func:`compress_reference` -- a sequence of length L gives ``Lc = (L - ks) // s + 1`` compressed
  tokens (0 if ``L < ks``); token i pools raw tokens ``[i*s, i*s + ks)`` by mean, learned weights,
  or a learned linear map (optionally after adding an intra-block position embedding).
* :func:`cmp_attention_reference` -- query t sees compressed token i iff ``i*s + ks - 1 <= t``;
  returns the softmax probabilities too, which selection consumes.
* :func:`select_blocks_reference` -- block scores from those probabilities (summed over the G
  heads of a group, weighted by :func:`selection_weights`), forced initial and local blocks, top-k
  with ties to the lower block, ascending, ``-1`` padded: ``topk_idx`` int32 ``[Hkv, N, topk]``.

Everything is plain autograd in float64, so ``torch.autograd.grad`` gives reference gradients.
Per-sequence python loops are fine here: these are oracles for test sizes, not kernels.
"""

from __future__ import annotations

import math
import numbers

import torch

from fsagen.reference_common import (check_int, check_ndim, check_shape, fail,
                                     masked_softmax_attention, seq_bounds)

__all__ = [
    "COMPRESS_KINDS",
    "COMPRESS_REQUIRED",
    "COMPRESS_OPTIONAL",
    "compress_param_shapes",
    "num_compressed",
    "compress_reference",
    "cmp_attention_reference",
    "selection_weights",
    "select_blocks_reference",
]

COMPRESS_KINDS = ("mean", "weighted", "linear")

# The parameters each compression kind needs, and those it may take besides; any other one given
# is an error (a silently ignored parameter usually means the caller asked for a different kind
# than they think).  Shared with the production op, fsagen.compress.
COMPRESS_REQUIRED = {"mean": (), "weighted": ("weight",), "linear": ("proj_k", "proj_v")}
COMPRESS_OPTIONAL = {"mean": (), "weighted": (), "linear": ("pos_emb",)}


def compress_param_shapes(hkv: int, kernel_size: int, d: int, dv: int) -> dict:
    """``{name: (shape, layout)}`` of every compression parameter (k head dim d, v head dim dv)."""
    ks = kernel_size
    return {
        "weight": ((hkv, ks), "[Hkv, kernel_size]"),
        "proj_k": ((hkv, ks * d, d), "[Hkv, kernel_size * D, D]"),
        "proj_v": ((hkv, ks * dv, dv), "[Hkv, kernel_size * Dv, Dv]"),
        "pos_emb": ((hkv, ks, d), "[Hkv, kernel_size, D]"),
    }


# --------------------------------------------------------------------------- argument checks


def _check_kernel(kernel_size, stride) -> None:
    check_int("kernel_size", kernel_size, 1)
    check_int("stride", stride, 1)
    if kernel_size % stride != 0:
        fail("kernel_size", f"must be a multiple of stride={stride}", kernel_size)


def num_compressed(length: int, kernel_size: int, stride: int) -> int:
    """Compressed tokens of a sequence of ``length`` raw tokens: full windows only."""
    return 0 if length < kernel_size else (length - kernel_size) // stride + 1


def _cmp_bounds(bounds: list[int], kernel_size: int, stride: int) -> list[int]:
    """``cu_seqlens_cmp`` (as ints) that the raw offsets ``bounds`` imply."""
    out = [0]
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        out.append(out[-1] + num_compressed(s1 - s0, kernel_size, stride))
    return out


# --------------------------------------------------------------------------- compression


def _check_compress_params(kind, params: dict, hkv: int, ks: int, d: int, dv: int) -> None:
    if kind not in COMPRESS_REQUIRED:
        fail("kind", f"must be one of {list(COMPRESS_KINDS)}", repr(kind))
    allowed = COMPRESS_REQUIRED[kind] + COMPRESS_OPTIONAL[kind]
    for name, value in params.items():
        if value is None and name in COMPRESS_REQUIRED[kind]:
            fail(name, f"is required by kind={kind!r}", None)
        if value is not None and name not in allowed:
            fail(name, f"is not used by kind={kind!r} (it takes {list(allowed) or 'no parameters'})", "a tensor")
    expected = compress_param_shapes(hkv, ks, d, dv)
    for name, value in params.items():
        if value is not None:
            check_shape(name, value, *expected[name])
    if params.get("pos_emb") is not None and dv != d:
        fail("pos_emb", f"is added to v too, so v's head dim must equal D={d}", f"Dv={dv}")


def _windows(x: torch.Tensor, num: int, kernel_size: int, stride: int) -> torch.Tensor:
    """``[num, H, ks, D]``: the raw rows of every compressed token of one sequence ``x [L, H, D]``."""
    if num == 0:
        return x.new_zeros(0, x.shape[1], kernel_size, x.shape[2])
    used = x[: (num - 1) * stride + kernel_size]
    return used.unfold(0, kernel_size, stride).permute(0, 1, 3, 2)  # unfold puts the window last


def _pool(win: torch.Tensor, kind: str, weight, proj, pos_emb) -> torch.Tensor:
    """One compressed tensor ``[Lc, H, Dout]`` from windows ``[Lc, H, ks, D]``."""
    if kind == "mean":
        return win.mean(dim=2)
    if kind == "weighted":
        return torch.einsum("lhkd,hk->lhd", win, weight)
    if pos_emb is not None:
        win = win + pos_emb
    return torch.einsum("lhx,hxe->lhe", win.flatten(2), proj)


def compress_reference(
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    kernel_size: int,
    stride: int,
    kind: str,
    *,
    weight: torch.Tensor | None = None,
    proj_k: torch.Tensor | None = None,
    proj_v: torch.Tensor | None = None,
    pos_emb: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compress k ``[N, Hkv, D]`` and v ``[N, Hkv, Dv]`` per sequence, in float64.

    kind "mean": mean over the window.  "weighted": ``weight [Hkv, ks]``, a weighted sum over the
    window per kv head (the same weights for k and v).  "linear": ``proj_k [Hkv, ks*D, D]`` and
    ``proj_v [Hkv, ks*Dv, Dv]`` applied to the flattened window (row-major: window position, then
    feature), after adding ``pos_emb [Hkv, ks, D]`` (optional) to every window of k and of v.

    Returns ``(k_cmp [Nc, Hkv, D], v_cmp [Nc, Hkv, Dv], cu_seqlens_cmp int32 [B + 1])``,
    differentiable with respect to k, v and the parameters.
    """
    _check_kernel(kernel_size, stride)
    check_ndim("k", k, 3, "[N, Hkv, D]")
    check_ndim("v", v, 3, "[N, Hkv, Dv]")
    n, hkv, d = k.shape
    if v.shape[:2] != k.shape[:2]:
        fail("v", f"must be [N={n}, Hkv={hkv}, Dv] like k", f"shape {tuple(v.shape)}")
    params = {"weight": weight, "proj_k": proj_k, "proj_v": proj_v, "pos_emb": pos_emb}
    _check_compress_params(kind, params, hkv, kernel_size, d, v.shape[2])
    bounds = seq_bounds(cu_seqlens, n)
    p64 = {name: (t.double() if t is not None else None) for name, t in params.items()}
    k64, v64 = k.double(), v.double()
    k_out, v_out = [], []
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        num = num_compressed(s1 - s0, kernel_size, stride)
        kw = _windows(k64[s0:s1], num, kernel_size, stride)
        vw = _windows(v64[s0:s1], num, kernel_size, stride)
        k_out.append(_pool(kw, kind, p64["weight"], p64["proj_k"], p64["pos_emb"]))
        v_out.append(_pool(vw, kind, p64["weight"], p64["proj_v"], p64["pos_emb"]))
    cu_cmp = torch.tensor(_cmp_bounds(bounds, kernel_size, stride), dtype=torch.int32, device=k.device)
    return torch.cat(k_out), torch.cat(v_out), cu_cmp


# --------------------------------------------------------------------------- cmp attention


def _visible(length: int, num_cmp: int, kernel_size: int, stride: int, device) -> torch.Tensor:
    """``[L, Lc]`` bool: query t sees compressed token i iff its whole window is in the past."""
    t = torch.arange(length, device=device)
    last = torch.arange(num_cmp, device=device) * stride + kernel_size - 1
    return last[None, :] <= t[:, None]


def cmp_attention_reference(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cu_seqlens_cmp: torch.Tensor,
    kernel_size: int,
    stride: int,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Float64 attention of raw queries over compressed keys.

    Args: q ``[N, Hq, D]``, k_cmp ``[Nc, Hkv, D]``, v_cmp ``[Nc, Hkv, Dv]``, cu_seqlens (raw) and
    cu_seqlens_cmp (compressed; must be the one :func:`compress_reference` gives for these
    lengths), kernel_size, stride, scale (default ``1/sqrt(D)``).

    Returns ``(o [N, Hq, Dv], lse [N, Hq], p)``, where ``p`` holds one float64 ``[Hq, L, Lc]``
    tensor of softmax probabilities per sequence (zero-length sequences included, so it lines
    up with ``cu_seqlens``).  Differentiable with respect to q, k_cmp, v_cmp.
    """
    _check_kernel(kernel_size, stride)
    check_ndim("q", q, 3, "[N, Hq, D]")
    check_ndim("k_cmp", k_cmp, 3, "[Nc, Hkv, D]")
    check_ndim("v_cmp", v_cmp, 3, "[Nc, Hkv, Dv]")
    n, hq, d = q.shape
    nc, hkv, _ = k_cmp.shape
    if hkv == 0 or hq % hkv != 0:
        fail("k_cmp", f"number of kv heads must divide q's Hq={hq}", f"Hkv={hkv}")
    if k_cmp.shape[2] != d:
        fail("k_cmp", f"head dim must equal q's D={d}", f"shape {tuple(k_cmp.shape)}")
    if v_cmp.shape[:2] != k_cmp.shape[:2]:
        fail("v_cmp", f"must be [Nc={nc}, Hkv={hkv}, Dv] like k_cmp", f"shape {tuple(v_cmp.shape)}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        fail("scale", "must be a float or None", type(scale).__name__)
    bounds = seq_bounds(cu_seqlens, n)
    cmp_bounds = seq_bounds(cu_seqlens_cmp, nc, "cu_seqlens_cmp")
    if cmp_bounds != _cmp_bounds(bounds, kernel_size, stride):
        rule = f"must match cu_seqlens for kernel_size={kernel_size}, stride={stride}"
        fail("cu_seqlens_cmp", f"{rule} ({_cmp_bounds(bounds, kernel_size, stride)})", cmp_bounds)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q64, k64, v64 = q.double(), k_cmp.double(), v_cmp.double()
    outs, lses, probs = [], [], []
    for (s0, s1), (c0, c1) in zip(zip(bounds[:-1], bounds[1:]), zip(cmp_bounds[:-1], cmp_bounds[1:])):
        visible = _visible(s1 - s0, c1 - c0, kernel_size, stride, q.device)
        o, lse, p = masked_softmax_attention(q64[s0:s1], k64[c0:c1], v64[c0:c1], visible, scale)
        outs.append(o)
        lses.append(lse)
        probs.append(p)
    return torch.cat(outs), torch.cat(lses), probs


# --------------------------------------------------------------------------- block selection


def selection_weights(
    num_cmp: int, num_blocks: int, kernel_size: int, stride: int, block_size: int, device=None
) -> torch.Tensor:
    """``W [num_cmp, num_blocks]`` float64: w(i, j) = stride segments of token i's window in block j.

    Token i's window is the segments ``i, i+1, .., i + ks/s - 1`` (segment c = raw tokens
    ``[c*s, (c+1)*s)``); since ``bs % s == 0`` a segment lies in exactly one block, ``c // (bs/s)``.
    For ks=32, s=16, bs=64 column j holds 1, 2, 2, 2, 1 at rows 4j-1 .. 4j+3.
    """
    seg = torch.arange(num_cmp, device=device)[:, None] + torch.arange(kernel_size // stride, device=device)[None, :]
    blk = seg // (block_size // stride)
    w = torch.zeros(num_cmp, num_blocks, dtype=torch.float64, device=device)
    return w.scatter_add_(1, blk, torch.ones_like(blk, dtype=torch.float64))


def _forced(length: int, num_blocks: int, block_size: int, init_blocks: int, local_blocks: int, device,
            positions: torch.Tensor | None = None):
    """``[L, nblk]`` bool: the blocks forced into query t's selection (only existing ones); the
    queries sit at ``positions`` (default ``0 .. L-1``)."""
    pos = torch.arange(length, device=device) if positions is None else positions
    own = pos[:, None] // block_size
    j = torch.arange(num_blocks, device=device)[None, :]
    return (j < init_blocks) | ((j <= own) & (j > own - local_blocks))


def _top_blocks(score: torch.Tensor, forced: torch.Tensor, block_size: int, topk: int,
                positions: torch.Tensor | None = None) -> torch.Tensor:
    """``[H, L, topk]`` int32 from scores ``[H, L, nblk]`` and forced ``[L, nblk]`` of queries at
    ``positions`` (default ``0 .. L-1``).

    Forced blocks rank first, then higher score; a stable sort of the negated key keeps equal
    keys in block order, which is the tie rule (lower block wins).  Blocks after the query's own
    are dropped after the top-k, the rest sorted ascending and padded with -1.
    """
    h, length, nblk = score.shape
    key = torch.where(forced, torch.full_like(score, math.inf), score)
    order = torch.sort(-key, dim=-1, stable=True).indices[..., :topk]
    pos = torch.arange(length, device=score.device) if positions is None else positions
    own = pos[None, :, None] // block_size
    big = nblk + 1  # sorts after every real block, then becomes -1
    kept = torch.where(order <= own, order, torch.full_like(order, big))
    kept = torch.sort(kept, dim=-1).values
    kept = torch.where(kept == big, torch.full_like(kept, -1), kept)
    pad = kept.new_full((h, length, topk - kept.shape[-1]), -1)
    return torch.cat([kept, pad], dim=-1).to(torch.int32)


def select_blocks_reference(
    p_list: list[torch.Tensor],
    cu_seqlens: torch.Tensor,
    num_kv_heads: int,
    kernel_size: int,
    stride: int,
    block_size: int,
    topk: int,
    init_blocks: int,
    local_blocks: int,
) -> torch.Tensor:
    """Top-k selected blocks per (kv head, query) from cmp attention probabilities.

    ``p_list`` is :func:`cmp_attention_reference`'s third output: per sequence ``[Hq, L, Lc]``.
    Score of block j for query t = ``sum_i W[i, j] * sum_{h in group} p[h, t, i]`` (all G heads
    of the group, in float64).  Blocks ``j < init_blocks`` and the query's own block with the
    ``local_blocks - 1`` before it are forced in.  Returns ``topk_idx`` int32
    ``[Hkv, N, topk]``: block indices relative to the sequence, ascending, ``-1`` padded,
    never after the query's own block.
    """
    _check_kernel(kernel_size, stride)
    for name, value, minimum in (
        ("num_kv_heads", num_kv_heads, 1),
        ("block_size", block_size, 1),
        ("topk", topk, 1),
        ("init_blocks", init_blocks, 0),
        ("local_blocks", local_blocks, 0),
    ):
        check_int(name, value, minimum)
    if block_size % stride != 0:
        fail("block_size", f"must be a multiple of stride={stride}", block_size)
    if topk < init_blocks + local_blocks:
        fail("topk", f"must be >= init_blocks + local_blocks = {init_blocks + local_blocks}", topk)
    bounds = seq_bounds(cu_seqlens, None)
    if not isinstance(p_list, (list, tuple)) or len(p_list) != len(bounds) - 1:
        got = f"{len(p_list)} entries" if isinstance(p_list, (list, tuple)) else type(p_list).__name__
        fail("p_list", f"must be a list with one [Hq, L, Lc] tensor per sequence ({len(bounds) - 1})", got)
    out = []
    for b, (s0, s1) in enumerate(zip(bounds[:-1], bounds[1:])):
        length, p = s1 - s0, p_list[b]
        lc = num_compressed(length, kernel_size, stride)
        check_ndim(f"p_list[{b}]", p, 3, "[Hq, L, Lc]")
        hq = p.shape[0]
        if hq % num_kv_heads != 0 or tuple(p.shape[1:]) != (length, lc):
            rule = f"shape must be [Hq (a multiple of num_kv_heads={num_kv_heads}), L={length}, Lc={lc}]"
            fail(f"p_list[{b}]", rule, f"shape {tuple(p.shape)}")
        nblk = -(-length // block_size)
        grouped = p.double().reshape(num_kv_heads, hq // num_kv_heads, length, lc).sum(dim=1)
        w = selection_weights(lc, nblk, kernel_size, stride, block_size, device=p.device)
        forced = _forced(length, nblk, block_size, init_blocks, local_blocks, p.device)
        out.append(_top_blocks(grouped @ w, forced, block_size, topk))
    return torch.cat(out, dim=1)
