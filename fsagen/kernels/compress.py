"""Compression of raw k/v rows into compressed tokens (mean / weighted pooling), forward and backward.

A sequence of length L has ``Lc = (L - ks) // s + 1`` compressed tokens (0 if ``L < ks``);
compressed token c pools raw positions ``[c*s, c*s + ks)`` of its sequence with per-(kv head,
window position) float32 weights ``W[h, j]``: ``X_c[c] = sum_j W[h, j] * X[c*s + j]``. Mean pooling
is ``W = 1 / ks``, so mean and weighted are one program. Accumulation is float32; outputs are
stored in the input dtype. ``ks`` and ``s`` are compile-time (``ks % s == 0``), so the window
loops unroll and the shared tiles have static shapes. The target's dialect (``target.py``) spells
the allocations, element loops, 16-bit tensor access and the span's bulk copy, so the same programs
run on a GPU and on TileLang's serial CPU backend (``schedules/CPU.md``).

Every program takes k and v together: the grid's third axis (``z``) picks the tensor, so one
launch covers both. Packed varlen: ``cu`` are the raw offsets, ``cu_c`` the compressed ones
(``validate_dense.expected_cu_seqlens_cmp``); tile tables (``fsagen.tile_index.seq_tiles``) give
each CTA (sequence, first position) and have a static length, so no host sync is needed.

* ``comp_fwd``: one CTA per (tile of ``rows / s`` compressed tokens, kv head, k|v). The tile's
  windows overlap (``ks > s``); they span ``rows + ks - s`` consecutive raw rows, which are loaded
  once into shared memory (``Dialect.make_copy_rows``: a bulk copy on a GPU) and pooled from there.
* ``comp_bwd_dx``: one CTA per (tile of ``rows`` raw rows, kv head, k|v). Raw row p receives from
  the ``ks / s`` windows covering it, ``c = p // s - u`` (u < ks / s) at window position
  ``p % s + u * s``; the tile's ``rows / s + ks / s - 1`` upstream compressed rows are loaded once
  (zero outside ``[0, Lc)``), each raw row is written once: no atomics, and rows that no window
  covers (tails, sequences shorter than ks) get 0.
* ``comp_bwd_dw``: the weights' gradient, ``dW[h, j] = sum_c dX_c[c] . X[c*s + j]``: per forward
  tile (its span of raw rows again in shared memory) a float32 partial ``[ks]`` per (k|v, tile,
  kv head), summed by the caller (deterministic, no atomics).
"""

import tilelang.language as T

from .target import IO, SIMT, Dialect
from .tiles import ACCUM

INDEX = "int32"


def _tile_shape(kernel_size: int, stride: int, rows: int) -> tuple[int, int]:
    """(compressed tokens per forward tile, raw rows their windows span)."""
    if kernel_size % stride:
        raise ValueError(f"compress programs: kernel_size={kernel_size} must be a multiple of stride={stride}")
    if rows % stride:
        raise ValueError(f"compress programs: rows={rows} must be a multiple of stride={stride}")
    return rows // stride, rows + kernel_size - stride


def _make_load_weights(kernel_size: int, dl: Dialect):
    @T.macro
    def load_weights(W, head, w_s):
        for j in dl.par(kernel_size):
            w_s[j] = W[head, j]

    return load_weights


def _make_load_cmp_rows(n_rows: int, dim: int, dl: Dialect, io: IO):
    """Compressed rows ``first + i`` (i < n_rows) of sequence positions ``[lo, hi)`` only; 0 elsewhere."""

    @T.macro
    def load_cmp_rows(Xc, head, base, first, lo, hi, dst):
        for i, d in dl.par(n_rows, dim):
            dst[i, d] = T.if_then_else((first + i >= lo) & (first + i < hi), io.load(Xc[base + first + i, head, d]), 0)

    return load_cmp_rows


