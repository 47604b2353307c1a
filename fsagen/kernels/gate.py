"""The gated sum of the three branches' outputs, forward and backward, one pass over memory each.

``o = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa`` per (token, query head) row. As torch ops
this is five elementwise kernels with bf16 temporaries (about 12 row-sized reads and writes
forward); here the forward reads the three outputs once and writes ``o`` once, and the backward
reads dO and the three outputs once and writes their three gradients once.

Rows are the ``NR = N * Hq`` (token, head) rows of ``[N, Hq, D]`` tensors viewed as ``[NR, D]``.
Gates are ``[NG, 3]`` with ``NG = NR / rows_per_gate``: per (token, head) (``rows_per_gate`` 1)
or per token (``rows_per_gate = Hq``). The sum is formed in float32 from the inputs' dtype and
rounded once. The backward's gate gradient is per row (float32 ``[NR, 3]``): the glue sums it over
the heads of per-token gates.

* ``gate_fwd``: one CTA per ``rows`` rows: the rows' gates into a small tile, then the sum.
* ``gate_bwd``: per branch b, ``d o_b = g_b * dO`` and ``d g_b = sum_d dO * o_b`` (a row reduction).
"""
import tilelang.language as T

from .target import SIMT, Dialect
from .tiles import ACCUM

BRANCH_OUTPUTS = 3  # cmp, slc, swa: the gates' last axis


def make_param_types(NR, NG, D: int, io):
    """Factories of the programs' parameter types: ``[NR, D]`` rows and ``[NG, 3]`` gates. Each call
    is a new buffer: one ``T.Tensor`` object shared by two parameters would make them one buffer."""
    return (lambda: T.Tensor((NR, D), io.tensor)), (lambda: T.Tensor((NG, BRANCH_OUTPUTS), io.tensor))


def make_load_gates(rows: int, dl: Dialect, io):
    """``load_gates(gates, row0, n_rows, rows_per_gate, dst)``: ``dst[r, b]`` = the float32 gate
    ``b`` of row ``row0 + r`` (0 past ``n_rows``)."""

    @T.macro
    def load_gates(gates, row0, n_rows, rows_per_gate, dst):
        for r, b in dl.par(rows, BRANCH_OUTPUTS):
            dst[r, b] = T.if_then_else(row0 + r < n_rows,
                                       T.cast(io.load(gates[(row0 + r) // rows_per_gate, b]), ACCUM), 0)

    return load_gates


def gate_fwd(D: int, dtype: str, rows: int, threads: int, dl: Dialect = SIMT):
    NR, NG = T.dynamic("NR, NG")
    io = dl.io(dtype)
    load_gates = make_load_gates(rows, dl, io)

    def x(t, row, d):
        return T.cast(io.load(t[row, d]), ACCUM)

    rows_t, gates_t = make_param_types(NR, NG, D, io)

    @T.prim_func
    def main(o_cmp: rows_t(), o_slc: rows_t(), o_swa: rows_t(), gates: gates_t(), O: rows_t(), rows_per_gate: T.int32):
        with T.Kernel(T.ceildiv(NR, rows), threads=threads) as bx:
            g = dl.alloc_tile((rows, BRANCH_OUTPUTS), ACCUM)
            row0 = bx * rows
            load_gates(gates, row0, NR, rows_per_gate, g)
            for r, d in dl.par(rows, D):
                if row0 + r < NR:
                    O[row0 + r, d] = io.store(g[r, 0] * x(o_cmp, row0 + r, d) + g[r, 1] * x(o_slc, row0 + r, d)
                                              + g[r, 2] * x(o_swa, row0 + r, d))

    return main


def gate_bwd(D: int, dtype: str, rows: int, threads: int, dl: Dialect = SIMT):
    NR, NG = T.dynamic("NR, NG")
    io = dl.io(dtype)
    load_gates = make_load_gates(rows, dl, io)

    @T.macro
    def branch_grads(dO, o_b, d_b, dg, b, g, prod, acc, row0):
        for r, d in dl.par(rows, D):
            live = row0 + r < NR
            grad = T.if_then_else(live, T.cast(io.load(dO[row0 + r, d]), ACCUM), 0)
            if live:
                d_b[row0 + r, d] = io.store(g[r, b] * grad)
            prod[r, d] = grad * T.if_then_else(live, T.cast(io.load(o_b[row0 + r, d]), ACCUM), 0)
        T.reduce_sum(prod, acc, dim=1)
        for r in dl.par(rows):
            if row0 + r < NR:
                dg[row0 + r, b] = acc[r]

    rows_t, gates_t = make_param_types(NR, NG, D, io)

    @T.prim_func
    def main(dO: rows_t(), o_cmp: rows_t(), o_slc: rows_t(), o_swa: rows_t(), gates: gates_t(), d_cmp: rows_t(),
             d_slc: rows_t(), d_swa: rows_t(), dg: T.Tensor((NR, BRANCH_OUTPUTS), ACCUM), rows_per_gate: T.int32):
        with T.Kernel(T.ceildiv(NR, rows), threads=threads) as bx:
            g = dl.alloc_tile((rows, BRANCH_OUTPUTS), ACCUM)
            prod = dl.alloc_acc((rows, D), ACCUM)
            acc = dl.alloc_acc((rows,), ACCUM)
            row0 = bx * rows
            load_gates(gates, row0, NR, rows_per_gate, g)
            branch_grads(dO, o_cmp, d_cmp, dg, 0, g, prod, acc, row0)
            branch_grads(dO, o_slc, d_slc, dg, 1, g, prod, acc, row0)
            branch_grads(dO, o_swa, d_swa, dg, 2, g, prod, acc, row0)

    return main
