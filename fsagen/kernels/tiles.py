"""Tile-level building blocks shared by every slc program.

Each factory closes over the compile-time constants (tile shape, dtypes) and returns a TileLang
macro. The kernels in ``slc.py`` are compositions of these macros, so the math of a step (how a KV
block is loaded with its tail guarded, how scores are masked causally, how a probability tile is
formed from a known log-sum-exp) is written once.

Conventions shared by all programs:

* scores live in the log2 domain: ``s2 = (q . k) * scale * log2(e)``, probabilities are ``exp2``,
  and every log-sum-exp passed between kernels (``lse2``) is in log2 units. The public ops convert
  to natural log at the boundary.
* the target's dialect (``target.py``) spells allocations, element-wise loops and 16-bit
  tensor access: each factory takes it (``dl``) and, where it reads or writes q/k/v-typed
  tensors, the ``IO`` of their dtype (``io``).
* a key at packed token index ``kg`` is visible to a query at packed token index ``qt`` iff
  ``kg <= qt``. Selected blocks always start inside the query's own sequence (the glue drops blocks
  past the query's own), so this single comparison is the causal mask *and* the sequence boundary.
"""
from __future__ import annotations

import tilelang.language as T

from .target import IO, Dialect

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
ACCUM = "float32"


def make_load_kv_rows(rows: int, dim: int, dl: Dialect, io: IO, bulk: bool = False):
    """``load_kv_rows(src, head, first_tok, n_tok, dst)``: ``rows`` consecutive token rows of one
    kv head into shared memory, zero past ``n_tok``; ``bulk``: by TileLang's tile copy on a GPU
    (``Dialect.make_copy_rows``), else each thread loads guarded elements itself."""
    return dl.make_copy_rows(rows, dim, io, bulk)


def make_mask_scores(rows: int, cols: int, dl: Dialect):
    """Scale raw scores to the log2 domain and mask keys a row may not see (and dead rows)."""

    @T.macro
    def mask_scores(acc_s, row_tok, first_key_tok, scale_log2):
        for r, c in dl.par(rows, cols):
            acc_s[r, c] = T.if_then_else(
                first_key_tok + c <= row_tok[r], acc_s[r, c] * scale_log2, -T.infinity(ACCUM)
            )

    return mask_scores


