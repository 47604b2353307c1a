"""fsagen.compress against the float64 oracle compress_reference: outputs, gradients, bad inputs (CPU)."""

import pytest
import torch

from fsagen.compression import compress
from fsagen.reference_cmp import compress_reference
from fsagen.testing import rel_err

KERNELS = [(32, 16), (64, 32), (32, 32), (4, 2)]
# kind, with pos_emb; D != Dv wherever the kind allows it (pos_emb is added to v's windows too).
KINDS = [("mean", False), ("weighted", False), ("linear", False), ("linear", True)]
KIND_IDS = ["mean", "weighted", "linear", "linear_pos"]
TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2}  # fp32: measured <= 5e-7
PARAM_NAMES = ("weight", "proj_k", "proj_v", "pos_emb")


def _lengths(ks, s):
    """Empty entries (first, middle, last), shorter than ks, exactly ks, not aligned to s, one token."""
    return [0, ks - 1, ks, 0, ks + s + 3, 3 * ks + s // 2 + 1, 1, ks + 1, 0]


def _cu(lengths):
    return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)


def _params(kind, pos, hkv, ks, d, dv, dtype, gen):
    """The parameters ``kind`` takes (pos_emb only if ``pos``), on ``gen``'s device, scaled so that
    every output has about unit size."""
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=gen.device) * scale).to(dtype)

    if kind == "weighted":
        return {"weight": rnd(hkv, ks, scale=ks**-0.5)}
    if kind == "linear":
        p = {"proj_k": rnd(hkv, ks * d, d, scale=(ks * d) ** -0.5),
             "proj_v": rnd(hkv, ks * dv, dv, scale=(ks * dv) ** -0.5)}
        if pos:
            p["pos_emb"] = rnd(hkv, ks, d)
        return p
    return {}


def _inputs(ks, s, hkv, d, dv, dtype, kind, pos, seed=0, lengths=None):
    gen = torch.Generator().manual_seed(seed)
    cu = _cu(_lengths(ks, s) if lengths is None else lengths)
    n = int(cu[-1])
    k = torch.randn(n, hkv, d, generator=gen).to(dtype)
    v = torch.randn(n, hkv, dv, generator=gen).to(dtype)
    return k, v, cu, _params(kind, pos, hkv, ks, d, dv, dtype, gen), gen


def compare_with_grads(k, v, cu, ks, s, kind, params, gen, tol):
    """Forward and gradients of k, v and every parameter against the float64 reference.

    Returns the relative errors ``||out - ref|| / ||ref||`` (keys k_cmp, v_cmp, dk, dv,
    d<parameter>) with the outputs, after asserting each is below ``tol`` (unless None)."""
    leaves = {"k": k.detach().requires_grad_(), "v": v.detach().requires_grad_()}
    leaves.update({name: t.detach().requires_grad_() for name, t in params.items()})
    k_cmp, v_cmp, cu_cmp = compress(leaves["k"], leaves["v"], cu, ks, s, kind,
                                    **{n: leaves[n] for n in params})
    ref64 = {name: t.detach().double().requires_grad_() for name, t in leaves.items()}
    rk, rv, rcu = compress_reference(ref64["k"], ref64["v"], cu, ks, s, kind, **{n: ref64[n] for n in params})

    assert torch.equal(cu_cmp, rcu) and cu_cmp.dtype == torch.int32 and cu_cmp.device == k.device
    for out, ref in ((k_cmp, rk), (v_cmp, rv)):
        assert out.shape == ref.shape and out.dtype == k.dtype and out.is_contiguous()
    errs = {"k_cmp": rel_err(k_cmp, rk), "v_cmp": rel_err(v_cmp, rv)}

    dk_out = torch.randn(k_cmp.shape, generator=gen, device=gen.device).to(k.dtype)
    dv_out = torch.randn(v_cmp.shape, generator=gen, device=gen.device).to(k.dtype)
    names = list(leaves)
    grads = torch.autograd.grad((k_cmp, v_cmp), [leaves[n] for n in names], (dk_out, dv_out), allow_unused=True)
    if rk.requires_grad:
        ref_grads = torch.autograd.grad((rk, rv), [ref64[n] for n in names], (dk_out.double(), dv_out.double()),
                                        allow_unused=True)
    else:  # the reference builds an empty result from zeros when there is no compressed token
        ref_grads = [None] * len(names)
    for name, g, rg in zip(names, grads, ref_grads):
        rg = torch.zeros_like(ref64[name]) if rg is None else rg  # no compressed token at all
        assert g is not None, f"no gradient reaches {name}"
        assert g.dtype == leaves[name].dtype and g.shape == leaves[name].shape, name
        errs["d" + name] = rel_err(g, rg)
    if tol is not None:
        bad = {name: e for name, e in errs.items() if not e < tol}
        assert not bad, f"relative errors over {tol}: {bad}"
    return errs, k_cmp, v_cmp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("hkv", [1, 4])
