"""Benchmark of the whole NSA attention layer against dense causal attention (issue 4's target).

Times :func:`fsagen.nsa_attention`, the functional layer without projections (compression, cmp
attention, top-k selection, slc, swa and the gated sum; mean compression, per-head gates in bf16),
against dense causal SDPA with the cuDNN backend (GQA through ``enable_gqa``), at N tokens in one
sequence, Hkv kv heads, head dim D, bf16, kernel 32, stride 16, block 64, topk 16, window 512,
init 1, local 2, for each G:

* forward (under ``torch.no_grad``) and forward + backward (``torch.autograd.grad`` with respect to
  q, k, v and, for fsagen, the gates), each as the median of CUDA-event timings after warm-up with
  L2 flushed between runs (``bench_slc._event_median``: at least 5 timed runs);
* peak extra memory: ``torch.cuda.max_memory_allocated`` during one call, less what was allocated
  before and less the call's outputs (``bench_cmp._peak_extra``);
* speedup = dense time / fsagen time, and per (G, phase) the crossover length below which dense
  wins (log-log interpolation between the measured N around the sign change of log(speedup));
* at the largest N, a per-stage breakdown: compress, cmp, select, slc, swa, gate forward and the
  backward of each differentiable stage, each timed alone on the outputs of the stage before.

fsagen's time includes compression's one host synchronisation (it reads the number of compressed
tokens); the value checks of the ops are off (``check_values=False``), as a training step would run.

Writes ``layer_bench.md``, ``layer_bench.csv`` and ``layer_bench.png`` to ``--out``.  The PNG needs
matplotlib; without it on the GPU machine, render it elsewhere from the CSV:

    python bench/bench_layer.py                        # on a GPU (sm90 kernels: bench/grids/layer_bench.toml)
    python bench/bench_layer.py --smoke --out /tmp/x   # tiny N, two G: checks the script end to end
    python bench/bench_layer.py --plot-only bench/results/layer_bench.csv   # PNG from the CSV, no GPU
"""
from __future__ import annotations

import argparse
import csv
import datetime
import math
import sys
import traceback
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cmp import _peak_extra  # noqa: E402
from bench_slc import _event_median, _fmt, _sdpa_call, _short  # noqa: E402

# The layer's configuration (the issue's): kernel, stride, block, topk, window, forced blocks.
LAYER = dict(kernel_size=32, stride=16, block_size=64, topk=16, init_blocks=1, local_blocks=2, window_size=512)
FSAGEN = "fsagen nsa_attention"
DENSE = "sdpa cudnn (dense causal)"
PHASES = ("fwd", "fwd+bwd")
LAYER_STAGE = "layer"  # the ``stage`` of whole-layer rows; breakdown rows name their stage
STAGES_FWD = ("compress", "cmp", "select", "slc", "swa", "gate")
STAGES_BWD = ("compress", "cmp", "slc", "swa", "gate")  # select is integer: no backward
DEFAULT_NS = (8192, 16384, 32768, 65536)
SMOKE_NS = (1024, 2048)


@dataclass
class Row:
    """One measurement (a CSV line).  ``speedup_vs_dense`` is filled in by :func:`add_speedups`."""

    N: int
    G: int
    Hq: int
    contender: str
    stage: str
    phase: str
    ms: float = math.nan
    extra_mib: float = math.nan
    speedup_vs_dense: float = math.nan
    note: str = ""
    error: str = ""


CSV_FIELDS = [f.name for f in fields(Row)]


# ------------------------------------------------------------------------------------ derived numbers
def add_speedups(rows: list[Row]) -> None:
    """fsagen whole-layer rows get dense time / fsagen time of the same (N, G, phase)."""
    dense = {(r.N, r.G, r.phase): r.ms for r in rows if r.contender == DENSE}
    for r in rows:
        if r.contender == FSAGEN and r.stage == LAYER_STAGE:
            r.speedup_vs_dense = dense.get((r.N, r.G, r.phase), math.nan) / r.ms


def crossover(points: list[tuple[int, float]]) -> tuple[float, str]:
    """The length below which dense wins, from ``(N, speedup)`` pairs (speedup = dense / fsagen).

    Returns ``(N*, text)``: N* interpolated linearly in (log N, log speedup) between the largest
    measured N where dense wins (speedup < 1) and the next measured N; NaN with an explanation when
    dense never wins, wins everywhere, or wins at the largest N.
    """
    pts = sorted((n, s) for n, s in points if s == s and s > 0)
    if not pts:
        return math.nan, "no measurement"
    losing = [i for i, (_, s) in enumerate(pts) if s < 1.0]
    if not losing:
        return math.nan, "dense never wins in the measured range"
    last = losing[-1]
    if last == len(pts) - 1:
        where = "every measured N" if len(losing) == len(pts) else "the largest measured N"
        return math.nan, f"dense wins at {where} (crossover above N={pts[-1][0]})"
    (n0, s0), (n1, s1) = pts[last], pts[last + 1]
    t = -math.log(s0) / (math.log(s1) - math.log(s0))
    n_star = math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0)))
    return n_star, f"dense wins below N ~ {n_star:,.0f} (between {n0} and {n1})"


