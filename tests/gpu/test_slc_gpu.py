"""slc kernels on the GPU against the float64 reference: o, lse, dq, dk, dv.

Every case draws fresh random inputs, runs with ``FSAGEN_POISON=1`` (the glue NaN-fills its
outputs, so an element a kernel forgets to write fails), and prints every relative error
``||out - ref|| / ||ref||``; with ``FSAGEN_GPU_LOG=path`` the figures are also appended to that
file as a markdown table (run pytest with ``-s`` to see the prints).
"""

import os
import time

import pytest
import torch

import fsagen
from fsagen.reference import slc_reference
from fsagen.testing import capture_cuda_graph, random_cu_seqlens, random_topk_idx, rel_err

pytestmark = pytest.mark.gpu

LOOP_ORDERS = ["kv_outer", "q_outer"]
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}  # fp16 carries 3 more mantissa bits
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
FIELDS = ("o", "lse", "dq", "dk", "dv")


def _grid():
    """(G, D, block_size, topk, dtype) of the default build grid; a built-in copy if unreadable."""
    try:
        from fsagen.spec import load_grid

        return sorted({(s.G, s.D, s.block_size, s.topk, s.dtype) for s in load_grid() if s.branch == "slc"})
    except Exception:  # pragma: no cover - only when the grid module is broken
        return [(g, d, bs, k, dt) for g in (1, 2, 4, 8, 16) for d in (64, 128)
                for bs, k in ((64, 16), (128, 8)) for dt in DTYPES]


def _record(case: str, errs: dict) -> None:
    line = " ".join(f"{k}={v:.3e}" for k, v in errs.items())
    print(f"\n[slc-gpu] {case}: {line}")
    path = os.environ.get("FSAGEN_GPU_LOG")
    if not path:
        return
    new = not os.path.exists(path)
    with open(path, "a") as f:
        if new:
            f.write("| case | " + " | ".join(FIELDS) + " |\n|---|" + "---|" * len(FIELDS) + "\n")
        cells = (f"{errs[k]:.3e}" if k in errs else "not measured" for k in FIELDS)
        f.write(f"| {case} | " + " | ".join(cells) + " |\n")


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setenv("FSAGEN_POISON", "1")


def _qkv(n, hq, hkv, d, dtype, gen):
    return [torch.randn(n, h, d, device="cuda", generator=gen).to(dtype) for h in (hq, hkv, hkv)]


def _reference(q, k, v, idx, cu, bs, do):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o, lse = slc_reference(*leaves, idx, cu, bs)
    grads = torch.autograd.grad(o, leaves, do.double())
    return (o.detach(), lse.detach(), *grads)


def run_and_compare(case, q, k, v, idx, cu, bs, loop_order, gen, fn=None):
    """Forward + backward through ``fn`` (default: fsagen.selected_attention), compare, record."""
    fn = fn or (lambda *a: fsagen.selected_attention(*a, return_lse=True, loop_order=loop_order))
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o, lse = fn(q, k, v, idx, bs, cu)
    do = torch.randn(o.shape, device="cuda", generator=gen).to(o.dtype)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    ref = _reference(q, k, v, idx, cu, bs, do)
    errs = {name: rel_err(out, r) for name, out, r in zip(FIELDS, (o, lse, dq, dk, dv), ref)}
    _record(case, errs)
    tol = TOL[q.dtype]
    bad = {k_: e for k_, e in errs.items() if not e < tol}
    assert not bad, f"{case}: relative errors over {tol}: {bad}"
    return errs


def _gen(seed=None):
    return torch.Generator(device="cuda").manual_seed(seed if seed is not None else time.time_ns() % 2**31)


