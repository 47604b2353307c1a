"""Selected-block attention (slc) programs, in the two loop orders.

KV-block outer (FSA order), three programs over a *work-item table* built on the GPU by
``fsagen.slc_index``. A work item is one (kv head, KV block) pair and a contiguous run of at most
``rows // G * tiles_per_item`` entries of that block's query list; the KV block is loaded once per
item and the selecting queries are gathered, all G heads of the group together, into tiles of
``rows`` (query, head) rows.

* ``kv_fwd_stats``: per (query, block) entry and head, the log-sum-exp (natural log) of that
  block's visible scores, written to ``part_lse[h, t, slot, g]``. The glue reduces it over the
  slots to the exact per-query lse (no shared shift: true statistics).
* ``kv_fwd_accum``: recomputes the scores, forms the exact probabilities ``exp2(s2 - lse2)`` and
  adds ``P @ V`` into a float32 accumulator (how: the ``scatter`` knob, ``tiles.py``). Two exact
  passes cost 1.5x the matmul
  FLOPs of one but need no per-(query, block) partial outputs, whose size (N * topk * Hq * Dv) is
  what makes a single pass impractical at long N.
* ``kv_bwd``: per item, dK and dV accumulate in registers across the item's tiles and are added
  once to float32 buffers; dQ is either atomically accumulated (``with_dq``) or left to ``q_bwd_dq``.

``kv_fwd_accum`` and ``kv_bwd`` take an accumulator *window* ``[q_lo, q_hi)`` of query tokens: they
run only the items whose queries lie in it (an item's queries lie in one query chunk of the index,
and windows are whole chunks) and add into ``o_acc`` / ``dq_acc`` rows ``token - q_lo``, so the
float32 accumulator is the window's, not the sequence's.

Query outer (NSA order), one CTA per (token, kv head), the G heads of the group padded to 16 rows:

* ``q_fwd``: online softmax over the token's selected blocks; writes o and lse (natural log).
  With ``tokens`` > 1 a CTA serves that many consecutive tokens and walks the union of their
  blocks, listed by ``q_fwd_plan``.
* ``q_bwd_dq``: dQ by recomputing P from lse.

The kv-outer programs take ``gather``: ``"sync"`` gathers each tile's query rows with loads that
block, then computes; ``"async"`` copies the next tile's rows with ``cp.async`` (16 bytes a thread
and chunk, one group a tile) into a second tile while the current one computes.

The kv-outer programs and ``q_fwd`` take ``ctas_per_sm``: when > 0, the compiler must leave
registers for that many resident CTAs per SM (``__launch_bounds__``' second argument; the
accumulate pass and the backward otherwise fit 2, at 188 and 238 registers).

``row_dot`` computes the backward's ``delta = rowsum(dO * O)`` in float32 without float32 copies
of dO and O.

Argument order of every program is the order of its parameters below; the glue in
``fsagen/slc.py`` is the only caller.
"""

import tilelang.language as T

from .target import SIMT, Dialect
from .tiles import (ACCUM, LN2, LOG2E, make_gather_row_stat, make_gather_rows, make_item_rows,
                    make_issue_item_tile, make_kv_grads_from_probs, make_load_kv_rows, make_mask_scores,
                    make_mask_user_scores, make_online_softmax, make_probs_from_lse, make_store_normalised_rows,
                    make_scatter_add_rows)

INDEX = "int32"


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


GATHERS = ("sync", "async")


def _check_gather(gather: str) -> None:
    if gather not in GATHERS:
        raise ValueError(f"kv-outer programs: gather={gather!r} must be one of {GATHERS}")


