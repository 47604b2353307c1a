"""The NSA layer on a CPU: ``fsagen.nsa_attention`` against ``nsa_attention_reference``, the
``NativeSparseAttention`` module against ``nsa_layer_reference`` (packed and padded, forward and
every parameter's gradient), shapes on meta / fake tensors, spec files, bad inputs, and the
training example's model.

The glue modules need a GPU, so the float64-reference-backed stubs of tests/test_ops_dense.py
(``fsagen.dense_attention``, ``fsagen.selection``) and tests/test_ops_fake.py (``fsagen.slc``) take
their place; compression (``fsagen.compress``) runs natively.  What is checked is the composition
(argument routing, rotary, gates, dtypes, gradients, validation), not the kernels
(tests/gpu/test_nsa_gpu.py does that).
"""

import copy
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fsagen
import test_ops_dense
import test_ops_fake
from fsagen.errors import SpecError, UnsupportedSpec
from fsagen.nn import NativeSparseAttention, load_nsa_spec
from fsagen.nsa import PART_NAMES, compress_kv, nsa_attention_from_compressed
from fsagen.reference_layer import nsa_layer_reference
from fsagen.reference_nsa import nsa_attention_reference
from fsagen.spec import NSASpec
from fsagen.testing import rel_err

REPO = Path(__file__).resolve().parent.parent
# A sequence shorter than kernel_size (its queries see no compressed token), an empty one, and two
# long enough for several selection blocks.
LENGTHS = (5, 70, 0, 45)
HQ, HKV, D, HIDDEN = 4, 2, 16, 32
CFG = dict(kernel_size=8, stride=4, block_size=8, topk=5, init_blocks=1, local_blocks=2, window_size=7)
SPEC = dict(num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, **CFG)
KINDS = ("mean", "weighted", "linear")
TOL = 1e-2


def stub_modules() -> list[types.ModuleType]:
    """Stand-ins of the three GPU glue modules (fsagen.dense_attention, fsagen.selection, fsagen.slc)
    computing with the float64 references."""
    dense = types.ModuleType("fsagen.dense_attention")
    dense.forward, dense.backward = test_ops_dense._stub_forward, test_ops_dense._stub_backward
    sel = types.ModuleType("fsagen.selection")
    sel.select = test_ops_dense._stub_select
    slc = types.ModuleType("fsagen.slc")
    slc.slc_forward, slc.slc_backward = test_ops_fake._stub_forward, test_ops_fake._stub_backward
    return [dense, sel, slc]


@pytest.fixture
def stub_glue(monkeypatch):
    """The three glue modules replaced by float64-reference stubs; returns the cmp/swa/sel call log."""
    for mod in stub_modules():
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    test_ops_dense.CALLS.clear()
    return test_ops_dense.CALLS


def _cu(lengths=LENGTHS):
    return torch.tensor((0,) + tuple(lengths), dtype=torch.int32).cumsum(0, dtype=torch.int32)


def _compression_params(kind, gen, hkv=HKV, ks=CFG["kernel_size"], d=D):
    """Random (not the initial mean-pooling) float32 parameters of a compression kind."""
    if kind == "weighted":
        return {"weight": torch.rand(hkv, ks, generator=gen) / (ks / 2)}
    if kind == "linear":
        scale = (ks * d) ** -0.5
        return {"proj_k": torch.randn(hkv, ks * d, d, generator=gen) * scale,
                "proj_v": torch.randn(hkv, ks * d, d, generator=gen) * scale,
                "pos_emb": torch.randn(hkv, ks, d, generator=gen) * 0.1}
    return {}


