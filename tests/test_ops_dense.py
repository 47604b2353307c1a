"""The cmp / swa / selection op layer on a CPU: fake impls, autograd wiring, opcheck, torch.compile,
and the input checks of compressed_attention, sliding_window_attention and select_blocks.

The real glue modules (``fsagen.dense_attention``, ``fsagen.select_blocks``) need a GPU, so these
tests put float64-reference-backed stubs in their place; what is checked is the op layer (argument
routing, shapes, dtypes, gradients, validation), not the kernels.
"""

import contextlib
import math
import sys
import types
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fsagen.ops_dense import compressed_attention, select_blocks, sliding_window_attention
from fsagen.reference_cmp import cmp_attention_reference, num_compressed, select_blocks_reference
from fsagen.reference_nsa import swa_reference
from fsagen.testing import rel_err
from fsagen.validate_dense import check_cmp_inputs, check_select_inputs, check_swa_inputs

# One sequence shorter than kernel_size (its queries see no compressed token: o = 0, lse = -inf),
# an empty one, and two long enough for several selection blocks.
LENGTHS = (5, 70, 0, 45)
HQ, HKV, D = 4, 2, 16
KS, STRIDE, WINDOW = 8, 4, 7
# block_size, topk, init_blocks, local_blocks (init != local, so a swap would show)
BS, TOPK, INIT, LOCAL = 8, 5, 1, 2

# --------------------------------------------------------------------------- reference-backed glue stubs

CALLS = []


def _dense_reference(branch, q, k, v, cu_q, cu_k, arg_a, arg_b, scale):
    if branch == "cmp":
        o, lse, _ = cmp_attention_reference(q, k, v, cu_q, cu_k, arg_a, arg_b, scale)
        return o, lse
    assert branch == "swa" and arg_b == 0 and torch.equal(cu_q, cu_k), (branch, arg_b)
    return swa_reference(q, k, v, cu_q, arg_a, scale)


def _stub_forward(branch, q, k, v, cu_q, cu_k, arg_a, arg_b, scale):
    CALLS.append(("fwd", branch, arg_a, arg_b, scale))
    o, lse = _dense_reference(branch, q, k, v, cu_q, cu_k, arg_a, arg_b, scale)
    return o.to(q.dtype), lse.float()


def _stub_backward(branch, do, q, k, v, o, lse, cu_q, cu_k, arg_a, arg_b, scale):
    CALLS.append(("bwd", branch, arg_a, arg_b, scale))

    def grads():
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        o64, _ = _dense_reference(branch, *leaves, cu_q, cu_k, arg_a, arg_b, scale)
        return torch.autograd.grad(o64, leaves, do.double())

    # Inside a custom op the autograd dispatch key is excluded for this thread; a fresh thread
    # has a clean dispatch state, so the reference can be differentiated there.
    with ThreadPoolExecutor(1) as pool:
        dq, dk, dv = pool.submit(grads).result()
    return tuple(g.to(t.dtype) for g, t in zip((dq, dk, dv), (q, k, v)))


def _stub_select(q, k_cmp, lse, cu_q, cu_k, kernel_size, stride, block_size, topk, init_blocks, local_blocks,
                 scale):
    CALLS.append(("sel", kernel_size, stride, block_size, topk, init_blocks, local_blocks, scale))
    # v does not enter p: k_cmp stands in for it.  The lse handed over must be cmp's own.
    _, lse64, p = cmp_attention_reference(q, k_cmp, k_cmp, cu_q, cu_k, kernel_size, stride, scale)
    torch.testing.assert_close(lse, lse64.float(), rtol=1e-5, atol=1e-5)
    return select_blocks_reference(p, cu_q, k_cmp.shape[1], kernel_size, stride, block_size, topk, init_blocks,
                                   local_blocks)


@pytest.fixture
def stub_glue(monkeypatch):
    dense = types.ModuleType("fsagen.dense_attention")
    dense.forward, dense.backward = _stub_forward, _stub_backward
    sel = types.ModuleType("fsagen.select_blocks")
    sel.select = _stub_select
    for mod in (dense, sel):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    # The selection glue is being renamed fsagen.selection (its old name shadows the public
    # fsagen.select_blocks); the stub answers to both names until ops_dense follows.
    monkeypatch.setitem(sys.modules, "fsagen.selection", sel)
    CALLS.clear()
    return CALLS


