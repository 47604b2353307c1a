"""The compression op layer on a CPU: ``fsagen::compress_pool`` / ``compress_pool_bwd`` fake impls,
autograd wiring, opcheck, and ``fsagen.compress``'s dispatch to them and its sync-free mode.

A stub module in place of the real glue (``fsagen.pooling``) computes the same pooling with
``fsagen.compression``'s torch path; what is checked is the op layer, not the kernels
(tests/gpu/test_compress_gpu.py checks those on the GPU, tests/test_cpu_kernels.py on the CPU).
"""

import sys
import types
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fsagen import compression, ops_compress  # noqa: F401  (registers torch.ops.fsagen.compress_pool*)
from fsagen.compression import compress
from fsagen.reference_cmp import compress_reference
from fsagen.testing import rel_err
from fsagen.validate_dense import expected_cu_seqlens_cmp

CALLS = []
KS, S, HKV, D = 8, 4, 2, 16


def _stub_forward(k, v, weight, cu, cu_cmp, nc, kernel_size, stride):
    CALLS.append("fwd")
    pool = (cu, cu_cmp, nc, kernel_size, stride, "weighted", weight, None, None)
    return compression._pool_torch(k, *pool), compression._pool_torch(v, *pool)


def _stub_backward(dk_cmp, dv_cmp, k, v, weight, cu, cu_cmp, kernel_size, stride, weight_grad):
    CALLS.append(("bwd", weight_grad))

    def grads():
        leaves = [t.detach().requires_grad_() for t in (k, v, weight)]
        outs = _stub_forward(*leaves, cu, cu_cmp, dk_cmp.shape[0], kernel_size, stride)
        return torch.autograd.grad(outs, leaves, (dk_cmp, dv_cmp))

    # Inside a custom op the autograd dispatch key is excluded for this thread; a fresh thread
    # has a clean dispatch state (as in test_ops_fake.py).
    with ThreadPoolExecutor(1) as pool:
        dk, dv, dw = pool.submit(grads).result()
    return dk, dv, dw if weight_grad else torch.zeros_like(weight)


@pytest.fixture
def stub_glue(monkeypatch):
    """The stub in place of the GPU glue, and compress routed to the op as on a GPU."""
    mod = types.ModuleType("fsagen.pooling")
    mod.forward, mod.backward = _stub_forward, _stub_backward
    monkeypatch.setitem(sys.modules, "fsagen.pooling", mod)
    monkeypatch.setattr(compression, "_kernel_runs", lambda k, v, kind, ks, s: kind != "linear")
    CALLS.clear()
    return CALLS


