"""Top-k block selection, fused with the recomputation of the compressed branch's probabilities.

NSA scores selection block j for query t as ``sum_i w(i, j) * sum_{g in group} p[t, g, i]``, where
``p`` are cmp attention's softmax probabilities over compressed tokens i and ``w(i, j)`` counts the
stride segments of token i's window that lie in block j (``../shared/DESIGN.md`` section 2).
``sel_topk`` never stores the ``[Hq, N, Lc]`` probabilities nor the ``[Hkv, N, blocks]`` scores:
per (query tile, kv head) it recomputes each key tile of scores from q, the compressed keys and
cmp's lse exactly as cmp's forward does, sums the G heads of the group in shared memory, folds the
compressed tokens into block scores, and feeds them to a running top-k kept in registers, one
thread per query.

Folding: with ``m = block_size / stride`` segments per block and ``r = kernel_size / stride``
segments per window, block j gathers tokens ``i = j*m + u`` for ``u = -(r-1) .. m-1`` with weight
``w(u) = min(u + r - 1, m - 1) - max(u, 0) + 1``: the same for every block. Key tiles are aligned
to blocks (``keys`` is a multiple of m), so a tile completes its ``keys / m`` blocks except for the
``r - 1`` tokens before its start, which are carried over from the previous tile ("halo").

Selection rule (the reference's, ``fsagen.reference_cmp.select_blocks_reference``): candidates are
the blocks up to the query's own; the first ``init_blocks`` and the own block with the
``local_blocks - 1`` before it are forced (score +inf); the top-k keeps the larger score and, on
equal scores, the lower block (blocks arrive in ascending order and a newcomer must be strictly
greater to pass an entry); the result is written ascending, ``-1`` padded.
"""

import functools
import operator

import tilelang.language as T

from .dense import key_range
from .tiles import ACCUM, LOG2E, make_gather_row_stat, make_gather_rows

INDEX = "int32"


def window_weights(block_size: int, kernel_size: int, stride: int) -> list[tuple[int, int]]:
    """``[(u, w(u))]`` for the compressed tokens ``i = j*m + u`` that touch block j."""
    m, r = block_size // stride, kernel_size // stride
    return [(u, min(u + r - 1, m - 1) - max(u, 0) + 1) for u in range(-(r - 1), m)]


def make_topk_insert(topk: int):
    """Insert (value, block) into a descending register list; equal values keep their order."""

    @T.macro
    def insert(top_v, top_i, value, block):
        if value > top_v[topk - 1]:
            top_v[topk - 1] = value
            top_i[topk - 1] = block
            for s in T.unroll(topk - 1):
                i = topk - 1 - s
                if top_v[i] > top_v[i - 1]:
                    tv = top_v[i]
                    ti = top_i[i]
                    top_v[i] = top_v[i - 1]
                    top_i[i] = top_i[i - 1]
                    top_v[i - 1] = tv
                    top_i[i - 1] = ti

    return insert


