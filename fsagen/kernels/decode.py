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
    B, BQ, HQ, HKV, NP, NT, S, NS = T.dynamic("B, BQ, HQ, HKV, NP, NT, S, NS")
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
        Q: T.Tensor((BQ, HQ, D), io.tensor),
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
                Q_s[r, d] = T.if_then_else(r < G, io.load(Q[b % BQ, h * G + T.min(r, G - 1), d]), 0)
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


# --------------------------------------------------------------------------- the step's glue stages
#
# Decode-time selection and the split merge are small per-sequence computations; as torch ops they
# were ~30 launches of a few microseconds each, more than the attention itself. These stages do
# them in four launches. They are written in "lanes": on a GPU a lane is a thread of the CTA, on
# the CPU a serial loop (``Dialect.lane_loop`` / ``lane_id``), so each lane's code is plain scalar code.

LANES = 128


def decode_prep(dl: Dialect = SIMT):
    """Per query row of a step (a new token of sequence ``seq_idx[b]``, ``back[b]`` tokens before
    its newest), from the cache's device lengths (no host read): the token's position
    ``pos = length - 1 - back``, the compressed tokens it sees ``num_cmp``, the cmp launch's tile counts
    (``ceil(num_cmp / page)`` per kv head) and key range ``(-1, num_cmp - 1]``, and the key ranges
    of the slc+swa launch's ``2B`` rows: ``(-1, pos]`` (slc, rows ``< B``) and
    ``(pos - window, pos]`` (swa)."""
    B, NSEQ, HKV, B2 = T.dynamic("B, NSEQ, HKV, B2")

    @T.prim_func
    def main(
        seq_idx: T.Tensor((B,), "int64"),
        back: T.Tensor((B,), INDEX),
        lengths: T.Tensor((NSEQ,), INDEX),
        pos: T.Tensor((B,), INDEX),
        num_cmp: T.Tensor((B,), INDEX),
        cmp_count: T.Tensor((B, HKV), INDEX),
        cmp_lo: T.Tensor((B,), INDEX),
        cmp_hi: T.Tensor((B,), INDEX),
        raw_lo: T.Tensor((B2,), INDEX),
        raw_hi: T.Tensor((B2,), INDEX),
        kernel_size: T.int32,
        stride: T.int32,
        page_size: T.int32,
        window_size: T.int32,
    ):
        with T.Kernel(T.ceildiv(B, LANES), threads=LANES) as bx:
            length = T.alloc_var(INDEX)
            lc = T.alloc_var(INDEX)
            for lane in dl.lane_loop(LANES):
                b = bx * LANES + dl.lane_id(lane)
                if b < B:
                    length = lengths[seq_idx[b]] - back[b]  # the row's token is the newest here
                    lc = T.if_then_else(length >= kernel_size, (length - kernel_size) // stride + 1, 0)
                    pos[b] = length - 1
                    num_cmp[b] = lc
                    cmp_lo[b] = -1
                    cmp_hi[b] = lc - 1
                    for h in T.serial(HKV):
                        cmp_count[b, h] = T.ceildiv(lc, page_size)
                    raw_lo[b] = -1
                    raw_hi[b] = length - 1
                    raw_lo[B + b] = length - 1 - window_size
                    raw_hi[B + b] = length - 1

    return main


def decode_block_keys(G: int, dl: Dialect = SIMT):
    """Decode-time selection's scores, one lane per block ``j`` of each (sequence, kv head): cmp's
    probabilities (``p = exp2(s2 - lse2)``, lse2 merged here from the cmp launch's split runs)
    summed over the G heads, folded into blocks with NSA's window/block overlap (a compressed
    token's window is ``nu = kernel_size / stride`` stride segments; segment ``c`` of block ``j``
    gets ``p[c - u]``, ``u < nu``), written as a unique int64 sort key: the score's float bits
    (``+inf`` for forced blocks: the first ``init_blocks``, the own block and the
    ``local_blocks - 1`` before it; ``-inf`` past the own block) above the bits ``2^24 - 1 - j``,
    so that one integer top-k picks the prefill's blocks with ties to the lower block."""
    B, HQ, HKV, NS, S, NB = T.dynamic("B, HQ, HKV, NS, S, NB")

    @T.prim_func
    def main(
        S_in: T.Tensor((B, HQ, NS), ACCUM),
        lse_part: T.Tensor((B, HQ, S), ACCUM),
        num_cmp: T.Tensor((B,), INDEX),
        pos: T.Tensor((B,), INDEX),
        keys: T.Tensor((B, HKV, NB), "int64"),
        nu: T.int32,
        per_block: T.int32,
        block_size: T.int32,
        init_blocks: T.int32,
        local_blocks: T.int32,
    ):
        with T.Kernel(T.ceildiv(NB, LANES), HKV, B, threads=LANES) as (bx, h, b):
            lse2 = dl.alloc_tile((G,), ACCUM)
            m = T.alloc_var(ACCUM)
            acc = T.alloc_var(ACCUM)
            score = T.alloc_var(ACCUM)
            key = T.alloc_var(ACCUM)
            for lane in dl.lane_loop(LANES):  # the G heads' lse (log2), merged over the split runs
                g = dl.lane_id(lane)
                if g < G:
                    m = -T.infinity(ACCUM)
                    for s in T.serial(S):
                        m = T.max(m, lse_part[b, h * G + g, s])
                    acc = 0
                    for s in T.serial(S):
                        acc += T.if_then_else(m > -T.infinity(ACCUM), T.exp(lse_part[b, h * G + g, s] - m), 0)
                    lse2[g] = T.if_then_else(acc > 0, (m + T.log(acc)) * (1.0 / LN2), T.infinity(ACCUM))
            n = num_cmp[b]
            own = pos[b] // block_size
            for lane in dl.lane_loop(LANES):
                j = bx * LANES + dl.lane_id(lane)
                if j < NB:
                    score = 0
                    for t in T.serial(per_block):
                        for u in T.serial(nu):
                            c = j * per_block + t - u
                            if (c >= 0) & (c < n):
                                score += sum(T.exp2(S_in[b, h * G + g, c] - lse2[g]) for g in range(G))
                    key = T.if_then_else(
                        j > own, -T.infinity(ACCUM),
                        T.if_then_else((j < init_blocks) | (j > own - local_blocks), T.infinity(ACCUM), score))
                    keys[b, h, j] = T.Cast("int64", T.reinterpret("int32", key)) * T.int64(1 << 24) \
                        + T.Cast("int64", (1 << 24) - 1 - j)

    return main


def decode_tiles(dl: Dialect = SIMT):
    """The slc+swa launch's tile lists from the top-k candidates (``cand [B, HKV, K]``, the blocks
    of the K largest keys, any order): per (sequence, kv head), the candidates at or before the
    own block sorted ascending (rank = how many valid candidates are smaller), written to
    ``topk_idx [B, HKV, K]`` with -1 padding; then the pages of the selected blocks (row ``b``)
    and of the window ``(pos - window, pos]`` (row ``B + b``), valid ones first (only the own
    block / page can be partly past ``pos``, and it comes last), with their count."""
    B, HKV, K, NSEQ, MAXP, NT, B2 = T.dynamic("B, HKV, K, NSEQ, MAXP, NT, B2")

    @T.prim_func
    def main(
        cand: T.Tensor((B, HKV, K), "int64"),
        pos: T.Tensor((B,), INDEX),
        seq_idx: T.Tensor((B,), "int64"),
        block_table: T.Tensor((NSEQ, MAXP), INDEX),
        topk_idx: T.Tensor((B, HKV, K), INDEX),
        tile_page: T.Tensor((B2, HKV, NT), INDEX),
        tile_pos: T.Tensor((B2, HKV, NT), INDEX),
        tile_count: T.Tensor((B2, HKV), INDEX),
        block_size: T.int32,
        page_size: T.int32,
        window_size: T.int32,
    ):
        with T.Kernel(B, HKV, threads=LANES) as (b, h):
            sel = dl.alloc_tile((LANES,), INDEX)
            rank = T.alloc_var(INDEX)
            n_valid = T.alloc_var(INDEX)
            blk = T.alloc_var(INDEX)
            page_no = T.alloc_var(INDEX)
            p = pos[b]
            own = p // block_size
            last_page = p // page_size
            sub = block_size // page_size
            seq = seq_idx[b]
            for lane in dl.lane_loop(LANES):
                i = dl.lane_id(lane)
                if i < K:
                    rank = 0
                    n_valid = 0
                    for k in T.serial(K):
                        if cand[b, h, k] <= own:
                            n_valid += 1
                            if cand[b, h, k] < cand[b, h, i]:
                                rank += 1
                    if cand[b, h, i] <= own:
                        sel[rank] = T.Cast(INDEX, cand[b, h, i])
                        topk_idx[b, h, rank] = T.Cast(INDEX, cand[b, h, i])
                    if i >= n_valid:
                        sel[i] = -1
                        topk_idx[b, h, i] = -1
            for it in T.serial(T.ceildiv(NT, LANES)):
                for lane in dl.lane_loop(LANES):
                    e = it * LANES + dl.lane_id(lane)
                    if e < NT:
                        blk = T.if_then_else(e // sub < K, sel[T.min(e // sub, LANES - 1)], -1)
                        page_no = blk * sub + e % sub
                        if (blk >= 0) & (page_no <= last_page):
                            tile_page[b, h, e] = block_table[seq, page_no]
                            tile_pos[b, h, e] = page_no * page_size
                        else:
                            tile_page[b, h, e] = 0
                            tile_pos[b, h, e] = 0
                        page_no = T.max(p - window_size + 1, 0) // page_size + e
                        if page_no <= last_page:
                            tile_page[B + b, h, e] = block_table[seq, page_no]
                            tile_pos[B + b, h, e] = page_no * page_size
                        else:
                            tile_page[B + b, h, e] = 0
                            tile_pos[B + b, h, e] = 0
            for lane in dl.lane_loop(LANES):
                if dl.lane_id(lane) == 0:
                    n_valid = 0
                    for k in T.serial(K):
                        if sel[k] >= 0:
                            n_valid += 1
                            blk = sel[k]
                    tile_count[b, h] = T.if_then_else(
                        n_valid > 0, (n_valid - 1) * sub + T.min(sub, last_page - blk * sub + 1), 0)
                    tile_count[B + b, h] = last_page - T.max(p - window_size + 1, 0) // page_size + 1

    return main


def decode_combine(DV: int, dl: Dialect = SIMT):
    """The gated output of the step, one lane per feature ``d`` of each (sequence, query head):
    each branch's split runs merged exactly (``o = sum_s exp(lse_s - lse) o_s``, 0 where no run
    saw a key), then ``g_cmp o_cmp + g_slc o_slc + g_swa o_swa`` in float32. ``cmp_*`` are the
    cmp launch's runs, ``raw_*`` the slc+swa launch's (rows ``b`` and ``B + b``); gates
    ``[B, GH, 3]`` with ``GH`` 1 (per sequence) or Hq."""
    B, HQ, S1, B2, S2, GH = T.dynamic("B, HQ, S1, B2, S2, GH")

    @T.macro
    def merged(o_part, lse_part, row, hq, d, st):
        # st: [max, sum of weights, weighted sum] of the runs (a local array: macro arguments
        # cannot be reassigned)
        st[0] = -T.infinity(ACCUM)
        for s in T.serial(lse_part.shape[2]):
            st[0] = T.max(st[0], lse_part[row, hq, s])
        st[1] = 0
        st[2] = 0
        for s in T.serial(lse_part.shape[2]):
            if lse_part[row, hq, s] > -T.infinity(ACCUM):
                st[1] += T.exp(lse_part[row, hq, s] - st[0])
                st[2] += T.exp(lse_part[row, hq, s] - st[0]) * o_part[row, hq, s, d]

    @T.prim_func
    def main(
        cmp_o: T.Tensor((B, HQ, S1, DV), ACCUM),
        cmp_lse: T.Tensor((B, HQ, S1), ACCUM),
        raw_o: T.Tensor((B2, HQ, S2, DV), ACCUM),
        raw_lse: T.Tensor((B2, HQ, S2), ACCUM),
        gates: T.Tensor((B, GH, 3), ACCUM),
        out: T.Tensor((B, HQ, DV), ACCUM),
    ):
        with T.Kernel(T.ceildiv(DV, LANES), HQ, B, threads=LANES) as (dx, hq, b):
            st = T.alloc_local((3,), ACCUM)
            o = T.alloc_var(ACCUM)
            gh = hq % GH
            for lane in dl.lane_loop(LANES):
                d = dx * LANES + dl.lane_id(lane)
                if d < DV:
                    merged(cmp_o, cmp_lse, b, hq, d, st)
                    o = gates[b, gh, 0] * T.if_then_else(st[1] > 0, st[2] / st[1], 0)
                    merged(raw_o, raw_lse, b, hq, d, st)
                    o += gates[b, gh, 1] * T.if_then_else(st[1] > 0, st[2] / st[1], 0)
                    merged(raw_o, raw_lse, B + b, hq, d, st)
                    o += gates[b, gh, 2] * T.if_then_else(st[1] > 0, st[2] / st[1], 0)
                    out[b, hq, d] = o

    return main
