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
from .target import SIMT, Dialect
from .tiles import ACCUM, LOG2E, make_gather_row_stat, make_gather_rows

INDEX = "int32"


def window_weights(block_size: int, kernel_size: int, stride: int) -> list[tuple[int, int]]:
    """``[(u, w(u))]`` for the compressed tokens ``i = j*m + u`` that touch block j."""
    m, r = block_size // stride, kernel_size // stride
    return [(u, min(u + r - 1, m - 1) - max(u, 0) + 1) for u in range(-(r - 1), m)]


def make_topk_insert(topk: int):
    """Insert (value, block) into a descending register list, branch-free: position i takes the
    old entry i-1 if that one is below ``value``, else ``value`` if the old entry i is below it,
    else keeps its entry. Equal values keep their order (a newcomer goes after them), and a value
    not above the last entry changes nothing. Branch-free because the query threads of a warp
    insert at different times: a branchy bubble would run for the whole warp whenever one
    thread needs it."""

    @T.macro
    def insert(top_v, top_i, lane, value, block):
        for s in T.unroll(topk - 1):
            i = topk - 1 - s
            top_i[lane, i] = T.if_then_else(top_v[lane, i - 1] < value, top_i[lane, i - 1],
                                            T.if_then_else(top_v[lane, i] < value, block, top_i[lane, i]))
            top_v[lane, i] = T.if_then_else(top_v[lane, i - 1] < value, top_v[lane, i - 1],
                                            T.if_then_else(top_v[lane, i] < value, value, top_v[lane, i]))
        top_i[lane, 0] = T.if_then_else(top_v[lane, 0] < value, block, top_i[lane, 0])
        top_v[lane, 0] = T.if_then_else(top_v[lane, 0] < value, value, top_v[lane, 0])

    return insert


