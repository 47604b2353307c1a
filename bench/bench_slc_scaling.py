"""slc time against sequence length, and a batch of mixed lengths against one long sequence.

Two questions of issue 5, on the schedule's own choice of loop order (``auto``):

* **Scaling**: forward and backward time of one sequence of N tokens, N from 8K to 128K. slc does
  a fixed amount of work per query (topk * block_size keys, fewer only for the first blocks), so
  the time should grow linearly: the table gives the time per 1K tokens and its ratio to the 64K
  row's (1.00 = linear).
* **Varlen**: one forward + backward over a packed batch of 8 sequences of mixed lengths totalling
  65536 tokens, against one 65536-token sequence (target: within 10%). Short sequences have fewer
  visible blocks per query, so the batch does slightly less work; both counts are reported.

Shape: Hkv = 4, D = 128, bf16, random valid selection (``fsagen.testing.random_topk_idx``),
median of CUDA-event timings (``bench_slc._timer``). Extra memory: peak of one forward + backward
above what was allocated before, less its outputs (``bench_slc._extra_memory``).

Usage: python bench/bench_slc_scaling.py [--groups 1 4 16] [--configs 64,16] [--out bench/results]
"""
from __future__ import annotations

import argparse
import datetime
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_slc import _extra_memory, _timer, slc_flops  # noqa: E402

LENGTHS = (8192, 16384, 32768, 65536, 131072)
MIXED = (20480, 12288, 9216, 8192, 6144, 4096, 3584, 1536)  # 8 sequences, 65536 tokens
assert sum(MIXED) == 65536