def _attention_inputs(kind="mean", gate="per_head", gate_dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = sum(LENGTHS)
    q, k, v = (torch.randn(n, h, D, generator=gen).bfloat16() for h in (HQ, HKV, HKV))
    gates = torch.sigmoid(torch.randn((n, HQ, 3) if gate == "per_head" else (n, 3), generator=gen)).to(gate_dtype)
    return dict(q=q, k=k, v=v, gates=gates, cu_seqlens=_cu(), **CFG, compression=kind,
                compression_params=_compression_params(kind, gen))


def _leaves(a, dtype=None):
    """Copies of the differentiable inputs of nsa_attention arguments ``a`` as fresh leaves."""
    def leaf(t):
        return (t.detach() if dtype is None else t.detach().to(dtype)).clone().requires_grad_()

    out = dict(a, **{name: leaf(a[name]) for name in ("q", "k", "v", "gates")})
    out["compression_params"] = {name: leaf(t) for name, t in a["compression_params"].items()}
    return out


def _grad_inputs(a):
    return [a[name] for name in ("q", "k", "v", "gates")] + list(a["compression_params"].values())


def _grad_names(a):
    return ["q", "k", "v", "gates"] + list(a["compression_params"])


# --------------------------------------------------------------------------- nsa_attention


@pytest.mark.parametrize("gate,gate_dtype,scale", [("per_head", torch.float32, None),
                                                   ("per_token", torch.bfloat16, 0.3)],
                         ids=["per_head_fp32", "per_token_bf16_scale"])
@pytest.mark.parametrize("kind", KINDS)
def test_nsa_attention_matches_reference(stub_glue, kind, gate, gate_dtype, scale):
    a = _leaves(_attention_inputs(kind, gate, gate_dtype))
    o, parts = fsagen.nsa_attention(**a, scale=scale, return_parts=True)
    ref = _leaves(a, torch.float64)
    ro, rparts = nsa_attention_reference(**ref, scale=scale, return_parts=True)

    assert o.dtype == gate_dtype and o.shape == a["q"].shape
    assert set(parts) == set(rparts) == set(PART_NAMES)
    assert torch.equal(parts["topk_idx"], rparts["topk_idx"])  # no near-ties in these inputs
    assert rel_err(o, ro) < TOL
    for name in PART_NAMES[:-1]:
        assert rel_err(parts[name], rparts[name]) < TOL, name
    # cmp, selection and swa got the one shared scale (slc's stub records none: o_slc above checks it)
    used = D ** -0.5 if scale is None else scale
    assert [(c[0], c[-1]) for c in stub_glue] == [(name, pytest.approx(used)) for name in ("fwd", "sel", "fwd")]

    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(o, _grad_inputs(a), do.to(o.dtype))
    ref_grads = torch.autograd.grad(ro, _grad_inputs(ref), do.double())
    for name, g, r, leaf in zip(_grad_names(a), grads, ref_grads, _grad_inputs(a)):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, name
        assert rel_err(g, r) < TOL, name


def test_nsa_attention_value_checks_do_not_change_the_result(stub_glue):
    a = _attention_inputs("linear")
    assert torch.equal(fsagen.nsa_attention(**a), fsagen.nsa_attention(**a, check_values=False))


def test_nsa_attention_on_abstract_tensors():
    a = _attention_inputs("linear")
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for k, t in a.items()}
        fake["compression_params"] = {k: mode.from_tensor(t) for k, t in a["compression_params"].items()}
        o, parts = fsagen.nsa_attention(**fake, return_parts=True)
    assert o.shape == a["q"].shape and o.dtype == a["gates"].dtype
    assert parts["topk_idx"].shape == (HKV, sum(LENGTHS), CFG["topk"])
    meta = {k: t.to("meta") if isinstance(t, torch.Tensor) else t for k, t in a.items()}
    meta["compression_params"] = {k: t.to("meta") for k, t in a["compression_params"].items()}
    o = fsagen.nsa_attention(**meta)
    assert o.device.type == "meta" and o.shape == a["q"].shape


# --------------------------------------------------------------------------- the module


def _module(kind="mean", gate="per_head", rope=10000.0, seed=0, **kw):
    """A float32 module with random (non-initial) compression parameters and biases."""
    torch.manual_seed(seed)
    m = NativeSparseAttention(hidden_size=HIDDEN, compression=kind, gate=gate, rope_theta=rope, bias=True,
                              **{**SPEC, **kw})
    with torch.no_grad():
        for name, p in _compression_params(kind, torch.Generator().manual_seed(seed + 1)).items():
            m.compression_params[name].copy_(p)
    return m


def _x(n=sum(LENGTHS), seed=2):
    return torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rope", [None, 10000.0], ids=["no_rope", "rope"])
@pytest.mark.parametrize("gate", ["per_head", "per_token"])
@pytest.mark.parametrize("kind", KINDS)
def test_module_packed_matches_layer_reference(stub_glue, kind, gate, rope):
    m, x, cu = _module(kind, gate, rope), _x(), _cu()
    out, parts = m(x, cu, return_parts=True)
    ref, rparts = nsa_layer_reference(m, x, cu, return_parts=True)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.equal(parts["topk_idx"], rparts["topk_idx"])
    assert rel_err(out, ref) < TOL
    for name in ("o_cmp", "o_slc", "o_swa"):
        assert rel_err(parts[name], rparts[name]) < TOL, name