def make_mask_user_scores(rows: int, cols: int, group: int, dl: Dialect):
    """``make_mask_scores`` for a tile of several tokens' rows (``group`` consecutive rows a token)
    where only some tokens selected the block: token ``r // group``'s rows count only if its bit is
    set in ``users``; the other rows are masked whole (``-inf``, as dead rows)."""

    @T.macro
    def mask_user_scores(acc_s, row_tok, users, first_key_tok, scale_log2):
        for r, c in dl.par(rows, cols):
            acc_s[r, c] = T.if_then_else(
                (first_key_tok + c <= row_tok[r]) & ((T.shift_right(users, r // group) & 1) == 1),
                acc_s[r, c] * scale_log2, -T.infinity(ACCUM)
            )

    return mask_user_scores


def make_probs_from_lse(rows: int, cols: int, dl: Dialect):
    """P = exp2(s2 - lse2) for visible keys, 0 elsewhere: the exact softmax once lse is known."""

    @T.macro
    def probs_from_lse(acc_s, row_tok, row_lse2, first_key_tok, scale_log2):
        for r, c in dl.par(rows, cols):
            acc_s[r, c] = T.if_then_else(
                first_key_tok + c <= row_tok[r],
                T.exp2(acc_s[r, c] * scale_log2 - row_lse2[r]),
                0,
            )

    return probs_from_lse


def make_kv_grads_from_probs(rows: int, cols: int, dl: Dialect):
    """The backward's step once a tile's probabilities are in ``acc_s`` (0 where not visible):
    dP = dO V^T, dS = P * (dP - delta) * scale, then dV += P^T dO and dK += dS^T Q. Leaves P in
    ``P_s`` and dS in ``dS_s`` (input dtype, shared) for a caller that also wants dQ = dS K."""

    @T.macro
    def kv_grads_from_probs(Q_s, V_s, dO_s, P_s, dS_s, row_delta, acc_s, acc_dp, acc_dk, acc_dv, sm_scale):
        T.clear(acc_dp)
        T.gemm(dO_s, V_s, acc_dp, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
        T.copy(acc_s, P_s)
        for r, c in dl.par(rows, cols):
            acc_dp[r, c] = acc_s[r, c] * (acc_dp[r, c] - row_delta[r]) * sm_scale
        T.copy(acc_dp, dS_s)
        T.gemm(P_s, dO_s, acc_dv, transpose_A=True, policy=T.GemmWarpPolicy.FullRow)
        T.gemm(dS_s, Q_s, acc_dk, transpose_A=True, policy=T.GemmWarpPolicy.FullRow)

    return kv_grads_from_probs


def make_gather_rows(rows: int, dim: int, group: int, dl: Dialect, io: IO):
    """Gather a (query, head) row tile: row r reads token ``row_tok[r]``, query head
    ``kv_head * group + r % group``; dead rows (``row_tok[r] < 0``) are zero.

    Serves both orders: KV-outer tiles hold ``rows // group`` queries x ``group`` heads, query-outer
    tiles hold one token's ``group`` heads padded with dead rows.
    """

    @T.macro
    def gather_rows(src, kv_head, row_tok, dst):
        for r, d in dl.par(rows, dim):
            dst[r, d] = T.if_then_else(
                row_tok[r] >= 0, io.load(src[row_tok[r], kv_head * group + r % group, d]), 0
            )

    return gather_rows


ASYNC_BYTES = 16  # one cp.async copies 16 bytes


def make_issue_rows(rows: int, dim: int, group: int, token, dl: Dialect, io: IO):
    """``issue(src, kv_head, a, b, c, d, dst)``: start filling ``dst`` with a (query, head) row tile
    laid out as ``make_gather_rows``', row r reading token ``token(a, b, c, d, r)`` (-1: a dead
    row, zero), without waiting for it: on a GPU one 16-byte ``cp.async`` per thread and chunk
    (the destination through ``T.access_ptr``, which keeps the tile's swizzled layout; a predicate
    zero-fills dead rows). The caller commits the copies as one group (``Dialect.commit_async``)
    and waits for it (``Dialect.wait_async``) before a barrier. On the CPU the copy is
    synchronous. ``dim`` elements of 2 bytes must be whole 16-byte chunks."""
    vec = ASYNC_BYTES // 2
    if dim % vec:
        raise ValueError(f"async row copy: dim={dim} must be a multiple of {vec} (16-byte chunks)")

    if dl.simt:

        @T.macro
        def issue(src, kv_head, a, b, c, d, dst):
            for r, col in T.Parallel(rows, dim // vec):
                tok = token(a, b, c, d, r)
                T.ptx_cp_async(T.access_ptr(dst[r, col * vec], "w", vec),
                               T.access_ptr(src[T.max(tok, 0), kv_head * group + r % group, col * vec], "r", vec),
                               vec, tok >= 0)

        return issue

    @T.macro
    def issue(src, kv_head, a, b, c, d, dst):
        for r, col in dl.par(rows, dim):
            tok = token(a, b, c, d, r)
            dst[r, col] = T.if_then_else(tok >= 0, io.load(src[T.max(tok, 0), kv_head * group + r % group, col]), 0)

    return issue


def make_issue_item_tile(rows: int, dim: int, group: int, dl: Dialect, io: IO):
    """``issue(src, kv_head, ent_q, e0, e1, tile, dst)``: ``make_issue_rows`` for tile ``tile`` of a
    kv-outer work item's entries ``[e0, e1)`` (tokens ``ent_q``, as ``make_item_rows``)."""
    per_tile = rows // group

    def token(ent_q, e0, e1, tile, r):
        e = e0 + tile * per_tile + r // group
        return T.if_then_else(e < e1, ent_q[T.min(e, e1 - 1)], -1)

    return make_issue_rows(rows, dim, group, token, dl, io)


def make_issue_run_tile(rows: int, dim: int, group: int, dl: Dialect, io: IO):
    """``issue(src, kv_head, q0, p0, p_end, unused, dst)``: ``make_issue_rows`` for the query tile of
    ``rows // group`` consecutive positions from ``p0`` of the sequence starting at packed row
    ``q0``; positions at or past ``p_end`` are dead."""

    def token(q0, p0, p_end, unused, r):
        return T.if_then_else(p0 + r // group < p_end, q0 + p0 + r // group, -1)

    return make_issue_rows(rows, dim, group, token, dl, io)


def make_gather_row_stat(rows: int, group: int, dl: Dialect):
    """Per-row statistic (lse2, delta) of a row tile, laid out like ``make_gather_rows``."""

    @T.macro
    def gather_row_stat(src, kv_head, row_tok, dst):
        for r in dl.par(rows):
            dst[r] = T.if_then_else(row_tok[r] >= 0, src[row_tok[r], kv_head * group + r % group], 0)

    return gather_row_stat


def make_item_rows(rows: int, group: int, dl: Dialect):
    """Token of each row of tile ``tile`` of a work item's entry range [e0, e1); -1 past the end."""
    per_tile = rows // group

    @T.macro
    def item_rows(ent_q, e0, e1, tile, row_tok):
        for r in dl.par(rows):
            e = e0 + tile * per_tile + r // group
            row_tok[r] = T.if_then_else(e < e1, ent_q[e], -1)

    return item_rows


def make_online_softmax(rows: int, cols: int, dim: int, dl: Dialect):
    """One key tile of an online softmax: ``acc_s`` holds masked log2-domain scores (``-inf``
    where not visible); updates the running max ``m``, sum ``l`` and output ``acc_o`` (rescaled),
    leaving the tile's probabilities in ``p_s`` (input dtype, shared) for the caller's ``P @ V``.
    Rows that have seen nothing yet keep ``m = -inf``, a rescale of 1 and probabilities 0 (no NaN:
    they are shifted by 0, kept in ``m_prev`` once the rescale has used it), so a tile may leave
    a live row wholly masked (``q_fwd`` over several tokens)."""

    @T.macro
    def online_softmax(acc_s, m, m_prev, rescale, l, l_tile, acc_o, p_s):
        T.copy(m, m_prev)
        T.reduce_max(acc_s, m, dim=1, clear=False)
        for r in dl.par(rows):
            rescale[r] = T.if_then_else(m[r] == -T.infinity(ACCUM), 1, T.exp2(m_prev[r] - m[r]))
            m_prev[r] = T.if_then_else(m[r] == -T.infinity(ACCUM), 0, m[r])
        for r, c in dl.par(rows, cols):
            acc_s[r, c] = T.exp2(acc_s[r, c] - m_prev[r])
        T.reduce_sum(acc_s, l_tile, dim=1)
        for r in dl.par(rows):
            l[r] = l[r] * rescale[r] + l_tile[r]
        for r, d in dl.par(rows, dim):
            acc_o[r, d] *= rescale[r]
        T.copy(acc_s, p_s)

    return online_softmax


def make_store_normalised_rows(rows: int, dim: int, group: int, dl: Dialect, io: IO):
    """The end of an online softmax over a (query, head) row tile: row r (token ``row_tok[r]``,
    head ``kv_head * group + r % group``; dead rows skipped) gets ``o = acc_o / l`` and the natural-log
    ``lse = (m + log2 l) * ln 2``; 0 and ``-inf`` where the row saw no key (``l = 0``)."""

    @T.macro
    def store_normalised_rows(O, lse, kv_head, row_tok, acc_o, l, m):
        for r, d in dl.par(rows, dim):
            if row_tok[r] >= 0:
                O[row_tok[r], kv_head * group + r % group, d] = io.store(
                    T.if_then_else(l[r] > 0, acc_o[r, d] / l[r], 0))
        for r in dl.par(rows):
            if row_tok[r] >= 0:
                lse[row_tok[r], kv_head * group + r % group] = T.if_then_else(
                    l[r] > 0, (m[r] + T.log2(l[r])) * LN2, -T.infinity(ACCUM)
                )

    return store_normalised_rows


SCATTER_MODES = ("x2", "x4", "tma")


def make_scatter_add_rows(rows: int, dim: int, group: int, mode: str, dl: Dialect):
    """Add a float32 (query, head) row tile into ``dst[row_tok[r] - row0, head0 + r % group, :]``
    (``row0``: the first token of the accumulator window ``dst`` holds).

    Returns ``(macro, staging_shape)``; the caller allocates a float32 shared buffer of
    ``staging_shape`` (None: no staging) and passes it as ``stage``. Modes:

    * ``x2``: atomics straight from the accumulator fragment (its layout gives each thread pairs).
    * ``x4``: through shared memory, so each thread issues 16-byte vector atomics.
    * ``tma``: through shared memory, one TMA bulk reduce-add per query (its ``group`` heads are
      contiguous in ``dst``), issued by one thread.
    """
    per_tile = rows // group
    if mode == "x2":

        @T.macro
        def scatter_add(acc, dst, head0, row_tok, row0, stage):
            for r, d in dl.par(rows, dim):
                if row_tok[r] >= 0:
                    T.atomic_add(dst[row_tok[r] - row0, head0 + r % group, d], acc[r, d])

        return scatter_add, None
    if mode == "x4":

        @T.macro
        def scatter_add(acc, dst, head0, row_tok, row0, stage):
            T.copy(acc, stage)
            for r, d in dl.par(rows, dim):
                if row_tok[r] >= 0:
                    T.atomic_add(dst[row_tok[r] - row0, head0 + r % group, d], stage[r, d])

        return scatter_add, (rows, dim)
    if mode == "tma":

        @T.macro
        def scatter_add(acc, dst, head0, row_tok, row0, stage):
            for r, d in dl.par(rows, dim):
                stage[r // group, r % group, d] = acc[r, d]
            for qi in T.serial(per_tile):
                if row_tok[qi * group] >= 0:
                    T.atomic_add(dst[row_tok[qi * group] - row0, head0:head0 + group, :], stage[qi, :, :],
                                 annotations={"use_tma": 1})

        return scatter_add, (per_tile, group, dim)
    raise ValueError(f"scatter mode {mode!r}: must be one of {SCATTER_MODES}")
