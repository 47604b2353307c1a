"""Float64 oracles of compression, cmp attention and block selection against naive python loops."""

import math

import pytest
import torch

from fsagen.reference import slc_reference
from fsagen.reference_cmp import (
    cmp_attention_reference,
    compress_reference,
    num_compressed,
    select_blocks_reference,
    selection_weights,
)
from fsagen.validate import check_slc_inputs

# name: (cu_seqlens, Hq, Hkv, D, Dv, kernel_size, stride, block_size, topk, init_blocks, local_blocks)
# Boundaries are aligned to none of ks, s, bs; every case has a sequence shorter than ks (no
# compressed token) and an empty one somewhere, and queries t < ks - 1 that see nothing.
CASES = {
    "ks8_s4_bs16_gqa2": ([0, 5, 5, 47, 130, 151], 4, 2, 4, 3, 8, 4, 16, 4, 1, 2),
    "ks32_s16_bs64_gqa4": ([0, 20, 300, 379], 4, 1, 3, 3, 32, 16, 64, 2, 0, 1),
    "ks_eq_s_mha": ([0, 3, 41, 41, 90], 2, 2, 3, 2, 4, 4, 8, 5, 0, 1),
    "window_spans_blocks": ([0, 11, 77, 100], 2, 1, 2, 2, 12, 4, 8, 6, 2, 3),
}


def _params(kind, hkv, ks, d, dv, gen, pos_emb=True):
    def rnd(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen)

    if kind == "mean":
        return {}
    if kind == "weighted":
        return {"weight": rnd(hkv, ks)}
    params = {"proj_k": rnd(hkv, ks * d, d), "proj_v": rnd(hkv, ks * dv, dv)}
    if pos_emb and d == dv:  # pos_emb is added to v's windows too
        params["pos_emb"] = rnd(hkv, ks, d)
    return params


def _case(name, seed=0):
    cu, hq, hkv, d, dv, ks, s, bs, topk, init, local = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    n = cu[-1]
    q = torch.randn(n, hq, d, dtype=torch.float64, generator=gen)
    k = torch.randn(n, hkv, d, dtype=torch.float64, generator=gen)
    v = torch.randn(n, hkv, dv, dtype=torch.float64, generator=gen)
    cfg = dict(hkv=hkv, ks=ks, s=s, bs=bs, topk=topk, init=init, local=local)
    return q, k, v, torch.tensor(cu, dtype=torch.int32), gen, cfg


def _seqs(cu):
    b = cu.tolist()
    return list(zip(b[:-1], b[1:]))


# --------------------------------------------------------------------------- naive oracles


def _naive_pool(rows, h, kind, params, proj_name):
    """One compressed vector from the window ``rows [ks, Hkv, D]`` of kv head h."""
    x = rows[:, h]
    if kind == "mean":
        return sum(x[p] for p in range(x.shape[0])) / x.shape[0]
    if kind == "weighted":
        return sum(params["weight"][h, p] * x[p] for p in range(x.shape[0]))
    if "pos_emb" in params:
        x = x + params["pos_emb"][h]
    return x.reshape(-1) @ params[proj_name][h]


def _naive_compress(k, v, cu, ks, s, kind, params):
    k_rows, v_rows, cu_cmp = [], [], [0]
    for s0, s1 in _seqs(cu):
        i = 0
        while i * s + ks <= s1 - s0:
            a = s0 + i * s
            k_rows.append(torch.stack([_naive_pool(k[a : a + ks], h, kind, params, "proj_k") for h in range(k.shape[1])]))
            v_rows.append(torch.stack([_naive_pool(v[a : a + ks], h, kind, params, "proj_v") for h in range(v.shape[1])]))
            i += 1
        cu_cmp.append(cu_cmp[-1] + i)
    return torch.stack(k_rows), torch.stack(v_rows), cu_cmp