def make_sort_ascending(topk: int):
    """Sort block indices ascending with -1 (empty) last: an unrolled odd-even transposition sort."""

    @T.macro
    def sort_ascending(top_i, lane):
        for rnd in T.unroll(topk):
            for s in T.unroll(topk // 2):
                i = 2 * s + rnd % 2
                if i + 1 < topk:
                    a = top_i[lane, i]
                    b = top_i[lane, i + 1]
                    # -1 sorts after every block: compare as unsigned
                    if T.Cast("uint32", a) > T.Cast("uint32", b):
                        top_i[lane, i] = b
                        top_i[lane, i + 1] = a

    return sort_ascending


def sel_topk(G: int, D: int, dtype: str, block_size: int, kernel_size: int, stride: int,
             topk: int, rows: int, keys: int, threads: int, dl: Dialect = SIMT):
    """Measured on the H100 (N=65536, Hkv=4, D=128, bf16, 2026-11-22; ms at G = 1 / 4 / 16):

    * the key loop is not software-pipelined: a warp-specialised ``T.Pipelined`` took 8.5 / 26.3 /
      84.4 against 3.7 / 8.9 / 29.8 for the plain loop (explicit ``__syncthreads`` inside it hangs;
      pipelining without warp specialisation does not lower, non-constant trip count), and a
      hand-made cp.async double buffer of the key tile was slower too (4.6 / 9.9 / 32.8: the
      second buffer costs a CTA per SM, and occupancy hides more latency than the prefetch);
    * the top-k update inserts only the tile's candidates (blocks above the current k-th score,
      one per round of a popcount loop) with a branch-free insertion, block scores are stored
      block-major (conflict-free reads by the query threads), per-row key limits are computed
      once per tile row and, at G = 1, the probabilities go straight to the fold buffer:
      3.65 / 8.76 / 30.5 -> 2.1 / 6.9 / 23.9. What remains is mostly the float32 shared-memory
      round trip of the probabilities (the group sum) and the per-element masking.
    """
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
    if NBT > 32:
        raise ValueError(f"sel_topk: keys={keys} cover {NBT} blocks per tile; the candidate mask holds 32")
    weights = window_weights(block_size, kernel_size, stride)
    _, hi = key_range("cmp")
    N, NK, HQ, HKV, NT, B1 = T.dynamic("N, NK, HQ, HKV, NT, B1")
    io = dl.io(dtype)
    copy_k = dl.make_copy_rows(BN, D, io)
    gather_q = make_gather_rows(R, D, G, dl, io)
    gather_stat = make_gather_row_stat(R, G, dl)
    bits = dl.set_bits
    LANES = dl.lanes(BQ)  # per-query state rows: the query threads' registers, or a row per query
    insert = make_topk_insert(topk)
    sort_ascending = make_sort_ascending(topk)

    def group_sum(P, q, c):
        return functools.reduce(operator.add, [P[q * G + g, c] for g in range(G)])

    def prob(acc_s, row_hi, row_lse2, rr, c, j0, sm_scale):
        # cmp's probability of row rr for key column c of the tile at j0 (0 where not visible)
        return T.if_then_else(j0 + c < row_hi[rr], T.exp2(acc_s[rr, c] * (sm_scale * LOG2E) - row_lse2[rr]), 0)

    def block_score(blk, own, score, init_blocks, local_blocks):
        # forced blocks (the first init_blocks, the own one and the local_blocks - 1 before it)
        return T.if_then_else((blk < init_blocks) | (blk > own - local_blocks), T.infinity(ACCUM), score)

    def block_sum(ext, q, jj):
        return functools.reduce(operator.add, [ext[q, HALO_A + jj * m + u] * float(w) for u, w in weights])

    @T.prim_func
    def main(
        Q: T.Tensor((N, HQ, D), io.tensor),
        K: T.Tensor((NK, HKV, D), io.tensor),
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
            Q_s = dl.alloc_tile((R, D), io.tile)
            K_s = dl.alloc_tile((BN, D), io.tile)
            row_tok = dl.alloc_tile((R,), INDEX)
            row_lse2 = dl.alloc_tile((R,), ACCUM)
            row_hi = dl.alloc_tile((R,), INDEX)  # the row's visible keys end here (0: dead row)
            q0 = T.alloc_var(INDEX)  # per-CTA scalars held in registers, not re-read per use
            k0 = T.alloc_var(INDEX)
            p1 = T.alloc_var(INDEX)
            k_hi = T.alloc_var(INDEX)
            acc_s = dl.alloc_acc((R, BN), ACCUM)
            # +4 columns: the accumulator fragment's rows land on distinct banks when stored
            P_s = dl.alloc_tile((R, BN + 4) if G > 1 else (1, 1), ACCUM)
            ext = dl.alloc_tile((BQ, HALO_A + BN), ACCUM)
            blk_s = dl.alloc_tile((NBT, BQ), ACCUM)
            top_v = T.alloc_local((LANES, topk), ACCUM)
            top_i = T.alloc_local((LANES, topk), INDEX)
            cand = T.alloc_var(INDEX)
            jsel = T.alloc_var(INDEX)
            ncand = T.alloc_var(INDEX)

            seq = tiles[bt, 0]
            p0 = tiles[bt, 1]
            if seq >= 0:
                q0 = cu_q[seq]
                k0 = cu_k[seq]
                p1 = T.min(p0 + BQ, cu_q[seq + 1] - q0)
                k_hi = T.min(hi(p1 - 1, kernel_size, stride), cu_k[seq + 1] - k0)
                for rr in dl.par(R):
                    row_tok[rr] = T.if_then_else(p0 + rr // G < p1, q0 + p0 + rr // G, -1)
                    row_hi[rr] = T.if_then_else(p0 + rr // G < p1, hi(p0 + rr // G, kernel_size, stride), 0)
                gather_stat(lse2, h, row_tok, row_lse2)
                gather_q(Q, h, row_tok, Q_s)
                for q, e in dl.par(BQ, HALO_A + BN):
                    ext[q, e] = 0
                for lane in T.serial(LANES):
                    for i in T.unroll(topk):
                        top_v[lane, i] = -1.0
                        top_i[lane, i] = -1
                n_tiles = T.ceildiv(k_hi, BN)
                for it in T.serial(n_tiles):
                    j0 = it * BN
                    copy_k(K, h, k0 + j0, NK, K_s)
                    T.clear(acc_s)
                    T.gemm(Q_s, K_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                    if G == 1:  # one head: the probabilities are the group sums
                        for rr, c in dl.par(R, BN):
                            ext[rr, HALO_A + c] = prob(acc_s, row_hi, row_lse2, rr, c, j0, sm_scale)
                    else:
                        for rr, c in dl.par(R, BN):
                            P_s[rr, c] = prob(acc_s, row_hi, row_lse2, rr, c, j0, sm_scale)
                        for q, c in dl.par(BQ, BN):
                            ext[q, HALO_A + c] = group_sum(P_s, q, c)
                    for jj, q in dl.par(NBT, BQ):
                        blk_s[jj, q] = block_sum(ext, q, jj)
                    for q, e in dl.par(BQ, HALO_A):
                        ext[q, e] = ext[q, BN + e]
                    T.sync_threads()
                    for lane in T.serial(LANES):
                        tx = dl.lane_id(lane)  # the query this lane serves
                        own = (p0 + tx) // block_size
                        if tx < BQ and p0 + tx < p1:
                            # the tile's candidates: blocks up to the own one that beat the current
                            # k-th score; only those are inserted, one candidate per round
                            cand = 0
                            for jj in T.unroll(NBT):
                                cand = cand | T.if_then_else(
                                    (j0 // m + jj <= own)
                                    & (block_score(j0 // m + jj, own, blk_s[jj, tx], init_blocks, local_blocks)
                                       > top_v[lane, topk - 1]),
                                    T.shift_left(1, jj), 0)
                            ncand = bits.rounds(cand, NBT)
                            for it in T.serial(ncand):
                                jsel = bits.pick(cand, it)
                                insert(top_v, top_i, lane,
                                       T.if_then_else(bits.live(cand, jsel),
                                                      block_score(j0 // m + jsel, own, blk_s[jsel, tx],
                                                                  init_blocks, local_blocks),
                                                      -T.infinity(ACCUM)),
                                       j0 // m + jsel)
                                cand = bits.rest(cand)
                    T.sync_threads()
                for lane in T.serial(LANES):
                    tx = dl.lane_id(lane)
                    own = (p0 + tx) // block_size
                    if tx < BQ and p0 + tx < p1:
                        # blocks up to the query's own that no visible compressed token touches: score 0
                        for x in T.serial(T.max(own + 1 - n_tiles * NBT, 0)):
                            blk = n_tiles * NBT + x
                            insert(top_v, top_i, lane, block_score(blk, own, 0.0, init_blocks, local_blocks), blk)
                        sort_ascending(top_i, lane)
                        for i in T.unroll(topk):
                            topk_idx[h, q0 + p0 + tx, i] = top_i[lane, i]

    return main
