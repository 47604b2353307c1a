"""Benchmark of the compression / compressed-attention / selection pipeline (issue 3's targets).

At N tokens (one sequence), Hkv kv heads, head dim D, bf16, (kernel, stride, block, topk) =
(32, 16, 64, 16) by default, for each G it times, in one run on the GPU:

* ``compress`` (mean pool of k and v), ``compressed_attention`` forward, ``select_blocks``, and the
  three together (the selection front end of an NSA layer);
* fsagen's ``selected_attention`` forward on the blocks just selected (the target's yardstick:
  the front end must take under 1.5x its time);
* ``compressed_attention`` backward, and ``sliding_window_attention`` (window 512) forward and
  backward, for reference.

Compression is timed once (it does not depend on G), by kind: mean and weighted run the generated
kernels (``fsagen::compress_pool``), linear runs in torch; forward with its one host read of the
compressed-token count, forward without it (``num_compressed`` given, ``check_values=False``), and
backward (dk, dv and the parameters). Their GB/s count the bytes a kernel must move: k and v read,
k_cmp and v_cmp written (backward: the reverse, plus k and v read again for the weights' gradient).

cmp attention's FLOPs count every visible (query, compressed key) pair: ``4 * D * Hq * sum_t
Lc(t)``. Achieved TFLOP/s are set against the H100's measured bf16 matmul rate (680 TFLOP/s; the
target is 40% of it). Extra memory is the peak allocated during the pipeline minus what was
allocated before it (inputs) and its outputs. Times are medians (``bench_slc``'s timer).

Writes ``cmp_bench.md`` and ``cmp_bench.csv`` to ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_slc import _timer  # noqa: E402

MATMUL_TFLOPS = 680.0


def cmp_pairs(n, ks, s):
    t = torch.arange(n, dtype=torch.float64)
    return float(torch.clamp(torch.floor((t - ks + 1 + s) / s), min=0).sum())


def swa_pairs(n, w):
    t = torch.arange(n, dtype=torch.float64)
    return float(torch.clamp(t + 1, max=w).sum())


def _peak_extra(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    keep = sum(t.numel() * t.element_size() for t in _tensors(out))
    return (torch.cuda.max_memory_allocated() - base - keep) / 2**20


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for y in x for t in _tensors(y)]
    return []


def compress_rows(k, v, cu, ks, s, timeit):
    """Rows of the compression timings (mean / weighted / linear; forward with and without the
    host read of Nc; backward), with GB/s of the bytes each pass must move."""
    import fsagen

    n, hkv, d = k.shape
    gen = torch.Generator(device=k.device).manual_seed(1)
    params = {
        "mean": {},
        "weighted": {"weight": torch.randn(hkv, ks, device=k.device, generator=gen) / ks},
        "linear": {name: (torch.randn(hkv, ks * d, d, device=k.device, generator=gen) * (ks * d) ** -0.5).to(k.dtype)
                   for name in ("proj_k", "proj_v")},
    }
    nc = fsagen.compress(k, v, cu, ks, s, "mean")[0].shape[0]
    size = k.element_size() * hkv * d
    io = 2 * (n + nc) * size  # k, v read; k_cmp, v_cmp written
    rows = []
    for kind, p in params.items():
        def fwd(p=p, kind=kind):
            return fsagen.compress(k, v, cu, ks, s, kind, **p)

        def fwd_nosync(p=p, kind=kind):
            return fsagen.compress(k, v, cu, ks, s, kind, num_compressed=nc, check_values=False, **p)

        leaves = [k.detach().requires_grad_(), v.detach().requires_grad_()]
        learned = {name: t.detach().requires_grad_() for name, t in p.items()}
        kc, vc, _ = fsagen.compress(*leaves, cu, ks, s, kind, num_compressed=nc, check_values=False, **learned)
        dkc, dvc = torch.randn_like(kc), torch.randn_like(vc)
        wrt = leaves + list(learned.values())

        def bwd(kc=kc, vc=vc, dkc=dkc, dvc=dvc, wrt=wrt):
            return torch.autograd.grad((kc, vc), wrt, (dkc, dvc), retain_graph=True)

        bwd_io = io + (2 * n * size if learned else 0)
        for stage, fn, nbytes in ((f"compress fwd ({kind})", fwd, io), (f"compress fwd ({kind}, no sync)", fwd_nosync, io),
                                  (f"compress bwd ({kind})", bwd, bwd_io)):
            ms = timeit(fn)
            rows.append(dict(G="-", Hq="-", stage=stage, ms=ms, tflops=math.nan, pct_matmul=math.nan,
                             extra_mib=_peak_extra(fn) if "fwd" in stage else math.nan, gbps=nbytes / ms / 1e6))
            print(f"{stage:34s} {ms:8.3f} ms  {nbytes / ms / 1e6:7.0f} GB/s", flush=True)
    return rows


def run(args):
    import fsagen

    timer_name, timeit = _timer()
    n, hkv, d, ks, s, bs, topk = args.n, args.kv_heads, args.head_dim, 32, 16, 64, 16
    window = 512
    dev = "cuda"
    cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
    rows = []
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    k = torch.randn(n, hkv, d, device=dev, generator=gen).to(torch.bfloat16)
    v = torch.randn(n, hkv, d, device=dev, generator=gen).to(torch.bfloat16)
    rows += compress_rows(k, v, cu, ks, s, timeit)
    for g in args.groups:
        hq = hkv * g
        q = torch.randn(n, hq, d, device=dev, generator=gen).to(torch.bfloat16)
        k = torch.randn(n, hkv, d, device=dev, generator=gen).to(torch.bfloat16)
        v = torch.randn(n, hkv, d, device=dev, generator=gen).to(torch.bfloat16)
        do = torch.randn(n, hq, d, device=dev, generator=gen).to(torch.bfloat16)

        def compress():
            return fsagen.compress(k, v, cu, ks, s, "mean")

        kc, vc, cuc = compress()

        def cmp_fwd():
            return fsagen.compressed_attention(q, kc, vc, cu, cuc, ks, s, return_lse=True, check_values=False)

        o_c, lse_c = cmp_fwd()

        def select():
            return fsagen.select_blocks(q, kc, lse_c, cu, cuc, ks, s, bs, topk, 1, 2, check_values=False)

        idx = select()

        def pipeline():
            kc2, vc2, cuc2 = fsagen.compress(k, v, cu, ks, s, "mean")
            _, lse2 = fsagen.compressed_attention(q, kc2, vc2, cu, cuc2, ks, s, return_lse=True,
                                                  check_values=False)
            return fsagen.select_blocks(q, kc2, lse2, cu, cuc2, ks, s, bs, topk, 1, 2, check_values=False)

        def slc_fwd():
            return fsagen.selected_attention(q, k, v, idx, bs, cu, check_indices=False)

        qg, kg, vg = (t.detach().requires_grad_() for t in (q, kc, vc))
        o_g = fsagen.compressed_attention(qg, kg, vg, cu, cuc, ks, s, check_values=False)

        def cmp_bwd():
            return torch.autograd.grad(o_g, (qg, kg, vg), do, retain_graph=True)

        qs, ks_, vs = (t.detach().requires_grad_() for t in (q, k, v))
        o_s = fsagen.sliding_window_attention(qs, ks_, vs, cu, window, check_values=False)

        def swa_fwd():
            return fsagen.sliding_window_attention(q, k, v, cu, window, check_values=False)

        def swa_bwd():
            return torch.autograd.grad(o_s, (qs, ks_, vs), do, retain_graph=True)

        f_cmp = 4 * d * hq * cmp_pairs(n, ks, s)
        f_swa = 4 * d * hq * swa_pairs(n, window)
        cases = [
            ("compress (mean)", compress, math.nan),
            ("cmp fwd", cmp_fwd, f_cmp),
            ("select", select, f_cmp / 2),
            ("compress+cmp+select", pipeline, math.nan),
            ("slc fwd", slc_fwd, math.nan),
            ("cmp bwd", cmp_bwd, 2.5 * f_cmp),
            (f"swa fwd w{window}", swa_fwd, f_swa),
            (f"swa bwd w{window}", swa_bwd, 2.5 * f_swa),
        ]
        times = {}
        for name, fn, flops in cases:
            ms = timeit(fn)
            times[name] = ms
            extra = _peak_extra(fn) if name in ("compress+cmp+select", "cmp fwd", "select") else math.nan
            tf = flops / ms / 1e9 if flops == flops else math.nan
            rows.append(dict(G=g, Hq=hq, stage=name, ms=ms, tflops=tf,
                             pct_matmul=100 * tf / MATMUL_TFLOPS if tf == tf else math.nan,
                             extra_mib=extra, gbps=math.nan))
            print(f"G={g:2d} {name:22s} {ms:8.3f} ms  {tf:7.1f} TFLOP/s", flush=True)
        ratio = times["compress+cmp+select"] / times["slc fwd"]
        rows.append(dict(G=g, Hq=hq, stage="(compress+cmp+select) / slc fwd", ms=ratio, tflops=math.nan,
                         pct_matmul=math.nan, extra_mib=math.nan, gbps=math.nan))
        del q, k, v, do, kc, vc, o_c, lse_c, idx, qg, kg, vg, o_g, qs, ks_, vs, o_s
        torch.cuda.empty_cache()
    return rows, timer_name


def _fmt(x, digits=2):
    return "-" if x != x else f"{x:.{digits}f}"


def write(rows, out: Path, args, timer_name):
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "cmp_bench.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    dev = torch.cuda.get_device_name()
    lines = [
        "# Compression + compressed attention + selection (fsagen)",
        "",
        f"{datetime.date.today()}, {dev}, torch {torch.__version__}; N={args.n}, Hkv={args.kv_heads}, "
        f"D={args.head_dim}, bf16, kernel 32, stride 16, block 64, topk 16, one sequence; timer: {timer_name}.",
        "Produced by `python bench/bench_cmp.py`. TFLOP/s count visible pairs only; % of the measured "
        f"bf16 matmul rate ({MATMUL_TFLOPS:.0f} TFLOP/s). The ratio row is time / time.",
        "",
        "| G | stage | ms | TFLOP/s | % matmul | GB/s | extra MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['G']} | {r['stage']} | {_fmt(r['ms'], 3)} | {_fmt(r['tflops'], 1)} | "
                     f"{_fmt(r['pct_matmul'], 1)} | {_fmt(r['gbps'], 0)} | {_fmt(r['extra_mib'], 0)} |")
    (out / "cmp_bench.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--n", type=int, default=65536)
    p.add_argument("--groups", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rows, timer_name = run(args)
    write(rows, Path(args.out), args, timer_name)
    print((Path(args.out) / "cmp_bench.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
