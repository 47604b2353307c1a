"""Dispatch glue of top-k block selection (program: kernels/select.py, which computes the block
scores and keeps the top-k in one pass: no score matrix in device memory, no host sync)."""
import math

import torch

from .glue import kernel_spec, plan_and_kernel
from .tile_index import seq_tiles

LN2 = math.log(2.0)


def select_forward(kern, plan, q, k_cmp, lse, cu_q, cu_k, topk, init_blocks, local_blocks, scale):
    """topk_idx int32 ``[Hkv, N, topk]``: block indices within each query's sequence, ascending,
    -1 padded. ``lse`` is cmp attention's natural-log lse ``[N, Hq]`` (float32)."""
    n, hq, _ = q.shape
    hkv = k_cmp.shape[1]
    out = torch.empty((hkv, n, topk), dtype=torch.int32, device=q.device)
    if n == 0:
        return out
    if k_cmp.shape[0] == 0:
        # No compressed token anywhere: K has no row for the kernel's tile loads, but the
        # kernel's loop is empty anyway; give it one dummy row (never read) to keep shapes valid.
        k_cmp = k_cmp.new_zeros((1, hkv, k_cmp.shape[2]))
    lse2 = lse / LN2
    tiles = seq_tiles(cu_q, n, plan.knob("rows") // (hq // hkv))
    kern["sel_topk"](q, k_cmp, lse2, tiles, cu_q, cu_k, out, int(init_blocks), int(local_blocks),
                     float(scale))
    return out


def select(q, k_cmp, lse, cu_q, cu_k, kernel_size, stride, block_size, topk, init_blocks, local_blocks,
           scale):
    spec = kernel_spec("sel", "fwd", q, k_cmp, block_size=block_size, topk=topk,
                       kernel_size=kernel_size, stride=stride)
    kern, plan = plan_and_kernel(spec, device=q.device)
    return select_forward(kern, plan, q, k_cmp, lse, cu_q, cu_k, topk, init_blocks, local_blocks, scale)
