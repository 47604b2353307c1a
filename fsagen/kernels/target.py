"""Dialects: the few TileLang constructs whose spelling depends on the compile target.

Every kernel in this package is written once. Where a GPU and TileLang's serial CPU backend
(target kind ``"c"``) need different spellings of the same step, the kernel asks its ``Dialect``
instead of writing either one; ``dialect_for(target)`` picks it from the schedule's ``[target]``
table (``schedules/*.toml``), so choosing a dialect is the schedule's business, never a kernel's.
``schedules/CPU.md`` records what TileLang 0.1.15's CPU backend accepts and why each entry below
exists.

=========================  ===============================  ======================================
step                       ``SIMT`` (CUDA)                   ``SERIAL`` (CPU, target kind "c")
=========================  ===============================  ======================================
accumulator tile           ``T.alloc_fragment``              ``T.alloc_local`` (no fragments)
operand tile               ``T.alloc_shared``                ``T.alloc_local`` (one shared buffer
                                                             per kernel at most on CPU)
element-wise tile loop     ``T.Parallel``                    ``T.grid`` (local buffers may not be
                                                             indexed by a ``T.Parallel`` variable)
16-bit tensors             bfloat16 / float16                bfloat16 as ``uint16`` bits converted
                                                             in the kernel (the C code generator
                                                             has no bfloat16 type); tiles float32
rows of a tensor -> tile   ``T.copy`` (TMA / cp.async)       guarded element loop with conversion
per-query lanes (sel)      one thread per query              a serial loop over the queries, state
                                                             arrays with one row per query
set bits of a mask (sel)   ``__popc`` / ``__ffs``            every bit, dead ones inserted as -inf
=========================  ===============================  ======================================
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import tilelang.language as T

ACCUM = "float32"
# C target kinds TileLang 0.1.15 compiles for the host CPU ("llvm" needs a TVM built with LLVM).
CPU_TARGET_KINDS = ("c",)


@dataclass(frozen=True)
class IO:
    """How a kernel declares, reads and writes the tensors of one element type.

    ``tensor``: the dtype of the PrimFunc parameter; ``tile``: the dtype of on-chip copies (gemm
    operands); ``load(x)``: a tensor element as a ``tile`` value; ``store(x)``: a value as a
    tensor element (an assignment casts the rest of the way)."""

    tensor: str
    tile: str
    load: Callable
    store: Callable


def _same(x):
    return x


def _bf16_bits_to_float(x):
    return T.reinterpret("float32", T.shift_left(T.Cast("uint32", x), T.uint32(16)))


def _float_to_bf16_bits(x):
    """Round to nearest even, as a GPU's conversion does (NaN stays NaN: its payload is high)."""
    u = T.reinterpret("uint32", T.Cast("float32", x))
    rounded = u + T.uint32(0x7FFF) + (T.shift_right(u, T.uint32(16)) & T.uint32(1))
    return T.Cast("uint16", T.shift_right(rounded, T.uint32(16)))


def _to_float(x):
    return T.Cast(ACCUM, x)


class SetBitsSIMT:
    """Visit the set bits of an int32 mask, lowest first: one round per set bit (``__popc``
    rounds, ``__ffs`` picks the lowest, the round clears it). Every round is live."""

    @staticmethod
    def rounds(mask, width):
        return T.call_extern("int32", "__popc", mask)

    @staticmethod
    def pick(mask, it):
        return T.call_extern("int32", "__ffs", mask) - 1

    @staticmethod
    def live(mask, bit):
        return True

    @staticmethod
    def rest(mask):
        return mask & (mask - 1)


class SetBitsSerial:
    """The same visit without bit intrinsics (the C code generator has none): one round per bit
    position, live where the bit is set, the mask unchanged."""

    @staticmethod
    def rounds(mask, width):
        return width

    @staticmethod
    def pick(mask, it):
        return it

    @staticmethod
    def live(mask, bit):
        return (T.shift_right(mask, bit) & 1) == 1

    @staticmethod
    def rest(mask):
        return mask


