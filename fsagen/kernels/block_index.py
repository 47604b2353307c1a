"""The kv-outer block index's elementwise steps as four small programs (``fsagen/slc_index.py``).

The index is built around one stable sort of an int32 key per (kv head, query token, slot)
entry. Spelled as torch ops, the steps around the sort took ~60 launches (each a few
microseconds of host time: at short sequences the host's launches, not the GPU, set the pace of
a kv-outer forward). Here they are four launches, each a lane per element doing plain scalar
work (on a GPU a lane is a thread; on the CPU a serial loop, ``Dialect.lane_loop``):

* ``index_keys``: the sort key of every entry, ``n_keys`` for entries that take no part (-1
  padding, or a block after the query's own);
* ``index_entries``: from the sort's permutation, each sorted entry's query token and slot;
* ``index_bounds``: per key, where its run of sorted entries starts (a binary search of the
  sorted keys) and how many work items of ``per_item`` entries it needs;
* ``index_items``: per work item, its key (a binary search of the items' running end), hence
  its kv head, KV block and entry range; empty past the last real item.

Every size is a runtime argument, so one compiled program serves every spec. Results are equal,
element for element, to the torch formulation (``slc_index.build_block_index_torch``, kept as
the tests' oracle).
"""
import tilelang.language as T

from .target import SIMT, Dialect

INDEX = "int32"
LANES = 128
SEARCH_STEPS = 32  # a binary search over at most 2^31 elements