def test_module_gradients_match_reference(stub_glue):
    """Every parameter's gradient (and x's) is non-zero and matches the float64 layer reference."""
    for kind in ("weighted", "linear"):
        m, x, cu = _module(kind, "per_head", 10000.0), _x().requires_grad_(), _cu()
        out, parts = m(x, cu, return_parts=True)
        do = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
        names = ["x"] + [name for name, _ in m.named_parameters()]
        grads = torch.autograd.grad(out, [x] + list(m.parameters()), do)
        r = copy.deepcopy(m).double()
        x64 = x.detach().double().requires_grad_()
        ref = nsa_layer_reference(r, x64, cu, topk_idx=parts["topk_idx"])
        ref_grads = torch.autograd.grad(ref, [x64] + list(r.parameters()), do.double())
        for name, g, rg in zip(names, grads, ref_grads):
            assert g.abs().max() > 0, f"{kind}: {name} has a zero gradient"
            assert rel_err(g, rg) < 2 * TOL, f"{kind}: {name}"


def _padded(x, cu, t, left=False):
    """``(x [B, T, hidden], mask [B, T] bool)`` holding the sequences of packed x, right-padded
    (left-padded with left=True)."""
    bounds = cu.tolist()
    xp, mask = x.new_zeros(len(bounds) - 1, t, x.shape[1]), torch.zeros(len(bounds) - 1, t, dtype=torch.bool)
    for b, (s0, s1) in enumerate(zip(bounds[:-1], bounds[1:])):
        sl = slice(t - (s1 - s0), t) if left else slice(0, s1 - s0)
        xp[b, sl], mask[b, sl] = x[s0:s1], True
    return xp, mask


@pytest.mark.parametrize("left", [False, True], ids=["right_padded", "left_padded"])
def test_module_padded_equals_packed(stub_glue, left):
    m, x, cu = _module("linear"), _x(), _cu()
    packed = m(x, cu)
    xp, mask = _padded(x, cu, t=80, left=left)
    xp = xp.requires_grad_()
    out, parts = m(xp, attention_mask=mask.long(), return_parts=True)  # a 0/1 integer mask works too
    assert out.shape == xp.shape
    assert torch.equal(out[mask], packed)  # the same packed computation, scattered back
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
    assert torch.equal(parts["cu_seqlens"], cu)
    assert rel_err(out[mask], nsa_layer_reference(m, x, cu)) < TOL
    out.sum().backward()
    assert torch.equal(xp.grad[~mask], torch.zeros_like(xp.grad[~mask])) and xp.grad[mask].abs().min() > 0


def test_module_defaults_one_sequence_and_all_real(stub_glue):
    m, x = _module("mean"), _x(40)
    one = m(x)
    assert torch.equal(one, m(x, torch.tensor([0, 40], dtype=torch.int32)))
    assert torch.equal(m(x[None]), one[None])


def test_module_under_cpu_autocast(stub_glue):
    """bf16 projections under autocast: the kernels' dtype is the spec's, the output autocast's."""
    m, x, cu = _module("weighted"), _x(), _cu()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, parts = m(x, cu, return_parts=True)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, nsa_layer_reference(m, x, cu, topk_idx=parts["topk_idx"])) < 3 * TOL


def test_module_under_torch_compile(stub_glue):
    """torch.compile (aot_eager: no C++ compiler needed) gives eager's output and gradients; the
    graph breaks at compression's host read, which compile handles."""
    m, x, cu = _module("linear"), _x(), _cu()
    xp, mask = _padded(x, cu, t=80)
    compiled = torch.compile(m, backend="aot_eager")
    results = []
    for fn in (compiled, m):
        m.zero_grad()
        out = fn(x, cu)
        (out.square().sum() + fn(xp, attention_mask=mask).sum()).backward()
        results.append((out.detach(), [p.grad.clone() for p in m.parameters()]))
    (out_c, grads_c), (out_e, grads_e) = results
    assert torch.equal(out_c, out_e)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)


