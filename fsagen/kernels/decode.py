"""Decode attention: one new query per sequence over key tiles of a paged pool, split-KV.

One program serves the three NSA branches at decode time, because each is "attention of the new
token over some pages of a pool, with the keys of a position range":

* slc: the pages of the selected blocks in the raw pool, positions ``<= p`` (p: the token's own);
* swa: the pages covering ``(p - window, p]`` in the raw pool;
* cmp: the pages of the sequence's compressed keys (the compressed store viewed as a pool), all
  of them visible (a window that completed is in the past).

The pool is passed flat, ``[pages * page_size, Hkv, D]`` (page ``g`` is rows ``g*PS ..``), so a
page is a tile of consecutive rows and the dialect's row copy (TMA on a GPU) loads it.

The glue (``fsagen/decode.py``) lists, per query row ``b`` (a sequence, or a (sequence, branch)
pair when slc and swa share a launch) and kv head, the tiles: ``tile_page`` (a page of the pool)
and ``tile_pos`` (the position of the page's first key), valid ones first, with their number in
``tile_count``; plus the visible range ``(key_lo, key_hi]`` per row. A single query gives one
(row, kv head) CTA too little work, so the valid tiles are cut into runs of ``per_split``, one
CTA each (split-KV); the run's loop is software-pipelined (the next page loads while this one is
used) and has no branch, because every listed tile is a real page. Each run writes its normalised
output and natural-log lse; the glue combines the runs exactly (``lse = logsumexp``,
``o = sum_s exp(lse_s - lse) o_s``). The G query heads of a kv head share the K/V tile (rows
padded to 16 for the tensor cores).

``scores=True`` also writes each visible key's scaled score (log2 domain, ``-inf`` where masked)
to ``S [rows, Hq, keys]`` at the key's position: decode-time block selection reads cmp's scores
from there instead of recomputing them (``p = exp2(s2 - lse2)``).
"""
import math

import tilelang.language as T

from .target import SIMT, Dialect
from .tiles import ACCUM, LOG2E, make_online_softmax

INDEX = "int32"
LN2 = math.log(2.0)
# The running maximum starts finite so that a run whose first tile is fully masked rescales by
# exp2(0) instead of exp2(-inf - -inf) = NaN (as in dense.py); masked scores stay -inf.
NEG_BIG = -1.0e30


