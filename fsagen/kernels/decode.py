"""Decode attention: one new query per sequence over key tiles of a paged pool, split-KV.

One program serves the three NSA branches at decode time, because each is "attention of the new
token over some pages of a pool, with the keys of a position range":

* slc: the pages of the selected blocks in the raw pool, positions ``<= p`` (p: the token's own);
* swa: the pages covering ``(p - window, p]`` in the raw pool;
* cmp: the pages of the sequence's compressed keys (the compressed store viewed as a pool), all
  of them visible (a window that completed is in the past).

The glue (``fsagen/decode.py``) lists, per (sequence, kv head), the tiles: ``tile_page`` (a page of
the pool, -1 = none) and ``tile_pos`` (the position of the page's first key), plus the visible
range ``(key_lo, key_hi]`` per sequence. A single query gives one (sequence, kv head) CTA too little
work, so the tile list is cut into ``splits`` runs, one CTA each (split-KV). Each run writes its own
normalised output and natural-log lse; the glue combines the runs exactly (``lse = logsumexp``,
``o = sum_s exp(lse_s - lse) o_s``). The G query heads of a kv head share the K/V tile (rows padded
to 16 for the tensor cores).
"""
import math

import tilelang.language as T

from .target import SIMT
from .tiles import ACCUM, LOG2E, make_online_softmax

INDEX = "int32"
LN2 = math.log(2.0)


def decode_fwd(G: int, D: int, DV: int, dtype: str, page_size: int, threads: int):
    R = (G + 15) // 16 * 16
    PS = page_size
    B, HQ, HKV, P, NT, S = T.dynamic("B, HQ, HKV, P, NT, S")
    online_softmax = make_online_softmax(R, PS, DV, SIMT)  # GPU only (no CPU spelling yet)

    @T.prim_func
    def main(
        Q: T.Tensor((B, HQ, D), dtype),
        K: T.Tensor((P, PS, HKV, D), dtype),
        V: T.Tensor((P, PS, HKV, DV), dtype),
        tile_page: T.Tensor((B, HKV, NT), INDEX),
        tile_pos: T.Tensor((B, HKV, NT), INDEX),
        key_lo: T.Tensor((B,), INDEX),
        key_hi: T.Tensor((B,), INDEX),
        o_part: T.Tensor((B, HQ, S, DV), ACCUM),
        lse_part: T.Tensor((B, HQ, S), ACCUM),
        per_split: T.int32,
        sm_scale: T.float32,
    ):
        with T.Kernel(B, HKV, S, threads=threads) as (b, h, s):
            Q_s = T.alloc_shared((R, D), dtype)
            K_s = T.alloc_shared((PS, D), dtype)
            V_s = T.alloc_shared((PS, DV), dtype)
            P_s = T.alloc_shared((R, PS), dtype)
            acc_s = T.alloc_fragment((R, PS), ACCUM)
            acc_o = T.alloc_fragment((R, DV), ACCUM)
            m = T.alloc_fragment((R,), ACCUM)
            m_prev = T.alloc_fragment((R,), ACCUM)
            rescale = T.alloc_fragment((R,), ACCUM)
            l = T.alloc_fragment((R,), ACCUM)
            l_tile = T.alloc_fragment((R,), ACCUM)

            for r, d in T.Parallel(R, D):
                Q_s[r, d] = T.if_then_else(r < G, Q[b, h * G + r, d], 0)
            T.clear(acc_o)
            T.clear(l)
            T.fill(m, -T.infinity(ACCUM))
            lo = key_lo[b]
            hi = key_hi[b]
            for i in T.serial(per_split):
                t = s * per_split + i
                if t < NT:
                    page = tile_page[b, h, t]
                    if page >= 0:
                        pos0 = tile_pos[b, h, t]
                        T.copy(K[page, :, h, :], K_s)
                        T.copy(V[page, :, h, :], V_s)
                        T.clear(acc_s)
                        T.gemm(Q_s, K_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullCol)
                        for r, c in T.Parallel(R, PS):
                            acc_s[r, c] = T.if_then_else(
                                (r < G) & (pos0 + c > lo) & (pos0 + c <= hi),
                                acc_s[r, c] * (sm_scale * LOG2E),
                                -T.infinity(ACCUM),
                            )
                        online_softmax(acc_s, m, m_prev, rescale, l, l_tile, acc_o, P_s)
                        T.gemm(P_s, V_s, acc_o, policy=T.GemmWarpPolicy.FullCol)
            for r, d in T.Parallel(R, DV):
                if r < G:
                    o_part[b, h * G + r, s, d] = T.if_then_else(l[r] > 0, acc_o[r, d] / l[r], 0)
            for r in T.Parallel(R):
                if r < G:
                    lse_part[b, h * G + r, s] = T.if_then_else(
                        l[r] > 0, (m[r] + T.log2(l[r])) * LN2, -T.infinity(ACCUM)
                    )

    return main
