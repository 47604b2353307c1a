"""Attention over a contiguous key range per query: the compressed (cmp) and sliding-window (swa)
branches, forward and backward, as one program family.

Both branches are "dense" attention whose mask is a key range ``[lo(p), hi(p))`` that depends only
on the query's position ``p`` in its sequence and two runtime integers ``(a, b)``:

* cmp (keys are compressed tokens; ``a = kernel_size``, ``b = stride``): query p sees compressed
  token i iff ``i*b + a - 1 <= p``, i.e. ``lo = 0``, ``hi = max(p - a + 1 + b, 0) // b``;
* swa (``a = window_size``): ``lo = max(p - a + 1, 0)``, ``hi = p + 1``.

Both ends are non-decreasing in p, so a tile of consecutive queries reads one contiguous key range
and only the blocks at its two ends need masking. Sequences are packed (varlen): queries of
sequence s are rows ``cu_q[s]..cu_q[s+1]`` of Q, its keys rows ``cu_k[s]..cu_k[s+1]`` of K and V.

* ``dense_fwd``: one CTA per (query tile, kv head); a query tile holds ``rows // G`` consecutive
  queries of one sequence x the G heads of the group, so each K/V tile (loaded by TMA in a
  pipelined loop) serves every head of the group. Online softmax in the log2 domain; writes o and
  the natural-log lse (``-inf`` and o = 0 for a query that sees no key).
* ``dense_bwd_dq``: the forward's loop again (query tiles outside, key tiles inside), recomputing
  P from the lse: dQ accumulates in registers and is stored once, with no atomics and no float32
  buffer. (Adding dQ from the key-tile loop instead costs one float32 atomic per (query row, key
  tile, feature): measured 57 ms at G=4 and 765 ms at G=16 for cmp at N=65536 on the H100, against
  a few ms for the recomputation.)
* ``dense_bwd_dkdv``: one CTA per (key tile, kv head): dK and dV of the tile stay in registers
  over every query tile that sees it and are stored once (each key belongs to exactly one tile).
  Its query tiles are gathered like the forward's (G heads a token), with loads that block or,
  with ``dkdv_rows = "gather_async"``, copied a tile ahead by ``cp.async``.

Tile tables (``[tiles, 2]`` = (sequence, first position), ``-1`` sequence for padding) are built
on the GPU by ``fsagen.tile_index`` without host synchronisation.
"""

import tilelang.language as T

from .target import SIMT, Dialect
from .tiles import (ACCUM, LOG2E, make_gather_row_stat, make_gather_rows, make_issue_run_tile,
                    make_kv_grads_from_probs, make_online_softmax, make_store_normalised_rows)

INDEX = "int32"
# Running row maximum starts finite so that a row whose first key tiles are all masked rescales
# by exp2(0) = 1 instead of exp2(-inf - -inf) = NaN; masked scores stay -inf (probability 0).
NEG_BIG = -1.0e30

BRANCHES = ("cmp", "swa")