def crossovers(rows: list[Row]) -> dict[tuple[int, str], tuple[float, str]]:
    """(G, phase) -> crossover(...) over the whole-layer rows (run add_speedups first)."""
    out = {}
    for g in sorted({r.G for r in rows}):
        for phase in PHASES:
            pts = [(r.N, r.speedup_vs_dense) for r in rows
                   if (r.G, r.phase, r.contender, r.stage) == (g, phase, FSAGEN, LAYER_STAGE)]
            if pts:
                out[(g, phase)] = crossover(pts)
    return out


# ------------------------------------------------------------------------------------------ outputs
def write_csv(path: Path, rows: list[Row]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (("" if v != v else f"{v:.6g}") if isinstance(v, float) else v)
                        for k, v in asdict(r).items()})


def read_csv(path: Path) -> list[Row]:
    num = lambda x: float(x) if x not in ("", None) else math.nan  # noqa: E731
    with open(path) as f:
        return [Row(N=int(d["N"]), G=int(d["G"]), Hq=int(d["Hq"]), contender=d["contender"], stage=d["stage"],
                    phase=d["phase"], ms=num(d["ms"]), extra_mib=num(d["extra_mib"]),
                    speedup_vs_dense=num(d["speedup_vs_dense"]), note=d["note"], error=d["error"])
                for d in csv.DictReader(f)]


def _cell(r: Row | None, what: str) -> str:
    if r is None:
        return ""
    if r.error:
        return "ERROR " + r.error.replace("|", "/")
    return _fmt(getattr(r, what), 0 if what == "extra_mib" else 2)