def _abstract_run(kind, m_kwargs, make):
    m = NativeSparseAttention(hidden_size=HIDDEN, compression=kind, rope_theta=500.0, **SPEC, **m_kwargs)
    n = sum(LENGTHS)
    packed = m(make(torch.randn(n, HIDDEN)), make(_cu()))
    padded = m(make(torch.randn(3, 50, HIDDEN)), attention_mask=make(torch.ones(3, 50, dtype=torch.bool)))
    (packed.sum() + padded.sum()).backward()
    return m, packed, padded


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("where", ["meta", "fake"])
def test_module_on_abstract_tensors(kind, where):
    if where == "meta":
        m, packed, padded = _abstract_run(kind, {"device": "meta"}, lambda t: t.to("meta"))
    else:
        with FakeTensorMode():
            m, packed, padded = _abstract_run(kind, {}, lambda t: t)
    assert packed.shape == (sum(LENGTHS), HIDDEN) and padded.shape == (3, 50, HIDDEN)
    assert all(p.grad is not None and p.grad.shape == p.shape for p in m.parameters())
    if where == "meta":
        assert packed.device.type == "meta" and padded.device.type == "meta"


# --------------------------------------------------------------------------- construction, spec files


def test_module_parameters_and_initial_compression():
    m = NativeSparseAttention(hidden_size=64, num_q_heads=4, num_kv_heads=2, compression="linear", gate="per_token")
    assert m.spec.head_dim == 16  # hidden_size // num_q_heads
    shapes = {name: tuple(p.shape) for name, p in m.named_parameters()}
    assert shapes["q_proj.weight"] == (64, 64) and shapes["k_proj.weight"] == (32, 64)
    assert shapes["g_proj.weight"] == (3, 64) and "q_proj.bias" not in shapes
    assert shapes["compression_params.proj_k"] == (2, 32 * 16, 16)
    assert not m.compression_params["pos_emb"].any()
    # "linear" starts as mean pooling: compress(linear) == compress(mean)
    k, v = torch.randn(100, 2, 16), torch.randn(100, 2, 16)
    cu = torch.tensor([0, 40, 100], dtype=torch.int32)
    lin = fsagen.compress(k, v, cu, 32, 16, "linear", **dict(m.compression_params))
    mean = fsagen.compress(k, v, cu, 32, 16, "mean")
    for a, b in zip(lin, mean):
        torch.testing.assert_close(a, b)
    w = NativeSparseAttention(hidden_size=64, num_q_heads=4, num_kv_heads=2, compression="weighted")
    assert torch.equal(w.compression_params["weight"], torch.full((2, 32), 1 / 32))
    assert tuple(w.g_proj.weight.shape) == (12, 64)
    assert dict(NativeSparseAttention(hidden_size=64, num_q_heads=4, num_kv_heads=2).compression_params) == {}


def test_spec_and_keywords_build_the_same_layer():
    spec = NSASpec(num_q_heads=4, num_kv_heads=1, head_dim=64, topk=8, compression="weighted")
    a = NativeSparseAttention(spec, hidden_size=128)
    b = NativeSparseAttention(hidden_size=128, num_q_heads=4, num_kv_heads=1, head_dim=64, topk=8,
                              compression="weighted")
    assert a.spec == b.spec == spec
    assert [(n, p.shape) for n, p in a.named_parameters()] == [(n, p.shape) for n, p in b.named_parameters()]


def test_from_spec_file(tmp_path):
    path = tmp_path / "layer.toml"
    path.write_text('[nsa]\nnum_q_heads = 8\nnum_kv_heads = 2\nhead_dim = 64\nblock_size = 128\ntopk = 8\n'
                    'kernel_size = 64\nstride = 32\ncompression = "linear"\ngate = "per_token"\n')
    m = NativeSparseAttention.from_spec_file(path, hidden_size=256, rope_theta=1e4, bias=True)
    assert m.spec == NSASpec(num_q_heads=8, num_kv_heads=2, head_dim=64, block_size=128, topk=8, kernel_size=64,
                             stride=32, compression="linear", gate="per_token")
    assert m.rope_theta == 1e4 and m.q_proj.bias is not None and m.hidden_size == 256
    assert load_nsa_spec(str(path)) == m.spec