# --------------------------------------------------------------------------- inputs (argument dicts)


def _cu(lengths):
    return torch.tensor((0,) + tuple(lengths), dtype=torch.int32).cumsum(0, dtype=torch.int32)


def _randn(gen, dtype, *shape):
    return torch.randn(*shape, generator=gen).to(dtype)


def cmp_args(dtype=torch.bfloat16, hq=HQ, hkv=HKV, d=D, ks=KS, stride=STRIDE, seed=0, lengths=LENGTHS):
    """compressed_attention's arguments (a dict keyed by parameter name)."""
    gen = torch.Generator().manual_seed(seed)
    cu = _cu(lengths)
    cu_cmp = _cu([num_compressed(n, ks, stride) for n in lengths])
    n, nc = int(cu[-1]), int(cu_cmp[-1])
    return dict(q=_randn(gen, dtype, n, hq, d), k_cmp=_randn(gen, dtype, nc, hkv, d),
                v_cmp=_randn(gen, dtype, nc, hkv, d), cu_seqlens=cu, cu_seqlens_cmp=cu_cmp, kernel_size=ks,
                stride=stride, scale=None)


def swa_args(dtype=torch.bfloat16, hq=HQ, hkv=HKV, d=D, window=WINDOW, seed=0, lengths=LENGTHS):
    """sliding_window_attention's arguments."""
    gen = torch.Generator().manual_seed(seed)
    cu = _cu(lengths)
    n = int(cu[-1])
    return dict(q=_randn(gen, dtype, n, hq, d), k=_randn(gen, dtype, n, hkv, d), v=_randn(gen, dtype, n, hkv, d),
                cu_seqlens=cu, window_size=window, scale=None)


def select_args(dtype=torch.bfloat16, d=D, ks=KS, stride=STRIDE, bs=BS, topk=TOPK, init=INIT, local=LOCAL,
                seed=0, scale=None):
    """select_blocks's arguments, lse_cmp from the cmp reference."""
    a = cmp_args(dtype, d=d, ks=ks, stride=stride, seed=seed)
    _, lse, _ = cmp_attention_reference(a["q"], a["k_cmp"], a.pop("v_cmp"), a["cu_seqlens"], a["cu_seqlens_cmp"],
                                        ks, stride, scale)
    a.update(lse_cmp=lse.float(), block_size=bs, topk=topk, init_blocks=init, local_blocks=local, scale=scale)
    return a


ARGS = {"cmp": cmp_args, "swa": swa_args, "sel": select_args}
FUNCS = {"cmp": compressed_attention, "swa": sliding_window_attention, "sel": select_blocks}
CHECKS = {"cmp": check_cmp_inputs, "swa": check_swa_inputs, "sel": check_select_inputs}
KV = {"cmp": ("k_cmp", "v_cmp"), "swa": ("k", "v")}


def _dense_op_args(branch, a):
    """dense_fwd's positional arguments from a cmp_args / swa_args dict (scale 0.3)."""
    if branch == "cmp":
        return (a["q"], a["k_cmp"], a["v_cmp"], a["cu_seqlens"], a["cu_seqlens_cmp"], "cmp", a["kernel_size"],
                a["stride"], 0.3)
    return (a["q"], a["k"], a["v"], a["cu_seqlens"], a["cu_seqlens"], "swa", a["window_size"], 0, 0.3)


def _select_op_args(a):
    """select_topk's positional arguments from a select_args dict made with scale=0.3 (lse_cmp's scale)."""
    assert a["scale"] == 0.3
    return (a["q"], a["k_cmp"], a["lse_cmp"], a["cu_seqlens"], a["cu_seqlens_cmp"], a["kernel_size"], a["stride"],
            a["block_size"], a["topk"], a["init_blocks"], a["local_blocks"], 0.3)


