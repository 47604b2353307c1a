"""Dispatch glue of the slc branch: picks the plan, builds the block index, launches the stages.

Inputs are already validated and contiguous (``fsagen.ops`` does that). Nothing here reads a
tensor's values on the host, so the sequence of launches is capturable in a CUDA graph.

Memory: the KV-outer stages accumulate into float32 buffers of ``N * heads * D``; kv heads are
processed in chunks so that those buffers and the block index stay under ``FSAGEN_CHUNK_BYTES``
(default 512 MiB), down to one kv head a chunk. When the plan cuts the index into query chunks
(knob ``chunk_rows``), the o / dq accumulator is further cut into windows of whole query chunks of at
most ``FSAGEN_ACC_BYTES`` (default 256 MiB), one launch per window over the same index; without
query chunks one head's buffer is N * G * D * 4 bytes (512 MiB at N = 65536, G = 16, D = 128).

A kv-outer forward keeps its block index (``FORWARD_INDEX``, keyed by its lse's storage) and the
backward of the same call uses it instead of sorting the selection again; both passes cut the kv
heads the same way (``_kv_outer_head_chunks``) so that the chunks meet.
"""
import math
import os
from dataclasses import replace

import torch

from .glue import alloc, head_chunks, kernel_spec, plan_and_kernel, plan_for as _plan_for_spec
from .slc_index import ForwardIndexStash, build_block_index, token_layout

LN2 = math.log(2.0)
FORWARD_INDEX = ForwardIndexStash()  # kv-outer forwards' block indices, for their backward


def _spec(q, k, topk_idx, block_size, phase):
    return kernel_spec("slc", phase, q, k, block_size=block_size, topk=topk_idx.shape[2])


def plan_for(q, k, topk_idx, block_size, phase, loop_order=None):
    """(spec, plan, arch) the schedule picks for these inputs; loads nothing."""
    spec = _spec(q, k, topk_idx, block_size, phase)
    return (spec, *_plan_for_spec(spec, loop_order, q.device))


def _kernel(q, k, topk_idx, block_size, phase, loop_order):
    return plan_and_kernel(_spec(q, k, topk_idx, block_size, phase), loop_order, q.device)