@pytest.mark.parametrize("text,match", [
    ("[other]\nx = 1\n", r"needs an \[nsa\] table"),
    ("[nsa]\nnum_q_heads = 4\nnum_kv_heads = 2\nhead_dim = 64\nheads = 3\n", r"unknown field\(s\) \['heads'\]"),
    ("[nsa]\nnum_q_heads = 4\nhead_dim = 64\n", r"missing field\(s\) \['num_kv_heads'\]"),
    ("[nsa]\nnum_q_heads = 4\nnum_kv_heads = 3\nhead_dim = 64\n", "num_q_heads must be a multiple of num_kv_heads"),
    ("[nsa]\nnum_q_heads = 4\nnum_kv_heads = 2\nhead_dim = 64\ntopk = 2\n", "topk must be >= init_blocks"),
    ("[nsa\n", "invalid TOML"),
    ("[nsa]\nnum_q_heads = 4\nnum_kv_heads = 2\nhead_dim = 64\nwindow_size = 0\n", "window_size=0: must be >= 1"),
    ("[nsa]\nnum_q_heads = 4\nnum_kv_heads = 2\nhead_dim = 64\nkernel_size = 40\n",
     "kernel_size must be a multiple of stride"),
], ids=["no_table", "unknown", "missing", "heads", "topk", "syntax", "window", "kernel"])
def test_bad_spec_file(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SpecError, match=match) as info:
        NativeSparseAttention.from_spec_file(path, hidden_size=256)
    assert str(path) in str(info.value)
    with pytest.raises(SpecError, match="file not found"):
        load_nsa_spec(tmp_path / "missing.toml")


# --------------------------------------------------------------------------- bad inputs

BASE = dict(hidden_size=64, num_q_heads=4, num_kv_heads=2)
BAD_CONSTRUCTION = {  # keyword edits -> (error type, text the message starts with)
    "hidden_not_divisible": (dict(hidden_size=66), ValueError, "hidden_size: "),
    "hidden_zero": (dict(hidden_size=0), ValueError, "hidden_size: "),
    "hidden_str": (dict(hidden_size="64"), TypeError, "hidden_size: "),
    "unknown_keyword": (dict(heads=4), TypeError, "heads: "),
    "missing_kv_heads": (dict(num_kv_heads=None), TypeError, "num_kv_heads: "),
    "spec_not_nsaspec": (dict(spec={"num_q_heads": 4}), TypeError, "spec: "),
    "spec_and_fields": (dict(spec=NSASpec(4, 2, 16)), TypeError, "num_kv_heads: "),
    "v_head_dim": (dict(head_dim=16, v_head_dim=8), UnsupportedSpec, "v_head_dim: "),
    "odd_head_dim_with_rope": (dict(head_dim=15, rope_theta=1e4), ValueError, "head_dim: "),
    "rope_negative": (dict(rope_theta=-1.0), ValueError, "rope_theta: "),
    "rope_str": (dict(rope_theta="1e4"), TypeError, "rope_theta: "),
    "bias_str": (dict(bias="yes"), TypeError, "bias: "),
    "torch_dtype": (dict(dtype=torch.bfloat16), TypeError, "dtype: "),
    "topk_below_forced": (dict(topk=2), SpecError, "NSASpec: topk must be >= init_blocks"),
    "block_not_multiple_of_stride": (dict(block_size=40), SpecError, "NSASpec: block_size must be a multiple"),
    "bad_gate": (dict(gate="per_layer"), SpecError, "NSASpec.gate="),
    # spec values that do not fit together
    "window_zero": (dict(window_size=0), SpecError, "NSASpec.window_size=0: must be >= 1"),
    "window_negative": (dict(window_size=-4), SpecError, "NSASpec.window_size=-4: must be >= 1"),
    "window_float": (dict(window_size=7.5), SpecError, "NSASpec.window_size=7.5: must be an int"),
    "topk_zero": (dict(topk=0), SpecError, "NSASpec.topk=0: must be >= 1"),
    "kv_heads_do_not_divide": (dict(num_kv_heads=3), SpecError, "NSASpec: num_q_heads must be a multiple of "
                                                                "num_kv_heads"),
    "more_kv_than_q_heads": (dict(num_kv_heads=8), SpecError, "NSASpec: num_q_heads must be a multiple"),
    "kernel_not_multiple_of_stride": (dict(kernel_size=24), SpecError, "NSASpec: kernel_size must be a multiple"),
    "kernel_below_stride": (dict(kernel_size=8), SpecError, "NSASpec: kernel_size must be a multiple"),
    "head_dim_zero": (dict(head_dim=0), SpecError, "NSASpec.head_dim=0: must be >= 1"),
    "v_head_dim_larger": (dict(head_dim=16, v_head_dim=32), UnsupportedSpec, "v_head_dim: the kernels need "
                                                                              "v_head_dim == head_dim=16"),
    "kernel_dtype_fp32": (dict(dtype="float32"), SpecError, "NSASpec.dtype='float32': must be one of"),
    "compression_unknown": (dict(compression="max"), SpecError, "NSASpec.compression='max'"),
    "param_dtype_str": (dict(param_dtype="float32"), TypeError, "param_dtype: "),
    "param_dtype_int": (dict(param_dtype=torch.int32), TypeError, "param_dtype: "),
    # hidden sizes that do not divide
    "hidden_not_divisible_by_7_heads": (dict(hidden_size=64, num_q_heads=7, num_kv_heads=1), ValueError,
                                        "hidden_size: must be a multiple of num_q_heads=7"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONSTRUCTION))