@pytest.mark.parametrize("ks,s", KERNELS)
@pytest.mark.parametrize("kind,pos", KINDS, ids=KIND_IDS)
def test_matches_reference(kind, pos, ks, s, hkv, dtype):
    d, dv = (8, 8) if pos else (8, 6)
    k, v, cu, params, gen = _inputs(ks, s, hkv, d, dv, dtype, kind, pos)
    compare_with_grads(k, v, cu, ks, s, kind, params, gen, TOL[dtype])


@pytest.mark.parametrize("kind,pos", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("lengths", [[3, 0, 2], [0], [0, 0]], ids=["all_short", "n0", "n0_two_entries"])
def test_no_compressed_token(kind, pos, lengths):
    """Nc = 0 (every sequence shorter than ks, or no token at all): empty outputs, zero gradients."""
    k, v, cu, params, gen = _inputs(4, 2, 2, 4, 4, torch.float32, kind, pos, lengths=lengths)
    _, k_cmp, v_cmp = compare_with_grads(k, v, cu, 4, 2, kind, params, gen, TOL[torch.float32])
    assert k_cmp.shape == (0, 2, 4) and v_cmp.shape == (0, 2, 4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind,pos", KINDS, ids=KIND_IDS)
def test_float32_params_with_half_inputs(kind, pos, dtype):
    """Parameters kept in float32 (master weights) are cast for the products; their gradients
    come back in float32."""
    d, dv = (8, 8) if pos else (8, 6)
    k, v, cu, params, gen = _inputs(32, 16, 2, d, dv, dtype, kind, pos, seed=1)
    params = {name: t.float() for name, t in params.items()}
    compare_with_grads(k, v, cu, 32, 16, kind, params, gen, 1e-2)


@pytest.mark.parametrize("kind,pos", KINDS, ids=KIND_IDS)
def test_non_contiguous_inputs(kind, pos):
    """Strided k, v and parameters give what their contiguous copies give."""
    hkv, d, ks, s = 2, 8, 4, 2
    dv = d if pos else 6
    k, v, cu, params, gen = _inputs(ks, s, hkv, d, dv, torch.float32, kind, pos, seed=2)
    n = k.shape[0]
    k_nc = k.transpose(0, 1).contiguous().transpose(0, 1)  # [N, Hkv, D] with Hkv-major strides
    v_nc = torch.zeros(n, hkv, 2 * dv)
    v_nc[..., ::2] = v
    v_nc = v_nc[..., ::2]
    params_nc = {name: t.transpose(-1, -2).contiguous().transpose(-1, -2) for name, t in params.items()}
    assert not k_nc.is_contiguous() and not v_nc.is_contiguous()
    assert all(not t.is_contiguous() for t in params_nc.values())
    want = compress(k, v, cu, ks, s, kind, **params)
    got = compress(k_nc, v_nc, cu, ks, s, kind, **params_nc)
    for g, w in zip(got, want):
        assert g.is_contiguous()
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_default_kind_is_mean():
    k, v, cu, _, _ = _inputs(4, 2, 1, 4, 4, torch.float32, "mean", False)
    for got, want in zip(compress(k, v, cu, 4, 2), compress(k, v, cu, 4, 2, "mean")):
        assert torch.equal(got, want)


# --------------------------------------------------------------------------- bad inputs

KS, S, HKV, D, DV = 4, 2, 2, 8, 6


def _good(kind="linear"):
    """Valid arguments of compress as a dict (linear without pos_emb, D != Dv)."""
    k, v, cu, params, _ = _inputs(KS, S, HKV, D, DV, torch.float32, kind, False, lengths=[5, 0, 9])
    return dict(k=k, v=v, cu_seqlens=cu, kernel_size=KS, stride=S, kind=kind, **params)


def _meta(t):
    return t.to("meta")


def _i32(values):
    return torch.tensor(values, dtype=torch.int32)


# name: (kind of the valid base call, edits to it, error type, argument the message starts with, rule fragment)
BAD = {
    "kernel_size_zero": ("mean", dict(kernel_size=0), ValueError, "kernel_size", "must be a positive int"),
    "kernel_size_float": ("mean", dict(kernel_size=4.0), TypeError, "kernel_size", "must be an int"),
    "kernel_size_bool": ("mean", dict(kernel_size=True), TypeError, "kernel_size", "must be an int"),
    "stride_zero": ("mean", dict(stride=0), ValueError, "stride", "must be a positive int"),
    "stride_negative": ("mean", dict(stride=-2), ValueError, "stride", "must be a positive int"),
    "stride_str": ("mean", dict(stride="2"), TypeError, "stride", "must be an int"),
    "kernel_not_multiple_of_stride": ("mean", dict(kernel_size=6, stride=4), ValueError, "kernel_size",
                                      "must be a multiple of stride=4"),
    "k_not_tensor": ("mean", dict(k=[[1.0]]), TypeError, "k", "must be a torch.Tensor"),
    "v_not_tensor": ("mean", dict(v=None), TypeError, "v", "must be a torch.Tensor"),
    "k_float64": ("mean", dict(k=lambda a: a["k"].double(), v=lambda a: a["v"].double()), TypeError, "k",
                  "dtype must be torch.bfloat16, torch.float16 or torch.float32"),
    "k_int": ("mean", dict(k=lambda a: a["k"].int()), TypeError, "k", "dtype must be torch.bfloat16"),
    "v_dtype_differs": ("mean", dict(v=lambda a: a["v"].bfloat16()), TypeError, "v", "dtype must equal k's dtype"),
    "v_other_device": ("mean", dict(v=lambda a: _meta(a["v"])), ValueError, "v", "must be on k's device"),
    "k_2d": ("mean", dict(k=lambda a: a["k"][:, 0]), ValueError, "k", "must be 3-D [N, Hkv, D]"),
    "v_4d": ("mean", dict(v=lambda a: a["v"][None]), ValueError, "v", "must be 3-D [N, Hkv, Dv]"),
    "v_other_n": ("mean", dict(v=lambda a: a["v"][1:]), ValueError, "v", "must be [N=14, Hkv=2, Dv] like k"),
    "v_other_hkv": ("mean", dict(v=lambda a: a["v"][:, :1]), ValueError, "v", "must be [N=14, Hkv=2, Dv] like k"),
    "kind_unknown": ("mean", dict(kind="max"), ValueError, "kind", "must be one of ['mean', 'weighted', 'linear']"),
    "kind_none": ("mean", dict(kind=None), ValueError, "kind", "must be one of"),
    "weight_missing": ("weighted", dict(weight=None), ValueError, "weight", "is required by kind='weighted'"),
    "proj_k_missing": ("linear", dict(proj_k=None), ValueError, "proj_k", "is required by kind='linear'"),
    "proj_v_missing": ("linear", dict(proj_v=None), ValueError, "proj_v", "is required by kind='linear'"),
    "weight_with_mean": ("mean", dict(weight=torch.ones(HKV, KS)), ValueError, "weight", "is not used by kind='mean'"),
    "pos_emb_with_weighted": ("weighted", dict(pos_emb=torch.ones(HKV, KS, D)), ValueError, "pos_emb",
                              "is not used by kind='weighted'"),
    "proj_k_with_weighted": ("weighted", dict(proj_k=torch.ones(HKV, KS * D, D)), ValueError, "proj_k",
                             "is not used by kind='weighted'"),
    "weight_with_linear": ("linear", dict(weight=torch.ones(HKV, KS)), ValueError, "weight",
                           "is not used by kind='linear'"),
    "weight_shape": ("weighted", dict(weight=torch.ones(HKV, KS + 1)), ValueError, "weight",
                     "shape must be [Hkv, kernel_size] = [2, 4]"),
    "weight_1d": ("weighted", dict(weight=torch.ones(KS)), ValueError, "weight", "shape must be [Hkv, kernel_size]"),
    "weight_int": ("weighted", dict(weight=torch.ones(HKV, KS, dtype=torch.int32)), TypeError, "weight",
                   "dtype must be floating point"),
    "weight_not_tensor": ("weighted", dict(weight=[[1.0] * KS] * HKV), TypeError, "weight",
                          "must be a torch.Tensor"),
    "weight_other_device": ("weighted", dict(weight=lambda a: _meta(a["weight"])), ValueError, "weight",
                            "must be on k's device"),
    "proj_k_shape": ("linear", dict(proj_k=torch.ones(HKV, KS * DV, D)), ValueError, "proj_k",
                     "shape must be [Hkv, kernel_size * D, D] = [2, 32, 8]"),
    "proj_v_shape": ("linear", dict(proj_v=torch.ones(HKV, KS * D, D)), ValueError, "proj_v",
                     "shape must be [Hkv, kernel_size * Dv, Dv] = [2, 24, 6]"),
    "proj_v_other_device": ("linear", dict(proj_v=lambda a: _meta(a["proj_v"])), ValueError, "proj_v",
                            "must be on k's device"),
    "pos_emb_shape": ("linear", dict(v=lambda a: a["v"][..., :1].expand(-1, -1, D), proj_v=torch.ones(HKV, KS * D, D),
                                     pos_emb=torch.ones(HKV, KS, DV)),
                      ValueError, "pos_emb", "shape must be [Hkv, kernel_size, D] = [2, 4, 8]"),
    "pos_emb_with_dv_ne_d": ("linear", dict(pos_emb=torch.ones(HKV, KS, D)), ValueError, "pos_emb",
                             "is added to v too, so v's head dim must equal D=8"),
    "pos_emb_int": ("linear", dict(pos_emb=torch.ones(HKV, KS, D, dtype=torch.long)), TypeError, "pos_emb",
                    "dtype must be floating point"),
    "cu_not_tensor": ("mean", dict(cu_seqlens=[0, 5, 5, 14]), TypeError, "cu_seqlens", "must be a torch.Tensor"),
    "cu_int64": ("mean", dict(cu_seqlens=lambda a: a["cu_seqlens"].long()), TypeError, "cu_seqlens",
                 "dtype must be torch.int32"),
    "cu_other_device": ("mean", dict(cu_seqlens=lambda a: _meta(a["cu_seqlens"])), ValueError, "cu_seqlens",
                        "must be on k's device"),
    "cu_2d": ("mean", dict(cu_seqlens=lambda a: a["cu_seqlens"][None]), ValueError, "cu_seqlens", "must be 1-D"),
    "cu_one_offset": ("mean", dict(cu_seqlens=_i32([14])), ValueError, "cu_seqlens", "B + 1 >= 2 offsets"),
    "cu_not_from_zero": ("mean", dict(cu_seqlens=_i32([1, 5, 14])), ValueError, "cu_seqlens", "must start at 0"),
    "cu_decreasing": ("mean", dict(cu_seqlens=_i32([0, 9, 5, 14])), ValueError, "cu_seqlens",
                      "must be non-decreasing, got cu_seqlens[1:3]=[9, 5]"),
    "cu_short_of_n": ("mean", dict(cu_seqlens=_i32([0, 5, 13])), ValueError, "cu_seqlens",
                      "must end at N=14 (k.shape[0]), got cu_seqlens[-1]=13"),
    "cu_past_n": ("mean", dict(cu_seqlens=_i32([0, 5, 15])), ValueError, "cu_seqlens", "must end at N=14"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input(name):
    base, edits, exc, arg, rule = BAD[name]
    args = _good(base)
    for key, value in edits.items():
        args[key] = value(args) if callable(value) else value
    args = {key: value for key, value in args.items() if value is not None or key not in PARAM_NAMES}
    with pytest.raises(exc) as info:
        compress(**args)
    msg = str(info.value)
    assert msg.startswith(f"{arg}: "), msg
    assert rule in msg, msg


def test_gpu_log_table(tmp_path, monkeypatch, capsys):
    """fsagen.testing.log_errors (the GPU tests' FSAGEN_GPU_LOG writer): a new header whenever the
    columns change, so the slc and compress GPU tests can share one log file."""
    from fsagen.testing import log_errors

    path = tmp_path / "log.md"
    monkeypatch.setenv("FSAGEN_GPU_LOG", str(path))
    log_errors("compress-gpu", "a", {"k_cmp": 1e-3}, ("k_cmp", "dk"))
    log_errors("compress-gpu", "b", {"k_cmp": 2e-3, "dk": 3e-3}, ("k_cmp", "dk"))
    log_errors("slc-gpu", "c", {"o": 4e-3}, ("o",))
    assert "[compress-gpu] a: k_cmp=1.000e-03" in capsys.readouterr().out
    assert path.read_text().splitlines() == [
        "| case | k_cmp | dk |", "|---|---|---|", "| a | 1.000e-03 | not measured |", "| b | 2.000e-03 | 3.000e-03 |",
        "", "| case | o |", "|---|---|", "| c | 4.000e-03 |",
    ]