def _query_chunk(plan, G):
    """Query tokens per chunk of the KV-outer index (``slc_index``): the plan's ``chunk_rows``
    float32 accumulator rows over the G heads of a token; 0 = no chunking."""
    rows = plan.knob("chunk_rows")
    return max(rows // G, 1) if rows else 0


def _acc_windows(num_tokens, query_chunk, row_bytes):
    """Token windows ``[q_lo, q_hi)`` of the o / dq accumulator, each whole query chunks of the
    index and at most ``FSAGEN_ACC_BYTES`` of ``row_bytes`` per token (at least one chunk); a single
    window without query chunks (an item's queries may then span the sequence)."""
    if not query_chunk or num_tokens <= query_chunk:
        return [(0, num_tokens)]
    budget = int(os.environ.get("FSAGEN_ACC_BYTES", 256 << 20))
    width = max(1, budget // max(row_bytes * query_chunk, 1)) * query_chunk
    return [(lo, min(num_tokens, lo + width)) for lo in range(0, num_tokens, width)]


def _head_chunks(num_tokens, num_kv_heads, topk, acc_floats_per_head_token):
    """Kv-head ranges whose float32 buffers (``acc_floats_per_head_token`` per token and kv head)
    and block index (~32 bytes an entry) fit ``FSAGEN_CHUNK_BYTES`` (``glue.head_chunks``)."""
    return head_chunks(num_kv_heads, num_tokens * (acc_floats_per_head_token * 4 + topk * 32))


def _kv_outer_head_chunks(num_tokens, num_kv_heads, topk, G, D, Dv):
    """The kv-head chunks of both kv-outer passes: the forward's buffers (o_acc and the partial
    statistics, G * (Dv + topk) floats a token) or the backward's (dq_acc, G * D), whichever is
    larger, so that the backward meets the forward's index chunks and can reuse them."""
    return _head_chunks(num_tokens, num_kv_heads, topk, G * max(Dv + topk, D))


def _index(kern, indices, topk_idx, layout, block_size, h_lo, h_hi, per_item, chunk):
    """The block index of kv heads [h_lo, h_hi): the forward's (``indices``) when it has this one,
    else built now by the plan's index stages (``kern``)."""
    found = indices.get((h_lo, h_hi, per_item, chunk))
    return found if found is not None else build_block_index(topk_idx[h_lo:h_hi], layout, block_size, h_lo,
                                                              per_item, chunk, kern)


def slc_forward(q, k, v, topk_idx, cu_seqlens, block_size, scale, loop_order=None):
    N, Hq, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[2]
    G, topk = Hq // Hkv, topk_idx.shape[2]
    kern, plan = _kernel(q, k, topk_idx, block_size, "fwd", loop_order)
    o = alloc((N, Hq, Dv), q.dtype, q.device)
    lse = alloc((N, Hq), torch.float32, q.device)
    if N == 0:
        return o, lse
    layout = token_layout(cu_seqlens, N, block_size)
    if plan.loop_order == "q_outer":
        tokens = plan.knob("q_tokens")
        if tokens == 1:
            kern["q_fwd"](q, k, v, topk_idx, layout.tok_start, o, lse, float(scale))
            return o, lse
        # the CTAs' work lists: the union of each `tokens`-token tile's blocks, and who selected them
        shape = (Hkv, -(-N // tokens), tokens, topk)
        blocks = torch.empty(shape, dtype=torch.int32, device=q.device)
        users = torch.empty(shape, dtype=torch.int32, device=q.device)
        kern["q_fwd_plan"](topk_idx, layout.tok_start, blocks, users)
        kern["q_fwd"](q, k, v, blocks, users, o, lse, float(scale))
        return o, lse

    per_item = plan.knob("rows") // G * plan.knob("tiles_per_item")
    chunk = _query_chunk(plan, G)
    lse2 = torch.empty((N, Hq), dtype=torch.float32, device=q.device)
    kept = {}
    for h_lo, h_hi in _kv_outer_head_chunks(N, Hkv, topk, G, D, Dv):
        heads = slice(h_lo * G, h_hi * G)
        index = build_block_index(topk_idx[h_lo:h_hi], layout, block_size, h_lo, per_item, chunk, kern)
        # the backward's part (a fresh empty ent_k: a slice of it would keep its storage alive)
        kept[(h_lo, h_hi, per_item, chunk)] = replace(index, ent_k=index.ent_k.new_empty(0))
        part = torch.full((h_hi - h_lo, N, topk, G), -math.inf, dtype=torch.float32, device=q.device)
        kern["kv_fwd_stats"](q, k, index.items, index.ent_q, index.ent_k, part, h_lo, float(scale))
        lse_c = torch.logsumexp(part, dim=2)  # [hc, N, G], natural log
        lse[:, heads] = lse_c.permute(1, 0, 2).reshape(N, -1)
        lse2[:, heads] = lse[:, heads] / LN2
        del part, lse_c
        for q_lo, q_hi in _acc_windows(N, chunk, (h_hi - h_lo) * G * Dv * 4):
            o_acc = torch.zeros((q_hi - q_lo, (h_hi - h_lo) * G, Dv), dtype=torch.float32, device=q.device)
            kern["kv_fwd_accum"](q, k, v, index.items, index.ent_q, lse2, o_acc, h_lo, q_lo, q_hi, float(scale))
            o[q_lo:q_hi, heads] = o_acc
    FORWARD_INDEX.put(lse, topk_idx, cu_seqlens, block_size, kept)
    return o, lse


def slc_backward(do, q, k, v, o, lse, topk_idx, cu_seqlens, block_size, scale, loop_order=None):
    N, Hq, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[2]
    G, topk = Hq // Hkv, topk_idx.shape[2]
    kern, plan = _kernel(q, k, topk_idx, block_size, "bwd", loop_order)
    dq = alloc(q.shape, q.dtype, q.device)
    if N == 0:
        return dq, alloc(k.shape, k.dtype, k.device), alloc(v.shape, v.dtype, v.device)
    layout = token_layout(cu_seqlens, N, block_size)  # the forward's, where fsagen.seqlens_cache kept it
    indices = FORWARD_INDEX.get(lse, topk_idx, cu_seqlens, block_size)
    delta = torch.empty((N, Hq), dtype=torch.float32, device=q.device)
    kern["row_dot"](do, o, delta)
    lse2 = lse / LN2
    dk_acc = torch.zeros((N, Hkv, D), dtype=torch.float32, device=q.device)
    dv_acc = torch.zeros((N, Hkv, Dv), dtype=torch.float32, device=q.device)
    per_item = plan.knob("rows") // G * plan.knob("tiles_per_item")
    if plan.loop_order == "q_outer":
        kern["q_bwd_dq"](q, k, v, do, topk_idx, layout.tok_start, lse2, delta, dq, float(scale))
        no_dq = torch.empty((1, 1, D), dtype=torch.float32, device=q.device)
        for h_lo, h_hi in _head_chunks(N, Hkv, topk, 0):
            index = _index(kern, indices, topk_idx, layout, block_size, h_lo, h_hi, per_item, 0)
            kern["kv_bwd_dkdv"](q, k, v, do, index.items, index.ent_q, lse2, delta, no_dq,
                                dk_acc, dv_acc, h_lo, 0, N, float(scale))
    else:
        chunk = _query_chunk(plan, G)
        for h_lo, h_hi in _kv_outer_head_chunks(N, Hkv, topk, G, D, Dv):
            index = _index(kern, indices, topk_idx, layout, block_size, h_lo, h_hi, per_item, chunk)
            for q_lo, q_hi in _acc_windows(N, chunk, (h_hi - h_lo) * G * D * 4):
                dq_acc = torch.zeros((q_hi - q_lo, (h_hi - h_lo) * G, D), dtype=torch.float32, device=q.device)
                kern["kv_bwd"](q, k, v, do, index.items, index.ent_q, lse2, delta, dq_acc,
                               dk_acc, dv_acc, h_lo, q_lo, q_hi, float(scale))
                dq[q_lo:q_hi, h_lo * G:h_hi * G] = dq_acc
    return dq, dk_acc.to(k.dtype), dv_acc.to(v.dtype)