def index_keys(dl: Dialect = SIMT):
    """``key[e]`` for entry ``e = (h * N + t) * TOPK + s``: ``((h * n_chunks + t // chunk) * nb +
    tok_block_base[t] + topk_idx[h, t, s])`` where the slot is valid, else ``n_chunks * nb * HC``."""
    HC, N, TOPK, E = T.dynamic("HC, N, TOPK, E")

    @T.prim_func
    def main(
        topk_idx: T.Tensor((HC, N, TOPK), INDEX),
        tok_pos: T.Tensor((N,), "int64"),
        tok_block_base: T.Tensor((N,), "int64"),
        key: T.Tensor((E,), INDEX),
        block_size: T.int32,
        chunk: T.int32,
        n_chunks: T.int32,
        nb: T.int32,
    ):
        with T.Kernel(T.ceildiv(E, LANES), threads=LANES) as bx:
            for lane in dl.lane_loop(LANES):
                e = bx * LANES + dl.lane_id(lane)
                if e < E:
                    h = e // (N * TOPK)
                    t = e // TOPK % N
                    blk = topk_idx[h, t, e % TOPK]
                    own = T.Cast(INDEX, tok_pos[t] // block_size)
                    key[e] = T.if_then_else(
                        (blk >= 0) & (blk <= own),
                        (h * n_chunks + t // chunk) * nb + T.Cast(INDEX, tok_block_base[t]) + blk,
                        HC * n_chunks * nb,
                    )

    return main


def index_entries(dl: Dialect = SIMT):
    """``ent_q[e]``, ``ent_k[e]``: query token and slot of the entry the sort put at ``e``."""
    E = T.dynamic("E")

    @T.prim_func
    def main(
        perm: T.Tensor((E,), "int64"),
        ent_q: T.Tensor((E,), INDEX),
        ent_k: T.Tensor((E,), INDEX),
        num_tokens: T.int32,
        topk: T.int32,
    ):
        with T.Kernel(T.ceildiv(E, LANES), threads=LANES) as bx:
            for lane in dl.lane_loop(LANES):
                e = bx * LANES + dl.lane_id(lane)
                if e < E:
                    src = T.Cast(INDEX, perm[e])
                    ent_q[e] = src // topk % num_tokens
                    ent_k[e] = src % topk

    return main


def _make_search(below):
    """``search(arr, n, value, lo, hi)``: binary search of the ascending ``arr[:n]``, leaving in
    ``lo`` the first position whose element is not ``below(element, value)`` (``n`` if none);
    ``lo`` and ``hi`` are the caller's one-element local buffers (a macro's assignment to a
    scalar variable would only rebind its own name)."""

    @T.macro
    def search(arr, n, value, lo, hi):
        lo[0] = 0
        hi[0] = n
        for _ in T.serial(SEARCH_STEPS):
            if lo[0] < hi[0]:  # the midpoint as lo + (hi - lo) // 2: lo + hi may pass 2^31
                if below(arr[lo[0] + (hi[0] - lo[0]) // 2], value):
                    lo[0] = lo[0] + (hi[0] - lo[0]) // 2 + 1
                else:
                    hi[0] = lo[0] + (hi[0] - lo[0]) // 2

    return search


_first_not_less = _make_search(lambda x, v: x < v)  # lower bound
_first_greater = _make_search(lambda x, v: x <= v)  # upper bound


def index_bounds(dl: Dialect = SIMT):
    """``bounds[j]`` (``j <= n_keys``): the first sorted entry whose key is >= j;
    ``items_per_key[j]`` (``j < n_keys``): ``ceil((bounds[j + 1] - bounds[j]) / per_item)``."""
    E, NK1, NK = T.dynamic("E, NK1, NK")

    @T.prim_func
    def main(
        sorted_key: T.Tensor((E,), INDEX),
        bounds: T.Tensor((NK1,), INDEX),
        items_per_key: T.Tensor((NK,), INDEX),
        per_item: T.int32,
    ):
        with T.Kernel(T.ceildiv(NK1, LANES), threads=LANES) as bx:
            lo = T.alloc_local((1,), INDEX)
            hi = T.alloc_local((1,), INDEX)
            first = T.alloc_var(INDEX)
            for lane in dl.lane_loop(LANES):
                j = bx * LANES + dl.lane_id(lane)
                if j < NK1:
                    _first_not_less(sorted_key, E, j, lo, hi)
                    bounds[j] = lo[0]
                    first = lo[0]
                    if j < NK:
                        _first_not_less(sorted_key, E, j + 1, lo, hi)
                        items_per_key[j] = (lo[0] - first + per_item - 1) // per_item

    return main


def index_items(dl: Dialect = SIMT):
    """``items[i] = (kv head, first token of the KV block, entry begin, entry end)`` of work item
    ``i``: its key is the first ``j`` with ``items_end[j] > i`` (``items_end``: running sum of
    ``items_per_key``), and it is item ``i - items_end[j - 1]`` of that key. Items past the last
    (``j == n_keys``) are empty (``begin == end == 0``) and name the last key's head and block."""
    NK, NK1, NB, MI = T.dynamic("NK, NK1, NB, MI")

    @T.prim_func
    def main(
        items_end: T.Tensor((NK,), INDEX),
        bounds: T.Tensor((NK1,), INDEX),
        block_first_tok: T.Tensor((NB,), "int64"),
        items: T.Tensor((MI, 4), INDEX),
        h_lo: T.int32,
        n_chunks: T.int32,
        per_item: T.int32,
    ):
        with T.Kernel(T.ceildiv(MI, LANES), threads=LANES) as bx:
            lo = T.alloc_local((1,), INDEX)
            hi = T.alloc_local((1,), INDEX)
            owner = T.alloc_var(INDEX)
            begin = T.alloc_var(INDEX)
            for lane in dl.lane_loop(LANES):
                i = bx * LANES + dl.lane_id(lane)
                if i < MI:
                    _first_greater(items_end, NK, i, lo, hi)
                    owner = T.min(lo[0], NK - 1)
                    begin = bounds[owner] + (i - T.if_then_else(owner > 0, items_end[T.max(owner - 1, 0)], 0)) * per_item
                    items[i, 0] = h_lo + owner // (n_chunks * NB)
                    items[i, 1] = T.Cast(INDEX, block_first_tok[owner % NB])
                    items[i, 2] = T.if_then_else(lo[0] < NK, begin, 0)
                    items[i, 3] = T.if_then_else(lo[0] < NK, T.min(begin + per_item, bounds[owner + 1]), 0)

    return main
