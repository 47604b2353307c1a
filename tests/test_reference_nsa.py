"""Float64 oracles of swa, the gates and the whole NSA mix against naive python loops."""

import math

import pytest
import torch

from fsagen.reference import slc_reference_naive
from fsagen.reference_nsa import (
    gate_combine_reference,
    gates_reference,
    nsa_attention_reference,
    swa_reference,
)

# tests/ is on sys.path (rootdir-less): reuse the per-query loops of the cmp/selection tests.
from test_reference_cmp import _naive_cmp_attention, _naive_compress, _naive_select, _seqs


def _rnd(gen, *shape, requires_grad=False):
    return torch.randn(*shape, dtype=torch.float64, generator=gen).requires_grad_(requires_grad)


def _qkv(cu, hq, hkv, d, dv, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    n = cu[-1]
    q, k, v = (_rnd(gen, n, h, e, requires_grad=requires_grad) for h, e in ((hq, d), (hkv, d), (hkv, dv)))
    return q, k, v, torch.tensor(cu, dtype=torch.int32), gen


# --------------------------------------------------------------------------- naive oracles


def _naive_swa(q, k, v, cu, window, scale):
    """Per-query, per-head loop over the keys ``[t - window + 1, t]`` of the query's sequence."""
    g = q.shape[1] // k.shape[1]
    o = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=torch.float64)
    lse = torch.zeros(q.shape[:2], dtype=torch.float64)
    for s0, s1 in _seqs(cu):
        for t in range(s1 - s0):
            keys = [s0 + j for j in range(max(0, t - window + 1), t + 1)]
            assert len(keys) == min(window, t + 1)
            for h in range(q.shape[1]):
                sc = torch.stack([q[s0 + t, h] @ k[j, h // g] * scale for j in keys])
                w = torch.softmax(sc, 0)
                o[s0 + t, h] = sum(w[m] * v[j, h // g] for m, j in enumerate(keys))
                lse[s0 + t, h] = torch.logsumexp(sc, 0)
    return o, lse


def _dense_causal(q, k, v, cu, scale):
    """Full causal softmax attention per sequence, dense ``[Hq, L, L]`` scores."""
    g = q.shape[1] // k.shape[1]
    outs = []
    for s0, s1 in _seqs(cu):
        kk = k[s0:s1].repeat_interleave(g, dim=1)
        vv = v[s0:s1].repeat_interleave(g, dim=1)
        s = torch.einsum("thd,jhd->htj", q[s0:s1], kk) * scale
        causal = torch.ones(s1 - s0, s1 - s0, dtype=torch.bool).tril()
        p = torch.softmax(s.masked_fill(~causal, -math.inf), dim=-1)
        outs.append(torch.einsum("htj,jhd->thd", p, vv))
    return torch.cat(outs)


def _naive_gate_combine(o_cmp, o_slc, o_swa, gates):
    out = torch.zeros_like(o_cmp)
    for t in range(o_cmp.shape[0]):
        for h in range(o_cmp.shape[1]):
            g = gates[t, h] if gates.dim() == 3 else gates[t]
            out[t, h] = g[0] * o_cmp[t, h] + g[1] * o_slc[t, h] + g[2] * o_swa[t, h]
    return out


# --------------------------------------------------------------------------- swa


# name: (cu_seqlens, Hq, Hkv, D, Dv, window_size).  Each has an empty sequence and one shorter
# than the window (except window 1, where no sequence can be).
SWA_CASES = {
    "w1_gqa2": ([0, 1, 1, 9, 30], 4, 2, 4, 3, 1),
    "w3_gqa2": ([0, 2, 2, 17, 40], 4, 2, 4, 3, 3),
    "w7_mha": ([0, 5, 31, 31], 2, 2, 3, 5, 7),
    "w64_all_shorter": ([0, 20, 20, 63], 3, 1, 2, 2, 64),
}


@pytest.mark.parametrize("name", sorted(SWA_CASES))
def test_swa_matches_naive(name):
    cu, hq, hkv, d, dv, window = SWA_CASES[name]
    q, k, v, cu_t, _ = _qkv(cu, hq, hkv, d, dv)
    o, lse = swa_reference(q, k, v, cu_t, window, scale=0.8)
    o_ref, lse_ref = _naive_swa(q, k, v, cu_t, window, 0.8)
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, lse_ref, rtol=1e-12, atol=1e-12)


def test_swa_window_1_is_own_value():
    q, k, v, cu, _ = _qkv([0, 7, 19], 4, 2, 3, 2)
    o, lse = swa_reference(q, k, v, cu, 1)
    torch.testing.assert_close(o, v.repeat_interleave(2, dim=1), rtol=0, atol=1e-15)
    torch.testing.assert_close(lse, (q * k.repeat_interleave(2, dim=1)).sum(-1) / math.sqrt(3), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("window", [37, 38, 500])
def test_swa_window_covering_the_sequence_is_causal_attention(window):
    q, k, v, cu, _ = _qkv([0, 37, 37, 50], 4, 2, 5, 3)  # longest sequence: 37
    o = swa_reference(q, k, v, cu, window)[0]
    torch.testing.assert_close(o, _dense_causal(q, k, v, cu, 1 / math.sqrt(5)), rtol=1e-12, atol=1e-12)


def test_swa_window_shorter_than_sequence_is_not_causal_attention():
    q, k, v, cu, _ = _qkv([0, 37], 2, 1, 5, 3)
    o = swa_reference(q, k, v, cu, 36)[0]
    full = _dense_causal(q, k, v, cu, 1 / math.sqrt(5))
    torch.testing.assert_close(o[:36], full[:36], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(o[36], full[36])  # the last query lost key 0


def test_swa_chunks_match_one_chunk(monkeypatch):
    """The query chunking (first key of a chunk = c0 - window + 1) changes nothing."""
    import fsagen.reference_nsa as mod

    q, k, v, cu, _ = _qkv([0, 50, 61], 2, 1, 3, 3)
    whole = swa_reference(q, k, v, cu, 9)
    monkeypatch.setattr(mod, "_SWA_CHUNK", 4)
    torch.testing.assert_close(swa_reference(q, k, v, cu, 9), whole, rtol=1e-13, atol=1e-13)


def test_swa_gradcheck():
    q, k, v, cu, _ = _qkv([0, 3, 9], 2, 1, 2, 2, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *x: swa_reference(*x, cu, 4), (q, k, v))


# --------------------------------------------------------------------------- gates


def test_gate_combine_per_head_matches_naive():
    gen = torch.Generator().manual_seed(1)
    outs = [_rnd(gen, 6, 4, 3) for _ in range(3)]
    gates = torch.rand(6, 4, 3, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(gate_combine_reference(*outs, gates), _naive_gate_combine(*outs, gates))


def test_gate_combine_per_token_broadcasts_over_heads():
    gen = torch.Generator().manual_seed(2)
    outs = [_rnd(gen, 6, 4, 3) for _ in range(3)]
    gates = torch.rand(6, 3, dtype=torch.float64, generator=gen)
    got = gate_combine_reference(*outs, gates)
    torch.testing.assert_close(got, _naive_gate_combine(*outs, gates))
    torch.testing.assert_close(got, gate_combine_reference(*outs, gates[:, None].expand(6, 4, 3)), rtol=0, atol=0)


@pytest.mark.parametrize("bias", [False, True])
def test_gates_per_head_layout(bias):
    gen = torch.Generator().manual_seed(3)
    x, w = _rnd(gen, 5, 7), _rnd(gen, 4 * 3, 7)
    b = _rnd(gen, 12) if bias else None
    g = gates_reference(x, w, b)
    assert g.shape == (5, 4, 3) and g.dtype == torch.float64
    for h in range(4):
        for br in range(3):
            logit = x @ w[h * 3 + br] + (b[h * 3 + br] if bias else 0)
            torch.testing.assert_close(g[:, h, br], 1 / (1 + torch.exp(-logit)))


def test_gates_per_token():
    gen = torch.Generator().manual_seed(4)
    x, w, b = _rnd(gen, 5, 7), _rnd(gen, 3, 7), _rnd(gen, 3)
    g = gates_reference(x, w, b, per_head=False)
    assert g.shape == (5, 3)
    torch.testing.assert_close(g, torch.sigmoid(x @ w.T + b))


# --------------------------------------------------------------------------- the whole mix

NSA_CFG = dict(kernel_size=8, stride=4, block_size=16, topk=3, init_blocks=1, local_blocks=1, window_size=20)


def _naive_nsa(q, k, v, gates, cu, weight, scale):
    """The mix composed from per-query loops only (weighted compression)."""
    c = NSA_CFG
    ks, s, bs = c["kernel_size"], c["stride"], c["block_size"]
    kc, vc, cu_cmp = _naive_compress(k, v, cu, ks, s, "weighted", {"weight": weight})
    o_cmp, _, probs = _naive_cmp_attention(q, kc, vc, cu, cu_cmp, ks, s, scale)
    topk_idx = _naive_select(probs, cu, k.shape[1], ks, s, bs, c["topk"], c["init_blocks"], c["local_blocks"])
    o_slc = slc_reference_naive(q, k, v, topk_idx, cu, bs, scale)[0]
    o_swa = _naive_swa(q, k, v, cu, c["window_size"], scale)[0]
    return _naive_gate_combine(o_cmp, o_slc, o_swa, gates), topk_idx


def _leaves_out_a_block(topk_idx, cu, block_size):
    """True when some query selects fewer blocks than it could see: the top-k made a real choice."""
    pos = torch.cat([torch.arange(b - a) for a, b in _seqs(cu)])
    return bool(((topk_idx >= 0).sum(-1) < pos // block_size + 1).any())


@pytest.mark.parametrize("per_head", [True, False])
def test_nsa_matches_naive_composition(per_head):
    q, k, v, cu, gen = _qkv([0, 83, 200], 4, 2, 8, 4)
    weight = _rnd(gen, 2, 8) * 2  # spread compressed keys: mean pools give near-uniform p and near ties
    gates = torch.rand((200, 4, 3) if per_head else (200, 3), dtype=torch.float64, generator=gen)
    o, parts = nsa_attention_reference(
        q, k, v, gates, cu, **NSA_CFG, compression="weighted", compression_params={"weight": weight},
        scale=1.0, return_parts=True,
    )
    o_ref, idx_ref = _naive_nsa(q, k, v, gates, cu, weight, 1.0)
    assert parts["topk_idx"].dtype == torch.int32 and torch.equal(parts["topk_idx"], idx_ref)
    assert _leaves_out_a_block(idx_ref, cu, NSA_CFG["block_size"])
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    mixed = gate_combine_reference(parts["o_cmp"], parts["o_slc"], parts["o_swa"], gates)
    torch.testing.assert_close(o, mixed, rtol=0, atol=0)


def test_nsa_default_return_is_o_only():
    q, k, v, cu, gen = _qkv([0, 40], 2, 1, 4, 4)
    gates = torch.rand(40, 3, dtype=torch.float64, generator=gen)
    o = nsa_attention_reference(q, k, v, gates, cu, **NSA_CFG)
    assert isinstance(o, torch.Tensor) and o.shape == (40, 2, 4)


GRAD_CFG = dict(kernel_size=4, stride=2, block_size=4, topk=3, init_blocks=1, local_blocks=1, window_size=3)


def test_nsa_gradcheck():
    """Gradients into q, k, v, gates and the compression weight.  The selection is an integer
    output with no gradient; gradcheck's perturbations are far too small to flip it here (these
    random inputs have no near-tied block scores), so every evaluation sees the same blocks."""
    q, k, v, cu, gen = _qkv([0, 13, 22], 2, 1, 2, 2, seed=5, requires_grad=True)
    gates = torch.rand(22, 2, 3, dtype=torch.float64, generator=gen).requires_grad_()
    weight = _rnd(gen, 1, 4, requires_grad=True)

    def f(q, k, v, gates, weight, return_parts=False):
        params = {"weight": weight}
        return nsa_attention_reference(
            q, k, v, gates, cu, **GRAD_CFG, compression="weighted", compression_params=params, return_parts=return_parts
        )

    idx = f(q, k, v, gates, weight, return_parts=True)[1]["topk_idx"]
    assert _leaves_out_a_block(idx, cu, GRAD_CFG["block_size"])
    assert torch.autograd.gradcheck(f, (q, k, v, gates, weight))


def test_nsa_linear_compression_gets_gradients():
    q, k, v, cu, gen = _qkv([0, 16], 2, 1, 2, 2, seed=6)
    params = {"proj_k": _rnd(gen, 1, 8, 2, requires_grad=True), "proj_v": _rnd(gen, 1, 8, 2, requires_grad=True),
              "pos_emb": _rnd(gen, 1, 4, 2, requires_grad=True)}
    gates = torch.rand(16, 3, dtype=torch.float64, generator=gen)
    o = nsa_attention_reference(q, k, v, gates, cu, **GRAD_CFG, compression="linear", compression_params=params)
    grads = torch.autograd.grad(o.sum(), list(params.values()))
    assert all(g.abs().sum() > 0 for g in grads)


# --------------------------------------------------------------------------- bad inputs


def _good():
    q, k, v, cu, gen = _qkv([0, 10, 24], 4, 2, 4, 3)
    return dict(q=q, k=k, v=v, cu=cu, gates=torch.rand(24, 4, 3, dtype=torch.float64, generator=gen))


def _swa(g, **over):
    a = {**g, "window_size": 4, **over}
    return swa_reference(a["q"], a["k"], a["v"], a["cu"], a["window_size"], a.get("scale"))


def _nsa(g, **over):
    a = {**g, **GRAD_CFG, **over}
    kw = {n: a[n] for n in GRAD_CFG}
    extra = {n: a[n] for n in ("compression", "compression_params", "scale") if n in a}
    return nsa_attention_reference(a["q"], a["k"], a["v"], a["gates"], a["cu"], **kw, **extra)


def _t(*shape):
    return torch.zeros(*shape, dtype=torch.float64)


BAD = {
    "swa_window_0": ("window_size", lambda g: _swa(g, window_size=0)),
    "swa_window_float": ("window_size", lambda g: _swa(g, window_size=2.0)),
    "swa_q_2d": ("q", lambda g: _swa(g, q=_t(24, 16))),
    "swa_k_wrong_n": ("k", lambda g: _swa(g, k=_t(23, 2, 4))),
    "swa_k_wrong_d": ("k", lambda g: _swa(g, k=_t(24, 2, 5))),
    "swa_k_heads_not_dividing": ("k", lambda g: _swa(g, k=_t(24, 3, 4), v=_t(24, 3, 3))),
    "swa_v_wrong_heads": ("v", lambda g: _swa(g, v=_t(24, 1, 3))),
    "swa_cu_wrong_end": ("cu_seqlens", lambda g: _swa(g, cu=torch.tensor([0, 10, 23]))),
    "swa_scale_str": ("scale", lambda g: _swa(g, scale="0.5")),
    "combine_o_cmp_2d": ("o_cmp", lambda g: gate_combine_reference(_t(24, 4), _t(24, 4), _t(24, 4), g["gates"])),
    "combine_o_slc_shape": ("o_slc", lambda g: gate_combine_reference(_t(24, 4, 3), _t(24, 4, 2), _t(24, 4, 3), g["gates"])),
    "combine_o_swa_shape": ("o_swa", lambda g: gate_combine_reference(_t(24, 4, 3), _t(24, 4, 3), _t(24, 2, 3), g["gates"])),
    "combine_gates_heads": ("gates", lambda g: gate_combine_reference(_t(24, 4, 3), _t(24, 4, 3), _t(24, 4, 3), _t(24, 2, 3))),
    "combine_gates_branches": ("gates", lambda g: gate_combine_reference(_t(24, 4, 3), _t(24, 4, 3), _t(24, 4, 3), _t(24, 2))),
    "gates_x_3d": ("x", lambda g: gates_reference(_t(2, 3, 5), _t(6, 5))),
    "gates_weight_cols": ("weight", lambda g: gates_reference(_t(2, 5), _t(6, 4))),
    "gates_weight_rows_per_head": ("weight", lambda g: gates_reference(_t(2, 5), _t(7, 5))),
    "gates_weight_rows_per_token": ("weight", lambda g: gates_reference(_t(2, 5), _t(6, 5), per_head=False)),
    "gates_bias_len": ("bias", lambda g: gates_reference(_t(2, 5), _t(6, 5), _t(5))),
    "nsa_gates_shape": ("gates", lambda g: _nsa(g, gates=_t(24, 4, 2))),
    "nsa_window_0": ("window_size", lambda g: _nsa(g, window_size=0)),
    "nsa_v_shape": ("v", lambda g: _nsa(g, v=_t(20, 2, 3))),
    "nsa_compression_kind": ("compression", lambda g: _nsa(g, compression="max")),
    "nsa_compression_params_key": ("compression_params", lambda g: _nsa(g, compression_params={"w": _t(2, 4)})),
    "nsa_compression_params_type": ("compression_params", lambda g: _nsa(g, compression_params=[1])),
    "nsa_weight_missing": ("weight", lambda g: _nsa(g, compression="weighted")),
    "nsa_topk_too_small": ("topk", lambda g: _nsa(g, topk=1)),
    "nsa_block_size": ("block_size", lambda g: _nsa(g, block_size=5)),
    "nsa_stride": ("kernel_size", lambda g: _nsa(g, stride=3)),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_error_names_the_argument(name):
    arg, call = BAD[name]
    with pytest.raises(ValueError, match=rf"^{arg}: "):
        call(_good())