def test_bad_construction_names_argument(case):
    edits, kind, start = BAD_CONSTRUCTION[case]
    kwargs = {**BASE, **edits}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if "spec" in kwargs:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("num_q_heads",)}
    with pytest.raises(kind) as info:
        NativeSparseAttention(**kwargs)
    assert str(info.value).startswith(start), str(info.value)


def _fwd_cases():
    """case -> (make (x, kwargs) from packed x and cu, error type, argument)."""
    x, cu = _x(), _cu()
    xp, mask = _padded(x, cu, 80)
    holes = mask.clone()
    holes[1, 3] = False
    twos = mask.long()
    twos[0, 0] = 2
    return {
        "x_int": ((x.long(), dict(cu_seqlens=cu)), TypeError, "x"),
        "x_list": ((x.tolist(), dict(cu_seqlens=cu)), TypeError, "x"),
        "x_hidden": ((x[:, :30], dict(cu_seqlens=cu)), ValueError, "x"),
        "x_4d": ((xp[None], {}), ValueError, "x"),
        "x_fp64": ((x.double(), dict(cu_seqlens=cu)), TypeError, "x"),
        "x_on_meta": ((x.to("meta"), dict(cu_seqlens=cu)), ValueError, "x"),
        "cu_int64": ((x, dict(cu_seqlens=cu.long())), TypeError, "cu_seqlens"),
        "cu_2d": ((x, dict(cu_seqlens=cu[None])), ValueError, "cu_seqlens"),
        "cu_on_meta": ((x, dict(cu_seqlens=cu.to("meta"))), ValueError, "cu_seqlens"),
        "cu_list": ((x, dict(cu_seqlens=cu.tolist())), TypeError, "cu_seqlens"),
        "cu_short_of_n": ((x, dict(cu_seqlens=torch.cat([cu[:-1], cu[-1:] - 1]))), ValueError, "cu_seqlens"),
        "cu_with_padded_x": ((xp, dict(cu_seqlens=cu)), ValueError, "cu_seqlens"),
        "mask_with_packed_x": ((x, dict(attention_mask=mask)), ValueError, "attention_mask"),
        "mask_float": ((xp, dict(attention_mask=mask.float())), TypeError, "attention_mask"),
        "mask_shape": ((xp, dict(attention_mask=mask[:, :-1])), ValueError, "attention_mask"),
        "mask_not_tensor": ((xp, dict(attention_mask=mask.tolist())), TypeError, "attention_mask"),
        "mask_value_2": ((xp, dict(attention_mask=twos)), ValueError, "attention_mask"),
        "mask_holes": ((xp, dict(attention_mask=holes)), ValueError, "attention_mask"),
        "mask_1d": ((xp, dict(attention_mask=mask[0])), ValueError, "attention_mask"),
        "mask_4d_additive_style": ((xp, dict(attention_mask=mask[:, None, None, :])), ValueError, "attention_mask"),
        "mask_batch": ((xp, dict(attention_mask=mask[:-1])), ValueError, "attention_mask"),
        "mask_longer": ((xp, dict(attention_mask=torch.cat([mask, mask[:, :1]], 1))), ValueError, "attention_mask"),
    }


FWD_CASES = _fwd_cases()


@pytest.mark.parametrize("case", sorted(FWD_CASES))
def test_bad_forward_input_names_argument(stub_glue, case):
    (x, kwargs), kind, arg = FWD_CASES[case]
    with pytest.raises(kind, match=rf"^{arg}: "):
        _module("mean")(x, **kwargs)
    assert stub_glue == []


