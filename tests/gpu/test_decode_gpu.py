"""Decode attention (kernels/decode.py through fsagen.decode) against the float64 decode reference.

A batch of sequences of different lengths (at and just past the compression-window, block and
window boundaries) is appended to an NSAKVCache in pieces; the new token of each is decoded per
branch (slc over the reference's own selection, swa, cmp) and compared with
``nsa_decode_reference``'s parts, outputs NaN-poisoned first. Prebuild the kernels with
``fsagen build --arch sm90 --grid bench/grids/decode.toml``.
"""
import pytest
import torch

from fsagen.decode import decode_attention
from fsagen.kv_cache import NSAKVCache
from fsagen.reference_cmp import compress_reference
from fsagen.reference_decode import nsa_decode_reference
from fsagen.testing import log_errors, rel_err

pytestmark = pytest.mark.gpu

HKV, KS, S, BS, PAGE = 2, 32, 16, 64, 64
TOPK, INIT, LOCAL = 8, 1, 2
LENGTHS = [KS - 1, KS, BS + 1, 100, 101, 512, 513, 1300]
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def check_decode(G, D, dtype, branch, window=100):
    gen = torch.Generator(device="cuda").manual_seed(G * 1000 + D)
    cache = NSAKVCache(len(LENGTHS), 64, PAGE, 1400, HKV, D, kernel_size=KS, stride=S, dtype=dtype, device="cuda")
    seqs = list(range(len(LENGTHS)))
    k_all = [torch.randn(n, HKV, D, device="cuda", generator=gen).to(dtype) for n in LENGTHS]
    v_all = [torch.randn(n, HKV, D, device="cuda", generator=gen).to(dtype) for n in LENGTHS]
    # prefill all but the last row, then append every sequence's new token in one call
    cache.append(seqs, torch.cat([k[:-1] for k in k_all]), torch.cat([v[:-1] for v in v_all]), [n - 1 for n in LENGTHS])
    cache.append(seqs, torch.cat([k[-1:] for k in k_all]), torch.cat([v[-1:] for v in v_all]), [1] * len(LENGTHS))
    q = torch.randn(len(LENGTHS), HKV * G, D, device="cuda", generator=gen).to(dtype)
    gates = torch.ones(1, HKV * G, 3, device="cuda", dtype=torch.float64)
    refs = []
    for b, n in enumerate(LENGTHS):
        kr, vr = cache.raw(b)
        kc, vc = compress_reference(kr, vr, torch.tensor([0, n], dtype=torch.int32, device="cuda"), KS, S, "mean")[:2]
        torch.testing.assert_close(cache.compressed(b)[0].double(), kc, rtol=2e-2, atol=2e-2)  # cache pooled it
        kc, vc = cache.compressed(b)  # the decode kernels read the cache's own compressed keys
        _, parts = nsa_decode_reference(q[b:b + 1], kr, vr, kc, vc, torch.tensor([n - 1], device="cuda"),
                                        gates, kernel_size=KS, stride=S, block_size=BS, topk=TOPK,
                                        init_blocks=INIT, local_blocks=LOCAL, window_size=window,
                                        return_parts=True)
        refs.append(parts)
    kwargs = {}
    if branch == "slc":
        kwargs = dict(topk_idx=torch.cat([p["topk_idx"] for p in refs], dim=1), block_size=BS)
    elif branch == "swa":
        kwargs = dict(window_size=window)
    o, lse = decode_attention(q, cache, seqs, branch, **kwargs)
    ro = torch.cat([p[f"o_{branch}"] for p in refs])
    rl = torch.cat([p[f"lse_{branch}"] for p in refs])
    fin = torch.isfinite(rl)
    assert torch.equal(torch.isfinite(lse), fin), f"{branch}: rows that see nothing differ"
    errs = {"o": rel_err(o, ro), "lse": (lse[fin].double() - rl[fin]).abs().max().item() if fin.any() else 0.0}
    case = f"decode {branch} G={G} D={D} {str(dtype)[6:]} lengths={LENGTHS}"
    log_errors("decode-gpu", case, errs, ("o", "lse"))
    assert not torch.isnan(o).any(), case
    assert errs["o"] < TOL[dtype] and errs["lse"] < 5e-2, f"{case}: {errs}"


@pytest.mark.parametrize("branch", ["slc", "swa", "cmp"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", [1, 4, 16])
def test_decode_matches_reference(G, D, dtype, branch, monkeypatch):
    monkeypatch.setenv("FSAGEN_POISON", "1")
    check_decode(G, D, dtype, branch)


def test_decode_bad_inputs():
    cache = NSAKVCache(2, 8, PAGE, 256, HKV, 64, kernel_size=KS, stride=S, dtype=torch.bfloat16, device="cuda")
    q = torch.randn(1, HKV, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="new token"):
        decode_attention(q, cache, [0], "cmp")
    cache.append([0], *(torch.randn(10, HKV, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2)), [10])
    with pytest.raises(IndexError, match="out of range"):
        decode_attention(q, cache, [5], "cmp")
    with pytest.raises(ValueError, match="branch"):
        decode_attention(q, cache, [0], "dense")
    with pytest.raises(ValueError, match="window_size"):
        decode_attention(q, cache, [0], "swa")
    with pytest.raises(ValueError, match="q must be"):
        decode_attention(q.float(), cache, [0], "cmp")