def decode_fwd(G: int, D: int, DV: int, dtype: str, page_size: int, threads: int, num_stages: int,
               scores: bool = False, dl: Dialect = SIMT):
    R = (G + 15) // 16 * 16
    PS = page_size
    B, HQ, HKV, NP, NT, S, NS = T.dynamic("B, HQ, HKV, NP, NT, S, NS")
    io = dl.io(dtype)
    copy_k = dl.make_copy_rows(PS, D, io)
    copy_v = dl.make_copy_rows(PS, DV, io)
    online_softmax = make_online_softmax(R, PS, DV, dl)

    @T.macro
    def write_scores(S_out, b, h, pos0, acc_s):
        for r, c in dl.par(R, PS):
            if r < G and pos0 + c < NS:
                S_out[b, h * G + r, pos0 + c] = acc_s[r, c]

    @T.prim_func
    def main(
        Q: T.Tensor((B, HQ, D), io.tensor),
        K: T.Tensor((NP, HKV, D), io.tensor),
        V: T.Tensor((NP, HKV, DV), io.tensor),
        tile_page: T.Tensor((B, HKV, NT), INDEX),
        tile_pos: T.Tensor((B, HKV, NT), INDEX),
        tile_count: T.Tensor((B, HKV), INDEX),
        key_lo: T.Tensor((B,), INDEX),
        key_hi: T.Tensor((B,), INDEX),
        o_part: T.Tensor((B, HQ, S, DV), ACCUM),
        lse_part: T.Tensor((B, HQ, S), ACCUM),
        S_out: T.Tensor((B, HQ, NS), ACCUM),
        per_split: T.int32,
        sm_scale: T.float32,
    ):
        with T.Kernel(B, HKV, S, threads=threads) as (b, h, s):
            Q_s = dl.alloc_tile((R, D), io.tile)
            K_s = dl.alloc_tile((PS, D), io.tile)
            V_s = dl.alloc_tile((PS, DV), io.tile)
            P_s = dl.alloc_tile((R, PS), io.tile)
            acc_s = dl.alloc_acc((R, PS), ACCUM)
            acc_o = dl.alloc_acc((R, DV), ACCUM)
            m = dl.alloc_acc((R,), ACCUM)
            m_prev = dl.alloc_acc((R,), ACCUM)
            rescale = dl.alloc_acc((R,), ACCUM)
            l = dl.alloc_acc((R,), ACCUM)
            l_tile = dl.alloc_acc((R,), ACCUM)

            for r, d in dl.par(R, D):
                Q_s[r, d] = T.if_then_else(r < G, io.load(Q[b, h * G + T.min(r, G - 1), d]), 0)
            T.clear(acc_o)
            T.clear(l)
            T.fill(m, NEG_BIG)
            lo = key_lo[b]
            hi = key_hi[b]
            first = s * per_split
            n_tiles = T.max(T.min(tile_count[b, h] - first, per_split), 0)
            for i in T.Pipelined(n_tiles, num_stages=num_stages):
                row0 = tile_page[b, h, first + i] * PS
                pos0 = tile_pos[b, h, first + i]
                copy_k(K, h, row0, NP, K_s)
                copy_v(V, h, row0, NP, V_s)
                T.clear(acc_s)
                T.gemm(Q_s, K_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullCol)
                for r, c in dl.par(R, PS):
                    acc_s[r, c] = T.if_then_else(
                        (r < G) & (pos0 + c > lo) & (pos0 + c <= hi),
                        acc_s[r, c] * (sm_scale * LOG2E),
                        -T.infinity(ACCUM),
                    )
                if scores:
                    write_scores(S_out, b, h, pos0, acc_s)
                online_softmax(acc_s, m, m_prev, rescale, l, l_tile, acc_o, P_s)
                T.gemm(P_s, V_s, acc_o, policy=T.GemmWarpPolicy.FullCol)
            for r, d in dl.par(R, DV):
                if r < G:
                    o_part[b, h * G + r, s, d] = T.if_then_else(l[r] > 0, acc_o[r, d] / l[r], 0)
            for r in dl.par(R):
                if r < G:
                    lse_part[b, h * G + r, s] = T.if_then_else(
                        l[r] > 0, (m[r] + T.log2(l[r])) * LN2, -T.infinity(ACCUM)
                    )

    return main


def group_probs(G: int, cols: int, threads: int, dl: Dialect = SIMT):
    """Decode-time selection's first step, in one pass over cmp's scores: the probabilities of
    each compressed token summed over the G query heads of a kv head,
    ``P[b, h, c] = sum_g exp2(S[b, h*G + g, c] - lse2)`` for ``c < num_cmp[b]``, 0 past it (where
    ``S`` was never written). ``lse`` is the merged natural-log lse of the cmp launch."""
    B, HQ, HKV, NS = T.dynamic("B, HQ, HKV, NS")

    @T.prim_func
    def main(
        S: T.Tensor((B, HQ, NS), ACCUM),
        lse: T.Tensor((B, HQ), ACCUM),
        num_cmp: T.Tensor((B,), INDEX),
        P: T.Tensor((B, HKV, NS), ACCUM),
    ):
        with T.Kernel(T.ceildiv(NS, cols), HKV, B, threads=threads) as (bc, h, b):
            n = num_cmp[b]
            for c in dl.par(cols):
                col = bc * cols + c
                if col < NS:
                    P[b, h, col] = T.if_then_else(
                        col < n,
                        sum(T.exp2(S[b, h * G + g, col] - lse[b, h * G + g] * (1.0 / LN2)) for g in range(G)),
                        0,
                    )

    return main