def _naive_cmp_attention(q, kc, vc, cu, cu_cmp, ks, s, scale):
    g = q.shape[1] // kc.shape[1]
    o = torch.zeros(q.shape[0], q.shape[1], vc.shape[2], dtype=torch.float64)
    lse = torch.full(q.shape[:2], -math.inf, dtype=torch.float64)
    probs = []
    for (s0, s1), (c0, c1) in zip(_seqs(cu), _seqs(torch.tensor(cu_cmp))):
        p = torch.zeros(q.shape[1], s1 - s0, c1 - c0, dtype=torch.float64)
        for t in range(s1 - s0):
            seen = [i for i in range(c1 - c0) if i * s + ks - 1 <= t]
            for h in range(q.shape[1]):
                if not seen:
                    continue
                sc = torch.stack([q[s0 + t, h] @ kc[c0 + i, h // g] * scale for i in seen])
                w = torch.softmax(sc, 0)
                lse[s0 + t, h] = torch.logsumexp(sc, 0)
                o[s0 + t, h] = sum(w[n] * vc[c0 + i, h // g] for n, i in enumerate(seen))
                p[h, t, seen] = w
        probs.append(p)
    return o, lse, probs


def _naive_weight(i, j, ks, s, bs):
    """Stride segments of compressed token i's window that lie inside block j, by enumeration."""
    segments = [(i * s + m * s, i * s + (m + 1) * s) for m in range(ks // s)]
    return sum(1 for a, b in segments if j * bs <= a and b <= (j + 1) * bs)


def _naive_select(probs, cu, hkv, ks, s, bs, topk, init, local):
    out = torch.full((hkv, int(cu[-1]), topk), -1, dtype=torch.int32)
    for (s0, s1), p in zip(_seqs(cu), probs):
        g = p.shape[0] // hkv
        nblk = -(-(s1 - s0) // bs)
        for kh in range(hkv):
            for t in range(s1 - s0):
                own = t // bs
                score = [
                    sum(_naive_weight(i, j, ks, s, bs) * float(p[kh * g : (kh + 1) * g, t, i].sum()) for i in range(p.shape[2]))
                    for j in range(nblk)
                ]
                forced = {j for j in range(nblk) if j < init or own - local < j <= own}
                best = sorted(range(nblk), key=lambda j: (j not in forced, -score[j], j))[:topk]
                kept = sorted(j for j in best if j <= own)
                out[kh, s0 + t, : len(kept)] = torch.tensor(kept, dtype=torch.int32)
    return out


# --------------------------------------------------------------------------- against the loops


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("kind", ["mean", "weighted", "linear"])
def test_compress_matches_naive(name, kind):
    _, k, v, cu, gen, c = _case(name)
    params = _params(kind, c["hkv"], c["ks"], k.shape[2], v.shape[2], gen)
    k_cmp, v_cmp, cu_cmp = compress_reference(k, v, cu, c["ks"], c["s"], kind, **params)
    k_ref, v_ref, cu_ref = _naive_compress(k, v, cu, c["ks"], c["s"], kind, params)
    assert cu_cmp.dtype == torch.int32 and cu_cmp.tolist() == cu_ref
    assert [num_compressed(b - a, c["ks"], c["s"]) for a, b in _seqs(cu)] == torch.diff(cu_cmp).tolist()
    torch.testing.assert_close(k_cmp, k_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v_cmp, v_ref, rtol=1e-12, atol=1e-12)


def test_compress_linear_without_pos_emb_matches_naive():
    _, k, v, cu, gen, c = _case("ks8_s4_bs16_gqa2")
    params = _params("linear", c["hkv"], c["ks"], k.shape[2], v.shape[2], gen, pos_emb=False)
    got = compress_reference(k, v, cu, c["ks"], c["s"], "linear", **params)[:2]
    ref = _naive_compress(k, v, cu, c["ks"], c["s"], "linear", params)[:2]
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def _cmp_inputs(name, seed=0):
    q, k, v, cu, gen, c = _case(name, seed)
    k_cmp, v_cmp, cu_cmp = compress_reference(k, v, cu, c["ks"], c["s"], "mean")
    # Random compressed keys rather than means: means of unit normals give nearly uniform p.
    k_cmp = torch.randn(k_cmp.shape, dtype=torch.float64, generator=gen) * 2
    return q, k_cmp, v_cmp, cu, cu_cmp, c


@pytest.mark.parametrize("name", sorted(CASES))
def test_cmp_attention_matches_naive(name):
    q, kc, vc, cu, cu_cmp, c = _cmp_inputs(name)
    o, lse, p = cmp_attention_reference(q, kc, vc, cu, cu_cmp, c["ks"], c["s"], scale=0.7)
    o_ref, lse_ref, p_ref = _naive_cmp_attention(q, kc, vc, cu, cu_cmp.tolist(), c["ks"], c["s"], 0.7)
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, lse_ref, rtol=1e-12, atol=1e-12)
    assert len(p) == len(p_ref)
    for a, b in zip(p, p_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # Queries before the first full window see nothing.
    blind = torch.cat([torch.arange(a, min(b, a + c["ks"] - 1)) for a, b in _seqs(cu)])
    assert torch.isneginf(lse[blind]).all() and (o[blind] == 0).all()
    assert torch.isfinite(lse[~torch.isin(torch.arange(q.shape[0]), blind)]).all()


def test_cmp_attention_default_scale():
    q, kc, vc, cu, cu_cmp, c = _cmp_inputs("ks8_s4_bs16_gqa2")
    got = cmp_attention_reference(q, kc, vc, cu, cu_cmp, c["ks"], c["s"])[0]
    want = cmp_attention_reference(q, kc, vc, cu, cu_cmp, c["ks"], c["s"], scale=1 / math.sqrt(q.shape[2]))[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_select_blocks_matches_naive(name):
    q, kc, vc, cu, cu_cmp, c = _cmp_inputs(name)
    p = cmp_attention_reference(q, kc, vc, cu, cu_cmp, c["ks"], c["s"])[2]
    args = (c["hkv"], c["ks"], c["s"], c["bs"], c["topk"], c["init"], c["local"])
    got = select_blocks_reference(p, cu, *args)
    assert got.dtype == torch.int32 and got.shape == (c["hkv"], q.shape[0], c["topk"])
    assert torch.equal(got, _naive_select(p, cu, *args))


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("kind,pos_emb", [("mean", False), ("weighted", False), ("linear", False), ("linear", True)])
def test_compress_gradcheck(kind, pos_emb):
    gen = torch.Generator().manual_seed(1)
    cu = torch.tensor([0, 3, 10, 17], dtype=torch.int32)  # 3 < ks: a sequence without tokens
    ks, s, hkv, d = 4, 2, 2, 2
    dv = d if pos_emb else 3
    k = torch.randn(17, hkv, d, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(17, hkv, dv, dtype=torch.float64, generator=gen, requires_grad=True)
    params = {n: t.requires_grad_() for n, t in _params(kind, hkv, ks, d, dv, gen, pos_emb).items()}
    names = list(params)

    def f(k, v, *values):
        return compress_reference(k, v, cu, ks, s, kind, **dict(zip(names, values)))[:2]

    assert torch.autograd.gradcheck(f, (k, v, *params.values()))


def test_cmp_attention_gradcheck_with_blind_queries():
    """Gradients are finite and correct also where a query sees no compressed token."""
    gen = torch.Generator().manual_seed(2)
    cu = torch.tensor([0, 9, 12], dtype=torch.int32)
    ks, s = 4, 2
    q = torch.randn(12, 2, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    kc = torch.randn(3, 1, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    vc = torch.randn(3, 1, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    cu_cmp = torch.tensor([0, 3, 3], dtype=torch.int32)

    def f(q, kc, vc):
        o, lse, _ = cmp_attention_reference(q, kc, vc, cu, cu_cmp, ks, s)
        return o, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    assert torch.autograd.gradcheck(f, (q, kc, vc))


# --------------------------------------------------------------------------- selection rules


def test_selection_weight_example_ks32_s16_bs64():
    w = selection_weights(num_cmp=16, num_blocks=5, kernel_size=32, stride=16, block_size=64)
    for j in (1, 2, 3):
        col = w[:, j]
        assert col[4 * j - 1 : 4 * j + 4].tolist() == [1, 2, 2, 2, 1]
        assert col.sum() == 8 and (col[: 4 * j - 1] == 0).all() and (col[4 * j + 4 :] == 0).all()
    ks, s, bs = 32, 16, 64
    naive = [[_naive_weight(i, j, ks, s, bs) for j in range(5)] for i in range(16)]
    assert w.tolist() == naive


def _one_seq_probs(length, lc, hq, fill):
    return [torch.full((hq, length, lc), fill, dtype=torch.float64)]


def test_ties_pick_the_lower_block():
    # All scores equal (zero): after the forced own block, the lowest blocks win.
    cu = torch.tensor([0, 100], dtype=torch.int32)
    p = _one_seq_probs(100, num_compressed(100, 8, 4), 2, 0.0)
    idx = select_blocks_reference(p, cu, 1, 8, 4, 16, 3, 0, 1)
    assert idx[0, 99].tolist() == [0, 1, 6]
    assert idx[0, 40].tolist() == [0, 1, 2]
    assert idx[0, 20].tolist() == [0, 1, -1]
    # Equal positive scores in blocks 2 and 4, both beating block 0 and 1: the lower (2) wins.
    p = torch.zeros(1, 100, num_compressed(100, 8, 4), dtype=torch.float64)
    w = selection_weights(p.shape[2], 7, 8, 4, 16)
    p[0, 99, 8] = p[0, 99, 16] = 0.5  # token 8 lies in block 2 only, token 16 in block 4 only
    assert w[8].tolist() == [0, 0, 2, 0, 0, 0, 0] and w[16].tolist() == [0, 0, 0, 0, 2, 0, 0]
    assert select_blocks_reference([p], cu, 1, 8, 4, 16, 2, 0, 1)[0, 99].tolist() == [2, 6]


def test_forced_blocks_are_always_present():
    q, kc, vc, cu, cu_cmp, c = _cmp_inputs("ks8_s4_bs16_gqa2", seed=3)
    c.update(topk=4, init=2, local=2)
    p = cmp_attention_reference(q, kc, vc, cu, cu_cmp, c["ks"], c["s"])[2]
    idx = select_blocks_reference(p, cu, c["hkv"], c["ks"], c["s"], c["bs"], c["topk"], c["init"], c["local"])
    for s0, s1 in _seqs(cu):
        for t in range(s1 - s0):
            own = t // c["bs"]
            must = {j for j in range(c["init"])} | {own - m for m in range(c["local"])}
            must = {j for j in must if 0 <= j <= own}
            for kh in range(c["hkv"]):
                row = idx[kh, s0 + t].tolist()
                assert must <= set(row), (kh, s0 + t, row)
                valid = [j for j in row if j >= 0]
                assert valid == sorted(set(valid)) and row[len(valid) :] == [-1] * (len(row) - len(valid))
                assert all(j <= own for j in valid)


@pytest.mark.parametrize("name", sorted(CASES))
def test_selection_feeds_slc(name):
    q, kc, vc, cu, cu_cmp, c = _cmp_inputs(name)
    p = cmp_attention_reference(q, kc, vc, cu, cu_cmp, c["ks"], c["s"])[2]
    idx = select_blocks_reference(p, cu, c["hkv"], c["ks"], c["s"], c["bs"], c["topk"], c["init"], c["local"])
    n, hq, d = q.shape
    gen = torch.Generator().manual_seed(4)
    k = torch.randn(n, c["hkv"], d, dtype=torch.float64, generator=gen)
    v = torch.randn(n, c["hkv"], d, dtype=torch.float64, generator=gen)
    bf = [t.to(torch.bfloat16) for t in (q, k, v)]
    check_slc_inputs(*bf, idx, cu, c["bs"], None, arch=None)
    o, lse = slc_reference(q, k, v, idx, cu, c["bs"])
    assert o.shape == (n, hq, d) and torch.isfinite(o).all()
    assert torch.isfinite(lse).all()  # local_blocks >= 1: every query sees its own block


# --------------------------------------------------------------------------- bad inputs


def _good():
    gen = torch.Generator().manual_seed(5)
    cu = torch.tensor([0, 10, 30], dtype=torch.int32)
    k = torch.randn(30, 2, 4, dtype=torch.float64, generator=gen)
    v = torch.randn(30, 2, 4, dtype=torch.float64, generator=gen)
    q = torch.randn(30, 4, 4, dtype=torch.float64, generator=gen)
    kc, vc, cu_cmp = compress_reference(k, v, cu, 4, 2, "mean")
    p = cmp_attention_reference(q, kc, vc, cu, cu_cmp, 4, 2)[2]
    return dict(k=k, v=v, q=q, cu=cu, kc=kc, vc=vc, cu_cmp=cu_cmp, p=p)


def _compress(g, ks=4, s=2, kind="mean", **params):
    return compress_reference(g["k"], g["v"], g["cu"], ks, s, kind, **params)


def _attend(g, **over):
    a = dict(q=g["q"], kc=g["kc"], vc=g["vc"], cu=g["cu"], cu_cmp=g["cu_cmp"], ks=4, s=2, scale=None)
    a.update(over)
    return cmp_attention_reference(a["q"], a["kc"], a["vc"], a["cu"], a["cu_cmp"], a["ks"], a["s"], a["scale"])


def _select(g, **over):
    a = dict(p=g["p"], cu=g["cu"], hkv=2, ks=4, s=2, bs=8, topk=3, init=1, local=2)
    a.update(over)
    return select_blocks_reference(a["p"], a["cu"], a["hkv"], a["ks"], a["s"], a["bs"], a["topk"], a["init"], a["local"])


def _t(*shape):
    return torch.zeros(*shape, dtype=torch.float64)


BAD = {
    "ks_not_multiple_of_stride": (lambda g: _compress(g, ks=5, s=2), "kernel_size"),
    "stride_zero": (lambda g: _compress(g, s=0), "stride"),
    "unknown_kind": (lambda g: _compress(g, kind="max"), "kind"),
    "weighted_missing_weight": (lambda g: _compress(g, kind="weighted"), "weight"),
    "weighted_bad_weight": (lambda g: _compress(g, kind="weighted", weight=_t(2, 3)), "weight"),
    "linear_missing_proj_v": (lambda g: _compress(g, kind="linear", proj_k=_t(2, 16, 4)), "proj_v"),
    "linear_bad_proj_k": (lambda g: _compress(g, kind="linear", proj_k=_t(2, 16, 3), proj_v=_t(2, 16, 4)), "proj_k"),
    "linear_bad_pos_emb": (
        lambda g: _compress(g, kind="linear", proj_k=_t(2, 16, 4), proj_v=_t(2, 16, 4), pos_emb=_t(2, 4)),
        "pos_emb",
    ),
    "pos_emb_with_dv_differing": (
        lambda g: compress_reference(
            g["k"], g["v"][..., :3], g["cu"], 4, 2, "linear", proj_k=_t(2, 16, 4), proj_v=_t(2, 12, 3), pos_emb=_t(2, 4, 4)
        ),
        "pos_emb",
    ),
    "mean_given_weight": (lambda g: _compress(g, weight=_t(2, 4)), "weight"),
    "k_not_3d": (lambda g: compress_reference(g["k"][0], g["v"], g["cu"], 4, 2, "mean"), "k"),
    "v_heads_differ": (lambda g: compress_reference(g["k"], g["v"][:, :1], g["cu"], 4, 2, "mean"), "v"),
    "cu_wrong_end": (lambda g: compress_reference(g["k"], g["v"], g["cu"][:2], 4, 2, "mean"), "cu_seqlens"),
    "cu_decreasing": (
        lambda g: compress_reference(g["k"], g["v"], torch.tensor([0, 20, 10, 30]), 4, 2, "mean"),
        "cu_seqlens",
    ),
    "attn_q_heads": (lambda g: _attend(g, q=g["q"][:, :3]), "k_cmp"),
    "attn_head_dim": (lambda g: _attend(g, q=g["q"][..., :3]), "k_cmp"),
    "attn_v_cmp": (lambda g: _attend(g, vc=g["vc"][:-1]), "v_cmp"),
    "attn_cu_cmp_mismatch": (lambda g: _attend(g, s=4, ks=4), "cu_seqlens_cmp"),
    "attn_ks_stride": (lambda g: _attend(g, ks=3), "kernel_size"),
    "attn_q_not_3d": (lambda g: _attend(g, q=g["q"][0]), "q"),
    "sel_bs_not_multiple_of_stride": (lambda g: _select(g, bs=7), "block_size"),
    "sel_topk_too_small": (lambda g: _select(g, topk=2), "topk"),
    "sel_negative_init": (lambda g: _select(g, init=-1), "init_blocks"),
    "sel_heads_not_dividing": (lambda g: _select(g, hkv=3), "p_list[0]"),
    "sel_p_wrong_length": (lambda g: _select(g, p=g["p"][:1]), "p_list"),
    "sel_p_wrong_shape": (lambda g: _select(g, p=[g["p"][0][:, :-1], g["p"][1]]), "p_list[0]"),
    "sel_p_not_3d": (lambda g: _select(g, p=[g["p"][0][0], g["p"][1]]), "p_list[0]"),
    "sel_p_wrong_ks": (lambda g: _select(g, ks=6), "p_list[0]"),
    "sel_cu_not_1d": (lambda g: _select(g, cu=g["cu"][None]), "cu_seqlens"),
    "sel_hkv_zero": (lambda g: _select(g, hkv=0), "num_kv_heads"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_error_names_the_argument(name):
    call, arg = BAD[name]
    with pytest.raises(ValueError) as err:
        call(_good())
    assert str(err.value).startswith(f"{arg}: "), str(err.value)
