"""Benchmark of the slc kernels against dense causal SDPA and the published FSA/NSA timings.

Shape of the FSA paper's kernel study: N = 65536 tokens (one sequence), Hkv = 4, D = 128, bf16,
(block_size, topk) in {(64, 16), (128, 8)}, G in {1, 2, 4, 8, 16}.  Contenders, each timed alone
as the median of CUDA-event timings after warm-up (triton.testing.do_bench when triton is
importable, which also flushes L2 between runs; otherwise an own event loop that does the same):

* fsagen forward ``fsagen::slc_fwd`` with loop_order kv_outer, q_outer and auto (schedule's pick);
* fsagen backward: the ``fsagen::slc_bwd`` op call alone, given o/lse saved from a forward;
* dense causal SDPA with the flash and cuDNN backends, forward and backward.

Selection: random valid selection (``fsagen.testing.random_topk_idx``).  A contender that fails
is recorded with its error and the run goes on.

Usage: python bench/bench_slc.py [--out bench/results] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import statistics
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Published H100 timings (ms) of the Triton FSA and NSA kernels and cuDNN dense attention,
# N = 65536, Hkv = 4, D = 128; keyed by (G, block_size, topk). Rows not published stay blank.
PUBLISHED = {
    (1, 64, 16): dict(fsa_fwd=12.6, fsa_bwd=7.9, nsa_fwd=18.0, nsa_bwd=28.9, cudnn_fwd=7.4),
    (2, 64, 16): dict(fsa_fwd=15.2, fsa_bwd=15.5, nsa_fwd=18.3, nsa_bwd=29.3, cudnn_fwd=14.4),
    (4, 64, 16): dict(fsa_fwd=21.1, fsa_bwd=22.4, nsa_fwd=18.4, nsa_bwd=30.7, cudnn_fwd=29.2),
    (8, 64, 16): dict(fsa_fwd=32.2, fsa_bwd=42.7, nsa_fwd=18.7, nsa_bwd=35.5, cudnn_fwd=56.1),
    (16, 64, 16): dict(fsa_fwd=54.3, fsa_bwd=86.9, nsa_fwd=18.2, nsa_bwd=45.3, cudnn_fwd=131.5),
    (1, 128, 8): dict(fsa_fwd=8.2, fsa_bwd=14.0, nsa_fwd=28.9, nsa_bwd=37.1, cudnn_fwd=7.5),
    (4, 128, 8): dict(fsa_fwd=15.5, fsa_bwd=24.2, nsa_fwd=29.0, nsa_bwd=38.1, cudnn_fwd=30.4),
}
# Measured ceilings of the H100 of this workplace (../shared/gpu/README.md, the brief): torch bf16
# matmul and a large device-to-device copy. Used for the "% of ceiling" columns.
MATMUL_TFLOPS = 680.0
COPY_TBPS = 3.0
FSAGEN_ORDERS = ("kv_outer", "q_outer", "auto")
SDPA_BACKENDS = ("flash", "cudnn")


@dataclass
class Row:
    G: int
    Hq: int
    block_size: int
    topk: int
    contender: str
    phase: str
    ms: float = math.nan
    tflops: float = math.nan
    extra_mem_mib: float = math.nan
    note: str = ""
    error: str = ""
    published: dict = field(default_factory=dict)

    def pub(self, key):
        return self.published.get(key, math.nan)


# ----------------------------------------------------------------------------------------- timing
def _timer():
    try:
        from triton.testing import do_bench

        return "triton.testing.do_bench(return_mode='median')", lambda fn: float(do_bench(fn, return_mode="median"))
    except Exception:
        return "CUDA events, median after warm-up, L2 flushed between runs", _event_median


def _event_median(fn, budget_ms: float = 1000.0) -> float:
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end), 1e-3)
    rep = int(min(100, max(5, budget_ms / est)))
    for _ in range(max(2, rep // 10)):
        fn()
    times = []
    for _ in range(rep):
        flush.zero_()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        times.append((s, e))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in times)


# ------------------------------------------------------------------------------------- contenders
def slc_flops(n, hq, topk, bs, d):
    """Forward FLOPs of slc, counting every selected key (causal masking of the own block ignored)."""
    return 4.0 * n * hq * topk * bs * d


def dense_causal_flops(n, hq, d):
    return 2.0 * n * n * hq * d


def min_bytes(contender, phase, n, hq, hkv, d, topk, elem=2):
    """Fewest bytes a kernel must move: every input read once, every output written once.

    Forward reads q, k, v (+ topk_idx for slc) and writes o and lse; backward reads q, k, v, o,
    do, lse (+ topk_idx) and writes dq, dk, dv.
    """
    q = n * hq * d * elem
    kv = 2 * n * hkv * d * elem
    lse = n * hq * 4
    idx = hkv * n * topk * 4 if contender.startswith("fsagen") else 0
    if phase == "fwd":
        return q + kv + idx + q + lse
    return 3 * q + kv + lse + idx + q + kv


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}"


def _bytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts)


def bench_fsagen(rows, timeit, q, k, v, idx, cu, bs, scale, meta):
    import fsagen.ops  # noqa: F401  (registers torch.ops.fsagen.*)

    n, hq, d = q.shape
    topk = idx.shape[2]
    flops = slc_flops(n, hq, topk, bs, d)
    for order in FSAGEN_ORDERS:
        note = ""
        if order == "auto":
            try:
                from fsagen.slc import plan_for

                note = "picked " + "/".join(plan_for(q, k, idx, bs, ph)[1].loop_order for ph in ("fwd", "bwd"))
            except Exception as exc:
                note = f"plan unknown ({_short(exc)})"
        fwd = Row(**meta, contender=f"fsagen {order}", phase="fwd", note=note)
        bwd = Row(**meta, contender=f"fsagen {order}", phase="bwd", note=note)
        rows += [fwd, bwd]
        try:
            call_fwd = lambda: torch.ops.fsagen.slc_fwd(q, k, v, idx, cu, bs, scale, order)  # noqa: E731
            o, lse = call_fwd()
            fwd.ms = timeit(call_fwd)
            fwd.tflops = flops / fwd.ms / 1e9
        except Exception as exc:
            fwd.error = bwd.error = _short(exc)
            traceback.print_exc()
            torch.cuda.empty_cache()
            continue
        try:
            do = torch.randn_like(o)
            call_bwd = lambda: torch.ops.fsagen.slc_bwd(do, q, k, v, o, lse, idx, cu, bs, scale, order)  # noqa: E731
            call_bwd()
            bwd.ms = timeit(call_bwd)
            bwd.tflops = 2.5 * flops / bwd.ms / 1e9
            fwd.extra_mem_mib = bwd.extra_mem_mib = _extra_memory(call_fwd, call_bwd, do) / 2**20
        except Exception as exc:
            bwd.error = _short(exc)
            traceback.print_exc()
        del o, lse
        torch.cuda.empty_cache()


def _extra_memory(call_fwd, call_bwd, do) -> int:
    """Peak memory of one forward + backward above what was allocated before, less its outputs."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    o, lse = call_fwd()
    grads = call_bwd()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak - base - _bytes(o, lse, *grads)