def write_markdown(path: Path, rows: list[Row], header: dict) -> None:
    by = {(r.N, r.G, r.contender, r.stage, r.phase): r for r in rows}
    lines = ["# NSA layer attention vs dense causal attention", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", "Times in ms (median); speedup = dense / fsagen (> 1: the NSA layer is faster); extra MiB = peak",
              "memory of one call above its inputs, less its outputs.", ""]
    cols = ["G", "N", "fsagen fwd", "dense fwd", "speedup fwd", "fsagen fwd+bwd", "dense fwd+bwd",
            "speedup fwd+bwd", "fsagen extra MiB fwd / fwd+bwd", "dense extra MiB fwd / fwd+bwd"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for g in sorted({r.G for r in rows}):
        for n in sorted({r.N for r in rows if r.G == g and r.stage == LAYER_STAGE}):
            f = {(c, p): by.get((n, g, c, LAYER_STAGE, p)) for c in (FSAGEN, DENSE) for p in PHASES}
            cells = [g, n, _cell(f[FSAGEN, "fwd"], "ms"), _cell(f[DENSE, "fwd"], "ms"),
                     _cell(f[FSAGEN, "fwd"], "speedup_vs_dense"), _cell(f[FSAGEN, "fwd+bwd"], "ms"),
                     _cell(f[DENSE, "fwd+bwd"], "ms"), _cell(f[FSAGEN, "fwd+bwd"], "speedup_vs_dense"),
                     f"{_cell(f[FSAGEN, 'fwd'], 'extra_mib')} / {_cell(f[FSAGEN, 'fwd+bwd'], 'extra_mib')}",
                     f"{_cell(f[DENSE, 'fwd'], 'extra_mib')} / {_cell(f[DENSE, 'fwd+bwd'], 'extra_mib')}"]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "## Crossover (length below which dense wins)", "", "| G | phase | crossover |", "|---|---|---|"]
    lines += [f"| {g} | {phase} | {text} |" for (g, phase), (_, text) in crossovers(rows).items()]
    stage_rows = [r for r in rows if r.stage != LAYER_STAGE]
    if stage_rows:
        n = stage_rows[0].N
        lines += ["", f"## Where the time goes (N = {n}, each stage timed alone, ms)", "",
                  "Backward of a stage: `torch.autograd.grad` of its outputs, given its saved forward. The last",
                  "columns compare the stages' sum with the whole layer measured above (the difference is launch",
                  "and autograd overhead, allocation, and the layer's casts).", ""]
        groups = sorted({r.G for r in stage_rows})
        cols = ["G", "phase"] + list(STAGES_FWD) + ["sum of stages", "whole layer"]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for g in groups:
            for phase, label in (("fwd", "fwd"), ("bwd", "bwd")):
                cells = [_cell(by.get((n, g, FSAGEN, s, phase)), "ms") for s in STAGES_FWD]
                times = [by[(n, g, FSAGEN, s, phase)].ms for s in STAGES_FWD if (n, g, FSAGEN, s, phase) in by]
                total = sum(t for t in times if t == t)  # failed stages left out
                whole = {p: by.get((n, g, FSAGEN, LAYER_STAGE, p)) for p in PHASES}
                fwd_ms = whole["fwd"].ms if whole["fwd"] else math.nan
                both_ms = whole["fwd+bwd"].ms if whole["fwd+bwd"] else math.nan
                whole_txt = _fmt(fwd_ms) if phase == "fwd" else f"{_fmt(both_ms - fwd_ms)} (fwd+bwd - fwd)"
                lines.append("| " + " | ".join([str(g), label] + cells + [_fmt(total), whole_txt]) + " |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, rows: list[Row], title: str) -> bool:
    """Time vs N (log-log) per phase, fsagen solid and dense dashed per G; stage bars at the largest N.
    False when matplotlib is not importable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    stage_rows = [r for r in rows if r.stage != LAYER_STAGE and r.ms == r.ms]
    fig, axes = plt.subplots(1, 3 if stage_rows else 2, figsize=(17 if stage_rows else 12, 4.8))
    groups = sorted({r.G for r in rows})
    colors = dict(zip(groups, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, phase in zip(axes, PHASES):
        for g in groups:
            for contender, style in ((FSAGEN, "-o"), (DENSE, "--s")):
                pts = sorted((r.N, r.ms) for r in rows if (r.G, r.phase, r.contender, r.stage) ==
                             (g, phase, contender, LAYER_STAGE) and r.ms == r.ms)
                if pts:
                    label = f"G={g} {'NSA layer' if contender == FSAGEN else 'dense cuDNN'}"
                    ax.plot(*zip(*pts), style, color=colors[g], label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (tokens, one sequence)")
        ax.set_ylabel("ms")
        ax.set_title(phase)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    if stage_rows:
        ax = axes[2]
        n = stage_rows[0].N
        bars = [(g, phase) for g in sorted({r.G for r in stage_rows}) for phase in ("fwd", "bwd")]
        ms = {(r.G, r.phase, r.stage): r.ms for r in stage_rows}
        bottom = [0.0] * len(bars)
        for stage in STAGES_FWD:
            heights = [ms.get((g, phase, stage), 0.0) for g, phase in bars]
            ax.bar(range(len(bars)), heights, bottom=bottom, label=stage)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_xticks(range(len(bars)), [f"G={g}\n{phase}" for g, phase in bars])
        ax.set_ylabel("ms")
        ax.set_title(f"NSA stages at N={n}")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------- measurements
def _measure(row: Row, timeit, fn, memory: bool = True) -> None:
    """Fill ``row.ms`` (and ``extra_mib``) from ``fn``; on failure record the error and go on."""
    try:
        fn()
        row.ms = timeit(fn)
        if memory:
            row.extra_mib = _peak_extra(fn)
    except Exception as exc:
        row.error = _short(exc)
        traceback.print_exc()
    torch.cuda.empty_cache()


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def bench_layer(rows, timeit, q, k, v, gates, cu, meta) -> None:
    """Whole-layer rows of fsagen (forward, forward + backward)."""
    import fsagen

    def layer(q_, k_, v_, g_):
        return fsagen.nsa_attention(q_, k_, v_, g_, cu, **LAYER, check_values=False)

    fwd = Row(**meta, contender=FSAGEN, stage=LAYER_STAGE, phase="fwd", note="mean compression, per-head gates")
    with torch.no_grad():
        _measure(fwd, timeit, lambda: layer(q, k, v, gates))
    both = Row(**meta, contender=FSAGEN, stage=LAYER_STAGE, phase="fwd+bwd", note="grads of q, k, v, gates")
    leaves = _leaves(q, k, v, gates)
    do = torch.randn_like(q)
    _measure(both, timeit, lambda: torch.autograd.grad(layer(*leaves), leaves, do))
    rows += [fwd, both]


def bench_dense(rows, timeit, q, k, v, meta) -> None:
    """Whole-layer rows of dense causal cuDNN SDPA (``bench_slc._sdpa_call``)."""
    q4, k4, v4 = (t.transpose(0, 1)[None].detach().requires_grad_() for t in (q, k, v))
    fwd = Row(**meta, contender=DENSE, stage=LAYER_STAGE, phase="fwd")
    both = Row(**meta, contender=DENSE, stage=LAYER_STAGE, phase="fwd+bwd")
    rows += [fwd, both]
    try:
        call, fwd.note = _sdpa_call("cudnn", q4, k4, v4)
    except Exception as exc:
        fwd.error = both.error = _short(exc)
        traceback.print_exc()
        return
    both.note = fwd.note
    with torch.no_grad():
        _measure(fwd, timeit, call)
    do = torch.randn_like(q4)
    # the repeat path of _sdpa_call (no enable_gqa) leaves k4/v4 out of the graph: differentiate what it used
    _measure(both, timeit, lambda: torch.autograd.grad(call(), [q4], do) if "repeated" in fwd.note
             else torch.autograd.grad(call(), (q4, k4, v4), do))


def bench_stages(rows, timeit, q, k, v, gates, cu, meta) -> None:
    """Each stage of the layer alone (forward), then the backward of each differentiable stage."""
    import fsagen
    from fsagen.gating import gate_sum  # the layer's own gated sum

    c = LAYER
    ks, s, bs = c["kernel_size"], c["stride"], c["block_size"]
    q, k, v, gates = _leaves(q, k, v, gates)
    kc, vc, cuc = fsagen.compress(k, v, cu, ks, s, "mean")
    o_cmp, lse_cmp = fsagen.compressed_attention(q, kc, vc, cu, cuc, ks, s, return_lse=True, check_values=False)
    kcd, lsed = kc.detach(), lse_cmp.detach()
    idx = fsagen.select_blocks(q.detach(), kcd, lsed, cu, cuc, ks, s, bs, c["topk"], c["init_blocks"],
                               c["local_blocks"], check_values=False)
    o_slc, _ = fsagen.selected_attention(q, k, v, idx, bs, cu, return_lse=True, check_indices=False)
    o_swa, _ = fsagen.sliding_window_attention(q, k, v, cu, c["window_size"], return_lse=True, check_values=False)
    o = gate_sum(o_cmp, o_slc, o_swa, gates)

    qd, kd, vd, gd = q.detach(), k.detach(), v.detach(), gates.detach()
    forward = {
        "compress": lambda: fsagen.compress(kd, vd, cu, ks, s, "mean"),
        "cmp": lambda: fsagen.compressed_attention(qd, kcd, vc.detach(), cu, cuc, ks, s, return_lse=True,
                                                   check_values=False),
        "select": lambda: fsagen.select_blocks(qd, kcd, lsed, cu, cuc, ks, s, bs, c["topk"], c["init_blocks"],
                                               c["local_blocks"], check_values=False),
        "slc": lambda: fsagen.selected_attention(qd, kd, vd, idx, bs, cu, return_lse=True, check_indices=False),
        "swa": lambda: fsagen.sliding_window_attention(qd, kd, vd, cu, c["window_size"], return_lse=True,
                                                       check_values=False),
        "gate": lambda: gate_sum(o_cmp.detach(), o_slc.detach(), o_swa.detach(), gd),
    }

    def grad(outputs, inputs):
        seeds = [torch.randn_like(t) for t in outputs]
        return lambda: torch.autograd.grad(outputs, inputs, seeds, retain_graph=True)

    backward = {
        "compress": grad((kc, vc), (k, v)),
        "cmp": grad((o_cmp,), (q, kc, vc)),
        "slc": grad((o_slc,), (q, k, v)),
        "swa": grad((o_swa,), (q, k, v)),
        "gate": grad((o,), (o_cmp, o_slc, o_swa, gates)),
    }
    for phase, table in (("fwd", forward), ("bwd", backward)):
        for stage, fn in table.items():
            row = Row(**meta, contender=FSAGEN, stage=stage, phase=phase)
            with torch.no_grad() if phase == "fwd" else torch.enable_grad():
                _measure(row, timeit, fn, memory=False)
            rows.append(row)
            print(f"   stage {stage:9s} {phase:4s} {_fmt(row.ms):>9} ms {row.error}", flush=True)


# --------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results", help="output directory (default bench/results)")
    p.add_argument("--smoke", action="store_true", help=f"tiny run: N in {SMOKE_NS}, G in 1 4 (checks the script)")
    p.add_argument("--ns", type=int, nargs="+", default=None, help=f"sequence lengths (default {DEFAULT_NS})")
    p.add_argument("--groups", type=int, nargs="+", default=None, help="G values (default 1 4 16)")
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--budget-ms", type=float, default=300.0,
                   help="timing budget per measurement (at least 5 timed runs whatever it is)")
    p.add_argument("--no-stages", action="store_true", help="skip the per-stage breakdown")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot-only", metavar="CSV", default=None,
                   help="no GPU: write layer_bench.png (to --out) from a CSV this script wrote")
    return p.parse_args(argv)


def plot_only(csv_path: Path, out: Path) -> int:
    rows = read_csv(csv_path)
    md = csv_path.with_suffix(".md")
    device = "?"
    if md.exists():
        device = next((line.split(": ", 1)[1] for line in md.read_text().splitlines()
                       if line.startswith("- device: ")), "?")
    out.mkdir(parents=True, exist_ok=True)
    if not write_plot(out / "layer_bench.png", rows, _title(device, rows)):
        print("bench_layer: --plot-only needs matplotlib", file=sys.stderr)
        return 2
    print(f"wrote {out / 'layer_bench.png'}")
    return 0


def _title(device: str, rows: list[Row]) -> str:
    hq_by_g = {r.G: r.Hq for r in rows}
    hkv = {hq // g for g, hq in hq_by_g.items()}
    return f"NSA layer attention vs dense causal cuDNN, {device}, Hkv={'/'.join(map(str, sorted(hkv)))}, bf16"


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.plot_only:
        return plot_only(Path(args.plot_only), out)
    if not torch.cuda.is_available():
        print("bench_layer: needs a CUDA GPU (or --plot-only CSV)", file=sys.stderr)
        return 2
    ns = args.ns or (SMOKE_NS if args.smoke else DEFAULT_NS)
    groups = args.groups or ([1, 4] if args.smoke else [1, 4, 16])
    hkv, d = args.kv_heads, args.head_dim
    timeit = lambda fn: _event_median(fn, args.budget_ms)  # noqa: E731
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    rows: list[Row] = []
    for n in sorted(ns):
        cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
        for g in groups:
            hq = g * hkv
            meta = dict(N=n, G=g, Hq=hq)
            print(f"== N={n} G={g} Hq={hq}", flush=True)
            q, k, v = (torch.randn(n, h, d, device="cuda", generator=gen, dtype=torch.bfloat16) for h in (hq, hkv, hkv))
            gates = torch.rand(n, hq, 3, device="cuda", generator=gen).to(torch.bfloat16)
            before = len(rows)
            bench_layer(rows, timeit, q, k, v, gates, cu, meta)
            bench_dense(rows, timeit, q, k, v, meta)
            for r in rows[before:]:
                print(f"   {r.contender:28s} {r.phase:8s} {_fmt(r.ms):>9} ms  extra {_fmt(r.extra_mib, 0):>6} MiB "
                      f"{r.note} {r.error}", flush=True)
            if n == max(ns) and not args.no_stages:
                bench_stages(rows, timeit, q, k, v, gates, cu, meta)
            del q, k, v, gates
            torch.cuda.empty_cache()
    add_speedups(rows)
    try:
        import tilelang

        tl_version = tilelang.__version__
    except Exception:
        tl_version = "not importable"
    device = torch.cuda.get_device_name()
    header = {
        "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "tilelang": tl_version,
        "shape": f"one sequence of N tokens, Hkv={hkv}, D={d}, bf16, G in {groups}",
        "layer": ", ".join(f"{k}={v}" for k, v in LAYER.items()) + ", mean compression, per-head bf16 gates",
        "fsagen": "fsagen.nsa_attention(check_values=False): compress, cmp, select, slc, swa, gated sum; no projections",
        "dense": "torch SDPA, cuDNN backend (sdpa_kernel(SDPBackend.CUDNN_ATTENTION)), is_causal=True",
        "timing": "CUDA events, median of >= 5 runs after warm-up, L2 flushed between runs (bench_slc._event_median)",
        "fwd+bwd": "torch.autograd.grad of the output with respect to q, k, v (and the gates for fsagen)",
        "produced by": "python bench/bench_layer.py" + (" --smoke" if args.smoke else ""),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "layer_bench.csv", rows)
    write_markdown(out / "layer_bench.md", rows, header)
    plotted = write_plot(out / "layer_bench.png", rows, _title(device, rows))
    print((out / "layer_bench.md").read_text())
    print(f"wrote {out / 'layer_bench.md'}, {out / 'layer_bench.csv'}"
          + (f", {out / 'layer_bench.png'}" if plotted else
             " (no PNG: matplotlib missing; run --plot-only on the CSV elsewhere)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