def kv_fwd_stats(G: int, D: int, BS: int, dtype: str, rows: int, threads: int, ctas_per_sm: int = 0,
                 gather: str = "sync", dl: Dialect = SIMT):
    """``gather``: as in ``kv_fwd_accum``."""
    _check_gather(gather)
    R, Q_PER_TILE = rows, rows // G
    N, HQ, HKV, NE, NI, HC, TOPK = T.dynamic("N, HQ, HKV, NE, NI, HC, TOPK")
    io = dl.io(dtype)
    load_kv = make_load_kv_rows(BS, D, dl, io)
    mask = make_mask_scores(R, BS, dl)
    item_rows = make_item_rows(R, G, dl)
    gather_q = make_gather_rows(R, D, G, dl, io)
    issue_q = make_issue_item_tile(R, D, G, dl, io)

    @T.macro
    def stats_tile(Q_s, K_s, row_tok, row_slot, acc_s, m, l, part_lse, h, kb, h_lo, sm_scale):
        """The per-row log-sum-exp of one tile of gathered rows against the block."""
        T.clear(acc_s)
        T.gemm(Q_s, K_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
        mask(acc_s, row_tok, kb, sm_scale * LOG2E)
        T.reduce_max(acc_s, m, dim=1, clear=True)
        for r, c in dl.par(R, BS):
            acc_s[r, c] = T.exp2(acc_s[r, c] - m[r])
        T.reduce_sum(acc_s, l, dim=1)
        for r in dl.par(R):
            if row_tok[r] >= 0:
                part_lse[h - h_lo, row_tok[r], row_slot[r], r % G] = (m[r] + T.log2(l[r])) * LN2

    @T.macro
    def async_tile(tile, n_tiles, Q_cur, Q_next, K_s, row_tok, row_slot, acc_s, m, l, Q, ent_q, ent_k, part_lse,
                   h, kb, e0, e1, h_lo, sm_scale):
        """Tile ``tile`` from ``Q_cur`` while the next tile's copy into ``Q_next`` is in flight."""
        if tile + 1 < n_tiles:
            issue_q(Q, h, ent_q, e0, e1, tile + 1, Q_next)
            dl.commit_async()
            dl.wait_async(1)
        else:
            dl.wait_async(0)
        item_rows(ent_q, e0, e1, tile, row_tok)
        item_rows(ent_k, e0, e1, tile, row_slot)
        T.sync_threads()
        stats_tile(Q_cur, K_s, row_tok, row_slot, acc_s, m, l, part_lse, h, kb, h_lo, sm_scale)
        T.sync_threads()

    @T.prim_func
    def main(
        Q: T.Tensor((N, HQ, D), io.tensor),
        K: T.Tensor((N, HKV, D), io.tensor),
        items: T.Tensor((NI, 4), INDEX),
        ent_q: T.Tensor((NE,), INDEX),
        ent_k: T.Tensor((NE,), INDEX),
        part_lse: T.Tensor((HC, N, TOPK, G), ACCUM),
        h_lo: T.int32,
        sm_scale: T.float32,
    ):
        with T.Kernel(NI, threads=threads) as bx:
            dl.min_ctas_per_sm(ctas_per_sm)
            K_s = dl.alloc_tile((BS, D), io.tile)
            Q_s = dl.alloc_tile((R, D), io.tile)
            row_tok = dl.alloc_tile((R,), INDEX)
            row_slot = dl.alloc_tile((R,), INDEX)
            acc_s = dl.alloc_acc((R, BS), ACCUM)
            m = dl.alloc_acc((R,), ACCUM)
            l = dl.alloc_acc((R,), ACCUM)
            Q_next = dl.alloc_tile((R, D), io.tile) if gather == "async" else None

            h = items[bx, 0]
            kb = items[bx, 1]
            e0 = items[bx, 2]
            e1 = items[bx, 3]
            if e1 > e0:
                load_kv(K, h, kb, N, K_s)
                n_tiles = T.ceildiv(e1 - e0, Q_PER_TILE)
                if gather == "async":
                    issue_q(Q, h, ent_q, e0, e1, 0, Q_s)
                    dl.commit_async()
                    for tile in T.serial(n_tiles):
                        if tile % 2 == 0:
                            async_tile(tile, n_tiles, Q_s, Q_next, K_s, row_tok, row_slot, acc_s, m, l, Q, ent_q,
                                       ent_k, part_lse, h, kb, e0, e1, h_lo, sm_scale)
                        else:
                            async_tile(tile, n_tiles, Q_next, Q_s, K_s, row_tok, row_slot, acc_s, m, l, Q, ent_q,
                                       ent_k, part_lse, h, kb, e0, e1, h_lo, sm_scale)
                else:
                    for tile in T.serial(n_tiles):
                        item_rows(ent_q, e0, e1, tile, row_tok)
                        item_rows(ent_k, e0, e1, tile, row_slot)
                        gather_q(Q, h, row_tok, Q_s)
                        stats_tile(Q_s, K_s, row_tok, row_slot, acc_s, m, l, part_lse, h, kb, h_lo, sm_scale)

    return main


def kv_fwd_accum(G: int, D: int, DV: int, BS: int, dtype: str, rows: int, threads: int,
                 scatter: str, ctas_per_sm: int = 0, gather: str = "sync", dl: Dialect = SIMT):
    """``gather = "async"``: the next tile's query rows are copied (cp.async) while the current
    tile computes, into a second Q tile; ``"sync"``: each tile's rows are gathered, then used."""
    _check_gather(gather)
    R, Q_PER_TILE = rows, rows // G
    N, HQ, HKV, NE, NI, HCG, NW = T.dynamic("N, HQ, HKV, NE, NI, HCG, NW")
    io = dl.io(dtype)
    load_k = make_load_kv_rows(BS, D, dl, io)
    load_v = make_load_kv_rows(BS, DV, dl, io)
    probs = make_probs_from_lse(R, BS, dl)
    item_rows = make_item_rows(R, G, dl)
    gather_q = make_gather_rows(R, D, G, dl, io)
    issue_q = make_issue_item_tile(R, D, G, dl, io)
    gather_stat = make_gather_row_stat(R, G, dl)
    scatter_o, o_stage_shape = make_scatter_add_rows(R, DV, G, scatter, dl)
    o_stage_shape = o_stage_shape or (1,)

    @T.macro
    def accum_tile(Q_s, K_s, V_s, row_tok, row_lse2, acc_s, p_cast, acc_o, o_stage, o_acc, h, kb, h_lo, q_lo,
                   sm_scale):
        """P @ V of one tile of gathered rows (and their lse), added into the accumulator."""
        T.clear(acc_s)
        T.gemm(Q_s, K_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
        probs(acc_s, row_tok, row_lse2, kb, sm_scale * LOG2E)
        T.copy(acc_s, p_cast)
        T.clear(acc_o)
        T.gemm(p_cast, V_s, acc_o, policy=T.GemmWarpPolicy.FullRow)
        scatter_o(acc_o, o_acc, (h - h_lo) * G, row_tok, q_lo, o_stage)

    @T.macro
    def async_tile(tile, n_tiles, Q_cur, Q_next, K_s, V_s, row_tok, row_lse2, acc_s, p_cast, acc_o, o_stage,
                   Q, ent_q, lse2, o_acc, h, kb, e0, e1, h_lo, q_lo, sm_scale):
        """Tile ``tile`` from ``Q_cur`` (its copy issued one step earlier) while the next tile's
        copy into ``Q_next`` is in flight."""
        if tile + 1 < n_tiles:
            issue_q(Q, h, ent_q, e0, e1, tile + 1, Q_next)
            dl.commit_async()
            dl.wait_async(1)  # the next tile's group may stay in flight
        else:
            dl.wait_async(0)
        item_rows(ent_q, e0, e1, tile, row_tok)
        gather_stat(lse2, h, row_tok, row_lse2)
        T.sync_threads()  # every thread's copies of this tile have landed
        accum_tile(Q_cur, K_s, V_s, row_tok, row_lse2, acc_s, p_cast, acc_o, o_stage, o_acc, h, kb, h_lo, q_lo,
                   sm_scale)
        T.sync_threads()  # Q_cur is free before the next step refills it

    @T.prim_func
    def main(
        Q: T.Tensor((N, HQ, D), io.tensor),
        K: T.Tensor((N, HKV, D), io.tensor),
        V: T.Tensor((N, HKV, DV), io.tensor),
        items: T.Tensor((NI, 4), INDEX),
        ent_q: T.Tensor((NE,), INDEX),
        lse2: T.Tensor((N, HQ), ACCUM),
        o_acc: T.Tensor((NW, HCG, DV), ACCUM),
        h_lo: T.int32,
        q_lo: T.int32,
        q_hi: T.int32,
        sm_scale: T.float32,
    ):
        with T.Kernel(NI, threads=threads) as bx:
            dl.min_ctas_per_sm(ctas_per_sm)
            K_s = dl.alloc_tile((BS, D), io.tile)
            V_s = dl.alloc_tile((BS, DV), io.tile)
            Q_s = dl.alloc_tile((R, D), io.tile)
            row_tok = dl.alloc_tile((R,), INDEX)
            row_lse2 = dl.alloc_tile((R,), ACCUM)
            acc_s = dl.alloc_acc((R, BS), ACCUM)
            p_cast = dl.alloc_acc((R, BS), io.tile)
            acc_o = dl.alloc_acc((R, DV), ACCUM)
            o_stage = dl.alloc_tile(o_stage_shape, ACCUM)
            Q_next = dl.alloc_tile((R, D), io.tile) if gather == "async" else None

            h = items[bx, 0]
            kb = items[bx, 1]
            e0 = items[bx, 2]
            e1 = items[bx, 3]
            if e1 > e0 and ent_q[e0] >= q_lo and ent_q[e0] < q_hi:
                load_k(K, h, kb, N, K_s)
                load_v(V, h, kb, N, V_s)
                n_tiles = T.ceildiv(e1 - e0, Q_PER_TILE)
                if gather == "async":
                    issue_q(Q, h, ent_q, e0, e1, 0, Q_s)
                    dl.commit_async()
                    for tile in T.serial(n_tiles):
                        if tile % 2 == 0:
                            async_tile(tile, n_tiles, Q_s, Q_next, K_s, V_s, row_tok, row_lse2, acc_s, p_cast,
                                       acc_o, o_stage, Q, ent_q, lse2, o_acc, h, kb, e0, e1, h_lo, q_lo, sm_scale)
                        else:
                            async_tile(tile, n_tiles, Q_next, Q_s, K_s, V_s, row_tok, row_lse2, acc_s, p_cast,
                                       acc_o, o_stage, Q, ent_q, lse2, o_acc, h, kb, e0, e1, h_lo, q_lo, sm_scale)
                else:
                    for tile in T.serial(n_tiles):
                        item_rows(ent_q, e0, e1, tile, row_tok)
                        gather_stat(lse2, h, row_tok, row_lse2)
                        gather_q(Q, h, row_tok, Q_s)
                        accum_tile(Q_s, K_s, V_s, row_tok, row_lse2, acc_s, p_cast, acc_o, o_stage, o_acc, h, kb,
                                   h_lo, q_lo, sm_scale)

    return main


def kv_bwd(G: int, D: int, DV: int, BS: int, dtype: str, rows: int, threads: int,
           with_dq: bool, scatter: str, ctas_per_sm: int = 0, gather: str = "sync", dl: Dialect = SIMT):
    """``gather = "async"``: the next tile's Q and dO rows are copied (cp.async) while the current
    tile computes, into second Q and dO tiles; ``"sync"``: each tile's rows are gathered, then used."""
    _check_gather(gather)
    R, Q_PER_TILE = rows, rows // G
    N, HQ, HKV, NE, NI, HCG, NDQ = T.dynamic("N, HQ, HKV, NE, NI, HCG, NDQ")
    io = dl.io(dtype)
    load_k = make_load_kv_rows(BS, D, dl, io)
    load_v = make_load_kv_rows(BS, DV, dl, io)
    probs = make_probs_from_lse(R, BS, dl)
    kv_grads = make_kv_grads_from_probs(R, BS, dl)
    item_rows = make_item_rows(R, G, dl)
    gather_q = make_gather_rows(R, D, G, dl, io)
    gather_do = make_gather_rows(R, DV, G, dl, io)
    issue_q = make_issue_item_tile(R, D, G, dl, io)
    issue_do = make_issue_item_tile(R, DV, G, dl, io)
    gather_stat = make_gather_row_stat(R, G, dl)
    scatter_dq, dq_stage_shape = make_scatter_add_rows(R, D, G, scatter, dl)
    dq_stage_shape = dq_stage_shape if with_dq and dq_stage_shape else (1,)

    @T.macro
    def grads_tile(Q_s, dO_s, K_s, V_s, P_s, dS_s, row_tok, row_lse2, row_delta, acc_s, acc_dp, acc_dk, acc_dv,
                   acc_dq, dq_stage, dq_acc, h, kb, h_lo, q_lo, sm_scale):
        """One tile of gathered rows (and their statistics): dK, dV into the registers, dQ added."""
        T.clear(acc_s)
        T.gemm(Q_s, K_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
        probs(acc_s, row_tok, row_lse2, kb, sm_scale * LOG2E)
        kv_grads(Q_s, V_s, dO_s, P_s, dS_s, row_delta, acc_s, acc_dp, acc_dk, acc_dv, sm_scale)
        if with_dq:
            T.clear(acc_dq)
            T.gemm(dS_s, K_s, acc_dq, policy=T.GemmWarpPolicy.FullRow)
            scatter_dq(acc_dq, dq_acc, (h - h_lo) * G, row_tok, q_lo, dq_stage)

    @T.macro
    def async_tile(tile, n_tiles, Q_cur, dO_cur, Q_next, dO_next, K_s, V_s, P_s, dS_s, row_tok, row_lse2,
                   row_delta, acc_s, acc_dp, acc_dk, acc_dv, acc_dq, dq_stage, Q, dO, ent_q, lse2, delta, dq_acc,
                   h, kb, e0, e1, h_lo, q_lo, sm_scale):
        """Tile ``tile`` from ``Q_cur`` / ``dO_cur`` (their copies issued one step earlier) while
        the next tile's copies are in flight."""
        if tile + 1 < n_tiles:
            issue_q(Q, h, ent_q, e0, e1, tile + 1, Q_next)
            issue_do(dO, h, ent_q, e0, e1, tile + 1, dO_next)
            dl.commit_async()
            dl.wait_async(1)  # the next tile's group may stay in flight
        else:
            dl.wait_async(0)
        item_rows(ent_q, e0, e1, tile, row_tok)
        gather_stat(lse2, h, row_tok, row_lse2)
        gather_stat(delta, h, row_tok, row_delta)
        T.sync_threads()  # every thread's copies of this tile have landed
        grads_tile(Q_cur, dO_cur, K_s, V_s, P_s, dS_s, row_tok, row_lse2, row_delta, acc_s, acc_dp, acc_dk,
                   acc_dv, acc_dq, dq_stage, dq_acc, h, kb, h_lo, q_lo, sm_scale)
        T.sync_threads()  # Q_cur and dO_cur are free before the next step refills them

    @T.prim_func
    def main(
        Q: T.Tensor((N, HQ, D), io.tensor),
        K: T.Tensor((N, HKV, D), io.tensor),
        V: T.Tensor((N, HKV, DV), io.tensor),
        dO: T.Tensor((N, HQ, DV), io.tensor),
        items: T.Tensor((NI, 4), INDEX),
        ent_q: T.Tensor((NE,), INDEX),
        lse2: T.Tensor((N, HQ), ACCUM),
        delta: T.Tensor((N, HQ), ACCUM),
        dq_acc: T.Tensor((NDQ, HCG, D), ACCUM),
        dk_acc: T.Tensor((N, HKV, D), ACCUM),
        dv_acc: T.Tensor((N, HKV, DV), ACCUM),
        h_lo: T.int32,
        q_lo: T.int32,
        q_hi: T.int32,
        sm_scale: T.float32,
    ):
        with T.Kernel(NI, threads=threads) as bx:
            dl.min_ctas_per_sm(ctas_per_sm)
            K_s = dl.alloc_tile((BS, D), io.tile)
            V_s = dl.alloc_tile((BS, DV), io.tile)
            Q_s = dl.alloc_tile((R, D), io.tile)
            dO_s = dl.alloc_tile((R, DV), io.tile)
            P_s = dl.alloc_tile((R, BS), io.tile)
            dS_s = dl.alloc_tile((R, BS), io.tile)
            row_tok = dl.alloc_tile((R,), INDEX)
            row_lse2 = dl.alloc_tile((R,), ACCUM)
            row_delta = dl.alloc_tile((R,), ACCUM)
            acc_s = dl.alloc_acc((R, BS), ACCUM)
            acc_dp = dl.alloc_acc((R, BS), ACCUM)
            acc_dk = dl.alloc_acc((BS, D), ACCUM)
            acc_dv = dl.alloc_acc((BS, DV), ACCUM)
            acc_dq = dl.alloc_acc((R, D), ACCUM)
            dq_stage = dl.alloc_tile(dq_stage_shape, ACCUM)
            Q_next = dl.alloc_tile((R, D), io.tile) if gather == "async" else None
            dO_next = dl.alloc_tile((R, DV), io.tile) if gather == "async" else None

            h = items[bx, 0]
            kb = items[bx, 1]
            e0 = items[bx, 2]
            e1 = items[bx, 3]
            if e1 > e0 and ent_q[e0] >= q_lo and ent_q[e0] < q_hi:
                load_k(K, h, kb, N, K_s)
                load_v(V, h, kb, N, V_s)
                T.clear(acc_dk)
                T.clear(acc_dv)
                n_tiles = T.ceildiv(e1 - e0, Q_PER_TILE)
                if gather == "async":
                    issue_q(Q, h, ent_q, e0, e1, 0, Q_s)
                    issue_do(dO, h, ent_q, e0, e1, 0, dO_s)
                    dl.commit_async()
                    for tile in T.serial(n_tiles):
                        if tile % 2 == 0:
                            async_tile(tile, n_tiles, Q_s, dO_s, Q_next, dO_next, K_s, V_s, P_s, dS_s, row_tok,
                                       row_lse2, row_delta, acc_s, acc_dp, acc_dk, acc_dv, acc_dq, dq_stage, Q, dO,
                                       ent_q, lse2, delta, dq_acc, h, kb, e0, e1, h_lo, q_lo, sm_scale)
                        else:
                            async_tile(tile, n_tiles, Q_next, dO_next, Q_s, dO_s, K_s, V_s, P_s, dS_s, row_tok,
                                       row_lse2, row_delta, acc_s, acc_dp, acc_dk, acc_dv, acc_dq, dq_stage, Q, dO,
                                       ent_q, lse2, delta, dq_acc, h, kb, e0, e1, h_lo, q_lo, sm_scale)
                else:
                    for tile in T.serial(n_tiles):
                        item_rows(ent_q, e0, e1, tile, row_tok)
                        gather_stat(lse2, h, row_tok, row_lse2)
                        gather_stat(delta, h, row_tok, row_delta)
                        gather_q(Q, h, row_tok, Q_s)
                        gather_do(dO, h, row_tok, dO_s)
                        grads_tile(Q_s, dO_s, K_s, V_s, P_s, dS_s, row_tok, row_lse2, row_delta, acc_s, acc_dp,
                                   acc_dk, acc_dv, acc_dq, dq_stage, dq_acc, h, kb, h_lo, q_lo, sm_scale)
                for i, d in dl.par(BS, D):
                    if kb + i < N:
                        T.atomic_add(dk_acc[kb + i, h, d], acc_dk[i, d])
                for i, d in dl.par(BS, DV):
                    if kb + i < N:
                        T.atomic_add(dv_acc[kb + i, h, d], acc_dv[i, d])

    return main


def q_fwd(G: int, D: int, DV: int, BS: int, dtype: str, threads: int, num_stages: int,
          bulk_copy: bool, keys: int = 0, ctas_per_sm: int = 0, tokens: int = 1, dl: Dialect = SIMT):
    """``keys``: key rows per pipelined step (a divisor of ``BS``; 0 = ``BS``). Smaller steps
    shrink each pipeline stage's K/V buffers, so more CTAs (and more bytes) are in flight per SM.
    ``ctas_per_sm`` > 0 asks the compiler for registers that let that many CTAs reside on an SM
    (``__launch_bounds__``' second argument); the warp-specialised CTA's 256 threads at ~88
    registers otherwise fit only 2.

    ``tokens`` > 1: a CTA serves that many consecutive tokens (``tokens * G`` rows) and walks the
    *union* of their selected blocks, each loaded once, from the work list ``q_fwd_plan`` wrote
    (``blocks``: a block's first key, -1 for a pair whose block an earlier pair of the tile has;
    ``users``: which of the tile's tokens selected it; rows of the others are masked). Fewer bytes
    than one CTA per token (the forced blocks are shared, and neighbouring tokens' selections
    overlap), at the price of matmul rows for tokens that did not select a block."""
    TOK = tokens
    if not 1 <= TOK <= 31:
        raise ValueError(f"q_fwd: tokens={tokens} must be in [1, 31] (a bit per token of an int32)")
    R = _round_up(G * TOK, 16)
    if R > 128:
        raise ValueError(f"q_fwd: tokens * G = {TOK * G} rows; at most 128")
    KS = keys or BS
    if BS % KS:
        raise ValueError(f"q_fwd: keys={keys} must divide block_size={BS}")
    SPLIT = BS // KS
    N, HQ, HKV, TOPK, NT = T.dynamic("N, HQ, HKV, TOPK, NT")
    io = dl.io(dtype)
    load_k = make_load_kv_rows(KS, D, dl, io, bulk_copy)
    load_v = make_load_kv_rows(KS, DV, dl, io, bulk_copy)
    mask = make_mask_scores(R, KS, dl)
    mask_users = make_mask_user_scores(R, KS, G, dl)
    gather_q = make_gather_rows(R, D, G, dl, io)
    online_softmax = make_online_softmax(R, KS, DV, dl)
    finish = make_store_normalised_rows(R, DV, G, dl, io)

    @T.macro
    def start(Q, h, t0, row_tok, Q_s, acc_o, l, m):
        """Rows r < TOK * G: token t0 + r // G (if < N), head h * G + r % G; state cleared."""
        for r in dl.par(R):
            row_tok[r] = T.if_then_else((r < TOK * G) & (t0 + r // G < N), t0 + r // G, -1)
        gather_q(Q, h, row_tok, Q_s)
        T.clear(acc_o)
        T.clear(l)
        T.fill(m, -T.infinity(ACCUM))

    @T.macro
    def scores(K, V, h, kb, Q_s, K_s, V_s, acc_s):
        """Load the key step from ``kb`` and its raw scores ``Q K^T`` (the caller masks them)."""
        load_k(K, h, kb, N, K_s)
        load_v(V, h, kb, N, V_s)
        T.clear(acc_s)
        T.gemm(Q_s, K_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullCol)

    @T.macro
    def fold(V_s, acc_s, P_s, acc_o, m, m_prev, rescale, l, l_tile):
        online_softmax(acc_s, m, m_prev, rescale, l, l_tile, acc_o, P_s)
        T.gemm(P_s, V_s, acc_o, policy=T.GemmWarpPolicy.FullCol)

    # The CTA's work list: TOK == 1, the token's own selection (topk_idx, tok_start); else the
    # tile's list from q_fwd_plan (blocks, users). Pair p of CTA c: its block's first key, whether
    # the CTA has anything to do with it, and the tile's tokens that selected it (a bit each).
    if TOK == 1:
        list_a = T.Tensor((HKV, N, TOPK), INDEX)
        list_b = T.Tensor((N,), INDEX)
        ctas = N

        def pair_key(topk_idx, tok_start, h, c, p):
            return tok_start[c] + topk_idx[h, c, p] * BS

        def pair_live(topk_idx, tok_start, h, c, p, kb):
            return (topk_idx[h, c, p] >= 0) & (kb <= c)

        def pair_users(topk_idx, tok_start, h, c, p):
            return 1

        @T.macro
        def mask_pair(acc_s, row_tok, users, first_key_tok, scale_log2):
            mask(acc_s, row_tok, first_key_tok, scale_log2)
    else:
        list_a = T.Tensor((HKV, NT, TOK, TOPK), INDEX)
        list_b = T.Tensor((HKV, NT, TOK, TOPK), INDEX)
        ctas = NT

        def pair_key(blocks, users, h, c, p):
            return blocks[h, c, p // TOPK, p % TOPK]

        def pair_live(blocks, users, h, c, p, kb):
            return (blocks[h, c, p // TOPK, p % TOPK] >= 0) & (kb < c * TOK + TOK)

        def pair_users(blocks, users, h, c, p):
            return users[h, c, p // TOPK, p % TOPK]

        mask_pair = mask_users

    @T.prim_func
    def main(
        Q: T.Tensor((N, HQ, D), io.tensor),
        K: T.Tensor((N, HKV, D), io.tensor),
        V: T.Tensor((N, HKV, DV), io.tensor),
        work_a: list_a,
        work_b: list_b,
        O: T.Tensor((N, HQ, DV), io.tensor),
        lse: T.Tensor((N, HQ), ACCUM),
        sm_scale: T.float32,
    ):
        with T.Kernel(ctas, HKV, threads=threads) as (c, h):
            dl.min_ctas_per_sm(ctas_per_sm)
            Q_s = dl.alloc_tile((R, D), io.tile)
            K_s = dl.alloc_tile((KS, D), io.tile)
            V_s = dl.alloc_tile((KS, DV), io.tile)
            row_tok = dl.alloc_tile((R,), INDEX)
            acc_s = dl.alloc_acc((R, KS), ACCUM)
            P_s = dl.alloc_tile((R, KS), io.tile)
            acc_o = dl.alloc_acc((R, DV), ACCUM)
            m = dl.alloc_acc((R,), ACCUM)
            m_prev = dl.alloc_acc((R,), ACCUM)
            rescale = dl.alloc_acc((R,), ACCUM)
            l = dl.alloc_acc((R,), ACCUM)
            l_tile = dl.alloc_acc((R,), ACCUM)

            start(Q, h, c * TOK, row_tok, Q_s, acc_o, l, m)
            for i in T.Pipelined(TOK * TOPK * SPLIT, num_stages=num_stages):
                kb = pair_key(work_a, work_b, h, c, i // SPLIT) + (i % SPLIT) * KS
                if pair_live(work_a, work_b, h, c, i // SPLIT, kb):
                    scores(K, V, h, kb, Q_s, K_s, V_s, acc_s)
                    mask_pair(acc_s, row_tok, pair_users(work_a, work_b, h, c, i // SPLIT), kb, sm_scale * LOG2E)
                    fold(V_s, acc_s, P_s, acc_o, m, m_prev, rescale, l, l_tile)
            finish(O, lse, h, row_tok, acc_o, l, m)

    return main


PLAN_LANES = 128


def q_fwd_plan(BS: int, tokens: int, dl: Dialect = SIMT):
    """The work list of ``q_fwd(tokens > 1)``: for tile ``tile`` of ``tokens`` consecutive tokens and
    kv head ``h``, pair ``(j, s)`` is slot ``s`` of token ``tile * tokens + j``.
    ``blocks[h, tile, j, s]``: the packed index of the first key of that pair's block, or -1 when
    the slot is empty (-1), the block starts after its token, or an earlier pair of the tile (in
    ``(j, s)`` order) has the same block; ``users[h, tile, j, s]``: bit ``j'`` set for each token
    ``j'`` of the tile that selected that block (0 where ``blocks`` is -1). Absolute key indices make
    a tile that straddles two sequences correct: their blocks never compare equal. One lane per
    pair, comparing it with every pair of its tile (``tokens * topk`` reads, from L1)."""
    N, HKV, TOPK, NT = T.dynamic("N, HKV, TOPK, NT")
    TOK = tokens

    def first_key(topk_idx, tok_start, h, t, s):
        """The first key of token ``t``'s slot ``s``; -1 if it has none it may see (or t >= N)."""
        tc = T.min(t, N - 1)
        kb = tok_start[tc] + topk_idx[h, tc, s] * BS
        return T.if_then_else((t < N) & (topk_idx[h, tc, s] >= 0) & (kb <= t), kb, -1)

    @T.prim_func
    def main(
        topk_idx: T.Tensor((HKV, N, TOPK), INDEX),
        tok_start: T.Tensor((N,), INDEX),
        blocks: T.Tensor((HKV, NT, TOK, TOPK), INDEX),
        users: T.Tensor((HKV, NT, TOK, TOPK), INDEX),
    ):
        with T.Kernel(NT, HKV, threads=PLAN_LANES) as (tile, h):
            kb = T.alloc_var(INDEX)
            other = T.alloc_var(INDEX)
            owner = T.alloc_var(INDEX)
            bits = T.alloc_var(INDEX)
            for it in T.serial(T.ceildiv(TOK * TOPK, PLAN_LANES)):
                for lane in dl.lane_loop(PLAN_LANES):
                    i = it * PLAN_LANES + dl.lane_id(lane)
                    if i < TOK * TOPK:
                        kb = first_key(topk_idx, tok_start, h, tile * TOK + i // TOPK, i % TOPK)
                        owner = 1
                        bits = 0
                        for i2 in T.serial(TOK * TOPK):
                            other = first_key(topk_idx, tok_start, h, tile * TOK + i2 // TOPK, i2 % TOPK)
                            if (kb >= 0) & (other == kb):
                                bits = bits | T.shift_left(1, i2 // TOPK)
                                if i2 < i:
                                    owner = 0
                        blocks[h, tile, i // TOPK, i % TOPK] = T.if_then_else((kb >= 0) & (owner == 1), kb, -1)
                        users[h, tile, i // TOPK, i % TOPK] = T.if_then_else((kb >= 0) & (owner == 1), bits, 0)

    return main


def q_bwd_dq(G: int, D: int, DV: int, BS: int, dtype: str, threads: int, num_stages: int,
             bulk_copy: bool, dl: Dialect = SIMT):
    R = _round_up(G, 16)
    N, HQ, HKV, TOPK = T.dynamic("N, HQ, HKV, TOPK")
    io = dl.io(dtype)
    load_k = make_load_kv_rows(BS, D, dl, io, bulk_copy)
    load_v = make_load_kv_rows(BS, DV, dl, io, bulk_copy)
    probs = make_probs_from_lse(R, BS, dl)
    gather_q = make_gather_rows(R, D, G, dl, io)
    gather_do = make_gather_rows(R, DV, G, dl, io)
    gather_stat = make_gather_row_stat(R, G, dl)

    @T.prim_func
    def main(
        Q: T.Tensor((N, HQ, D), io.tensor),
        K: T.Tensor((N, HKV, D), io.tensor),
        V: T.Tensor((N, HKV, DV), io.tensor),
        dO: T.Tensor((N, HQ, DV), io.tensor),
        topk_idx: T.Tensor((HKV, N, TOPK), INDEX),
        tok_start: T.Tensor((N,), INDEX),
        lse2: T.Tensor((N, HQ), ACCUM),
        delta: T.Tensor((N, HQ), ACCUM),
        dQ: T.Tensor((N, HQ, D), io.tensor),
        sm_scale: T.float32,
    ):
        with T.Kernel(N, HKV, threads=threads) as (t, h):
            Q_s = dl.alloc_tile((R, D), io.tile)
            dO_s = dl.alloc_tile((R, DV), io.tile)
            K_s = dl.alloc_tile((BS, D), io.tile)
            V_s = dl.alloc_tile((BS, DV), io.tile)
            dS_s = dl.alloc_tile((R, BS), io.tile)
            row_tok = dl.alloc_tile((R,), INDEX)
            row_lse2 = dl.alloc_tile((R,), ACCUM)
            row_delta = dl.alloc_tile((R,), ACCUM)
            acc_s = dl.alloc_acc((R, BS), ACCUM)
            acc_dp = dl.alloc_acc((R, BS), ACCUM)
            acc_dq = dl.alloc_acc((R, D), ACCUM)

            start = tok_start[t]
            for r in dl.par(R):
                row_tok[r] = T.if_then_else(r < G, t, -1)
            gather_stat(lse2, h, row_tok, row_lse2)
            gather_stat(delta, h, row_tok, row_delta)
            gather_q(Q, h, row_tok, Q_s)
            gather_do(dO, h, row_tok, dO_s)
            T.clear(acc_dq)
            for i in T.Pipelined(TOPK, num_stages=num_stages):
                kb = start + topk_idx[h, t, i] * BS
                if topk_idx[h, t, i] >= 0 and kb <= t:
                    load_k(K, h, kb, N, K_s)
                    load_v(V, h, kb, N, V_s)
                    T.clear(acc_s)
                    T.gemm(Q_s, K_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullCol)
                    probs(acc_s, row_tok, row_lse2, kb, sm_scale * LOG2E)
                    T.clear(acc_dp)
                    T.gemm(dO_s, V_s, acc_dp, transpose_B=True, policy=T.GemmWarpPolicy.FullCol)
                    for r, c in dl.par(R, BS):
                        acc_dp[r, c] = acc_s[r, c] * (acc_dp[r, c] - row_delta[r]) * sm_scale
                    T.copy(acc_dp, dS_s)
                    T.gemm(dS_s, K_s, acc_dq, policy=T.GemmWarpPolicy.FullCol)
            for r, d in dl.par(R, D):
                if r < G:
                    dQ[t, h * G + r, d] = io.store(acc_dq[r, d])

    return main


def row_dot(DV: int, dtype: str, threads: int, dl: Dialect = SIMT):
    """delta[t, h] = sum_d dO[t, h, d] * O[t, h, d] in float32, 64 (token, head) rows per CTA."""
    ROWS = 64
    N, HQ = T.dynamic("N, HQ")
    io = dl.io(dtype)

    @T.prim_func
    def main(
        dO: T.Tensor((N, HQ, DV), io.tensor),
        O: T.Tensor((N, HQ, DV), io.tensor),
        delta: T.Tensor((N, HQ), ACCUM),
    ):
        with T.Kernel(T.ceildiv(N * HQ, ROWS), threads=threads) as bx:
            prod = dl.alloc_acc((ROWS, DV), ACCUM)
            acc = dl.alloc_acc((ROWS,), ACCUM)
            for r, d in dl.par(ROWS, DV):
                row = bx * ROWS + r
                prod[r, d] = T.if_then_else(
                    row < N * HQ,
                    T.cast(io.load(dO[row // HQ, row % HQ, d]), ACCUM)
                    * T.cast(io.load(O[row // HQ, row % HQ, d]), ACCUM),
                    0,
                )
            T.reduce_sum(prod, acc, dim=1)
            for r in dl.par(ROWS):
                if bx * ROWS + r < N * HQ:
                    delta[(bx * ROWS + r) // HQ, (bx * ROWS + r) % HQ] = acc[r]

    return main
