"""Decode-step attention of fsagen's paged NSA cache against dense decode attention.

Batch B sequences of context N in an NSAKVCache (page 64), Hkv kv heads, head dim D, bf16, G in
{1, 4, 16}. fsagen: cmp + slc (over a random valid selection: the decode selection is not a kernel
yet, so it is not timed) + swa decode attention, each one generated split-KV launch plus its merge.
Dense: SDPA over the same context held contiguous ([B, Hq, N, D] after GQA expansion is not
materialised: enable_gqa), the cache's gather not timed. The floor: the bytes fsagen must read
(selected blocks, window, compressed cache, q, o) at the measured copy bandwidth.

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


def run(b, n, hkv, d, groups, out: Path):
    from fsagen.decode import decode_attention
    from fsagen.testing import random_topk_idx

    bw = copy_bandwidth()
    cache = build_cache(b, n, hkv, d)
    seqs = list(range(b))
    k_dense = torch.stack([cache.raw(s)[0] for s in seqs]).transpose(1, 2).contiguous()  # [B, Hkv, N, D]
    v_dense = torch.stack([cache.raw(s)[1] for s in seqs]).transpose(1, 2).contiguous()
    cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    idx_all = random_topk_idx(cu, hkv, TOPK, BS, init_blocks=1, local_blocks=2)[:, -1:]  # the last token's row
    topk_idx = idx_all.expand(hkv, b, TOPK).contiguous()
    rows = []
    for g in groups:
        hq = hkv * g
        q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)

        def nsa():
            decode_attention(q, cache, seqs, "cmp")
            decode_attention(q, cache, seqs, "slc", topk_idx=topk_idx, block_size=BS)
            decode_attention(q, cache, seqs, "swa", window_size=WINDOW)

        q4 = q[:, :, None, :]

        def dense():
            torch.nn.functional.scaled_dot_product_attention(q4, k_dense, v_dense, enable_gqa=True)

        t_nsa, t_dense = _event_median(nsa, 500), _event_median(dense, 500)
        lc = cache.num_compressed(n)
        keys = TOPK * BS + WINDOW + lc
        need = b * hkv * keys * d * 2 * 2 + 2 * b * hq * d * 2
        rows.append(dict(G=g, nsa=t_nsa, dense=t_dense, floor=need / bw * 1e3, need=need))
    lines = [
        "# Decode-step attention: fsagen paged NSA cache vs dense",
        "",
        f"- device: {torch.cuda.get_device_name()}; torch {torch.__version__}; date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- batch {b}, context {n}, Hkv {hkv}, D {d}, bf16; NSA: ks {KS}, s {S}, block {BS}, topk {TOPK}, window {WINDOW}, page {PAGE}",
        "- fsagen: decode_attention cmp + slc + swa (three split-KV launches and their merges); the decode",
        "  selection (not a kernel yet) and the gating are not timed. Dense: SDPA (enable_gqa) over the",
        "  context held contiguous, its gather not timed.",
        f"- floor: bytes fsagen must read (selected blocks, window, compressed keys; k and v) at the measured copy rate {bw / 1e12:.2f} TB/s",
        "- timing: CUDA-event median, L2 flushed (bench_slc._event_median)",
        "",
        "| G | fsagen ms | dense ms | dense / fsagen (target >= 4) | floor ms | fsagen / floor (target <= 2) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['G']} | {r['nsa']:.3f} | {r['dense']:.3f} | {r['dense'] / r['nsa']:.2f} | "
                     f"{r['floor']:.3f} | {r['nsa'] / r['floor']:.2f} |")
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
