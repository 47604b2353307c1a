"""cmp attention, swa attention and top-k selection on the GPU, through the public ops (spec ->
schedule -> cached artifact), against the float64 references.

Outputs are NaN-poisoned before the kernels run (FSAGEN_POISON=1). Relative errors
``||out - ref|| / ||ref||`` are printed (``-s``) and logged with ``FSAGEN_GPU_LOG``; bounds: bf16
1e-2, fp16 2e-3. A gradient that is exactly 0 in the reference (a query that sees one key) is
compared against 1e-2 x the norm of dv instead of its own zero norm.

Selection is checked exactly on the rows whose reference scores separate the chosen blocks from
the others by a clear margin (near-ties may legitimately flip between float64 and the kernel's
float32), and by recall of the reference's blocks over all rows (reported).
"""
import time

import pytest
import torch

import fsagen
from fsagen.reference_cmp import (cmp_attention_reference, num_compressed, select_blocks_reference,
                                  selection_weights)
from fsagen.reference_nsa import swa_reference
from fsagen.testing import log_errors, random_cu_seqlens

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
FIELDS = ("o", "lse", "dq", "dk", "dv")
HKV = 2
GS = (1, 2, 4, 8, 16)
DS = (64, 128)
CMP_SHAPES = ((32, 16, 64), (64, 32, 128), (32, 32, 64))  # (kernel_size, stride, block_size)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("FSAGEN_POISON", "1")


def _gen():
    return torch.Generator(device="cuda").manual_seed(time.time_ns() % 2**31)


def _layout(name, gen, block=64):
    if name == "random":
        return random_cu_seqlens(3000, 5, block_size=block, generator=gen, device="cuda")
    lengths = [1, 31, 32, 47, 64, 65, 200, 1000]  # shorter than a window, at and past boundaries
    return torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)


def _cu_cmp(cu, ks, s):
    lens = (cu[1:] - cu[:-1]).tolist()
    out = [0]
    for length in lens:
        out.append(out[-1] + num_compressed(length, ks, s))
    return torch.tensor(out, dtype=torch.int32, device=cu.device)


def _rel(a, b, floor=0.0):
    a, b = a.double(), b.double()
    return ((a - b).norm() / max(b.norm().item(), floor, 1e-30)).item()


def _compare(o, lse, grads, ro, rl, rgrads, dtype, case, tag):
    fin = torch.isfinite(rl)
    assert torch.equal(torch.isfinite(lse), fin), f"{case}: lse is finite exactly where a key is visible"
    for t in (o, lse[fin], *grads):
        assert not torch.isnan(t).any(), f"{case}: NaN left in an output (unwritten poisoned element)"
    floor = 1e-2 * rgrads[2].norm().item()
    errs = {
        "o": _rel(o, ro),
        "lse": _rel(lse[fin], rl[fin]) if fin.any() else 0.0,
        "dq": _rel(grads[0], rgrads[0], floor),
        "dk": _rel(grads[1], rgrads[1], floor),
        "dv": _rel(grads[2], rgrads[2]),
    }
    log_errors(tag, case, errs, FIELDS)
    bad = {k: v for k, v in errs.items() if not v < TOL[dtype]}
    assert not bad, f"{case}: relative errors above {TOL[dtype]}: {bad}"


def _run(fn, q, k, v, do):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o, lse = fn(q, k, v)
    grads = torch.autograd.grad(o, (q, k, v), do)
    return o.detach(), lse, grads


def _ref_grads(fn, q, k, v, do):
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ro, rl = fn(q64, k64, v64)[:2]
    return ro.detach(), rl.detach(), torch.autograd.grad(ro, (q64, k64, v64), do.double())


