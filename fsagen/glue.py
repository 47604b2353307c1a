"""Helpers shared by the branches' dispatch glue (slc, cmp/swa, sel): output allocation, the
schedule's plan and compiled kernel for a spec, and kv-head chunking of float32 buffers."""
import os

import torch

DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def alloc(shape, dtype, device):
    """Output buffers: NaN-poisoned when FSAGEN_POISON=1 so an unwritten element cannot pass a test."""
    if os.environ.get("FSAGEN_POISON") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def plan_and_kernel(spec, loop_order=None):
    """(compiled kernel, plan) the current device's schedule gives ``spec``."""
    from .cache import get_kernel
    from .schedule import detect_arch, load_schedule

    arch = detect_arch()
    plan = load_schedule(arch).plan(spec, loop_order=loop_order)
    return get_kernel(spec, plan, arch), plan


def head_chunks(num_kv_heads: int, bytes_per_head: int):
    """Ranges of kv heads processed together so that their buffers (``bytes_per_head`` each) fit
    ``FSAGEN_CHUNK_BYTES`` (default 512 MiB), down to one kv head a chunk."""
    budget = int(os.environ.get("FSAGEN_CHUNK_BYTES", 512 << 20))
    step = max(1, min(num_kv_heads, budget // max(bytes_per_head, 1)))
    return [(lo, min(num_kv_heads, lo + step)) for lo in range(0, num_kv_heads, step)]
