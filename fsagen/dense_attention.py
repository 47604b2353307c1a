"""Dispatch glue of the contiguous-key-range branches, cmp and swa (programs: kernels/dense.py).

Inputs are validated and contiguous (``fsagen.ops_dense`` does that). Nothing here reads a tensor's
values on the host, so the launches are capturable in a CUDA graph.

``arg_a`` / ``arg_b`` are the branch's runtime mask parameters: (kernel_size, stride) for cmp,
(window_size, unused) for swa. Memory: besides the outputs, float32 ``[N, Hq]`` row statistics
only (every gradient is accumulated in registers and stored once, or, with ``q_split``, added
into float32 dK / dV buffers).
"""
import math

import torch

from .glue import alloc, kernel_spec, plan_and_kernel
from .tile_index import seq_tiles

LN2 = math.log(2.0)


def dense_forward(kern, plan, q, k, v, cu_q, cu_k, arg_a, arg_b, scale):
    """(o ``[N, Hq, Dv]``, lse ``[N, Hq]`` float32, natural log, -inf where no key is visible)."""
    n, hq, _ = q.shape
    hkv, dv = k.shape[1], v.shape[2]
    o = alloc((n, hq, dv), q.dtype, q.device)
    lse = alloc((n, hq), torch.float32, q.device)
    if n == 0:
        return o, lse
    if k.shape[0] == 0:  # every sequence shorter than the first key range: nothing visible
        return o.zero_(), lse.fill_(-math.inf)
    tiles = seq_tiles(cu_q, n, plan.knob("rows") // (hq // hkv))
    kern["dense_fwd"](q, k, v, tiles, cu_q, cu_k, o, lse, int(arg_a), int(arg_b), float(scale))
    return o, lse


def dense_backward(kern, plan, do, q, k, v, o, lse, cu_q, cu_k, arg_a, arg_b, scale, query_span):
    """(dq, dk, dv) in the inputs' dtypes: dq by query tiles, dk/dv by key tiles.

    ``query_span`` bounds how many query positions see one key tile (:func:`query_span`); with
    the plan's ``q_split`` > 0 it sizes the split of each key tile's queries."""
    n, hq, _ = q.shape
    nk, hkv = k.shape[:2]
    dq = alloc(q.shape, q.dtype, q.device)
    dk = alloc(k.shape, k.dtype, k.device)
    dv = alloc(v.shape, v.dtype, v.device)
    if n == 0 or nk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty((n, hq), dtype=torch.float32, device=q.device)
    kern["row_dot"](do, o, delta)
    lse2 = lse / LN2
    a, b, s = int(arg_a), int(arg_b), float(scale)
    q_tiles = seq_tiles(cu_q, n, plan.knob("rows") // (hq // hkv))
    kern["dense_bwd_dq"](q, k, v, do, q_tiles, cu_q, cu_k, lse2, delta, dq, a, b, s)
    k_tiles = seq_tiles(cu_k, nk, plan.knob("keys"))
    q_split = plan.knob("q_split")
    if q_split == 0:
        runs = torch.zeros_like(k_tiles[:, :1])
        kern["dense_bwd_dkdv"](q, k, v, do, torch.cat([k_tiles, runs], 1), cu_q, cu_k, lse2, delta,
                               dk, dv, a, b, s)
        return dq, dk, dv
    # one work row per (key tile, run of q_split query positions); a key tile sees at most
    # query_span queries, which bounds the runs without reading any value on the host
    n_runs = -(-min(n, query_span) // q_split)
    run = torch.arange(n_runs, device=q.device, dtype=torch.int32)
    work = torch.cat([k_tiles.repeat_interleave(n_runs, 0), run.repeat(k_tiles.shape[0])[:, None]], 1)
    dk_acc = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv_acc = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    kern["dense_bwd_dkdv"](q, k, v, do, work, cu_q, cu_k, lse2, delta, dk_acc, dv_acc, a, b, s)
    return dq, dk.copy_(dk_acc), dv.copy_(dv_acc)


def query_span(branch, num_queries, arg_a, keys):
    """An upper bound on the query positions that see one key tile of ``keys`` keys."""
    return num_queries if branch == "cmp" else min(num_queries, arg_a + keys)


def forward(branch, q, k, v, cu_q, cu_k, arg_a, arg_b, scale):
    kern, plan = plan_and_kernel(kernel_spec(branch, "fwd", q, k), device=q.device)
    return dense_forward(kern, plan, q, k, v, cu_q, cu_k, arg_a, arg_b, scale)


def backward(branch, do, q, k, v, o, lse, cu_q, cu_k, arg_a, arg_b, scale):
    kern, plan = plan_and_kernel(kernel_spec(branch, "bwd", q, k), device=q.device)
    span = query_span(branch, q.shape[0], arg_a, plan.knob("keys"))
    return dense_backward(kern, plan, do, q, k, v, o, lse, cu_q, cu_k, arg_a, arg_b, scale, span)