def comp_fwd(D: int, dtype: str, kernel_size: int, stride: int, rows: int, threads: int, dl: Dialect = SIMT):
    BC, SPAN = _tile_shape(kernel_size, stride, rows)
    N, NC, HKV, NT, B1 = T.dynamic("N, NC, HKV, NT, B1")
    io = dl.io(dtype)
    load_w = _make_load_weights(kernel_size, dl)
    # the span's rows past the tensor's end read as zero; rows past the sequence are never used
    load_span = dl.make_copy_rows(SPAN, D, io)

    @T.macro
    def pool(X, Xc, h, row0, out0, n_c, w_s, span_s, acc):
        load_span(X, h, row0, N, span_s)
        T.clear(acc)
        for j in T.unroll(kernel_size):
            for c, d in dl.par(BC, D):
                acc[c, d] += w_s[j] * span_s[c * stride + j, d]
        for c, d in dl.par(BC, D):
            if c < n_c:
                Xc[out0 + c, h, d] = io.store(acc[c, d])

    @T.prim_func
    def main(
        K: T.Tensor((N, HKV, D), io.tensor),
        V: T.Tensor((N, HKV, D), io.tensor),
        W: T.Tensor((HKV, kernel_size), ACCUM),
        tiles: T.Tensor((NT, 2), INDEX),
        cu: T.Tensor((B1,), INDEX),
        cu_c: T.Tensor((B1,), INDEX),
        Kc: T.Tensor((NC, HKV, D), io.tensor),
        Vc: T.Tensor((NC, HKV, D), io.tensor),
    ):
        with T.Kernel(NT, HKV, 2, threads=threads) as (bt, h, z):
            span_s = dl.alloc_tile((SPAN, D), io.tile)
            w_s = dl.alloc_tile((kernel_size,), ACCUM)
            acc = dl.alloc_acc((BC, D), ACCUM)
            seq = tiles[bt, 0]
            c0 = tiles[bt, 1]
            if seq >= 0:
                n_c = T.min(BC, cu_c[seq + 1] - cu_c[seq] - c0)
                row0 = cu[seq] + c0 * stride
                out0 = cu_c[seq] + c0
                load_w(W, h, w_s)
                if z == 0:
                    pool(K, Kc, h, row0, out0, n_c, w_s, span_s, acc)
                else:
                    pool(V, Vc, h, row0, out0, n_c, w_s, span_s, acc)

    return main


