"""Where one slc forward and one backward spend their time, kernel by kernel (torch.profiler).

The benchmark (bench_slc.py) times the op calls whole; this splits them into the generated kernels
and the glue around them (block-index build: sort, searchsorted and elementwise kernels; buffer
fills; logsumexp; dtype copies), so the fixed costs that issue 5 asks about are measured, not
guessed. Shape of the benchmark: one sequence of ``--n`` tokens, Hkv = 4, D = 128, bf16, random
valid selection; the schedule's loop order unless ``--order`` forces one.

Per (G, block, topk, phase): the op call is warmed up, then profiled ``--iters`` times; every CUDA
kernel's time is charged to the generated stage or the torch op that launched it (``profile_call``)
and divided by the iterations.

Usage: python bench/profile_slc.py [--groups 1 4 16] [--configs 64,16] [--out DIR]
"""
from __future__ import annotations

import argparse
import datetime
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

def _self_device_us(event) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def profile_call(fn, iters: int) -> list[tuple[str, float, float]]:
    """[(what, microseconds per call, kernels launched per call)] of ``fn``, largest first.

    Every GPU kernel is charged to the innermost profiled CPU range that launched it: a generated
    stage's range ``fsagen::<branch>_<phase>.<stage>`` (set by ``fsagen.cache``, since TileLang names
    every kernel ``main_kernel``), or the torch op of the glue (``aten::sort``, ``aten::fill_``, ...).
    Where the profiler charges the stages' kernels to the enclosing op instead (``fsagen::slc_fwd``),
    the rows ``(stage span) ...`` give each stage range's span on the GPU timeline (its kernels'
    time: one kernel a stage), which is part of that op's time, not added to it."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type.name != "CPU":
            if "." in ev.name and ev.name.startswith("fsagen::"):  # a stage's range on the GPU timeline
                row = out[f"(stage span) {ev.name}"]
                row[0] += float(getattr(ev, "device_time", 0.0) or 0.0) / iters
            continue
        us = _self_device_us(ev)
        if us <= 0:
            continue
        row = out[ev.name]
        row[0] += us / iters
        row[1] += sum(1 for k in getattr(ev, "kernels", ()) or ()) / iters
    return sorted(((k, v[0], v[1]) for k, v in out.items()), key=lambda r: -r[1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--configs", nargs="+", default=["64,16"], help="block_size,topk pairs")
    p.add_argument("--n", type=int, default=65536)
    p.add_argument("--order", default="auto", choices=["auto", "kv_outer", "q_outer"])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("profile_slc: needs a CUDA GPU", file=sys.stderr)
        return 2
    import fsagen.ops  # noqa: F401
    from fsagen.testing import random_topk_idx

    hkv, d, n = 4, 128, args.n
    gen = torch.Generator(device="cuda").manual_seed(0)
    lines = [f"# slc forward / backward, kernel by kernel ({torch.cuda.get_device_name()}, "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
             f"N = {n} (one sequence), Hkv = {hkv}, D = {d}, bf16, random valid selection, order {args.order}; "
             f"torch.profiler CUDA kernel times, mean of {args.iters} calls (no L2 flush between calls).", ""]
    for cfg in args.configs:
        bs, topk = (int(x) for x in cfg.split(","))
        cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
        idx = random_topk_idx(cu, hkv, topk, bs, generator=gen)
        for g in args.groups:
            q, k, v = (torch.randn(n, h, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                       for h in (g * hkv, hkv, hkv))
            order = args.order
            fwd = lambda: torch.ops.fsagen.slc_fwd(q, k, v, idx, cu, bs, d ** -0.5, order)  # noqa: E731
            o, lse = fwd()
            do = torch.randn_like(o)
            bwd = lambda: torch.ops.fsagen.slc_bwd(do, q, k, v, o, lse, idx, cu, bs, d ** -0.5, order)  # noqa: E731
            for phase, fn in (("fwd", fwd), ("bwd", bwd)):
                rows = profile_call(fn, args.iters)
                total = sum(r[1] for r in rows if not r[0].startswith("(stage span)"))
                block = [f"## G = {g}, block {bs}, topk {topk}, {phase}: {total / 1e3:.3f} ms of kernels", "",
                         "| range or torch op | ms | share | kernels |", "|---|---|---|---|"]
                block += [f"| {name} | {us / 1e3:.3f} | {us / total:.0%} | {n_:.0f} |" for name, us, n_ in rows
                          if us >= 0.5]  # rows under half a microsecond are profiler bookkeeping
                lines += block + [""]
                print("\n".join(block), flush=True)
            del q, k, v, o, lse, do
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "slc_profile_kernels.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
