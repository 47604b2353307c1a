"""Input generators and error metrics shared by tests and benchmarks.

Everything here is vectorised torch so that it runs on the GPU at benchmark sizes
(N = 65536, topk = 16) without python loops over tokens.
"""

from __future__ import annotations

import math
import os

import torch

from fsagen.slc_index import token_positions  # re-exported: tests and benchmarks use it

__all__ = [
    "random_cu_seqlens",
    "random_topk_idx",
    "token_positions",
    "rel_err",
    "poisoned_like",
    "log_errors",
    "capture_cuda_graph",
    "count_host_work",
]


def random_cu_seqlens(
    total_len: int,
    num_seqs: int,
    *,
    block_size: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random packed-varlen boundaries: int32 ``[num_seqs + 1]`` from 0 to ``total_len``.

    Every sequence has at least one token.  With ``block_size`` given, no interior boundary is
    a multiple of it (so sequence starts are never block-aligned in the packed layout), which is
    what catches kernels that use global instead of per-sequence block offsets.
    """
    if not 1 <= num_seqs <= total_len:
        raise ValueError(f"num_seqs: need 1 <= num_seqs <= total_len, got {num_seqs}, {total_len}")
    cand = torch.arange(1, total_len)
    if block_size is not None:
        unaligned = cand[cand % block_size != 0]
        if unaligned.numel() >= num_seqs - 1:
            cand = unaligned
    perm = torch.randperm(cand.numel(), generator=_cpu_gen(generator))[: num_seqs - 1]
    cuts = torch.sort(cand[perm]).values
    cu = torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.tensor([total_len])])
    return cu.to(dtype=torch.int32, device=device)


def _cpu_gen(generator: torch.Generator | None) -> torch.Generator | None:
    """randperm on the CPU needs a CPU generator; derive one from a device generator."""
    if generator is None or generator.device.type == "cpu":
        return generator
    g = torch.Generator()
    g.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)))
    return g


def random_topk_idx(
    cu_seqlens: torch.Tensor,
    num_kv_heads: int,
    topk: int,
    block_size: int,
    *,
    init_blocks: int = 1,
    local_blocks: int = 2,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A random valid NSA-like selection ``[num_kv_heads, N, topk]`` int32.

    Per (kv head, token at position p, own block b = p // block_size): blocks ``< init_blocks``
    and blocks ``b - local_blocks + 1 .. b`` are forced in (as NSA does), the remaining slots are
    distinct random causal blocks ``<= b``; indices ascend, and rows with fewer than ``topk``
    available blocks are padded with -1 at the end.

    Built as random scores + forced scores + causal mask + ``torch.topk``, in token chunks that
    keep the score matrix near 64M elements.
    """
    if topk < 1:
        raise ValueError(f"topk: must be >= 1, got {topk}")
    if init_blocks + local_blocks > topk:
        raise ValueError(f"topk: must be >= init_blocks + local_blocks ({init_blocks} + {local_blocks}), got {topk}")
    device = torch.device(device) if device is not None else cu_seqlens.device
    cu = cu_seqlens.to(device)
    n = int(cu[-1])
    pos, _ = token_positions(cu, n)
    lens = (cu[1:] - cu[:-1]).long()
    max_blocks = max(1, int((lens.max() + block_size - 1) // block_size)) if lens.numel() else 1
    kb = min(topk, max_blocks)
    gen_device = generator.device if generator is not None else device
    out = torch.empty(num_kv_heads, n, topk, dtype=torch.int32, device=device)
    step = max(1, (1 << 26) // (num_kv_heads * max_blocks))
    j = torch.arange(max_blocks, device=device)
    for t0 in range(0, n, step):
        t1 = min(n, t0 + step)
        own = (pos[t0:t1] // block_size)[None, :, None]
        scores = torch.rand(num_kv_heads, t1 - t0, max_blocks, generator=generator, device=gen_device).to(device)
        forced = (j < init_blocks) | ((j <= own) & (j > own - local_blocks))
        scores = torch.where(forced, scores + 2.0, scores)
        scores = torch.where(j <= own, scores, torch.full_like(scores, -1.0))
        val, idx = torch.topk(scores, kb, dim=-1)
        # Unavailable blocks sort last (as max_blocks) and become -1.
        idx = torch.where(val >= 0, idx, torch.full_like(idx, max_blocks))
        idx = torch.sort(idx, dim=-1).values
        idx = torch.where(idx == max_blocks, torch.full_like(idx, -1), idx)
        out[:, t0:t1, :kb] = idx.to(torch.int32)
    out[:, :, kb:] = -1
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (absolute norm if ``ref`` is zero).

    Entries where both are the same infinity (e.g. lse = -inf for a query that sees nothing)
    count as equal; any NaN in ``out`` makes the result NaN, so poisoned outputs never pass.
    """
    a = out.detach().double()
    b = ref.detach().to(a.device).double()
    same_inf = torch.isinf(b) & (a == b)
    diff = torch.where(same_inf, torch.zeros_like(a), a - b)
    b = torch.where(torch.isinf(b), torch.zeros_like(b), b)
    num = torch.linalg.vector_norm(diff).item()
    den = torch.linalg.vector_norm(b).item()
    if math.isnan(num):
        return math.nan
    return num / den if den > 0 else num


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor like ``t`` filled with NaN (floats) or the most negative value (integers)."""
    if t.dtype.is_floating_point or t.dtype.is_complex:
        return torch.full_like(t, math.nan)
    return torch.full_like(t, torch.iinfo(t.dtype).min)


def log_errors(tag: str, case: str, errs: dict, fields: tuple[str, ...]) -> None:
    """Print one test case's relative errors (run pytest with ``-s`` to see them) and, with
    ``FSAGEN_GPU_LOG=path``, append them as a row of a markdown table in that file: one column per
    name in ``fields``, "not measured" where ``errs`` lacks it.  A header (after a blank line) is
    written whenever the file's last table has other columns, so tests with different fields can
    share one log."""
    line = " ".join(f"{k}={v:.3e}" for k, v in errs.items())
    print(f"\n[{tag}] {case}: {line}")
    path = os.environ.get("FSAGEN_GPU_LOG")
    if not path:
        return
    header = "| case | " + " | ".join(fields) + " |"
    lines = open(path).read().splitlines() if os.path.exists(path) else []
    last = next((x for x in reversed(lines) if x.startswith("| case |")), None)
    with open(path, "a") as f:
        if last != header:
            f.write(("\n" if lines else "") + header + "\n|---|" + "---|" * len(fields) + "\n")
        cells = (f"{errs[k]:.3e}" if k in errs else "not measured" for k in fields)
        f.write(f"| {case} | " + " | ".join(cells) + " |\n")


def capture_cuda_graph(step, warmup: int = 2):
    """``(graph, outputs)``: ``step()`` run ``warmup`` times on a side stream (kernels loaded,
    eager checks done), then captured once into a CUDA graph whose replays rewrite ``outputs``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs


HOST_READS = ("tolist", "item", "__bool__", "__int__", "__float__")


def count_host_work(step) -> tuple[list[str], int]:
    """(the fsagen op each top-level aten op of ``step()`` ran under, or "(outside)"; the number of
    host reads of tensor values) of one call of ``step``, recorded with torch.profiler.

    A top-level aten op (one not called from inside another) is what the host issues: on a GPU a
    launch each. A host read (``tolist``, ``item``, ``bool(t)``, ...) is a GPU sync."""
    from torch.profiler import ProfilerActivity, profile

    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    reads = [0]

    def counted(name):
        def read(self, *args, **kwargs):
            reads[0] += 1
            return saved[name](self, *args, **kwargs)
        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, counted(name))
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)

    def op_of(event):
        while event is not None and not event.name.startswith("fsagen::"):
            event = event.cpu_parent
        return event.name if event is not None else "(outside)"

    top = [e for e in prof.events()
           if e.name.startswith("aten::") and not (e.cpu_parent and e.cpu_parent.name.startswith("aten::"))]
    return [op_of(e) for e in top], reads[0]