def _sdpa_call(backend_name, q4, k4, v4):
    """A callable for one SDPA backend; GQA via enable_gqa=True, else k/v repeated per group."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend_name]
    group = q4.shape[1] // k4.shape[1]

    def gqa():
        with sdpa_kernel(backend):
            return sdpa(q4, k4, v4, is_causal=True, enable_gqa=group > 1)

    try:
        gqa()
        return gqa, "enable_gqa=True" if group > 1 else "MHA"
    except Exception:
        kr = k4.repeat_interleave(group, dim=1).detach().requires_grad_(k4.requires_grad)
        vr = v4.repeat_interleave(group, dim=1).detach().requires_grad_(v4.requires_grad)

        def rep():
            with sdpa_kernel(backend):
                return sdpa(q4, kr, vr, is_causal=True)

        rep()
        return rep, "k/v repeated per group (enable_gqa unsupported by this backend)"


def bench_dense(rows, timeit, q, k, v, meta):
    n, hq, d = q.shape
    flops = dense_causal_flops(n, hq, d)
    # [N, H, D] -> [1, H, N, D] views; leaves so that the backward can be timed.
    q4, k4, v4 = (t.transpose(0, 1)[None].detach().requires_grad_() for t in (q, k, v))
    for name in SDPA_BACKENDS:
        fwd = Row(**meta, contender=f"sdpa {name} (dense causal)", phase="fwd")
        bwd = Row(**meta, contender=f"sdpa {name} (dense causal)", phase="bwd")
        rows += [fwd, bwd]
        try:
            call, note = _sdpa_call(name, q4, k4, v4)
            fwd.note = bwd.note = note
            with torch.no_grad():
                fwd.ms = timeit(call)
            fwd.tflops = flops / fwd.ms / 1e9
            o = call()
            do = torch.randn_like(o)
            bwd.ms = timeit(lambda: torch.autograd.grad(o, (q4, k4, v4), do, retain_graph=True))
            bwd.tflops = 2.5 * flops / bwd.ms / 1e9
            del o, do
        except Exception as exc:
            msg = _short(exc)
            fwd.error = fwd.error or msg
            bwd.error = msg
            traceback.print_exc()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------- outputs
CSV_FIELDS = ["G", "Hq", "block_size", "topk", "contender", "phase", "ms", "tflops", "pct_matmul",
              "min_bytes_tbps", "pct_copy", "extra_mem_mib",
              "pub_fsa_ms", "pub_nsa_ms", "pub_cudnn_fwd_ms", "speedup_vs_pub_fsa", "speedup_vs_pub_nsa",
              "speedup_vs_pub_cudnn", "speedup_vs_sdpa_cudnn", "note", "error"]


def _table(rows, shape) -> list[dict]:
    """CSV/markdown records with the ratio columns (reference time / this row's time).

    ``shape`` = (N, Hkv, D) for the floor columns: TFLOP/s as a share of the measured matmul
    ceiling, and the minimum bytes (``min_bytes``) over the time against the copy ceiling.

    fsagen rows get the published FSA/NSA figures of their phase and the ratio to the cuDNN SDPA
    measured in this run; dense rows get the published cuDNN forward figure.
    """
    measured_cudnn = {(r.G, r.block_size, r.phase): r.ms for r in rows if r.contender.startswith("sdpa cudnn")}
    n, hkv, d = shape
    out = []
    for r in rows:
        tbps = min_bytes(r.contender, r.phase, n, r.Hq, hkv, d, r.topk) / r.ms / 1e9
        ph, nan = r.phase, math.nan
        ours = r.contender.startswith("fsagen")
        fsa = r.pub(f"fsa_{ph}") if ours else nan
        nsa = r.pub(f"nsa_{ph}") if ours else nan
        cud = r.pub("cudnn_fwd") if ph == "fwd" else nan
        sdpa = measured_cudnn.get((r.G, r.block_size, ph), nan) if ours else nan
        out.append(dict(G=r.G, Hq=r.Hq, block_size=r.block_size, topk=r.topk, contender=r.contender, phase=ph,
                        ms=r.ms, tflops=r.tflops, pct_matmul=100 * r.tflops / MATMUL_TFLOPS,
                        min_bytes_tbps=tbps, pct_copy=100 * tbps / COPY_TBPS,
                        extra_mem_mib=r.extra_mem_mib, pub_fsa_ms=fsa, pub_nsa_ms=nsa,
                        pub_cudnn_fwd_ms=cud, speedup_vs_pub_fsa=fsa / r.ms, speedup_vs_pub_nsa=nsa / r.ms,
                        speedup_vs_pub_cudnn=cud / r.ms, speedup_vs_sdpa_cudnn=sdpa / r.ms,
                        note=r.note, error=r.error))
    return out


def _fmt(x, digits=2) -> str:
    if isinstance(x, str):
        return x
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def write_csv(path: Path, rows, shape) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for rec in _table(rows, shape):
            w.writerow({k: (_fmt(v, 4) if isinstance(v, float) else v) for k, v in rec.items()})


def write_markdown(path: Path, rows, header: dict, shape) -> None:
    lines = ["# slc kernel benchmark", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", "Speedup columns are published time / measured time (> 1: fsagen faster than the published",
              "kernel, measured on its own H100; compare only on the same device); 'vs cuDNN here' is the dense",
              "cuDNN SDPA of this run / fsagen. slc FLOPs: 4*N*Hq*topk*bs*D forward; dense causal: 2*N^2*Hq*D",
              "forward; backward counted as 2.5x forward everywhere. '% matmul' = TFLOP/s over the measured",
              f"bf16 matmul ceiling ({MATMUL_TFLOPS:.0f} TFLOP/s); 'min TB/s' = the fewest bytes the kernel must",
              f"move (bench_slc.min_bytes) over its time, '% copy' = that over the copy ceiling ({COPY_TBPS} TB/s).", ""]
    cols = ["G", "bs,topk", "contender", "phase", "ms", "TFLOP/s", "% matmul", "min TB/s", "% copy",
            "extra MiB (fwd+bwd)", "pub FSA ms",
            "pub NSA ms", "pub cuDNN fwd ms", "vs pub FSA", "vs pub NSA", "vs pub cuDNN", "vs cuDNN here",
            "note / error"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for c in _table(rows, shape):
        cells = [c["G"], f"{c['block_size']},{c['topk']}", c["contender"], c["phase"], _fmt(c["ms"]),
                 _fmt(c["tflops"], 1), _fmt(c["pct_matmul"], 1), _fmt(c["min_bytes_tbps"], 2),
                 _fmt(c["pct_copy"], 1), _fmt(c["extra_mem_mib"], 0), _fmt(c["pub_fsa_ms"], 1),
                 _fmt(c["pub_nsa_ms"], 1), _fmt(c["pub_cudnn_fwd_ms"], 1), _fmt(c["speedup_vs_pub_fsa"]),
                 _fmt(c["speedup_vs_pub_nsa"]), _fmt(c["speedup_vs_pub_cudnn"]), _fmt(c["speedup_vs_sdpa_cudnn"]),
                 (f"ERROR {c['error']}" if c["error"] else c["note"]).replace("|", "/")]
        lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, rows, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    configs = sorted({(r.block_size, r.topk) for r in rows})
    contenders = list(dict.fromkeys(r.contender for r in rows))
    fig, axes = plt.subplots(len(configs), 2, figsize=(13, 4 * len(configs)), squeeze=False)
    for i, (bs, topk) in enumerate(configs):
        for j, phase in enumerate(("fwd", "bwd")):
            ax = axes[i][j]
            sel = [r for r in rows if (r.block_size, r.topk) == (bs, topk) and r.phase == phase]
            groups = sorted({r.G for r in sel})
            width = 0.8 / (len(contenders) + 2)
            series = [(c, {r.G: r.ms for r in sel if r.contender == c}) for c in contenders]
            for pub, label in (("fsa", "published FSA (H100)"), ("nsa", "published NSA (H100)")):
                series.append((label, {g: PUBLISHED.get((g, bs, topk), {}).get(f"{pub}_{phase}", math.nan)
                                       for g in groups}))
            for s, (label, by_g) in enumerate(series):
                xs = [gi + (s - len(series) / 2) * width for gi in range(len(groups))]
                ax.bar(xs, [by_g.get(g, math.nan) for g in groups], width, label=label)
            ax.set_xticks(range(len(groups)), [f"G={g}" for g in groups])
            ax.set_yscale("log")
            ax.set_ylabel("ms (log)")
            ax.set_title(f"{phase}, block={bs}, topk={topk}")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results", help="output directory (default bench/results)")
    p.add_argument("--quick", action="store_true", help="small smoke run: N=4096, G in {1, 4}")
    p.add_argument("--n", type=int, default=None, help="tokens (default 65536, 4096 with --quick)")
    p.add_argument("--groups", type=int, nargs="+", default=None, help="G values (default 1 2 4 8 16)")
    p.add_argument("--configs", nargs="+", default=["64,16", "128,8"], help="block_size,topk pairs")
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--no-dense", action="store_true", help="skip the SDPA contenders")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--render", metavar="CSV", default=None,
                   help="no GPU: rebuild the markdown and plot from a CSV this script wrote (its .md "
                        "header is kept); for changes of the report's derived columns")
    return p.parse_args(argv)


def read_rows(csv_path: Path) -> list[Row]:
    """Rows of a CSV written by write_csv: the measured fields; the rest is derived again."""
    num = lambda x: float(x) if x not in ("", None) else math.nan  # noqa: E731
    rows = []
    with open(csv_path) as f:
        for rec in csv.DictReader(f):
            g, bs, topk = int(rec["G"]), int(rec["block_size"]), int(rec["topk"])
            rows.append(Row(G=g, Hq=int(rec["Hq"]), block_size=bs, topk=topk, contender=rec["contender"],
                            phase=rec["phase"], ms=num(rec["ms"]), tflops=num(rec["tflops"]),
                            extra_mem_mib=num(rec["extra_mem_mib"]), note=rec["note"], error=rec["error"],
                            published=PUBLISHED.get((g, bs, topk), {})))
    return rows


def render(csv_path: Path, out: Path, shape) -> int:
    """Rewrite slc_bench.{md,csv,png} in ``out`` from an earlier run's CSV and markdown header."""
    rows = read_rows(csv_path)
    old_md = (csv_path.parent / "slc_bench.md").read_text().splitlines()
    header = dict(line[2:].split(": ", 1) for line in old_md if line.startswith("- ") and ": " in line)
    header["report rendered"] = "from the CSV of the run above (bench_slc.py --render)"
    write_csv(out / "slc_bench.csv", rows, shape)
    write_markdown(out / "slc_bench.md", rows, header, shape)
    n, hkv, d = shape
    write_plot(out / "slc_bench.png", rows, f"slc, {header.get('device', '?')}, N={n}, Hkv={hkv}, D={d}, bf16")
    print(f"rendered {out / 'slc_bench.md'}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        n = args.n or (4096 if args.quick else 65536)
        return render(Path(args.render), Path(args.out), (n, args.kv_heads, args.head_dim))
    if not torch.cuda.is_available():
        print("bench_slc: needs a CUDA GPU", file=sys.stderr)
        return 2
    n = args.n or (4096 if args.quick else 65536)
    groups = args.groups or ([1, 4] if args.quick else [1, 2, 4, 8, 16])
    configs = [tuple(int(x) for x in c.split(",")) for c in args.configs]
    hkv, d, dtype = args.kv_heads, args.head_dim, torch.bfloat16
    timer_name, timeit = _timer()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from fsagen.testing import random_topk_idx

    # The published figures are for N=65536, Hkv=4, D=128 only: other shapes get blank columns.
    paper_shape = (n, hkv, d) == (65536, 4, 128)
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    rows: list[Row] = []
    for bs, topk in configs:
        cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
        idx = random_topk_idx(cu, hkv, topk, bs, generator=gen)
        for g in groups:
            hq = g * hkv
            published = PUBLISHED.get((g, bs, topk), {}) if paper_shape else {}
            meta = dict(G=g, Hq=hq, block_size=bs, topk=topk, published=published)
            print(f"== G={g} Hq={hq} block={bs} topk={topk}", flush=True)
            q, k, v = (torch.randn(n, h, d, device="cuda", dtype=dtype, generator=gen) for h in (hq, hkv, hkv))
            bench_fsagen(rows, timeit, q, k, v, idx, cu, bs, d ** -0.5, meta)
            if not args.no_dense:
                bench_dense(rows, timeit, q, k, v, meta)
            for r in rows[-10:]:
                if (r.G, r.block_size) == (g, bs):
                    print(f"   {r.contender:32s} {r.phase} {_fmt(r.ms):>9} ms {_fmt(r.tflops, 1):>7} TFLOP/s "
                          f"{r.note} {r.error}", flush=True)
            del q, k, v
            torch.cuda.empty_cache()

    try:
        import tilelang

        tl_version = tilelang.__version__
    except Exception:
        tl_version = "not importable"
    header = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "tilelang": tl_version,
        "shape": f"N={n} (one sequence), Hkv={hkv}, D={d}, bf16",
        "selection": "random valid selection (fsagen.testing.random_topk_idx: init_blocks=1, local_blocks=2)",
        "timing": timer_name,
        "fsagen backward": "the fsagen::slc_bwd op call alone, given o/lse saved from a forward",
        "extra MiB": "torch.cuda.max_memory_allocated after reset, minus memory before and minus outputs",
        "published": "Triton FSA/NSA kernels and cuDNN dense fwd on an H100 (FSA paper); blank where not published",
    }
    write_csv(out / "slc_bench.csv", rows, (n, hkv, d))
    write_markdown(out / "slc_bench.md", rows, header, (n, hkv, d))
    plotted = write_plot(out / "slc_bench.png", rows, f"slc, {header['device']}, N={n}, Hkv={hkv}, D={d}, bf16")
    print(f"wrote {out / 'slc_bench.md'}, {out / 'slc_bench.csv'}" + (f", {out / 'slc_bench.png'}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