def comp_bwd_dx(D: int, dtype: str, kernel_size: int, stride: int, rows: int, threads: int, dl: Dialect = SIMT):
    _tile_shape(kernel_size, stride, rows)
    NU = kernel_size // stride  # windows covering one raw row
    NCB = rows // stride + NU - 1  # compressed rows a tile of raw rows receives from
    N, NC, HKV, NT, B1 = T.dynamic("N, NC, HKV, NT, B1")
    io = dl.io(dtype)
    load_w = _make_load_weights(kernel_size, dl)
    load_cmp = _make_load_cmp_rows(NCB, D, dl, io)

    @T.macro
    def spread(dXc, dX, h, cmp0, n_cmp, raw0, r0, n_r, w_s, dxc_s):
        load_cmp(dXc, h, cmp0, r0 // stride - (NU - 1), 0, n_cmp, dxc_s)
        for r, d in dl.par(rows, D):
            if r < n_r:
                dX[raw0 + r0 + r, h, d] = io.store(sum(
                    w_s[r % stride + u * stride] * T.cast(dxc_s[r // stride + NU - 1 - u, d], ACCUM)
                    for u in range(NU)
                ))

    @T.prim_func
    def main(
        dKc: T.Tensor((NC, HKV, D), io.tensor),
        dVc: T.Tensor((NC, HKV, D), io.tensor),
        W: T.Tensor((HKV, kernel_size), ACCUM),
        tiles: T.Tensor((NT, 2), INDEX),
        cu: T.Tensor((B1,), INDEX),
        cu_c: T.Tensor((B1,), INDEX),
        dK: T.Tensor((N, HKV, D), io.tensor),
        dV: T.Tensor((N, HKV, D), io.tensor),
    ):
        with T.Kernel(NT, HKV, 2, threads=threads) as (bt, h, z):
            dxc_s = dl.alloc_tile((NCB, D), io.tile)
            w_s = dl.alloc_tile((kernel_size,), ACCUM)
            seq = tiles[bt, 0]
            r0 = tiles[bt, 1]
            if seq >= 0:
                raw0 = cu[seq]
                n_r = T.min(rows, cu[seq + 1] - raw0 - r0)
                cmp0 = cu_c[seq]
                n_cmp = cu_c[seq + 1] - cmp0
                load_w(W, h, w_s)
                if z == 0:
                    spread(dKc, dK, h, cmp0, n_cmp, raw0, r0, n_r, w_s, dxc_s)
                else:
                    spread(dVc, dV, h, cmp0, n_cmp, raw0, r0, n_r, w_s, dxc_s)

    return main


def comp_bwd_dw(D: int, dtype: str, kernel_size: int, stride: int, rows: int, threads: int, dl: Dialect = SIMT):
    BC, SPAN = _tile_shape(kernel_size, stride, rows)
    N, NC, HKV, NT, B1 = T.dynamic("N, NC, HKV, NT, B1")
    io = dl.io(dtype)
    load_span = dl.make_copy_rows(SPAN, D, io)
    load_cmp = _make_load_cmp_rows(BC, D, dl, io)

    @T.macro
    def partial(X, dXc, h, row0, cmp0, c0, n_c, span_s, dxc_s, prod, row_sum, tab_s):
        load_span(X, h, row0, N, span_s)
        load_cmp(dXc, h, cmp0, c0, c0, c0 + n_c, dxc_s)
        for j in T.serial(kernel_size):
            for c, d in dl.par(BC, D):
                prod[c, d] = T.cast(dxc_s[c, d], ACCUM) * T.cast(span_s[c * stride + j, d], ACCUM)
            T.reduce_sum(prod, row_sum, dim=1)
            for c in dl.par(BC):
                tab_s[j, c] = row_sum[c]

    @T.prim_func
    def main(
        K: T.Tensor((N, HKV, D), io.tensor),
        V: T.Tensor((N, HKV, D), io.tensor),
        dKc: T.Tensor((NC, HKV, D), io.tensor),
        dVc: T.Tensor((NC, HKV, D), io.tensor),
        tiles: T.Tensor((NT, 2), INDEX),
        cu: T.Tensor((B1,), INDEX),
        cu_c: T.Tensor((B1,), INDEX),
        dW_part: T.Tensor((2, NT, HKV, kernel_size), ACCUM),
    ):
        with T.Kernel(NT, HKV, 2, threads=threads) as (bt, h, z):
            span_s = dl.alloc_tile((SPAN, D), io.tile)
            dxc_s = dl.alloc_tile((BC, D), io.tile)
            tab_s = dl.alloc_tile((kernel_size, BC), ACCUM)
            prod = dl.alloc_acc((BC, D), ACCUM)
            row_sum = dl.alloc_acc((BC,), ACCUM)
            seq = tiles[bt, 0]
            c0 = tiles[bt, 1]
            if seq >= 0:
                n_c = T.min(BC, cu_c[seq + 1] - cu_c[seq] - c0)
                row0 = cu[seq] + c0 * stride
                cmp0 = cu_c[seq]
                if z == 0:
                    partial(K, dKc, h, row0, cmp0, c0, n_c, span_s, dxc_s, prod, row_sum, tab_s)
                else:
                    partial(V, dVc, h, row0, cmp0, c0, n_c, span_s, dxc_s, prod, row_sum, tab_s)
                for j in dl.par(kernel_size):
                    dW_part[z, bt, h, j] = sum(tab_s[j, c] for c in range(BC))

    return main