@pytest.mark.parametrize("loop_order", LOOP_ORDERS)
@pytest.mark.parametrize("G,D,bs,topk,dtype", _grid())
def test_grid(G, D, bs, topk, dtype, loop_order):
    gen = _gen()
    hkv = 1 if G >= 16 else 2
    n = 2048
    cu = random_cu_seqlens(n, 3, block_size=bs, generator=gen, device="cuda")
    idx = random_topk_idx(cu, hkv, topk, bs, generator=gen)
    q, k, v = _qkv(n, G * hkv, hkv, D, DTYPES[dtype], gen)
    run_and_compare(f"grid G={G} D={D} bs={bs} topk={topk} {dtype} {loop_order}", q, k, v, idx, cu, bs,
                    loop_order, gen)


@pytest.mark.parametrize("windows", [1, 4])
@pytest.mark.parametrize("G", [1, 4, 16])
def test_kv_outer_query_chunks(G, windows, edited_schedule, monkeypatch):
    """kv_outer with the block index cut into query chunks (knob chunk_rows; 64 tokens a chunk
    here, so a 2048-token varlen batch has 32), and the o / dq accumulator in ``windows`` launches
    (FSAGEN_ACC_BYTES): forward and backward still equal the reference."""
    edited_schedule("sm90", "chunk_rows = 16384", f"chunk_rows = {64 * G}")
    gen = _gen()
    hkv, bs, topk, n = 2, 64, 16, 2048
    if windows > 1:  # the two kv heads share a head chunk: 2 * G * 128 float32 a token
        monkeypatch.setenv("FSAGEN_ACC_BYTES", str(n // windows * 2 * G * 128 * 4))
    cu = random_cu_seqlens(n, 3, block_size=bs, generator=gen, device="cuda")
    idx = random_topk_idx(cu, hkv, topk, bs, generator=gen)
    q, k, v = _qkv(n, G * hkv, hkv, 128, torch.bfloat16, gen)
    run_and_compare(f"kv_outer query chunks of 64 tokens, {windows} accumulator windows, G={G}", q, k, v, idx, cu,
                    bs, "kv_outer", gen)


def _varlen_case(case, G, D, bs, topk, loop_order, seqs):
    """``run_and_compare`` on 2048 tokens in ``seqs`` random sequences, 2 kv heads, bf16."""
    gen = _gen()
    hkv, n = 2, 2048
    cu = random_cu_seqlens(n, seqs, block_size=bs, generator=gen, device="cuda")
    idx = random_topk_idx(cu, hkv, topk, bs, generator=gen)
    q, k, v = _qkv(n, G * hkv, hkv, D, torch.bfloat16, gen)
    run_and_compare(case, q, k, v, idx, cu, bs, loop_order, gen)


ASYNC_GATHER_EDITS = [('gather = "sync"', 'gather = "async"')]  # bench/prebuild_gpu_tests.py builds these plans
ASYNC_GATHER_CASES = [(G, D, bs, topk) for G in (1, 2, 4, 16) for D in (64, 128) for bs, topk in ((64, 16), (128, 8))]


@pytest.mark.parametrize("G,D,bs,topk", ASYNC_GATHER_CASES)
def test_kv_outer_async_gather(G, D, bs, topk, edited_schedule):
    """kv_outer with ``gather = "async"`` (cp.async of the next tile's rows while the current tile
    computes; bench/variants/kv_outer_occupancy.toml): forward and backward equal the reference."""
    for old, new in ASYNC_GATHER_EDITS:
        edited_schedule("sm90", old, new)
    _varlen_case(f"kv_outer async gather G={G} D={D} bs={bs} topk={topk}", G, D, bs, topk, "kv_outer", seqs=3)


def token_tile_edits(tokens):
    """sm90 edits of test_q_outer_token_tiles: ``tokens`` tokens a q_outer forward CTA, and no
    3-CTA register cap (a tile of several tokens' rows needs more than 80 registers a thread)."""
    return [("q_tokens = 1", f"q_tokens = {tokens}"),
            ("knobs = { q_ctas_per_sm = 3 }", "knobs = { q_ctas_per_sm = 0 }")]


# (G, D, block, topk, tokens a CTA): tokens * G = 64 rows (a wgmma tile) where it fits 31 tokens
TOKEN_TILE_CASES = [(G, D, bs, topk, min(31, max(2, 64 // G))) for G in (1, 2, 4, 8, 16) for D in (64, 128)
                    for bs, topk in ((64, 16), (128, 8))]


@pytest.mark.parametrize("G,D,bs,topk,tokens", TOKEN_TILE_CASES)
def test_q_outer_token_tiles(G, D, bs, topk, tokens, edited_schedule):
    """q_outer forward with ``tokens`` tokens a CTA over the union of their blocks (knob q_tokens,
    bench/variants/q_outer_union.toml) on varlen sequences whose boundaries fall inside tiles:
    forward and backward equal the reference."""
    for old, new in token_tile_edits(tokens):
        edited_schedule("sm90", old, new)
    _varlen_case(f"q_outer {tokens} tokens a CTA G={G} D={D} bs={bs} topk={topk}", G, D, bs, topk, "q_outer", seqs=5)


def _holes(idx, gen):
    """-1 at random places inside rows (not only trailing padding); remaining entries stay valid."""
    drop = torch.rand(idx.shape, device=idx.device, generator=gen) < 0.3
    return torch.where(drop, torch.full_like(idx, -1), idx)


def _hot_block(idx, gen):
    """Every query of every head selects block 0 (one single block of N queries)."""
    idx = idx.clone()
    has0 = (idx == 0).any(-1)
    idx[..., 0] = torch.where(has0, idx[..., 0], torch.zeros_like(idx[..., 0]))
    return idx


SPECIAL = {
    # name: (cu_seqlens as list or (total, num_seqs), topk, index editor or None)
    "minus_one_holes": ((3000, 2), 16, _holes),
    "hot_block_single_sequence": ([0, 4096], 16, _hot_block),
    "many_unaligned_sequences": ((4000, 37), 16, None),
    "sequences_shorter_than_a_block": ([0, 1, 6, 69, 132, 1000, 1063], 16, None),
    "topk_exceeds_available_blocks": ([0, 100, 400, 460], 16, None),
}


@pytest.mark.parametrize("loop_order", LOOP_ORDERS)
@pytest.mark.parametrize("name", sorted(SPECIAL))
def test_special_cases(name, loop_order):
    cu_spec, topk, edit = SPECIAL[name]
    gen = _gen()
    bs, G, hkv, D = 64, 4, 2, 128
    if isinstance(cu_spec, tuple):
        cu = random_cu_seqlens(*cu_spec, block_size=bs, generator=gen, device="cuda")
    else:
        cu = torch.tensor(cu_spec, dtype=torch.int32, device="cuda")
    n = int(cu[-1])
    idx = random_topk_idx(cu, hkv, topk, bs, generator=gen)
    if edit is not None:
        idx = edit(idx, gen)
    q, k, v = _qkv(n, G * hkv, hkv, D, torch.bfloat16, gen)
    run_and_compare(f"{name} {loop_order}", q, k, v, idx, cu, bs, loop_order, gen)


def _small_case(gen, n=300, G=2, hkv=2, D=64, bs=64, topk=4):
    cu = random_cu_seqlens(n, 2, block_size=bs, generator=gen, device="cuda")
    idx = random_topk_idx(cu, hkv, topk, bs, generator=gen)
    q, k, v = _qkv(n, G * hkv, hkv, D, torch.bfloat16, gen)
    return q, k, v, idx, cu, bs


@pytest.mark.parametrize("loop_order", LOOP_ORDERS)
def test_opcheck(loop_order):
    gen = _gen()
    q, k, v, idx, cu, bs = _small_case(gen)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5
    torch.library.opcheck(torch.ops.fsagen.slc_fwd.default, (q, k, v, idx, cu, bs, scale, loop_order))
    with torch.no_grad():
        o, lse = torch.ops.fsagen.slc_fwd(q, k, v, idx, cu, bs, scale, loop_order)
    do = torch.randn_like(o)
    torch.library.opcheck(torch.ops.fsagen.slc_bwd.default,
                          (do, q.detach(), k.detach(), v.detach(), o, lse, idx, cu, bs, scale, loop_order))


def test_torch_compile_forward_backward():
    gen = _gen()
    q, k, v, idx, cu, bs = _small_case(gen, n=1500, G=4)

    @torch.compile(fullgraph=True)
    def attn(q, k, v, idx, bs, cu):
        o, lse = fsagen.selected_attention(q, k, v, idx, bs, cu, return_lse=True)
        return o * 1.0, lse  # some surrounding ops for inductor to fuse

    run_and_compare("torch.compile fwd+bwd", q, k, v, idx, cu, bs, None, gen, fn=attn)


def test_cuda_graph_capture_and_replay():
    """fwd + bwd captured once (index checks turn themselves off during capture), replayed on
    new q, k, v, do, topk_idx and cu_seqlens of the same shapes."""
    gen = _gen()
    q0, k0, v0, idx0, cu0, bs = _small_case(gen, n=2000, G=4, topk=8)
    q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
    idx, cu = idx0.clone(), cu0.clone()
    do = torch.randn(q.shape[0], q.shape[1], v.shape[2], device="cuda", generator=gen).to(q.dtype)

    def step():
        o = fsagen.selected_attention(q, k, v, idx, bs, cu)
        return (o, *torch.autograd.grad(o, (q, k, v), do))

    graph, outs = capture_cuda_graph(step)  # warm-up compiles/loads kernels, runs the checks eagerly

    q1, k1, v1, idx1, cu1, _ = _small_case(gen, n=2000, G=4, topk=8)
    with torch.no_grad():
        for dst, src in ((q, q1), (k, k1), (v, v1), (idx, idx1), (cu, cu1)):
            dst.copy_(src)
        do.copy_(torch.randn(do.shape, device="cuda", generator=gen))
    graph.replay()
    torch.cuda.synchronize()
    ref = _reference(q1, k1, v1, idx1, cu1, bs, do)
    names = ("o", "dq", "dk", "dv")
    errs = {n: rel_err(out, r) for n, out, r in zip(names, outs, (ref[0], *ref[2:]))}
    _record("cuda graph replay (new data)", errs)
    assert all(e < TOL[torch.bfloat16] for e in errs.values()), errs


def test_tables_kept_per_cu_seqlens_and_stream():
    """fsagen.seqlens_cache on the GPU: a second call on the same cu_seqlens reuses its token layout
    and still equals the reference; after an in-place write to cu_seqlens the layout is rebuilt (the
    results follow the new lengths); a call on another stream builds its own."""
    from fsagen.seqlens_cache import SEQLENS_CACHE
    from fsagen.slc_index import token_layout

    gen = _gen()
    hkv, G, D, bs, topk, n = 2, 4, 128, 64, 16, 2048
    cu = torch.tensor([0, 700, 1500, n], dtype=torch.int32, device="cuda")
    q, k, v = _qkv(n, G * hkv, hkv, D, torch.bfloat16, gen)
    for case in ("first call", "same cu_seqlens again"):
        idx = random_topk_idx(cu, hkv, topk, bs, generator=gen)
        run_and_compare(f"seqlens cache: {case}", q, k, v, idx, cu, bs, "kv_outer", gen)
    layout = token_layout(cu, n, bs)
    assert token_layout(cu, n, bs) is layout
    cu[1:3] = torch.tensor([64, 1000], dtype=torch.int32, device="cuda")
    assert token_layout(cu, n, bs) is not layout
    idx = random_topk_idx(cu, hkv, topk, bs, generator=gen)
    run_and_compare("seqlens cache: cu_seqlens written in place", q, k, v, idx, cu, bs, "kv_outer", gen)
    kept = len(SEQLENS_CACHE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        other = token_layout(cu, n, bs)
    torch.cuda.current_stream().wait_stream(side)
    assert other is not token_layout(cu, n, bs) and len(SEQLENS_CACHE) == kept + 1
