"""Decode-step attention of fsagen's paged NSA cache against dense decode attention.

Batch B sequences of context N in an NSAKVCache (page 64), Hkv kv heads, head dim D, bf16, G in
{1, 4, 16}. fsagen: ``nsa_decode``, the whole step's attention (cmp with its scores, the block
selection, slc + swa, the merges of the split-KV runs, the gates; no projections, no cache
append), timed eagerly and replayed from a CUDA graph (how a server runs decode steps), with the
device time of each kernel from the profiler. Dense: SDPA over the same context held contiguous
(``enable_gqa``; flash_attn_with_kvcache if installed), the cache's gather not timed. The floor:
the bytes fsagen must read (selected blocks, window, compressed cache; k and v) at the measured
copy bandwidth.

    python bench/bench_decode.py [--out bench/results] [--smoke]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_slc import _event_median  # noqa: E402

KS, S, BS, TOPK, WINDOW, PAGE = 32, 16, 64, 16, 512, 64


def copy_bandwidth() -> float:
    """Measured device copy rate (bytes/s): a 1 GiB clone."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    t = _event_median(lambda: x.clone(), 300)
    return 2 * x.numel() / (t * 1e-3)


def build_cache(b, n, hkv, d):
    from fsagen.kv_cache import NSAKVCache

    cache = NSAKVCache(b, b * (n // PAGE + 1), PAGE, n, hkv, d, kernel_size=KS, stride=S, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for s in range(b):
        k = torch.randn(n, hkv, d, device="cuda", generator=gen, dtype=torch.bfloat16)
        cache.append([s], k, torch.randn_like(k), [n])
    return cache


def _graphed(fn):
    """fn captured in a CUDA graph (after two eager warm-up calls); returns the replay."""
    fn(), fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _kernel_times(fn, reps=20):
    """Device ms per call of each CUDA kernel ``fn`` launches (profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    totals = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t and ev.count:
            totals[ev.key] = totals.get(ev.key, 0.0) + t / 1e3 / reps
    return sorted(totals.items(), key=lambda kv: -kv[1])


def _dense_fn(q, k_dense, v_dense):
    try:
        from flash_attn import flash_attn_with_kvcache  # noqa: F401
    except ImportError:
        q4 = q[:, :, None, :]
        return "SDPA (enable_gqa)", lambda: torch.nn.functional.scaled_dot_product_attention(
            q4, k_dense, v_dense, enable_gqa=True)
    kc, vc, q1 = k_dense.transpose(1, 2).contiguous(), v_dense.transpose(1, 2).contiguous(), q[:, None]
    return "flash_attn_with_kvcache", lambda: flash_attn_with_kvcache(q1, kc, vc)


def run(b, n, hkv, d, groups, out: Path):
    from fsagen.decode import nsa_decode

    bw = copy_bandwidth()
    cache = build_cache(b, n, hkv, d)
    seqs = list(range(b))
    k_dense = torch.stack([cache.raw(s)[0] for s in seqs]).transpose(1, 2).contiguous()  # [B, Hkv, N, D]
    v_dense = torch.stack([cache.raw(s)[1] for s in seqs]).transpose(1, 2).contiguous()
    nsa_args = dict(block_size=BS, topk=TOPK, init_blocks=1, local_blocks=2, window_size=WINDOW)
    rows, breakdown = [], {}
    for g in groups:
        hq = hkv * g
        q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
        gates = torch.rand(b, hq, 3, device="cuda", dtype=torch.bfloat16)

        def nsa():
            nsa_decode(q, cache, seqs, gates, **nsa_args)

        dense_name, dense = _dense_fn(q, k_dense, v_dense)
        replay = _graphed(nsa)
        t_eager, t_graph, t_dense = _event_median(nsa, 300), _event_median(replay, 500), _event_median(dense, 300)
        breakdown[g] = _kernel_times(nsa)
        lc = cache.num_compressed(n)
        keys = TOPK * BS + WINDOW + lc
        need = b * hkv * keys * d * 2 * 2 + 2 * b * hq * d * 2
        rows.append(dict(G=g, eager=t_eager, graph=t_graph, dense=t_dense, floor=need / bw * 1e3,
                         kernels=sum(t for _, t in breakdown[g])))
    lines = [
        "# Decode-step attention: fsagen paged NSA cache vs dense",
        "",
        f"- device: {torch.cuda.get_device_name()}; torch {torch.__version__}; date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- batch {b}, context {n}, Hkv {hkv}, D {d}, bf16; NSA: ks {KS}, s {S}, block {BS}, topk {TOPK}, window {WINDOW}, page {PAGE}",
        "- fsagen: `nsa_decode` (cmp with scores, selection, slc + swa, split merges, gates; no projections,",
        "  no cache append), eager and replayed from a CUDA graph; 'kernels' is the sum of its kernels' device",
        f"  times (profiler). Dense: {dense_name} over the context held contiguous, its gather not timed.",
        f"- floor: bytes fsagen must read (selected blocks, window, compressed keys; k and v) at the measured copy rate {bw / 1e12:.2f} TB/s",
        "- timing: CUDA-event median, L2 flushed (bench_slc._event_median)",
        "",
        "| G | fsagen graph ms | fsagen eager ms | kernels ms | dense ms | dense / graph (target >= 4) | floor ms | graph / floor (target <= 2) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['G']} | {r['graph']:.3f} | {r['eager']:.3f} | {r['kernels']:.3f} | {r['dense']:.3f} | "
                     f"{r['dense'] / r['graph']:.2f} | {r['floor']:.3f} | {r['graph'] / r['floor']:.2f} |")
    for g, items in breakdown.items():
        lines += ["", f"Kernels of one step, G = {g} (device ms per step, largest first):", "",
                  "| kernel | ms |", "|---|---|"]
        lines += [f"| `{name[:90]}` | {t:.4f} |" for name, t in items[:12]]
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--smoke", action="store_true", help="batch 2, context 2048")
    a = p.parse_args(argv)
    if a.smoke:
        run(2, 2048, 4, 128, [1, 4], Path(a.out))
    else:
        run(32, 65536, 4, 128, [1, 4, 16], Path(a.out))


if __name__ == "__main__":
    main()
