"""Host work of the slc op and of one NSA layer, counted as top-level aten ops (torch.profiler).

On a GPU each top-level aten op is a launch the host must issue (plus its Python and dispatcher
time); at short sequences those launches, not the GPU, set the pace (bench/NOTES.md). This script
counts them, on the CPU kernels (``--device cpu``, default) or on CUDA, for:

* slc forward and backward (``fsagen.selected_attention``, kv_outer and q_outer),
* one NSA layer forward, and forward + backward (``fsagen.nsa_attention``, check_values=False),

each called twice on the same inputs and counted on the second call (the first builds what is
kept per ``cu_seqlens`` tensor), under three settings: as shipped; without the ``cu_seqlens``
tables kept (``fsagen.seqlens_cache`` off); and without both that and the block index's generated
steps (its torch formulation instead). Host reads of tensor values (GPU syncs) are counted too.

Usage: python bench/count_host_ops.py [--device cpu|cuda] [--out bench/results/host_ops_cpu.md]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

@contextlib.contextmanager
def setting(name: str):
    """``shipped``, ``no_cache`` (seqlens_cache off) or ``torch_index`` (that, and the block index
    as torch ops)."""
    import fsagen.seqlens_cache as cache
    import fsagen.slc as glue
    from fsagen.slc_index import build_block_index_torch

    saved = cache.cacheable, glue.build_block_index
    if name in ("no_cache", "torch_index"):
        cache.cacheable = lambda cu: False
    if name == "torch_index":
        glue.build_block_index = lambda *a, **kw: build_block_index_torch(*a[:6])
    try:
        yield
    finally:
        cache.cacheable, glue.build_block_index = saved


def count(step) -> tuple[int, int]:
    """(top-level aten ops, host reads) of ``step()``, run once before to warm up."""
    from fsagen.testing import count_host_work

    step()
    ops, reads = count_host_work(step)
    return len(ops), reads


def cases(device: str):
    import fsagen
    from fsagen.testing import random_topk_idx

    gen = torch.Generator().manual_seed(0)
    hkv, G, D, bs = 2, 2, 64, 64
    topk, n = (4, 512) if device == "cpu" else (16, 8192)  # on a GPU: specs of the default grid (built ahead)
    cu = torch.tensor([0, n // 2 + 17, n], dtype=torch.int32, device=device)
    idx = random_topk_idx(cu.cpu(), hkv, topk, bs, generator=gen).to(device)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=torch.bfloat16).requires_grad_()

    q, k, v = leaf(n, hkv * G, D), leaf(n, hkv, D), leaf(n, hkv, D)
    gates = leaf(n, hkv * G, 3)
    do = torch.randn(n, hkv * G, D, generator=gen).to(device=device, dtype=torch.bfloat16)
    nsa = dict(kernel_size=32, stride=16, block_size=bs, topk=topk, init_blocks=1, local_blocks=2, window_size=128,
               check_values=False)

    def slc(order, backward):
        def step():
            o = fsagen.selected_attention(q, k, v, idx, bs, cu, loop_order=order, check_indices=False)
            if backward:
                torch.autograd.grad(o, (q, k, v), do)
        return step

    def layer(backward):
        def step():
            o = fsagen.nsa_attention(q, k, v, gates, cu, **nsa)
            if backward:
                o.sum().backward()
        return step

    shape = f"N={n} (2 sequences), Hkv={hkv}, G={G}, D={D}, block {bs}, topk {topk}, bf16"
    return shape, {
        "slc fwd kv_outer": slc("kv_outer", False), "slc fwd+bwd kv_outer": slc("kv_outer", True),
        "slc fwd q_outer": slc("q_outer", False), "slc fwd+bwd q_outer": slc("q_outer", True),
        "layer fwd": layer(False), "layer fwd+bwd": layer(True),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--out", type=Path, default=None, help="markdown report (default: print only)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("count_host_ops: --device cuda needs a CUDA GPU", file=sys.stderr)
        return 2
    shape, steps = cases(args.device)
    settings = ("shipped", "no_cache", "torch_index")
    rows = []
    for name, step in steps.items():
        cells = []
        for s in settings:
            with setting(s):
                cells.append(count(step))
        rows.append((name, cells))
        print(name, cells, flush=True)
    lines = ["# Host work per call: top-level aten ops (and host reads of tensor values)", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; device: {args.device}; "
             f"torch {torch.__version__}",
             f"- shape: {shape}; each call counted the second time on the same inputs",
             "- produced by: python bench/count_host_ops.py" + (" --device cuda" if args.device == "cuda" else ""), "",
             "Settings: 'shipped'; 'no cu_seqlens tables kept' (fsagen.seqlens_cache off); 'torch index' (that, "
             "and the kv-outer block index as torch ops instead of its generated steps).", "",
             "| call | shipped: ops | reads | no cu_seqlens tables kept: ops | reads | torch index: ops | reads |",
             "|---|---|---|---|---|---|---|"]
    for name, cells in rows:
        lines.append(f"| {name} | " + " | ".join(f"{ops} | {reads}" for ops, reads in cells) + " |")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