@dataclass(frozen=True)
class Dialect:
    name: str
    simt: bool

    # -- storage -------------------------------------------------------------------------------
    def io(self, dtype: str) -> IO:
        """The IO of a kernel's ``dtype`` tensors (q, k, v, o and their gradients)."""
        if self.simt:
            return IO(dtype, dtype, _same, _same)
        if dtype == "bfloat16":
            return IO("uint16", ACCUM, _bf16_bits_to_float, _float_to_bf16_bits)
        if dtype == "float16":
            return IO("float16", ACCUM, _to_float, _same)
        return IO(dtype, dtype, _same, _same)

    def alloc_acc(self, shape, dtype):
        """A tile the kernel computes on (GEMM accumulators, scores, row statistics)."""
        return T.alloc_fragment(shape, dtype) if self.simt else T.alloc_local(shape, dtype)

    def alloc_tile(self, shape, dtype):
        """A tile every thread reads (GEMM operands, gathered rows, per-row indices)."""
        return T.alloc_shared(shape, dtype) if self.simt else T.alloc_local(shape, dtype)

    # -- loops ---------------------------------------------------------------------------------
    def par(self, *extents):
        """An element-wise loop nest over a tile."""
        return T.Parallel(*extents) if self.simt else T.grid(*extents)

    def lanes(self, n: int) -> int:
        """Iterations of a lane loop over ``n`` per-query lanes: 1 on a GPU (the lanes are
        threads), ``n`` on the CPU. Per-lane state has this many rows, indexed by the loop
        variable (always 0 on a GPU)."""
        return 1 if self.simt else n

    def lane_loop(self, n: int):
        """The loop over a CTA's ``n`` lanes: ``for lane in dl.lane_loop(n): i = dl.lane_id(lane)``
        (one iteration on a GPU, whose ``n`` threads are the lanes; ``n`` on the CPU)."""
        return T.serial(self.lanes(n))

    def lane_id(self, lane):
        """The lane (query) a lane-loop iteration serves: the thread index on a GPU."""
        return T.get_thread_binding() if self.simt else lane

    @property
    def set_bits(self):
        return SetBitsSIMT if self.simt else SetBitsSerial

    # -- launch ----------------------------------------------------------------------------------
    def min_ctas_per_sm(self, n: int):
        """Inside a ``T.Kernel``: ask the compiler to leave registers for ``n`` resident CTAs per SM
        (``__launch_bounds__``' second argument) when ``n`` > 0 on a GPU; nothing otherwise (the
        CPU has no such bound). The annotation frame is returned for TVMScript to enter."""
        return T.annotate_min_blocks_per_sm(n) if n and self.simt else None

    # -- data movement ---------------------------------------------------------------------------
    def make_copy_rows(self, rows: int, dim: int, io: IO, bulk: bool = True):
        """``copy_rows(src, head, first, n_tok, dst)``: ``dst[i, :] = src[first + i, head, :]``
        for the ``rows`` rows of ``dst`` (``dim`` columns), 0 for rows at or past ``n_tok``.

        ``bulk`` on a GPU: TileLang's tile copy (cp.async / TMA, which a pipelined loop can
        overlap with compute; TileLang predicates the rows past the tensor's end and ``n_tok`` is not
        read: rows past it are the caller's to mask). Otherwise, and always on the CPU (whose
        copies must convert 16-bit elements), a guarded element loop."""
        if bulk and self.simt:

            @T.macro
            def copy_rows(src, head, first, n_tok, dst):
                T.copy(src[first:first + rows, head, :], dst)

            return copy_rows

        @T.macro
        def copy_rows(src, head, first, n_tok, dst):
            for i, d in self.par(rows, dim):
                dst[i, d] = T.if_then_else(first + i < n_tok, io.load(src[first + i, head, d]), 0)

        return copy_rows

    def commit_async(self):
        """Close this thread's asynchronous copies issued so far (``tiles.make_issue_item_tile``)
        into one group; nothing on the CPU, whose copies are synchronous."""
        return T.ptx_commit_group() if self.simt else None

    def wait_async(self, pending: int):
        """Wait until at most ``pending`` of this thread's groups of asynchronous copies are still
        in flight (then a barrier makes every thread's copies visible); nothing on the CPU."""
        return T.ptx_wait_group(pending) if self.simt else None

    def pass_configs(self) -> dict:
        """TileLang pass configs every program of this dialect compiles with."""
        # The CPU code generator emits vector casts it cannot compile (half4 -> float4).
        return {} if self.simt else {"tirx.disable_vectorize": True}


SIMT = Dialect("simt", True)
SERIAL = Dialect("serial", False)


def dialect_for(target: dict | None) -> Dialect:
    """The dialect of a schedule's ``[target]`` table: ``SERIAL`` for TileLang's C backend."""
    if target is not None and target.get("kind") in CPU_TARGET_KINDS:
        return SERIAL
    return SIMT