@contextlib.contextmanager
def _abstract(kind):
    """Yields a converter of real tensors into fake ("fake", under FakeTensorMode) or meta ones."""
    if kind == "meta":
        yield lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t
    else:
        with FakeTensorMode() as mode:
            yield lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t


def _device(kind):
    return torch.device("meta" if kind == "meta" else "cpu")


# --------------------------------------------------------------------------- fake / meta


@pytest.mark.parametrize("kind", ["fake", "meta"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("branch", ["cmp", "swa"])
def test_dense_ops_abstract_shapes(branch, dtype, kind):
    real = _dense_op_args(branch, ARGS[branch](dtype))
    q, k, v = real[:3]
    with _abstract(kind) as conv:
        args = [conv(t) for t in real]
        o, lse = torch.ops.fsagen.dense_fwd(*args)
        grads = torch.ops.fsagen.dense_bwd(o, *args[:3], o, lse, *args[3:])
    assert o.shape == (q.shape[0], q.shape[1], v.shape[2]) and o.dtype == dtype
    assert lse.shape == q.shape[:2] and lse.dtype == torch.float32
    for t in (o, lse) + tuple(grads):
        assert t.device == _device(kind)
    for g, t in zip(grads, (q, k, v)):
        assert g.shape == t.shape and g.dtype == t.dtype


@pytest.mark.parametrize("kind", ["fake", "meta"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_select_topk_abstract_shape(dtype, kind):
    a = select_args(dtype, scale=0.3)
    with _abstract(kind) as conv:
        idx = torch.ops.fsagen.select_topk(*(conv(t) for t in _select_op_args(a)))
    assert idx.shape == (HKV, a["q"].shape[0], TOPK) and idx.dtype == torch.int32
    assert idx.device == _device(kind)


@pytest.mark.parametrize("kind", ["fake", "meta"])
@pytest.mark.parametrize("target", ["cmp", "swa", "sel"])
def test_public_functions_on_abstract_tensors_skip_value_checks(target, kind):
    a = ARGS[target]()
    n = a["q"].shape[0]
    a["cu_seqlens"] = a["cu_seqlens"].clone()
    a["cu_seqlens"][-1] = n - 1  # a bad value: not readable (and not read) on fake / meta tensors
    with _abstract(kind) as conv:
        out = FUNCS[target](**{name: conv(t) for name, t in a.items()})
    if target == "sel":
        assert out.shape == (HKV, n, TOPK) and out.dtype == torch.int32
    else:
        assert out.shape == a["q"].shape and out.dtype == a["q"].dtype
    assert out.device == _device(kind)


# --------------------------------------------------------------------------- autograd through the stubs

# target, edits of the default arguments (GQA / MHA, default and explicit scale, window / kernel)
GRAD_CASES = [
    ("cmp", {}),
    ("cmp", dict(hq=6, hkv=1, ks=4, stride=4)),
    ("swa", {}),
    ("swa", dict(hq=4, hkv=4, window=1)),
]


@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("target,edits", GRAD_CASES, ids=["cmp", "cmp_g6_ks4", "swa", "swa_mha_w1"])
def test_autograd_matches_reference(stub_glue, target, edits, scale):
    a = ARGS[target](**edits)
    a["scale"] = scale
    kn, vn = KV[target]
    inputs = {name: a[name] for name in ("q", kn, vn)}
    for name, t in inputs.items():
        a[name] = t.clone().requires_grad_()
    o, lse = FUNCS[target](**a, return_lse=True)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(o.dtype)
    o.backward(do)

    arg_a, arg_b = (a["kernel_size"], a["stride"]) if target == "cmp" else (a["window_size"], 0)
    used = 1 / math.sqrt(a["q"].shape[-1]) if scale is None else scale
    assert stub_glue == [(p, target, arg_a, arg_b, pytest.approx(used)) for p in ("fwd", "bwd")]

    leaves = [t.detach().double().requires_grad_() for t in inputs.values()]
    cu_k = a["cu_seqlens_cmp"] if target == "cmp" else a["cu_seqlens"]
    o64, lse64 = _dense_reference(target, *leaves, a["cu_seqlens"], cu_k, arg_a, arg_b, used)
    ref_grads = torch.autograd.grad(o64, leaves, do.double())
    assert o.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert rel_err(o, o64) < 1e-2 and rel_err(lse, lse64) < 1e-6
    for name, ref in zip(inputs, ref_grads):
        grad = a[name].grad
        assert grad.dtype == torch.bfloat16 and grad.shape == a[name].shape
        assert rel_err(grad, ref) < 1e-2, name


@pytest.mark.parametrize("target", ["cmp", "swa"])
def test_lse_is_not_differentiable(stub_glue, target):
    a = ARGS[target]()
    names = ("q",) + KV[target]
    for name in names:
        a[name].requires_grad_()
    o, lse = FUNCS[target](**a, return_lse=True)
    assert o.requires_grad and not lse.requires_grad and lse.grad_fn is None
    with pytest.raises(RuntimeError):
        lse.sum().backward()
    (o.float().sum() + lse.nan_to_num().sum()).backward()  # lse adds nothing to the gradients
    assert all(a[name].grad is not None for name in names)


@pytest.mark.parametrize("target", ["cmp", "swa", "sel"])
def test_non_contiguous_inputs_are_copied(stub_glue, target):
    a = ARGS[target]()
    out = FUNCS[target](**a)
    a["q"] = a["q"].transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    assert not a["q"].is_contiguous()
    assert torch.equal(FUNCS[target](**a), out)


# --------------------------------------------------------------------------- selection through the stub

SEL_CONFIGS = [  # kernel_size, stride, block_size, topk, init_blocks, local_blocks
    (8, 4, 8, 5, 1, 2),
    (8, 8, 16, 3, 0, 1),
    (4, 2, 8, 4, 2, 0),
    (16, 8, 16, 2, 1, 1),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("config", SEL_CONFIGS, ids=[f"ks{c[0]}_s{c[1]}_bs{c[2]}_k{c[3]}_i{c[4]}_l{c[5]}"
                                                     for c in SEL_CONFIGS])
def test_select_blocks_equals_reference(stub_glue, config, seed):
    ks, stride, bs, topk, init, local = config
    scale = 0.2 if seed else None
    a = select_args(ks=ks, stride=stride, bs=bs, topk=topk, init=init, local=local, seed=seed, scale=scale)
    idx = select_blocks(**a)
    _, _, p = cmp_attention_reference(a["q"], a["k_cmp"], a["k_cmp"], a["cu_seqlens"], a["cu_seqlens_cmp"], ks,
                                      stride, scale)
    ref = select_blocks_reference(p, a["cu_seqlens"], HKV, ks, stride, bs, topk, init, local)
    assert idx.dtype == torch.int32 and idx.shape == (HKV, a["q"].shape[0], topk)
    assert torch.equal(idx, ref)
    used = D ** -0.5 if scale is None else scale
    assert stub_glue == [("sel", ks, stride, bs, topk, init, local, pytest.approx(used))]


# --------------------------------------------------------------------------- opcheck, torch.compile


@pytest.mark.parametrize("branch", ["cmp", "swa"])
def test_opcheck_dense(stub_glue, branch):
    args = list(_dense_op_args(branch, ARGS[branch]()))
    args[:3] = [t.requires_grad_() for t in args[:3]]
    torch.library.opcheck(torch.ops.fsagen.dense_fwd.default, tuple(args))
    o, lse = torch.ops.fsagen.dense_fwd(*args)
    q, k, v = (t.detach() for t in args[:3])
    bwd_args = (torch.randn_like(o), q, k, v, o.detach(), lse, *args[3:])
    torch.library.opcheck(torch.ops.fsagen.dense_bwd.default, bwd_args)


def test_opcheck_select_topk(stub_glue):
    torch.library.opcheck(torch.ops.fsagen.select_topk.default, _select_op_args(select_args(scale=0.3)))


def test_torch_compile_fullgraph_matches_eager(stub_glue):
    """cmp -> selection -> swa in one graph: no graph break from validation or the ops (aot_eager:
    no C++ compiler needed); outputs and gradients as in eager mode."""
    c, s = cmp_args(), swa_args()
    cu, cu_cmp = c["cu_seqlens"], c["cu_seqlens_cmp"]

    def f(q, k_cmp, v_cmp, k, v):
        o_cmp, lse = compressed_attention(q, k_cmp, v_cmp, cu, cu_cmp, KS, STRIDE, return_lse=True,
                                          check_values=False)
        idx = select_blocks(q, k_cmp, lse, cu, cu_cmp, KS, STRIDE, BS, TOPK, INIT, LOCAL, check_values=False)
        o_swa = sliding_window_attention(q, k, v, cu, WINDOW, 0.25, check_values=False)
        return (o_cmp.float() * o_swa.float()).sum() + o_swa.float().sum(), idx

    inputs = (c["q"], c["k_cmp"], c["v_cmp"], s["k"], s["v"])
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (compiled, f):
        leaves = [t.clone().requires_grad_() for t in inputs]
        loss, idx = fn(*leaves)
        loss.backward()
        results.append((loss.detach(), idx, [t.grad for t in leaves]))
    (loss_c, idx_c, grads_c), (loss_e, idx_e, grads_e) = results
    assert torch.equal(loss_c, loss_e) and torch.equal(idx_c, idx_e)
    assert idx_c.shape == (HKV, int(cu[-1]), TOPK) and (idx_c >= 0).any()
    for gc, ge in zip(grads_c, grads_e):
        assert gc is not None and torch.equal(gc, ge)


# --------------------------------------------------------------------------- bad inputs


def _with(name, index, value):
    """Edit: a copy of argument ``name`` with ``[index] = value``."""
    def edit(a):
        t = a[name].clone()
        t[index] = value
        return {name: t}
    return edit


def _map(name, fn):
    """Edit: argument ``name`` replaced by ``fn(old value)``."""
    return lambda a: {name: fn(a[name])}


def _const(name, value):
    return lambda a: {name: value}


def _extra_row(t):
    return torch.cat([t, t[:1]])


def _cases(target):
    """``{case: (edit, error type, argument named first in the message)}`` for one public function."""
    kn, vn = KV.get(target, ("k_cmp", None))
    n = sum(LENGTHS)
    c = {
        "q_fp32": (_map("q", lambda t: t.float()), TypeError, "q"),
        "q_not_tensor": (_map("q", lambda t: t.tolist()), TypeError, "q"),
        f"{kn}_fp16": (_map(kn, lambda t: t.half()), TypeError, kn),
        "cu_int64": (_map("cu_seqlens", lambda t: t.long()), TypeError, "cu_seqlens"),
        f"{kn}_on_meta": (_map(kn, lambda t: t.to("meta")), ValueError, kn),
        "q_on_meta": (_map("q", lambda t: t.to("meta")), ValueError, kn),
        "cu_on_meta": (_map("cu_seqlens", lambda t: t.to("meta")), ValueError, "cu_seqlens"),
        "q_2d": (_map("q", lambda t: t[:, 0]), ValueError, "q"),
        f"{kn}_4d": (_map(kn, lambda t: t[None]), ValueError, kn),
        "cu_2d": (_map("cu_seqlens", lambda t: t[None]), ValueError, "cu_seqlens"),
        "cu_one_entry": (_map("cu_seqlens", lambda t: t[:1]), ValueError, "cu_seqlens"),
        "hq_not_multiple_of_hkv": (_map(kn, lambda t: t[:, :1].expand(-1, 3, -1)), ValueError, kn),
        f"{kn}_head_dim": (_map(kn, lambda t: t[..., :8]), ValueError, kn),
        "cu_not_from_zero": (_with("cu_seqlens", 0, 1), ValueError, "cu_seqlens"),
        "cu_decreasing": (_with("cu_seqlens", 2, 4), ValueError, "cu_seqlens"),  # [0, 5, 4, 75, 120]
        "cu_short_of_n": (_with("cu_seqlens", -1, n - 1), ValueError, "cu_seqlens"),
        "cu_past_n": (_with("cu_seqlens", -1, n + 1), ValueError, "cu_seqlens"),
        "scale_str": (_const("scale", "0.1"), TypeError, "scale"),
        "scale_nan": (_const("scale", float("nan")), ValueError, "scale"),
        "scale_zero": (_const("scale", 0.0), ValueError, "scale"),
        "scale_inf": (_const("scale", math.inf), ValueError, "scale"),
    }
    if vn is not None:
        c.update({
            f"{vn}_fp16": (_map(vn, lambda t: t.half()), TypeError, vn),
            f"{vn}_on_meta": (_map(vn, lambda t: t.to("meta")), ValueError, vn),
            f"{vn}_2d": (_map(vn, lambda t: t[:, 0]), ValueError, vn),
            f"{vn}_heads": (_map(vn, lambda t: t[:, :1]), ValueError, vn),
            f"{vn}_rows": (_map(vn, _extra_row), ValueError, vn),
            "dv_differs_from_d": (_map(vn, lambda t: t[..., :8]), ValueError, vn),
        })
    if target == "swa":
        c.update({
            "k_tokens": (lambda a: {"k": a["k"][:-1], "v": a["v"][:-1]}, ValueError, "k"),
            "window_zero": (_const("window_size", 0), ValueError, "window_size"),
            "window_float": (_const("window_size", 7.0), TypeError, "window_size"),
            "window_bool": (_const("window_size", True), TypeError, "window_size"),
            "window_none": (_const("window_size", None), TypeError, "window_size"),
        })
        return c
    c.update({
        "cu_cmp_int64": (_map("cu_seqlens_cmp", lambda t: t.long()), TypeError, "cu_seqlens_cmp"),
        "cu_cmp_on_meta": (_map("cu_seqlens_cmp", lambda t: t.to("meta")), ValueError, "cu_seqlens_cmp"),
        "cu_cmp_2d": (_map("cu_seqlens_cmp", lambda t: t[None]), ValueError, "cu_seqlens_cmp"),
        "cu_cmp_shorter": (_map("cu_seqlens_cmp", lambda t: t[:-1]), ValueError, "cu_seqlens_cmp"),
        "cu_cmp_longer": (_map("cu_seqlens_cmp", lambda t: torch.cat([t, t[-1:]])), ValueError, "cu_seqlens_cmp"),
        "cu_cmp_values": (_with("cu_seqlens_cmp", 2, 17), ValueError, "cu_seqlens_cmp"),  # seq 1 has 16
        "cu_cmp_last": (_with("cu_seqlens_cmp", -1, 25), ValueError, "cu_seqlens_cmp"),
        "k_cmp_rows": (lambda a: {name: _extra_row(a[name]) for name in ("k_cmp", "v_cmp") if name in a},
                       ValueError, "k_cmp"),
        "kernel_not_multiple_of_stride": (_const("kernel_size", 6), ValueError, "kernel_size"),
        "kernel_zero": (_const("kernel_size", 0), ValueError, "kernel_size"),
        "kernel_float": (_const("kernel_size", 8.0), TypeError, "kernel_size"),
        "kernel_bool": (_const("kernel_size", True), TypeError, "kernel_size"),
        "stride_zero": (_const("stride", 0), ValueError, "stride"),
        "stride_str": (_const("stride", "4"), TypeError, "stride"),
        "stride_negative": (_const("stride", -4), ValueError, "stride"),
    })
    if target == "cmp":
        return c
    c.update({
        "lse_bf16": (_map("lse_cmp", lambda t: t.bfloat16()), TypeError, "lse_cmp"),
        "lse_fp64": (_map("lse_cmp", lambda t: t.double()), TypeError, "lse_cmp"),
        "lse_not_tensor": (_map("lse_cmp", lambda t: t.tolist()), TypeError, "lse_cmp"),
        "lse_on_meta": (_map("lse_cmp", lambda t: t.to("meta")), ValueError, "lse_cmp"),
        "lse_heads": (_map("lse_cmp", lambda t: t[:, :1]), ValueError, "lse_cmp"),
        "lse_1d": (_map("lse_cmp", lambda t: t[:, 0]), ValueError, "lse_cmp"),
        "lse_tokens": (_map("lse_cmp", lambda t: t[:-1]), ValueError, "lse_cmp"),
        "block_not_multiple_of_stride": (_const("block_size", 6), ValueError, "block_size"),
        "block_zero": (_const("block_size", 0), ValueError, "block_size"),
        "block_float": (_const("block_size", 8.0), TypeError, "block_size"),
        "topk_zero": (_const("topk", 0), ValueError, "topk"),
        "topk_float": (_const("topk", 5.0), TypeError, "topk"),
        "topk_below_forced": (_const("topk", INIT + LOCAL - 1), ValueError, "topk"),
        "init_negative": (_const("init_blocks", -1), ValueError, "init_blocks"),
        "init_float": (_const("init_blocks", 1.0), TypeError, "init_blocks"),
        "local_negative": (_const("local_blocks", -1), ValueError, "local_blocks"),
        "local_none": (_const("local_blocks", None), TypeError, "local_blocks"),
    })
    return c


BAD = {f"{t}-{case}": (t,) + spec for t in FUNCS for case, spec in _cases(t).items()}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_names_argument(stub_glue, case):
    target, edit, kind, arg = BAD[case]
    a = ARGS[target]()
    a.update(edit(a))
    with pytest.raises(kind, match=rf"^{arg}: "):
        FUNCS[target](**a)
    assert stub_glue == []


@pytest.mark.parametrize("target", ["cmp", "swa", "sel"])
def test_value_checks_can_be_skipped(stub_glue, target):
    a = ARGS[target]()
    a.update(_with("cu_seqlens", 0, 1)(a))  # bad values, but shapes and dtypes are fine
    CHECKS[target](**a, check_values=False)
    with pytest.raises(ValueError, match="^cu_seqlens: must start at 0"):
        FUNCS[target](**a, check_values=False)
    assert len(stub_glue) == 1  # the op ran: the error is the stub's reference refusing the offsets


def test_values_are_checked_when_inputs_require_grad(stub_glue):
    a = cmp_args()
    a["q"].requires_grad_()
    a.update(_with("cu_seqlens_cmp", 1, 1)(a))
    with pytest.raises(ValueError, match="^cu_seqlens_cmp: "):
        compressed_attention(**a)


# --------------------------------------------------------------------------- schedule support (sm90)

SM90_ARGS = {  # NSA-like sizes, so that nothing but the head dim can be out of the schedule
    "cmp": lambda d: cmp_args(d=d, ks=32, stride=16, lengths=(40, 100)),
    "swa": lambda d: swa_args(d=d, window=64, lengths=(40, 100)),
    "sel": lambda d: select_args(d=d, ks=32, stride=16, bs=64, topk=4, init=1, local=2),
}


@pytest.mark.parametrize("target", ["cmp", "swa", "sel"])
def test_sm90_rejects_unsupported_head_dim(target):
    from fsagen.errors import UnsupportedSpec

    a = SM90_ARGS[target](96)
    phases = {} if target == "sel" else {"phases": ("fwd", "bwd")}
    with pytest.raises(UnsupportedSpec, match=r"\bD=96\b"):
        CHECKS[target](**a, arch="sm90", **phases)
    CHECKS[target](**a)  # CPU, no arch given: the schedule is not asked


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("target", ["cmp", "swa", "sel"])
def test_sm90_accepts_supported_head_dim(target, d):
    phases = {} if target == "sel" else {"phases": ("fwd", "bwd")}
    CHECKS[target](**SM90_ARGS[target](d), arch="sm90", **phases)


def test_sm90_takes_integral_non_int_sizes():
    """numpy ints pass check_int, so the selection spec built for the schedule must take them too."""
    np = pytest.importorskip("numpy")
    a = SM90_ARGS["sel"](64)
    for name in ("kernel_size", "stride", "block_size", "topk", "init_blocks", "local_blocks"):
        a[name] = np.int64(a[name])
    check_select_inputs(**a, arch="sm90")