def _inputs(dtype=torch.bfloat16, seed=0, lengths=(0, KS - 1, KS, 3 * KS + 1, 1, 2 * KS + S // 2)):
    gen = torch.Generator().manual_seed(seed)
    cu = torch.tensor((0,) + tuple(lengths)).cumsum(0).to(torch.int32)
    n = int(cu[-1])
    k = torch.randn(n, HKV, D, generator=gen).to(dtype)
    v = torch.randn(n, HKV, D, generator=gen).to(dtype)
    weight = torch.randn(HKV, KS, generator=gen) * KS**-0.5
    return k, v, weight, cu


def _op_args(k, v, weight, cu):
    cu_cmp = expected_cu_seqlens_cmp(cu, KS, S)
    return k, v, weight, cu, cu_cmp, int(cu_cmp[-1]), KS, S


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fake_forward_and_backward_shapes(dtype):
    k, v, weight, cu = _inputs(dtype)
    args = _op_args(k, v, weight, cu)
    nc = args[5]
    with FakeTensorMode() as mode:
        fk, fv, fw, fcu, fcc = (mode.from_tensor(t) for t in args[:5])
        kc, vc = torch.ops.fsagen.compress_pool(fk, fv, fw, fcu, fcc, nc, KS, S)
        dk, dv, dw = torch.ops.fsagen.compress_pool_bwd(kc, vc, fk, fv, fw, fcu, fcc, KS, S, True)
    for out, x in ((kc, k), (vc, v)):
        assert out.shape == (nc, HKV, D) and out.dtype == dtype and out.device == x.device
    for g, x in ((dk, k), (dv, v)):
        assert g.shape == x.shape and g.dtype == x.dtype
    assert dw.shape == (HKV, KS) and dw.dtype == torch.float32


def test_meta_tensors_use_fake_impl():
    k, v, weight, cu = (t.to("meta") for t in _inputs())
    cu_cmp = torch.empty_like(cu)
    kc, vc = torch.ops.fsagen.compress_pool(k, v, weight, cu, cu_cmp, 7, KS, S)
    assert kc.device.type == "meta" and kc.shape == (7, HKV, D) and vc.shape == (7, HKV, D)


def test_autograd_registration_present():
    from torch._library.custom_ops import OPDEFS

    assert OPDEFS["fsagen::compress_pool"]._backward_fn is not None
    schema = str(torch.ops.fsagen.compress_pool_bwd.default._schema)
    assert "weight_grad" in schema and "kernel_size" in schema


def test_opcheck_with_stub(stub_glue):
    k, v, weight, cu = _inputs(torch.float32)
    k, v, weight = (t.requires_grad_() for t in (k, v, weight))
    args = _op_args(k, v, weight, cu)
    torch.library.opcheck(torch.ops.fsagen.compress_pool.default, args)
    kc, vc = torch.ops.fsagen.compress_pool(*args)
    bwd_args = (torch.randn_like(kc), torch.randn_like(vc), *(t.detach() for t in args[:3]), *args[3:5], KS, S, True)
    torch.library.opcheck(torch.ops.fsagen.compress_pool_bwd.default, bwd_args)


@pytest.mark.parametrize("kind", ["mean", "weighted"])
def test_compress_runs_the_op_and_its_backward(stub_glue, kind):
    """compress -> fsagen::compress_pool (float32 weights; 1/ks for mean) -> autograd: values and
    gradients of k, v and weight (in weight's own dtype) against the float64 reference."""
    k, v, weight, cu = _inputs(torch.float32)
    params = {"weight": weight.to(torch.bfloat16).requires_grad_()} if kind == "weighted" else {}
    k, v = k.requires_grad_(), v.requires_grad_()
    kc, vc, cu_cmp = compress(k, v, cu, KS, S, kind, **params)
    assert stub_glue == ["fwd"]
    ref = {"k": k.detach().double().requires_grad_(), "v": v.detach().double().requires_grad_()}
    ref.update({n: t.detach().double().requires_grad_() for n, t in params.items()})
    rk, rv, rcu = compress_reference(ref["k"], ref["v"], cu, KS, S, kind, **{n: ref[n] for n in params})
    assert torch.equal(cu_cmp, rcu) and rel_err(kc, rk) < 1e-5 and rel_err(vc, rv) < 1e-5
    gk, gv = torch.randn_like(kc), torch.randn_like(vc)
    leaves = [k, v, *params.values()]
    grads = torch.autograd.grad((kc, vc), leaves, (gk, gv))
    ref_grads = torch.autograd.grad((rk, rv), list(ref.values()), (gk.double(), gv.double()))
    assert stub_glue[1] == ("bwd", kind == "weighted")
    for g, rg, leaf in zip(grads, ref_grads, leaves):
        assert g.dtype == leaf.dtype and rel_err(g, rg) < (1e-2 if leaf.dtype == torch.bfloat16 else 1e-5)


def test_linear_stays_in_torch(stub_glue):
    k, v, _, cu = _inputs(torch.float32)
    proj = torch.randn(HKV, KS * D, D) * (KS * D) ** -0.5
    compress(k, v, cu, KS, S, "linear", proj_k=proj, proj_v=proj)
    assert stub_glue == []


def test_kernels_on_cpu_where_the_cpu_schedule_covers_the_shape():
    """CPU tensors take the kernels (the cpu schedule) for the shapes it supports: D = 16 and
    kernel_size = 8 it does not; float32 and linear never run them."""
    k, v, _, _ = _inputs()
    assert not compression._kernel_runs(k, v, "mean", KS, S)
    k32, v32 = (torch.zeros(4, HKV, 32, dtype=torch.bfloat16) for _ in range(2))
    assert compression._kernel_runs(k32, v32, "mean", 32, 16)
    assert compression._kernel_runs(k32.half(), v32.half(), "weighted", 64, 32)
    assert not compression._kernel_runs(k32.float(), v32.float(), "mean", 32, 16)
    assert not compression._kernel_runs(k32, v32, "linear", 32, 16)
    assert not compression._kernel_runs(k32, v32[..., :16], "mean", 32, 16)  # Dv != D


# --------------------------------------------------------------------------- num_compressed / check_values


@pytest.mark.parametrize("kind", ["mean", "linear"])
def test_num_compressed_gives_the_same_result(kind):
    k, v, _, cu = _inputs(torch.float32)
    params = {"proj_k": torch.randn(HKV, KS * D, D), "proj_v": torch.randn(HKV, KS * D, D)} if kind == "linear" else {}
    want = compress(k, v, cu, KS, S, kind, **params)
    nc = want[0].shape[0]
    for check in (True, False):
        got = compress(k, v, cu, KS, S, kind, num_compressed=nc, check_values=check, **params)
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def test_wrong_num_compressed_is_an_error():
    k, v, _, cu = _inputs(torch.float32)
    nc = int(expected_cu_seqlens_cmp(cu, KS, S)[-1])
    with pytest.raises(ValueError, match=rf"^num_compressed: must be the number of compressed tokens of cu_seqlens "
                                         rf"\({nc}\), got {nc + 1}"):
        compress(k, v, cu, KS, S, num_compressed=nc + 1)
    with pytest.raises(ValueError, match=r"^num_compressed: must be >= 0"):
        compress(k, v, cu, KS, S, num_compressed=-1, check_values=False)
    with pytest.raises(TypeError, match=r"^num_compressed: must be an int"):
        compress(k, v, cu, KS, S, num_compressed=3.0)
    with pytest.raises(ValueError, match=r"^cu_seqlens: must start at 0"):  # the value checks still run
        compress(k, v, torch.tensor([1, int(cu[-1])], dtype=torch.int32), KS, S, num_compressed=nc)


@pytest.mark.parametrize("kind", ["mean", "weighted", "linear"])
def test_torch_compile_fullgraph_without_host_reads(kind):
    """With num_compressed, compress traces into one graph (no host read, no graph break)."""
    k, v, weight, cu = _inputs(torch.float32)
    proj = torch.randn(HKV, KS * D, D) * (KS * D) ** -0.5
    params = {"weighted": {"weight": weight}, "linear": {"proj_k": proj, "proj_v": proj}}.get(kind, {})
    nc = int(expected_cu_seqlens_cmp(cu, KS, S)[-1])

    def f(k, v):
        kc, vc, _ = compress(k, v, cu, KS, S, kind, num_compressed=nc, **params)
        return kc.sum() + vc.square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(k, v), f(k, v))
