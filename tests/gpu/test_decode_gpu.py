"""Decode attention (kernels/decode.py through fsagen.decode) against the float64 decode reference.

A batch of sequences of different lengths (at and just past the compression-window, block and
window boundaries) is appended to an NSAKVCache in pieces; the new token of each is decoded per
branch (slc over the reference's own selection, swa, cmp) and compared with
``nsa_decode_reference``'s parts, outputs NaN-poisoned first; the whole gated step
(``nsa_decode``: cmp with scores, selection, slc + swa, gates) against the reference's output and
selection; and a step captured in a CUDA graph and replayed after the cache grew. Prebuild the kernels with
``fsagen build --arch sm90 --grid bench/grids/decode.toml``.
"""
import pytest
import torch

from fsagen.decode import decode_attention, nsa_decode
from fsagen.kv_cache import NSAKVCache
from fsagen.reference_cmp import compress_reference
from fsagen.reference_decode import nsa_decode_reference
from fsagen.testing import log_errors, rel_err

pytestmark = pytest.mark.gpu

HKV, KS, S, BS, PAGE = 2, 32, 16, 64, 64
TOPK, INIT, LOCAL = 8, 1, 2
LENGTHS = [KS - 1, KS, BS + 1, 100, 101, 512, 513, 1300]
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _filled_cache(G, D, dtype, seed, lengths=LENGTHS, max_len=1400):
    """A cache holding random k/v of ``lengths`` (prefilled, then each new token appended in one
    call) and random queries ``[B, Hkv*G, D]``."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    cache = NSAKVCache(len(lengths), 64, PAGE, max_len, HKV, D, kernel_size=KS, stride=S, dtype=dtype, device="cuda")
    seqs = list(range(len(lengths)))
    k_all = [torch.randn(n, HKV, D, device="cuda", generator=gen).to(dtype) for n in lengths]
    v_all = [torch.randn(n, HKV, D, device="cuda", generator=gen).to(dtype) for n in lengths]
    cache.append(seqs, torch.cat([k[:-1] for k in k_all]), torch.cat([v[:-1] for v in v_all]), [n - 1 for n in lengths])
    cache.append(seqs, torch.cat([k[-1:] for k in k_all]), torch.cat([v[-1:] for v in v_all]), [1] * len(lengths))
    q = torch.randn(len(lengths), HKV * G, D, device="cuda", generator=gen).to(dtype)
    return cache, seqs, q


def _references(cache, q, gates, window):
    """nsa_decode_reference's parts for every sequence of the cache (its own compressed keys)."""
    refs = []
    for b, n in enumerate(cache.lengths):
        kr, vr = cache.raw(b)
        kc, vc = compress_reference(kr, vr, torch.tensor([0, n], dtype=torch.int32, device="cuda"), KS, S, "mean")[:2]
        torch.testing.assert_close(cache.compressed(b)[0].double(), kc, rtol=2e-2, atol=2e-2)  # cache pooled it
        kc, vc = cache.compressed(b)  # the decode kernels read the cache's own compressed keys
        refs.append(nsa_decode_reference(q[b:b + 1], kr, vr, kc, vc, torch.tensor([n - 1], device="cuda"),
                                         gates[b:b + 1], kernel_size=KS, stride=S, block_size=BS, topk=TOPK,
                                         init_blocks=INIT, local_blocks=LOCAL, window_size=window,
                                         return_parts=True))
    return refs


def check_decode(G, D, dtype, branch, window=100):
    cache, seqs, q = _filled_cache(G, D, dtype, G * 1000 + D)
    gates = torch.ones(len(seqs), HKV * G, 3, device="cuda", dtype=torch.float64)
    refs = [parts for _, parts in _references(cache, q, gates, window)]
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


def _nsa_kwargs(window):
    return dict(block_size=BS, topk=TOPK, init_blocks=INIT, local_blocks=LOCAL, window_size=window)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", [1, 4, 16])