def visible_keys(lengths, bs, topk):
    """Selected keys actually attended: per query min(topk, its visible blocks) * bs, causal tail cut."""
    total = 0
    for n in lengths:
        t = torch.arange(n, dtype=torch.float64)
        blocks = torch.clamp(t // bs + 1, max=topk)
        total += float((blocks * bs).sum())
    return total


def run_case(timeit, lengths, G, bs, topk, hkv=4, d=128, seed=0, graphs=False):
    import fsagen.ops  # noqa: F401  (registers torch.ops.fsagen.*)
    from fsagen.testing import capture_cuda_graph, random_topk_idx

    gen = torch.Generator(device="cuda").manual_seed(seed)
    n = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    idx = random_topk_idx(cu, hkv, topk, bs, generator=gen)
    q, k, v = (torch.randn(n, h, d, device="cuda", generator=gen).to(torch.bfloat16) for h in (hkv * G, hkv, hkv))
    scale = d ** -0.5
    fwd = lambda: torch.ops.fsagen.slc_fwd(q, k, v, idx, cu, bs, scale, "auto")  # noqa: E731
    o, lse = fwd()
    do = torch.randn_like(o)
    bwd = lambda: torch.ops.fsagen.slc_bwd(do, q, k, v, o, lse, idx, cu, bs, scale, "auto")  # noqa: E731
    res = dict(fwd_ms=timeit(fwd), bwd_ms=timeit(bwd), extra_mib=_extra_memory(fwd, bwd, do) / 2**20)
    if graphs:  # the same calls replayed from CUDA graphs: GPU time without the host's launch costs
        for phase, step in (("fwd", fwd), ("bwd", bwd)):
            graph, _ = capture_cuda_graph(step)
            res[f"{phase}_graph_ms"] = timeit(graph.replay)
            del graph
    del q, k, v, o, lse, do
    torch.cuda.empty_cache()
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--configs", nargs="+", default=["64,16"], help="block_size,topk pairs")
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_slc_scaling: needs a CUDA GPU", file=sys.stderr)
        return 2
    from fsagen.slc import plan_for

    how, timeit = _timer()
    scaling, varlen = [], []
    for G in args.groups:
        for cfg in args.configs:
            bs, topk = (int(x) for x in cfg.split(","))
            probe = torch.empty(1, 4 * G, 128, device="cuda", dtype=torch.bfloat16)
            probe_idx = torch.empty(4, 1, topk, device="cuda", dtype=torch.int32)
            picked = "/".join(plan_for(probe, probe[:, :4], probe_idx, bs, ph)[1].loop_order for ph in ("fwd", "bwd"))
            by_n = {}
            for n in args.lengths:
                r = run_case(timeit, [n], G, bs, topk, graphs=True)
                by_n[n] = r
                tf = slc_flops(n, 4 * G, topk, bs, 128) / r["fwd_ms"] / 1e9
                scaling.append(dict(G=G, bs=bs, topk=topk, N=n, picked=picked, tflops=tf, **r))
                print(f"scaling G={G} bs={bs} N={n}: fwd {r['fwd_ms']:.2f} bwd {r['bwd_ms']:.2f} ms "
                      f"(CUDA graph: {r['fwd_graph_ms']:.2f} / {r['bwd_graph_ms']:.2f}) extra {r['extra_mib']:.0f} MiB",
                      flush=True)
            ref = by_n.get(65536)
            for row in scaling:
                if (row["G"], row["bs"]) == (G, bs) and ref:
                    for ph in ("fwd", "bwd", "fwd_graph", "bwd_graph"):
                        row[f"{ph}_vs_linear"] = (row[f"{ph}_ms"] / row["N"]) / (ref[f"{ph}_ms"] / 65536)
            one = ref or run_case(timeit, [65536], G, bs, topk)
            mixed = run_case(timeit, list(MIXED), G, bs, topk)
            work = visible_keys(MIXED, bs, topk) / visible_keys([65536], bs, topk)
            ratio = (mixed["fwd_ms"] + mixed["bwd_ms"]) / (one["fwd_ms"] + one["bwd_ms"])
            varlen.append(dict(G=G, bs=bs, topk=topk, picked=picked, one=one, mixed=mixed, work=work, ratio=ratio))
            print(f"varlen G={G} bs={bs}: mixed {mixed['fwd_ms'] + mixed['bwd_ms']:.2f} ms vs one "
                  f"{one['fwd_ms'] + one['bwd_ms']:.2f} ms (x{ratio:.3f}, work x{work:.3f})", flush=True)
    write(args.out, scaling, varlen, how)
    return 0


def write(out: Path, scaling, varlen, how) -> None:
    out.mkdir(parents=True, exist_ok=True)
    f = lambda x, d=2: "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"  # noqa: E731
    lines = ["# slc scaling with N, and a mixed-length batch", "",
             f"- device: {torch.cuda.get_device_name()}",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- torch {torch.__version__}; Hkv=4, D=128, bf16; random valid selection; loop order: the schedule's",
             f"- timing: {how}; extra MiB: one fwd + bwd, peak above inputs, less outputs", "",
             "## Time against N (one sequence)", "",
             "'vs linear' = (ms / N) over the 64K row's (ms / N): 1.00 is linear growth. 'graph': the same op",
             "call captured in a CUDA graph and replayed, i.e. GPU time alone; where the eager time is far above",
             "it (short N), the host's launches set the pace (a kv_outer forward issues ~105 aten ops, most of",
             "them the block-index build, and two TileLang launches).", "",
             "| G | bs,topk | N | order fwd/bwd | fwd ms | fwd TFLOP/s | fwd vs linear | fwd graph ms | fwd graph vs linear "
             "| bwd ms | bwd vs linear | bwd graph ms | bwd graph vs linear | extra MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in scaling:
        lines.append(f"| {r['G']} | {r['bs']},{r['topk']} | {r['N']} | {r['picked']} | {f(r['fwd_ms'])} | "
                     f"{f(r['tflops'], 1)} | {f(r.get('fwd_vs_linear'))} | {f(r.get('fwd_graph_ms'))} | "
                     f"{f(r.get('fwd_graph_vs_linear'))} | {f(r['bwd_ms'])} | {f(r.get('bwd_vs_linear'))} | "
                     f"{f(r.get('bwd_graph_ms'))} | {f(r.get('bwd_graph_vs_linear'))} | {f(r['extra_mib'], 0)} |")
    lines += ["", f"## Mixed lengths: 8 sequences {list(MIXED)} (65536 tokens) against one of 65536", "",
              "'work' = attended keys of the batch over the single sequence's (short sequences see fewer blocks).", "",
              "| G | bs,topk | order fwd/bwd | one seq fwd+bwd ms | batch fwd+bwd ms | batch / one | work | batch extra MiB |",
              "|---|---|---|---|---|---|---|---|"]
    for r in varlen:
        lines.append(f"| {r['G']} | {r['bs']},{r['topk']} | {r['picked']} | "
                     f"{f(r['one']['fwd_ms'] + r['one']['bwd_ms'])} | {f(r['mixed']['fwd_ms'] + r['mixed']['bwd_ms'])} | "
                     f"{f(r['ratio'], 3)} | {f(r['work'], 3)} | {f(r['mixed']['extra_mib'], 0)} |")
    (out / "slc_scaling.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, ph in zip(axes, ("fwd", "bwd")):
        for key in dict.fromkeys((r["G"], r["bs"], r["topk"]) for r in scaling):
            rows = [r for r in scaling if (r["G"], r["bs"], r["topk"]) == key]
            ns = [r["N"] for r in rows]
            (line,) = ax.plot(ns, [r[f"{ph}_ms"] for r in rows], "o-", label=f"G={key[0]} bs={key[1]} topk={key[2]}")
            if all(f"{ph}_graph_ms" in r for r in rows):
                ax.plot(ns, [r[f"{ph}_graph_ms"] for r in rows], "s--", color=line.get_color(), alpha=0.6)
            last = rows[-1]
            ax.plot(ns, [last[f"{ph}_ms"] * n / last["N"] for n in ns], ":", color="gray")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (tokens, one sequence)")
        ax.set_ylabel("ms")
        ax.set_title(f"slc {ph} (dashed: CUDA graph replay; dotted: linear)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "slc_scaling.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