def _attention_cases():
    """case -> (edit of the nsa_attention arguments, error type, argument)."""
    def edit(**kw):
        return lambda a: kw

    def gates(fn):
        return lambda a: {"gates": fn(a["gates"])}

    return {
        "gates_heads": (gates(lambda g: g[:, :3]), ValueError, "gates"),
        "gates_tokens": (gates(lambda g: g[:-1]), ValueError, "gates"),
        "gates_two_branches": (gates(lambda g: g[..., :2]), ValueError, "gates"),
        "gates_int": (gates(lambda g: g.long()), TypeError, "gates"),
        "gates_list": (gates(lambda g: g.tolist()), TypeError, "gates"),
        "gates_on_meta": (gates(lambda g: g.to("meta")), ValueError, "gates"),
        "q_2d": (lambda a: {"q": a["q"][:, 0]}, ValueError, "q"),
        "q_fp32": (lambda a: {"q": a["q"].float()}, TypeError, "q"),
        "k_fp16": (lambda a: {"k": a["k"].half()}, TypeError, "k"),
        "v_head_dim": (lambda a: {"v": a["v"][..., :8]}, ValueError, "v"),
        "k_tokens": (lambda a: {"k": a["k"][:-1], "v": a["v"][:-1]}, ValueError, "k"),
        "cu_int64": (lambda a: {"cu_seqlens": a["cu_seqlens"].long()}, TypeError, "cu_seqlens"),
        "cu_short_of_n": (lambda a: {"cu_seqlens": a["cu_seqlens"] - (a["cu_seqlens"] > 100).int()}, ValueError,
                          "cu_seqlens"),
        "topk_below_forced": (edit(topk=2), ValueError, "topk"),
        "topk_zero": (edit(topk=0), ValueError, "topk"),
        "window_zero": (edit(window_size=0), ValueError, "window_size"),
        "window_float": (edit(window_size=7.0), TypeError, "window_size"),
        "kernel_not_multiple_of_stride": (edit(kernel_size=6), ValueError, "kernel_size"),
        "block_not_multiple_of_stride": (edit(block_size=6), ValueError, "block_size"),
        "stride_zero": (edit(stride=0), ValueError, "stride"),
        "init_negative": (edit(init_blocks=-1), ValueError, "init_blocks"),
        "local_none": (edit(local_blocks=None), TypeError, "local_blocks"),
        "compression_unknown": (edit(compression="max"), ValueError, "compression"),
        "params_not_dict": (edit(compression_params=[1]), TypeError, "compression_params"),
        "params_unknown_key": (edit(compression_params={"weights": 1}), ValueError, "compression_params"),
        "weighted_without_weight": (edit(compression="weighted", compression_params={}), ValueError, "weight"),
        "mean_with_weight": (edit(compression_params={"weight": torch.ones(HKV, 8)}), ValueError, "weight"),
        "weight_shape": (edit(compression="weighted", compression_params={"weight": torch.ones(HKV, 4)}),
                         ValueError, "weight"),
        "scale_str": (edit(scale="0.1"), TypeError, "scale"),
        "scale_zero": (edit(scale=0.0), ValueError, "scale"),
    }


ATTENTION_CASES = _attention_cases()


@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_bad_nsa_attention_input_names_argument(stub_glue, case):
    edit, kind, arg = ATTENTION_CASES[case]
    a = _attention_inputs()
    a.update(edit(a))
    with pytest.raises(kind, match=rf"^{arg}: "):
        fsagen.nsa_attention(**a)
    assert stub_glue == []  # refused before any op ran


COMPRESSED_CASES = {  # edit of (k_cmp, v_cmp) -> (error type, text the message starts with)
    "k_cmp_kv_heads": (lambda kc, vc: (kc[:, :1], vc[:, :1]), ValueError, "k_cmp: must be [Nc, Hkv=2, D]"),
    "v_cmp_kv_heads": (lambda kc, vc: (kc, vc[:, :1]), ValueError, "v_cmp: must be [Nc, Hkv=2, D]"),
    "k_cmp_2d": (lambda kc, vc: (kc[:, 0], vc), ValueError, "k_cmp: must be [Nc, Hkv=2, D]"),
    "k_cmp_head_dim": (lambda kc, vc: (kc[..., :8], vc[..., :8]), ValueError, "k_cmp: head dim must equal q's D=16"),
    "v_cmp_head_dim": (lambda kc, vc: (kc, vc[..., :8]), ValueError, "v_cmp: head dim Dv must equal D=16"),
    "k_cmp_fp32": (lambda kc, vc: (kc.float(), vc), TypeError, "k_cmp: dtype must equal q's dtype"),
    "k_cmp_list": (lambda kc, vc: (kc.tolist(), vc), TypeError, "k_cmp: must be a torch.Tensor"),
}