def make_sort_ascending(topk: int):
    """Sort block indices ascending with -1 (empty) last: an unrolled odd-even transposition sort."""

    @T.macro
    def sort_ascending(top_i):
        for rnd in T.unroll(topk):
            for s in T.unroll(topk // 2):
                i = 2 * s + rnd % 2
                if i + 1 < topk:
                    a = top_i[i]
                    b = top_i[i + 1]
                    # -1 sorts after every block: compare as unsigned
                    if T.Cast("uint32", a) > T.Cast("uint32", b):
                        top_i[i] = b
                        top_i[i + 1] = a

    return sort_ascending


def sel_topk(G: int, D: int, dtype: str, block_size: int, kernel_size: int, stride: int,
             topk: int, rows: int, keys: int, threads: int):
    """The key loop is not software-pipelined. Measured on the H100 (N=65536, Hkv=4, D=128,
    2026-11-22): a warp-specialised ``T.Pipelined`` (with TileLang's own barriers; explicit
    ``__syncthreads`` there hangs, the producer warps never reach it) took 8.5 / 26.3 / 84.4 ms at
    G = 1 / 4 / 16 against 3.7 / 8.9 / 29.8 ms for this plain loop; pipelining without warp
    specialisation does not lower (non-constant trip count)."""
    if rows % G:
        raise ValueError(f"sel_topk: rows={rows} must be a multiple of G={G}")
    m, r = block_size // stride, kernel_size // stride
    if keys % m or r - 1 > keys:
        raise ValueError(f"sel_topk: keys={keys} must be a multiple of block_size/stride={m} "
                         f"and >= kernel_size/stride - 1 = {r - 1}")
    R, BQ, BN = rows, rows // G, keys
    if BQ > threads:
        raise ValueError(f"sel_topk: rows/G={BQ} queries need as many threads (threads={threads})")
    # ext columns: HALO_A carried tokens (only the last r - 1 are weighted), then the tile's BN;
    # at least one so the carry copy has a fixed, valid shape when r == 1.
    HALO_A, NBT = max(r - 1, 1), keys // m
    weights = window_weights(block_size, kernel_size, stride)
    _, hi = key_range("cmp")
    N, NK, HQ, HKV, NT, B1 = T.dynamic("N, NK, HQ, HKV, NT, B1")
    gather_q = make_gather_rows(R, D, G)
    gather_stat = make_gather_row_stat(R, G)
    insert = make_topk_insert(topk)
    sort_ascending = make_sort_ascending(topk)

    def group_sum(P, q, c):
        return functools.reduce(operator.add, [P[q * G + g, c] for g in range(G)])

    def block_sum(ext, q, jj):
        return functools.reduce(operator.add, [ext[q, HALO_A + jj * m + u] * float(w) for u, w in weights])

    @T.prim_func
    def main(
        Q: T.Tensor((N, HQ, D), dtype),
        K: T.Tensor((NK, HKV, D), dtype),
        lse2: T.Tensor((N, HQ), ACCUM),
        tiles: T.Tensor((NT, 2), INDEX),
        cu_q: T.Tensor((B1,), INDEX),
        cu_k: T.Tensor((B1,), INDEX),
        topk_idx: T.Tensor((HKV, N, topk), INDEX),
        init_blocks: T.int32,
        local_blocks: T.int32,
        sm_scale: T.float32,
    ):
        with T.Kernel(NT, HKV, threads=threads) as (bt, h):
            Q_s = T.alloc_shared((R, D), dtype)
            K_s = T.alloc_shared((BN, D), dtype)
            row_tok = T.alloc_shared((R,), INDEX)
            row_lse2 = T.alloc_shared((R,), ACCUM)
            acc_s = T.alloc_fragment((R, BN), ACCUM)
            P_s = T.alloc_shared((R, BN), ACCUM)
            ext = T.alloc_shared((BQ, HALO_A + BN), ACCUM)
            blk_s = T.alloc_shared((BQ, NBT), ACCUM)
            top_v = T.alloc_local((topk,), ACCUM)
            top_i = T.alloc_local((topk,), INDEX)
            tx = T.get_thread_binding()

            seq = tiles[bt, 0]
            p0 = tiles[bt, 1]
            if seq >= 0:
                q0 = cu_q[seq]
                k0 = cu_k[seq]
                p1 = T.min(p0 + BQ, cu_q[seq + 1] - q0)
                k_hi = T.min(hi(p1 - 1, kernel_size, stride), cu_k[seq + 1] - k0)
                own = (p0 + tx) // block_size
                for rr in T.Parallel(R):
                    row_tok[rr] = T.if_then_else(p0 + rr // G < p1, q0 + p0 + rr // G, -1)
                gather_stat(lse2, h, row_tok, row_lse2)
                gather_q(Q, h, row_tok, Q_s)
                for q, e in T.Parallel(BQ, HALO_A + BN):
                    ext[q, e] = 0
                for i in T.unroll(topk):
                    top_v[i] = -1.0
                    top_i[i] = -1
                n_tiles = T.ceildiv(k_hi, BN)
                for it in T.serial(n_tiles):
                    j0 = it * BN
                    T.copy(K[k0 + j0:k0 + j0 + BN, h, :], K_s)
                    T.clear(acc_s)
                    T.gemm(Q_s, K_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                    for rr, c in T.Parallel(R, BN):
                        P_s[rr, c] = T.if_then_else(
                            (row_tok[rr] >= 0)
                            & (j0 + c < k_hi)
                            & (j0 + c < hi(p0 + rr // G, kernel_size, stride)),
                            T.exp2(acc_s[rr, c] * (sm_scale * LOG2E) - row_lse2[rr]),
                            0,
                        )
                    for q, c in T.Parallel(BQ, BN):
                        ext[q, HALO_A + c] = group_sum(P_s, q, c)
                    for q, jj in T.Parallel(BQ, NBT):
                        blk_s[q, jj] = block_sum(ext, q, jj)
                    for q, e in T.Parallel(BQ, HALO_A):
                        ext[q, e] = ext[q, BN + e]
                    T.sync_threads()
                    if tx < BQ and p0 + tx < p1:
                        for jj in T.serial(NBT):
                            blk = j0 // m + jj
                            if blk <= own:
                                insert(top_v, top_i,
                                       T.if_then_else(
                                           (blk < init_blocks) or (blk > own - local_blocks),
                                           T.infinity(ACCUM), blk_s[tx, jj]),
                                       blk)
                    T.sync_threads()
                if tx < BQ and p0 + tx < p1:
                    # blocks up to the query's own that no visible compressed token touches: score 0
                    for x in T.serial(T.max(own + 1 - n_tiles * NBT, 0)):
                        blk = n_tiles * NBT + x
                        insert(top_v, top_i,
                               T.if_then_else((blk < init_blocks) or (blk > own - local_blocks),
                                              T.infinity(ACCUM), 0.0),
                               blk)
                    sort_ascending(top_i)
                    for i in T.unroll(topk):
                        topk_idx[h, q0 + p0 + tx, i] = top_i[i]

    return main