def key_range(branch: str):
    """``(lo, hi)``: functions of (position, a, b) giving the keys ``[lo, hi)`` a query sees."""
    if branch == "cmp":
        return (lambda p, a, b: 0), (lambda p, a, b: T.max(p - a + 1 + b, 0) // b)
    if branch == "swa":
        return (lambda p, a, b: T.max(p - a + 1, 0)), (lambda p, a, b: p + 1)
    raise ValueError(f"dense programs: branch {branch!r} must be one of {BRANCHES}")


def query_range(branch: str):
    """``(first, end)``: functions of (key position, a, b): the queries that see key j are the
    positions ``[first(j), end(j))`` (end unbounded for cmp; the caller clips to the length)."""
    if branch == "cmp":
        return (lambda j, a, b: j * b + a - 1), (lambda j, a, b: 1 << 30)
    if branch == "swa":
        return (lambda j, a, b: j), (lambda j, a, b: j + a)
    raise ValueError(f"dense programs: branch {branch!r} must be one of {BRANCHES}")


def make_visible(branch: str):
    """``visible(p, p_end, j, k_end, a, b)``: the TIR predicate "query position p (< p_end, the
    end of the valid rows) sees key position j (< k_end, the end of the loaded valid keys)"."""
    lo, hi = key_range(branch)

    def visible(p, p_end, j, k_end, a, b):
        return (p < p_end) & (j < k_end) & (lo(p, a, b) <= j) & (j < hi(p, a, b))

    return visible


def dense_fwd(branch: str, G: int, D: int, DV: int, dtype: str, rows: int, keys: int,
              threads: int, num_stages: int, dl: Dialect = SIMT):
    if rows % G:
        raise ValueError(f"dense_fwd: rows={rows} must be a multiple of G={G}")
    R, BQ, BN = rows, rows // G, keys
    lo, hi = key_range(branch)
    visible = make_visible(branch)
    N, NK, HQ, HKV, NT, B1 = T.dynamic("N, NK, HQ, HKV, NT, B1")
    io = dl.io(dtype)
    copy_k = dl.make_copy_rows(BN, D, io)
    copy_v = dl.make_copy_rows(BN, DV, io)
    gather_q = make_gather_rows(R, D, G, dl, io)
    online_softmax = make_online_softmax(R, BN, DV, dl)
    store_normalised_rows = make_store_normalised_rows(R, DV, G, dl, io)

    @T.prim_func
    def main(
        Q: T.Tensor((N, HQ, D), io.tensor),
        K: T.Tensor((NK, HKV, D), io.tensor),
        V: T.Tensor((NK, HKV, DV), io.tensor),
        tiles: T.Tensor((NT, 2), INDEX),
        cu_q: T.Tensor((B1,), INDEX),
        cu_k: T.Tensor((B1,), INDEX),
        O: T.Tensor((N, HQ, DV), io.tensor),
        lse: T.Tensor((N, HQ), ACCUM),
        arg_a: T.int32,
        arg_b: T.int32,
        sm_scale: T.float32,
    ):
        with T.Kernel(NT, HKV, threads=threads) as (bt, h):
            Q_s = dl.alloc_tile((R, D), io.tile)
            K_s = dl.alloc_tile((BN, D), io.tile)
            V_s = dl.alloc_tile((BN, DV), io.tile)
            row_tok = dl.alloc_tile((R,), INDEX)
            acc_s = dl.alloc_acc((R, BN), ACCUM)
            p_cast = dl.alloc_acc((R, BN), io.tile)
            acc_o = dl.alloc_acc((R, DV), ACCUM)
            m = dl.alloc_acc((R,), ACCUM)
            m_prev = dl.alloc_acc((R,), ACCUM)
            rescale = dl.alloc_acc((R,), ACCUM)
            l = dl.alloc_acc((R,), ACCUM)
            l_tile = dl.alloc_acc((R,), ACCUM)

            seq = tiles[bt, 0]
            p0 = tiles[bt, 1]
            if seq >= 0:
                q0 = cu_q[seq]
                k0 = cu_k[seq]
                p1 = T.min(p0 + BQ, cu_q[seq + 1] - q0)
                k_lo = lo(p0, arg_a, arg_b)
                k_hi = T.min(hi(p1 - 1, arg_a, arg_b), cu_k[seq + 1] - k0)
                for r in dl.par(R):
                    row_tok[r] = T.if_then_else(p0 + r // G < p1, q0 + p0 + r // G, -1)
                gather_q(Q, h, row_tok, Q_s)
                T.clear(acc_o)
                T.clear(l)
                T.fill(m, NEG_BIG)
                for it in T.Pipelined(T.ceildiv(T.max(k_hi - k_lo, 0), BN), num_stages=num_stages):
                    j0 = k_lo + it * BN
                    copy_k(K, h, k0 + j0, NK, K_s)
                    copy_v(V, h, k0 + j0, NK, V_s)
                    T.clear(acc_s)
                    T.gemm(Q_s, K_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                    if (p1 - p0 == BQ) and (j0 >= lo(p1 - 1, arg_a, arg_b)) and (
                        j0 + BN <= hi(p0, arg_a, arg_b)
                    ):
                        for r, c in dl.par(R, BN):
                            acc_s[r, c] = acc_s[r, c] * (sm_scale * LOG2E)
                    else:
                        for r, c in dl.par(R, BN):
                            acc_s[r, c] = T.if_then_else(
                                visible(p0 + r // G, p1, j0 + c, k_hi, arg_a, arg_b),
                                acc_s[r, c] * (sm_scale * LOG2E),
                                -T.infinity(ACCUM),
                            )
                    online_softmax(acc_s, m, m_prev, rescale, l, l_tile, acc_o, p_cast)
                    T.gemm(p_cast, V_s, acc_o, policy=T.GemmWarpPolicy.FullRow)
                store_normalised_rows(O, lse, h, row_tok, acc_o, l, m)

    return main


def make_query_tile_stats(rows: int, G: int, dl: Dialect):
    """``tile_stats(lse2, delta, h, q0, p0, p_end, row_tok, row_lse2, row_delta)``: the tokens and
    row statistics of the backward's query tile at position ``p0`` of the sequence starting at
    packed row ``q0``: ``rows // G`` queries x the G heads of kv head ``h``; rows at or past
    ``p_end`` are dead (token -1, statistics 0)."""
    gather_stat = make_gather_row_stat(rows, G, dl)

    @T.macro
    def tile_stats(lse2, delta, h, q0, p0, p_end, row_tok, row_lse2, row_delta):
        for r in dl.par(rows):
            row_tok[r] = T.if_then_else(p0 + r // G < p_end, q0 + p0 + r // G, -1)
        gather_stat(lse2, h, row_tok, row_lse2)
        gather_stat(delta, h, row_tok, row_delta)

    return tile_stats


def make_gather_query_tile(rows: int, D: int, DV: int, G: int, dl: Dialect, io):
    """``gather_tile(Q, dO, lse2, delta, h, q0, p0, p_end, row_tok, row_lse2, row_delta, Q_s, dO_s)``:
    ``make_query_tile_stats``, then the tile's Q and dO rows (dead rows zero)."""
    tile_stats = make_query_tile_stats(rows, G, dl)
    gather_q = make_gather_rows(rows, D, G, dl, io)
    gather_do = make_gather_rows(rows, DV, G, dl, io)

    @T.macro
    def gather_tile(Q, dO, lse2, delta, h, q0, p0, p_end, row_tok, row_lse2, row_delta, Q_s, dO_s):
        tile_stats(lse2, delta, h, q0, p0, p_end, row_tok, row_lse2, row_delta)
        gather_q(Q, h, row_tok, Q_s)
        gather_do(dO, h, row_tok, dO_s)

    return gather_tile


def dense_bwd_dq(branch: str, G: int, D: int, DV: int, dtype: str, rows: int, keys: int,
                 threads: int, num_stages: int, dl: Dialect = SIMT):
    """dQ by query tiles (the forward's loop): recomputes P from lse, no atomics, no float32 buffer."""
    if rows % G:
        raise ValueError(f"dense_bwd_dq: rows={rows} must be a multiple of G={G}")
    R, BQ, BN = rows, rows // G, keys
    lo, hi = key_range(branch)
    visible = make_visible(branch)
    N, NK, HQ, HKV, NT, B1 = T.dynamic("N, NK, HQ, HKV, NT, B1")
    io = dl.io(dtype)
    copy_k = dl.make_copy_rows(BN, D, io)
    copy_v = dl.make_copy_rows(BN, DV, io)
    gather_tile = make_gather_query_tile(R, D, DV, G, dl, io)

    @T.prim_func
    def main(
        Q: T.Tensor((N, HQ, D), io.tensor),
        K: T.Tensor((NK, HKV, D), io.tensor),
        V: T.Tensor((NK, HKV, DV), io.tensor),
        dO: T.Tensor((N, HQ, DV), io.tensor),
        tiles: T.Tensor((NT, 2), INDEX),
        cu_q: T.Tensor((B1,), INDEX),
        cu_k: T.Tensor((B1,), INDEX),
        lse2: T.Tensor((N, HQ), ACCUM),
        delta: T.Tensor((N, HQ), ACCUM),
        dQ: T.Tensor((N, HQ, D), io.tensor),
        arg_a: T.int32,
        arg_b: T.int32,
        sm_scale: T.float32,
    ):
        with T.Kernel(NT, HKV, threads=threads) as (bt, h):
            Q_s = dl.alloc_tile((R, D), io.tile)
            dO_s = dl.alloc_tile((R, DV), io.tile)
            K_s = dl.alloc_tile((BN, D), io.tile)
            V_s = dl.alloc_tile((BN, DV), io.tile)
            dS_s = dl.alloc_tile((R, BN), io.tile)
            row_tok = dl.alloc_tile((R,), INDEX)
            row_lse2 = dl.alloc_tile((R,), ACCUM)
            row_delta = dl.alloc_tile((R,), ACCUM)
            acc_s = dl.alloc_acc((R, BN), ACCUM)
            acc_dp = dl.alloc_acc((R, BN), ACCUM)
            acc_dq = dl.alloc_acc((R, D), ACCUM)

            seq = tiles[bt, 0]
            p0 = tiles[bt, 1]
            if seq >= 0:
                q0 = cu_q[seq]
                k0 = cu_k[seq]
                p1 = T.min(p0 + BQ, cu_q[seq + 1] - q0)
                k_lo = lo(p0, arg_a, arg_b)
                k_hi = T.min(hi(p1 - 1, arg_a, arg_b), cu_k[seq + 1] - k0)
                gather_tile(Q, dO, lse2, delta, h, q0, p0, p1, row_tok, row_lse2, row_delta, Q_s, dO_s)
                T.clear(acc_dq)
                for it in T.Pipelined(T.ceildiv(T.max(k_hi - k_lo, 0), BN), num_stages=num_stages):
                    j0 = k_lo + it * BN
                    copy_k(K, h, k0 + j0, NK, K_s)
                    copy_v(V, h, k0 + j0, NK, V_s)
                    T.clear(acc_s)
                    T.gemm(Q_s, K_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                    T.clear(acc_dp)
                    T.gemm(dO_s, V_s, acc_dp, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                    for r, c in dl.par(R, BN):
                        acc_dp[r, c] = T.if_then_else(
                            visible(p0 + r // G, p1, j0 + c, k_hi, arg_a, arg_b),
                            T.exp2(acc_s[r, c] * (sm_scale * LOG2E) - row_lse2[r])
                            * (acc_dp[r, c] - row_delta[r]) * sm_scale,
                            0,
                        )
                    T.copy(acc_dp, dS_s)
                    T.gemm(dS_s, K_s, acc_dq, policy=T.GemmWarpPolicy.FullRow)
                for r, d in dl.par(R, D):
                    if row_tok[r] >= 0:
                        dQ[row_tok[r], h * G + r % G, d] = io.store(acc_dq[r, d])

    return main


DKDV_ROWS = ("gather", "gather_async")


def dense_bwd_dkdv(branch: str, G: int, D: int, DV: int, dtype: str, rows: int, keys: int,
                   threads: int, q_split: int, dkdv_rows: str = "gather", dl: Dialect = SIMT):
    """dK, dV by key tiles: each key tile's gradients stay in registers over the query tiles that
    see it. ``q_split == 0``: one CTA takes all of them and stores dK/dV once (a key belongs to
    one tile: no atomics). ``q_split > 0``: the queries are cut into runs of ``q_split``
    positions, one CTA each (the tile table's third column is the run), and each adds its
    partial dK/dV into float32 buffers: cmp has few key tiles (N / stride keys) each seen by up to
    N queries, which left 128 CTAs with long serial loops at N = 65536 (150 ms at G = 16).

    ``dkdv_rows`` says what the rows of a query tile are:

    * ``"gather"``: ``rows // G`` consecutive queries x the G heads of the group. Those rows are
      not one box of Q (the heads of a token are contiguous, the tokens are ``Hq`` rows apart), so
      the threads gather them with loads that block, and the query loop is serial.
    * ``"gather_async"``: the same tiles, the next one's Q and dO rows copied by ``cp.async`` into
      second tiles while the current one computes (``tiles.make_issue_run_tile``).

    (A third mode, ``rows`` consecutive queries of one head copied by TMA in a warp-specialised
    pipeline, compiled but hit "illegal instruction" on the H100 in every shape tried, and was
    removed: bench/results/gpu_tests_newknobs.md.)
    """
    if dkdv_rows not in DKDV_ROWS:
        raise ValueError(f"dense_bwd_dkdv: dkdv_rows={dkdv_rows!r} must be one of {DKDV_ROWS}")
    by_async = dkdv_rows == "gather_async"
    split = q_split > 0
    io = dl.io(dtype)
    GRAD = ACCUM if split else io.tensor
    if rows % G:
        raise ValueError(f"dense_bwd_dkdv: rows={rows} must be a multiple of G={G}")
    R, BN = rows, keys
    BQ = R // G  # query positions per tile

    visible = make_visible(branch)
    q_first, q_end = query_range(branch)
    store = make_store_key_rows(BN, split, dl, io)
    kv_grads = make_kv_grads_from_probs(R, BN, dl)

    def clip_run(first, end):
        return T.min(end, first + q_split) if split else end
    N, NK, HQ, HKV, NT, B1 = T.dynamic("N, NK, HQ, HKV, NT, B1")
    copy_k = dl.make_copy_rows(BN, D, io)
    copy_v = dl.make_copy_rows(BN, DV, io)
    if by_async:
        tile_stats = make_query_tile_stats(R, G, dl)
        issue_q = make_issue_run_tile(R, D, G, dl, io)
        issue_do = make_issue_run_tile(R, DV, G, dl, io)
    else:
        gather_tile = make_gather_query_tile(R, D, DV, G, dl, io)

    @T.macro
    def tile_grads(K_s, V_s, Q_s, dO_s, P_s, dS_s, row_lse2, row_delta, acc_s, acc_dp, acc_dk, acc_dv,
                   p0, p_hi, j0, j1, arg_a, arg_b, sm_scale):
        """One query tile's share of the key tile's dK and dV (rows loaded, statistics gathered)."""
        T.clear(acc_s)
        T.gemm(Q_s, K_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
        for r, c in dl.par(R, BN):
            acc_s[r, c] = T.if_then_else(
                visible(p0 + r // G, p_hi, j0 + c, j1, arg_a, arg_b),
                T.exp2(acc_s[r, c] * (sm_scale * LOG2E) - row_lse2[r]),
                0,
            )
        kv_grads(Q_s, V_s, dO_s, P_s, dS_s, row_delta, acc_s, acc_dp, acc_dk, acc_dv, sm_scale)

    @T.macro
    def async_tile(it, n_tiles, Q_cur, dO_cur, Q_next, dO_next, K_s, V_s, P_s, dS_s, row_tok, row_lse2, row_delta,
                   acc_s, acc_dp, acc_dk, acc_dv, Q, dO, lse2, delta, h, q0, p_lo, p_hi, j0, j1, arg_a, arg_b,
                   sm_scale):
        """Query tile ``it`` from ``Q_cur`` / ``dO_cur`` (copies issued one step earlier) while the
        next tile's copies into ``Q_next`` / ``dO_next`` are in flight."""
        p0 = p_lo + it * BQ
        if it + 1 < n_tiles:
            issue_q(Q, h, q0, p0 + BQ, p_hi, 0, Q_next)
            issue_do(dO, h, q0, p0 + BQ, p_hi, 0, dO_next)
            dl.commit_async()
            dl.wait_async(1)  # the next tile's group may stay in flight
        else:
            dl.wait_async(0)
        tile_stats(lse2, delta, h, q0, p0, p_hi, row_tok, row_lse2, row_delta)
        T.sync_threads()  # every thread's copies of this tile have landed
        tile_grads(K_s, V_s, Q_cur, dO_cur, P_s, dS_s, row_lse2, row_delta, acc_s, acc_dp, acc_dk, acc_dv,
                   p0, p_hi, j0, j1, arg_a, arg_b, sm_scale)
        T.sync_threads()  # Q_cur and dO_cur are free before the next step refills them

    @T.prim_func
    def main(
        Q: T.Tensor((N, HQ, D), io.tensor),
        K: T.Tensor((NK, HKV, D), io.tensor),
        V: T.Tensor((NK, HKV, DV), io.tensor),
        dO: T.Tensor((N, HQ, DV), io.tensor),
        tiles: T.Tensor((NT, 3), INDEX),
        cu_q: T.Tensor((B1,), INDEX),
        cu_k: T.Tensor((B1,), INDEX),
        lse2: T.Tensor((N, HQ), ACCUM),
        delta: T.Tensor((N, HQ), ACCUM),
        dK: T.Tensor((NK, HKV, D), GRAD),
        dV: T.Tensor((NK, HKV, DV), GRAD),
        arg_a: T.int32,
        arg_b: T.int32,
        sm_scale: T.float32,
    ):
        with T.Kernel(NT, HKV, threads=threads) as (bt, h):
            K_s = dl.alloc_tile((BN, D), io.tile)
            V_s = dl.alloc_tile((BN, DV), io.tile)
            Q_s = dl.alloc_tile((R, D), io.tile)
            dO_s = dl.alloc_tile((R, DV), io.tile)
            P_s = dl.alloc_tile((R, BN), io.tile)
            dS_s = dl.alloc_tile((R, BN), io.tile)
            row_tok = dl.alloc_tile((R,), INDEX)
            row_lse2 = dl.alloc_tile((R,), ACCUM)
            row_delta = dl.alloc_tile((R,), ACCUM)
            acc_s = dl.alloc_acc((R, BN), ACCUM)
            acc_dp = dl.alloc_acc((R, BN), ACCUM)
            acc_dk = dl.alloc_acc((BN, D), ACCUM)
            acc_dv = dl.alloc_acc((BN, DV), ACCUM)
            Q_next = dl.alloc_tile((R, D), io.tile) if by_async else None
            dO_next = dl.alloc_tile((R, DV), io.tile) if by_async else None

            seq = tiles[bt, 0]
            j0 = tiles[bt, 1]
            if seq >= 0:
                q0 = cu_q[seq]
                k0 = cu_k[seq]
                n_q = cu_q[seq + 1] - q0
                j1 = T.min(j0 + BN, cu_k[seq + 1] - k0)
                p_lo = T.max(q_first(j0, arg_a, arg_b), 0) + tiles[bt, 2] * q_split
                p_hi = clip_run(p_lo, T.min(q_end(j1 - 1, arg_a, arg_b), n_q))
                copy_k(K, h, k0 + j0, NK, K_s)
                copy_v(V, h, k0 + j0, NK, V_s)
                T.clear(acc_dk)
                T.clear(acc_dv)
                if by_async:
                    n_tiles = T.ceildiv(T.max(p_hi - p_lo, 0), BQ)
                    issue_q(Q, h, q0, p_lo, p_hi, 0, Q_s)
                    issue_do(dO, h, q0, p_lo, p_hi, 0, dO_s)
                    dl.commit_async()
                    for it in T.serial(n_tiles):
                        if it % 2 == 0:
                            async_tile(it, n_tiles, Q_s, dO_s, Q_next, dO_next, K_s, V_s, P_s, dS_s, row_tok,
                                       row_lse2, row_delta, acc_s, acc_dp, acc_dk, acc_dv, Q, dO, lse2, delta, h, q0,
                                       p_lo, p_hi, j0, j1, arg_a, arg_b, sm_scale)
                        else:
                            async_tile(it, n_tiles, Q_next, dO_next, Q_s, dO_s, K_s, V_s, P_s, dS_s, row_tok,
                                       row_lse2, row_delta, acc_s, acc_dp, acc_dk, acc_dv, Q, dO, lse2, delta, h, q0,
                                       p_lo, p_hi, j0, j1, arg_a, arg_b, sm_scale)
                else:
                    for it in T.serial(T.ceildiv(T.max(p_hi - p_lo, 0), BQ)):
                        p0 = p_lo + it * BQ
                        gather_tile(Q, dO, lse2, delta, h, q0, p0, p_hi, row_tok, row_lse2, row_delta, Q_s, dO_s)
                        tile_grads(K_s, V_s, Q_s, dO_s, P_s, dS_s, row_lse2, row_delta, acc_s, acc_dp,
                                   acc_dk, acc_dv, p0, p_hi, j0, j1, arg_a, arg_b, sm_scale)
                store(acc_dk, dK, k0 + j0, j1 - j0, h)
                store(acc_dv, dV, k0 + j0, j1 - j0, h)

    return main


def make_store_key_rows(rows: int, add: bool, dl: Dialect, io):
    """Write (or, ``add``, atomically add) the first ``n`` of ``rows`` gradient rows of one kv
    head to ``dst[first + i, head, :]``."""
    if add:

        @T.macro
        def store(acc, dst, first, n, head):
            for i, d in dl.par(rows, acc.shape[1]):
                if i < n:
                    T.atomic_add(dst[first + i, head, d], acc[i, d])

        return store

    @T.macro
    def store(acc, dst, first, n, head):
        for i, d in dl.par(rows, acc.shape[1]):
            if i < n:
                dst[first + i, head, d] = io.store(acc[i, d])

    return store