@pytest.mark.parametrize("case", sorted(COMPRESSED_CASES))
def test_bad_compressed_keys_name_argument(stub_glue, case):
    """nsa_attention_from_compressed (the layer's entry point): compressed keys whose heads or head dims
    do not fit q / k are refused, naming them, before any kernel runs."""
    edit, kind, start = COMPRESSED_CASES[case]
    a = _attention_inputs()
    kc, vc, cuc = compress_kv(a["k"], a["v"], a["cu_seqlens"], CFG["kernel_size"], CFG["stride"])
    k_cmp, v_cmp = edit(kc, vc)
    with pytest.raises(kind) as info:
        nsa_attention_from_compressed(a["q"], a["k"], a["v"], k_cmp, v_cmp, a["gates"], a["cu_seqlens"], cuc, **CFG)
    assert str(info.value).startswith(start), str(info.value)
    assert stub_glue == []


# --------------------------------------------------------------------------- the training example

TINY = ["--seq-len", "64", "--batch", "2", "--layers", "1", "--hidden", "32", "--heads", "2", "--kv-heads", "1",
        "--head-dim", "16", "--block-size", "8", "--topk", "4", "--kernel-size", "8", "--stride", "4",
        "--window", "8", "--pairs", "8", "--queries", "4", "--keys", "16", "--values", "8", "--noise", "8"]


def _example():
    spec = importlib.util.spec_from_file_location("train_recall", REPO / "examples" / "train_recall.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_builds_on_meta():
    ex = _example()
    args = ex.parse_args([])
    assert args.seq_len == 8192
    model = ex.build_model(args, device="meta")
    attn = [m for m in model.modules() if isinstance(m, NativeSparseAttention)]
    assert len(attn) == args.layers and attn[0].spec.kernel_specs()  # a spec the kernels cover
    tokens, cu, positions, targets = ex.make_batch(ex.parse_args(TINY), torch.Generator().manual_seed(0), "cpu")
    assert tokens.shape == (128,) and cu.tolist() == [0, 64, 128] and positions.shape == targets.shape == (8,)
    assert bool(((targets >= 16) & (targets < 24)).all())  # values follow the query keys
    logits = model(torch.zeros(2 * 256, dtype=torch.long, device="meta"),
                   torch.tensor([0, 256, 512], dtype=torch.int32, device="meta"))
    assert logits.shape == (512, ex.vocab_size(args)) and logits.device.type == "meta"


def test_example_train_step_on_cpu(stub_glue, tmp_path):
    ex = _example()
    args = ex.parse_args(TINY + ["--steps", "2", "--out", str(tmp_path)])
    model = ex.build_model(args, device="cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for step in range(args.steps):
        loss, acc = ex.train_step(model, opt, ex.make_batch(args, gen, "cpu"), step, args, device_type="cpu")
        rows.append({"step": step, "loss": loss.item(), "accuracy": acc.item(), "elapsed_s": 0.0})
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    ex.write_outputs(rows, tmp_path)
    assert (tmp_path / "loss.csv").read_text().splitlines()[0] == "step,loss,accuracy,elapsed_s"


def test_example_dense_control_on_cpu():
    """``--attention dense`` (the control run): causal attention with the layer's projections,
    per packed sequence; a step runs on the CPU with no fsagen kernel, and each sequence's output
    depends only on its own tokens."""
    ex = _example()
    args = ex.parse_args(TINY + ["--attention", "dense"])
    model = ex.build_model(args, device="cpu")
    assert not [m for m in model.modules() if isinstance(m, NativeSparseAttention)]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    loss, acc = ex.train_step(model, opt, ex.make_batch(args, torch.Generator().manual_seed(0), "cpu"), 0, args,
                              device_type="cpu")
    assert torch.isfinite(loss)
    attn = model.blocks[0].attn
    x = torch.randn(128, args.hidden)
    cu = torch.tensor([0, 64, 128], dtype=torch.int32)
    y = attn(x, cu)
    x2 = x.clone()
    x2[64:] += 1.0  # the second sequence changes: the first's outputs must not
    y2 = attn(x2, cu)
    assert torch.equal(y[:64], y2[:64]) and not torch.equal(y[64:], y2[64:])
    x3 = x.clone()
    x3[40] += 1.0  # a later token of the first sequence: earlier outputs unchanged (causal)
    assert torch.allclose(attn(x3, cu)[:40], y[:40], rtol=0, atol=1e-6)
