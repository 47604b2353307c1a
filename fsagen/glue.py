"""Helpers shared by the branches' dispatch glue (slc, cmp/swa, sel): output allocation, the
KernelSpec of some inputs, the schedule's plan and compiled kernel for a spec, and kv-head
chunking of float32 buffers."""
import os

import torch


def alloc(shape, dtype, device):
    """Output buffers: poisoned when FSAGEN_POISON=1 (NaN; integers: their most negative value,
    never a valid index or count) so an unwritten element cannot pass a test."""
    if os.environ.get("FSAGEN_POISON") == "1":
        fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def kernel_spec(branch, phase, q, k, **fields):
    """The KernelSpec of one kernel of ``branch`` for inputs q ``[N, Hq, D]`` and k ``[Nk, Hkv, D]``;
    ``fields`` are the branch's other KernelSpec fields (block_size and topk default to 0)."""
    from .spec import KernelSpec
    from .validate import dtype_name

    values = dict(block_size=0, topk=0)
    values.update((name, int(value)) for name, value in fields.items())  # numpy ints pass the op checks
    return KernelSpec(branch=branch, phase=phase, G=int(q.shape[1] // k.shape[1]), D=int(q.shape[2]),
                      dtype=dtype_name(q.dtype), **values)


def plan_for(spec, loop_order=None, device=None):
    """(plan, arch) the schedule of ``device`` (None: the current CUDA device; a CPU device: the
    ``cpu`` schedule) gives ``spec``; loads nothing."""
    from .schedule import detect_arch, load_schedule

    arch = detect_arch(device)
    return load_schedule(arch).plan(spec, loop_order=loop_order), arch


def plan_and_kernel(spec, loop_order=None, device=None):
    """(compiled kernel, plan) the schedule of ``device`` gives ``spec`` (see ``plan_for``)."""
    from .cache import get_kernel

    plan, arch = plan_for(spec, loop_order, device)
    return get_kernel(spec, plan, arch), plan


def head_chunks(num_kv_heads: int, bytes_per_head: int):
    """Ranges of kv heads processed together so that their buffers (``bytes_per_head`` each) fit
    ``FSAGEN_CHUNK_BYTES`` (default 512 MiB), down to one kv head a chunk."""
    budget = int(os.environ.get("FSAGEN_CHUNK_BYTES", 512 << 20))
    step = max(1, min(num_kv_heads, budget // max(bytes_per_head, 1)))
    return [(lo, min(num_kv_heads, lo + step)) for lo in range(0, num_kv_heads, step)]