@pytest.mark.parametrize("layout", ["random", "edges"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("ks,s", [(32, 16), (64, 32), (32, 32)])
@pytest.mark.parametrize("D", DS)
@pytest.mark.parametrize("G", GS)
def test_cmp_attention(G, D, ks, s, dtype, layout):
    _check_cmp(G, D, ks, s, dtype, layout, "cmp-gpu")


def _check_cmp(G, D, ks, s, dtype, layout, tag):
    gen = _gen()
    cu = _layout(layout, gen)
    cuc = _cu_cmp(cu, ks, s)
    n, nc = int(cu[-1]), int(cuc[-1])
    q = torch.randn(n, HKV * G, D, device="cuda", generator=gen).to(dtype)
    k = torch.randn(nc, HKV, D, device="cuda", generator=gen).to(dtype)
    v = torch.randn(nc, HKV, D, device="cuda", generator=gen).to(dtype)
    do = torch.randn(n, HKV * G, D, device="cuda", generator=gen).to(dtype)
    o, lse, grads = _run(lambda a, b, c: fsagen.compressed_attention(a, b, c, cu, cuc, ks, s, return_lse=True),
                         q, k, v, do)
    ro, rl, rgrads = _ref_grads(lambda a, b, c: cmp_attention_reference(a, b, c, cu, cuc, ks, s), q, k, v, do)
    case = f"G={G} D={D} ks={ks} s={s} {str(dtype)[6:]} {layout} N={n} Nc={nc}"
    _compare(o, lse, grads, ro, rl, rgrads, dtype, case, tag)


@pytest.mark.parametrize("layout", ["random", "edges"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("window", [1, 100, 512])
@pytest.mark.parametrize("D", DS)
@pytest.mark.parametrize("G", GS)
def test_sliding_window_attention(G, D, window, dtype, layout):
    _check_swa(G, D, window, dtype, layout, "swa-gpu")


def _check_swa(G, D, window, dtype, layout, tag):
    gen = _gen()
    cu = _layout(layout, gen)
    n = int(cu[-1])
    q = torch.randn(n, HKV * G, D, device="cuda", generator=gen).to(dtype)
    k = torch.randn(n, HKV, D, device="cuda", generator=gen).to(dtype)
    v = torch.randn(n, HKV, D, device="cuda", generator=gen).to(dtype)
    do = torch.randn(n, HKV * G, D, device="cuda", generator=gen).to(dtype)
    o, lse, grads = _run(lambda a, b, c: fsagen.sliding_window_attention(a, b, c, cu, window, return_lse=True),
                         q, k, v, do)
    ro, rl, rgrads = _ref_grads(lambda a, b, c: swa_reference(a, b, c, cu, window), q, k, v, do)
    case = f"G={G} D={D} window={window} {str(dtype)[6:]} {layout} N={n}"
    _compare(o, lse, grads, ro, rl, rgrads, dtype, case, tag)


def _reference_block_scores(p_list, cu, ks, s, bs):
    """Per sequence ``[Hkv, L, nblk]`` float64 block scores (the reference's, before the top-k)."""
    out = []
    bounds = cu.tolist()
    for b, p in enumerate(p_list):
        length = bounds[b + 1] - bounds[b]
        lc = p.shape[-1]
        grouped = p.reshape(HKV, p.shape[0] // HKV, length, lc).sum(1)
        w = selection_weights(lc, -(-length // bs), ks, s, bs, device=p.device)
        out.append(grouped @ w)
    return out


def _clear_rows(scores, cu, bs, topk, init, local, margin):
    """``[Hkv, N]`` bool: rows whose k-th and (k+1)-th best unforced candidate scores differ by more
    than ``margin`` (relative to the row's best score), so that any float32 rounding keeps the set."""
    rows = []
    bounds = cu.tolist()
    for b, sc in enumerate(scores):
        length = bounds[b + 1] - bounds[b]
        nblk = sc.shape[-1]
        own = torch.arange(length, device=sc.device)[:, None] // bs
        j = torch.arange(nblk, device=sc.device)[None, :]
        forced = (j < init) | ((j <= own) & (j > own - local))
        cand = (j <= own) & ~forced
        key = torch.where(cand, sc, torch.full_like(sc, -1.0))
        n_forced = (forced & (j <= own)).sum(-1)
        free = (topk - n_forced).clamp(min=0)  # slots left for scored blocks
        srt = key.sort(dim=-1, descending=True).values
        # -1 padding: a row with fewer candidates than free slots reads -1 ("no competitor")
        srt = torch.cat([srt, srt.new_full((*srt.shape[:-1], topk + 1), -1.0)], -1)
        kth = srt.gather(-1, (free - 1).clamp(min=0)[None, :, None].expand(sc.shape[0], -1, 1)).squeeze(-1)
        nxt = srt.gather(-1, free[None, :, None].expand(sc.shape[0], -1, 1)).squeeze(-1)
        scale = srt[..., :1].squeeze(-1).clamp(min=1e-30)
        gap = torch.where(free[None, :] == 0, torch.ones_like(kth), (kth - nxt) / scale)
        rows.append((gap > margin) | (nxt < 0))
    return torch.cat(rows, dim=1)


@pytest.mark.parametrize("layout", ["random", "edges"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("ks,s,bs", CMP_SHAPES)
@pytest.mark.parametrize("D", DS)
@pytest.mark.parametrize("G", GS)
def test_select_blocks(G, D, ks, s, bs, dtype, layout):
    gen = _gen()
    cu = _layout(layout, gen, bs)
    cuc = _cu_cmp(cu, ks, s)
    n, nc = int(cu[-1]), int(cuc[-1])
    topk, init, local = (16, 1, 2) if bs == 64 else (8, 1, 2)
    q = (torch.randn(n, HKV * G, D, device="cuda", generator=gen) * 2).to(dtype)
    k = torch.randn(nc, HKV, D, device="cuda", generator=gen).to(dtype)
    v = torch.randn(nc, HKV, D, device="cuda", generator=gen).to(dtype)
    _, lse = fsagen.compressed_attention(q, k, v, cu, cuc, ks, s, return_lse=True)
    got = fsagen.select_blocks(q, k, lse, cu, cuc, ks, s, bs, topk, init, local)
    _, _, p = cmp_attention_reference(q, k, v, cu, cuc, ks, s)
    ref = select_blocks_reference(p, cu, HKV, ks, s, bs, topk, init, local)
    assert got.dtype == torch.int32 and got.shape == ref.shape
    # structure: ascending valid entries, then -1 padding
    valid = got >= 0
    assert not (valid[..., 1:] & ~valid[..., :-1]).any(), "-1 padding must come last"
    assert ((got[..., 1:] > got[..., :-1]) | ~valid[..., 1:]).all(), "valid entries must ascend"
    clear = _clear_rows(_reference_block_scores(p, cu, ks, s, bs), cu, bs, topk, init, local, 1e-3)
    same = (got == ref).all(-1)
    mismatched_clear = (clear & ~same).sum().item()
    rs, gs = ref.reshape(-1, topk).tolist(), got.reshape(-1, topk).tolist()
    hits = sum(len({x for x in r if x >= 0} & {x for x in g if x >= 0}) for r, g in zip(rs, gs))
    total = sum(sum(1 for x in r if x >= 0) for r in rs)
    recall = hits / max(total, 1)
    case = (f"G={G} D={D} ks={ks} s={s} bs={bs} {str(dtype)[6:]} {layout} N={n} "
            f"clear_rows={clear.float().mean().item():.3f}")
    log_errors("sel-gpu", case, {"rows_exact": same.float().mean().item(), "recall": recall,
                                 "clear_row_mismatches": float(mismatched_clear)},
               ("rows_exact", "recall", "clear_row_mismatches"))
    assert mismatched_clear == 0, f"{case}: {mismatched_clear} rows with a clear margin differ from the reference"
    assert recall > 0.99, f"{case}: recall {recall:.4f} of the reference's blocks"


# dK / dV in the other row mode (dkdv_rows "gather_async": the gathered tiles, the next one's copied
# by cp.async): the shapes a sweep may pick (bench/variants/dense_dkdv.toml), with the shipped
# rules' other knobs
DKDV_VARIANTS = {
    "swa-async-r64": ("swa", "gather_async", "rows = 64, keys = 64, bwd_threads = 128"),
    "cmp-async-r128-runs": ("cmp", "gather_async", "rows = 128, keys = 64, bwd_threads = 256, q_split = 256"),
}
DKDV_GS = (1, 4, 16)


def dkdv_edits(variant: str) -> list[tuple[str, str]]:
    """The sm90 schedule edits (old, new) of a DKDV_VARIANTS variant: a rule put first for its
    branch's backward (bench/prebuild_gpu_tests.py compiles the same plans ahead)."""
    branch, rows, knobs = DKDV_VARIANTS[variant]
    return [("[[rules]]", f'[[rules]]\nwhen = {{ branch = "{branch}", phase = "bwd" }}\n'
                          f'loop_order = "dense"\nknobs = {{ dkdv_rows = "{rows}", {knobs} }}\n\n[[rules]]')]


@pytest.mark.parametrize("layout", ["random", "edges"])
@pytest.mark.parametrize("D", DS)
@pytest.mark.parametrize("G", DKDV_GS)
@pytest.mark.parametrize("variant", sorted(DKDV_VARIANTS))
def test_dense_backward_dkdv_modes(variant, G, D, layout, edited_schedule):
    branch = DKDV_VARIANTS[variant][0]
    for old, new in dkdv_edits(variant):
        edited_schedule("sm90", old, new)
    if branch == "swa":
        _check_swa(G, D, 512, torch.bfloat16, layout, f"dkdv-{variant}")
    else:
        _check_cmp(G, D, 32, 16, torch.bfloat16, layout, f"dkdv-{variant}")