def test_nsa_decode_matches_reference(G, D, dtype, monkeypatch):
    """The whole step: selection equals the reference's, every branch and the gated sum within
    tolerance; per-head gates."""
    monkeypatch.setenv("FSAGEN_POISON", "1")
    window = 100
    cache, seqs, q = _filled_cache(G, D, dtype, 7 * G + D)
    gates = torch.rand(len(seqs), HKV * G, 3, device="cuda", generator=torch.Generator("cuda").manual_seed(G))
    refs = _references(cache, q, gates.double(), window)
    o, parts = nsa_decode(q, cache, seqs, gates, **_nsa_kwargs(window), return_parts=True)
    want_idx = torch.cat([p["topk_idx"] for _, p in refs], dim=1)
    case = f"nsa_decode G={G} D={D} {str(dtype)[6:]} lengths={LENGTHS}"
    assert torch.equal(parts["topk_idx"], want_idx), f"{case}: selection differs"
    errs = {"o": rel_err(o, torch.cat([r for r, _ in refs]))}
    for name in ("o_cmp", "o_slc", "o_swa"):
        errs[name] = rel_err(parts[name], torch.cat([p[name] for _, p in refs]))
    for name in ("lse_cmp", "lse_slc", "lse_swa"):
        want = torch.cat([p[name] for _, p in refs])
        fin = torch.isfinite(want)
        assert torch.equal(torch.isfinite(parts[name]), fin), f"{case}: {name}: rows that see nothing differ"
        errs[name] = (parts[name][fin].double() - want[fin]).abs().max().item() if fin.any() else 0.0
    log_errors("decode-gpu", case, errs, tuple(errs))
    assert not torch.isnan(o).any(), case
    assert all(errs[n] < TOL[dtype] for n in ("o", "o_cmp", "o_slc", "o_swa")), f"{case}: {errs}"
    assert all(errs[n] < 5e-2 for n in ("lse_cmp", "lse_slc", "lse_swa")), f"{case}: {errs}"


@pytest.mark.parametrize("G", [1, 16])
def test_nsa_decode_cuda_graph_replay(G):
    """Capture one step, let every sequence grow by a token (pages allocated outside the graph),
    replay: the replay equals an eager step on the grown cache."""
    window, dtype, D = 100, torch.bfloat16, 128
    cache, seqs, q = _filled_cache(G, D, dtype, 11 + G)
    gates = torch.rand(len(seqs), HKV * G, 3, device="cuda")
    static_q = q.clone()
    for _ in range(2):  # warm up: compile/load the kernels, memoise the sequence list
        nsa_decode(static_q, cache, seqs, gates, **_nsa_kwargs(window))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_o = nsa_decode(static_q, cache, seqs, gates, **_nsa_kwargs(window))
    gen = torch.Generator(device="cuda").manual_seed(5)
    for step in range(3):
        k_new = torch.randn(len(seqs), HKV, D, device="cuda", generator=gen).to(dtype)
        v_new = torch.randn(len(seqs), HKV, D, device="cuda", generator=gen).to(dtype)
        cache.append(seqs, k_new, v_new, [1] * len(seqs))
        static_q.copy_(torch.randn(q.shape, device="cuda", generator=gen).to(dtype))
        graph.replay()
        eager = nsa_decode(static_q, cache, seqs, gates, **_nsa_kwargs(window))
        err = rel_err(static_o, eager.double())
        log_errors("decode-gpu", f"graph replay G={G} step {step}", {"o": err}, ("o",))
        assert err < 1e-6, f"step {step}: graph replay differs from the eager step ({err})"


@pytest.mark.parametrize("G", [1, 4, 16])
def test_nsa_decode_several_tokens_per_sequence(G, monkeypatch):
    """Speculative decoding: each sequence's last 1..4 tokens as rows of one step (rows of a
    sequence interleaved with others'); each row against the reference at its own position
    (selection block for block, o within tolerance)."""
    monkeypatch.setenv("FSAGEN_POISON", "1")
    window, dtype, D = 100, torch.bfloat16, 128
    cache, seqs, _ = _filled_cache(G, D, dtype, 31 * G)
    per_seq = [1 + i % 4 for i in range(len(seqs))]
    rows = [s for t in range(4) for s in seqs if t < per_seq[s]]  # round-robin: rows of a sequence not adjacent
    gen = torch.Generator(device="cuda").manual_seed(G)
    q = torch.randn(len(rows), HKV * G, D, device="cuda", generator=gen).to(dtype)
    gates = torch.rand(len(rows), 3, device="cuda", generator=gen)
    o, parts = nsa_decode(q, cache, rows, gates, **_nsa_kwargs(window), return_parts=True)
    errs = {"o": 0.0}
    for s, n in enumerate(cache.lengths):
        mine = [r for r, t in enumerate(rows) if t == s]
        kr, vr = cache.raw(s)
        kc, vc = cache.compressed(s)
        ro, rp = nsa_decode_reference(q[mine], kr, vr, kc, vc, torch.arange(n - len(mine), n, device="cuda"),
                                      gates[mine].double(), kernel_size=KS, stride=S, block_size=BS, topk=TOPK,
                                      init_blocks=INIT, local_blocks=LOCAL, window_size=window, return_parts=True)
        assert torch.equal(parts["topk_idx"][:, mine], rp["topk_idx"]), f"G={G} sequence {s}: selection differs"
        errs["o"] = max(errs["o"], rel_err(o[mine], ro))
    case = f"nsa_decode rows {per_seq} tokens per sequence G={G} lengths={LENGTHS}"
    log_errors("decode-gpu", case, errs, ("o",))
    assert not torch.isnan(o).any() and errs["o"] < TOL[dtype], f"{case}: {errs}"
