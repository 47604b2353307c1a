"""The custom ops' registration on a CPU: fake impls, autograd wiring, opcheck, torch.compile.

The real glue (``fsagen.slc``) needs a GPU, so these tests put a float64-reference-backed stub
module in its place; what is checked is the op layer, not the kernels.
"""

import sys
import types
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fsagen
from fsagen import ops  # noqa: F401  (registers torch.ops.fsagen.*)
from fsagen.reference import slc_reference
from fsagen.testing import random_cu_seqlens, random_topk_idx, rel_err

CALLS = []


def _stub_forward(q, k, v, topk_idx, cu_seqlens, block_size, scale, loop_order=None):
    CALLS.append(("fwd", loop_order))
    o, lse = slc_reference(q, k, v, topk_idx, cu_seqlens, block_size, scale)
    return o.to(q.dtype), lse.float()


def _stub_backward(do, q, k, v, o, lse, topk_idx, cu_seqlens, block_size, scale, loop_order=None):
    CALLS.append(("bwd", loop_order))

    def grads():
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        o64, _ = slc_reference(*leaves, topk_idx, cu_seqlens, block_size, scale)
        return torch.autograd.grad(o64, leaves, do.double())

    # Inside a custom op the autograd dispatch key is excluded for this thread; a fresh thread
    # has a clean dispatch state, so the reference can be differentiated there.
    with ThreadPoolExecutor(1) as pool:
        dq, dk, dv = pool.submit(grads).result()
    return tuple(g.to(t.dtype) for g, t in zip((dq, dk, dv), (q, k, v)))


@pytest.fixture
def stub_glue(monkeypatch):
    mod = types.ModuleType("fsagen.slc")
    mod.slc_forward, mod.slc_backward = _stub_forward, _stub_backward
    monkeypatch.setitem(sys.modules, "fsagen.slc", mod)
    CALLS.clear()
    return CALLS


def _inputs(n=40, hq=4, hkv=2, d=8, bs=8, topk=3, dtype=torch.bfloat16, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    cu = random_cu_seqlens(n, 2, block_size=bs, generator=gen)
    idx = random_topk_idx(cu, hkv, topk, bs, init_blocks=1, local_blocks=1, generator=gen)
    q = torch.randn(n, hq, d, generator=gen).to(dtype)
    k = torch.randn(n, hkv, d, generator=gen).to(dtype)
    v = torch.randn(n, hkv, d, generator=gen).to(dtype)
    return [t.to(device) for t in (q, k, v, idx, cu)] + [bs]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fake_forward_and_backward_shapes(dtype):
    q, k, v, idx, cu, bs = _inputs(dtype=dtype)
    with FakeTensorMode() as mode:
        fq, fk, fv, fidx, fcu = (mode.from_tensor(t) for t in (q, k, v, idx, cu))
        o, lse = torch.ops.fsagen.slc_fwd(fq, fk, fv, fidx, fcu, bs, 0.5, "auto")
        dq, dk, dv = torch.ops.fsagen.slc_bwd(o, fq, fk, fv, o, lse, fidx, fcu, bs, 0.5, "kv_outer")
    assert o.shape == (q.shape[0], q.shape[1], v.shape[2]) and o.dtype == dtype and o.device == q.device
    assert lse.shape == q.shape[:2] and lse.dtype == torch.float32
    for g, t in zip((dq, dk, dv), (q, k, v)):
        assert g.shape == t.shape and g.dtype == t.dtype and g.device == t.device


def test_meta_tensors_use_fake_impl():
    q, k, v, idx, cu, bs = (t.to("meta") if isinstance(t, torch.Tensor) else t for t in _inputs())
    o, lse = torch.ops.fsagen.slc_fwd(q, k, v, idx, cu, bs, 0.5, "q_outer")
    assert o.device.type == "meta" and o.shape == q.shape and lse.dtype == torch.float32


def test_selected_attention_under_fake_mode_skips_value_checks():
    q, k, v, idx, cu, bs = _inputs()
    idx[0, 5, 0] = 999  # a bad value: not readable (and not read) under fake mode
    with FakeTensorMode() as mode:
        fq, fk, fv, fidx, fcu = (mode.from_tensor(t) for t in (q, k, v, idx, cu))
        o, lse = fsagen.selected_attention(fq, fk, fv, fidx, bs, fcu, return_lse=True)
    assert o.shape == q.shape and lse.shape == q.shape[:2]


def test_autograd_registration_present():
    from torch._library.custom_ops import OPDEFS

    assert "fsagen::slc_fwd" in OPDEFS and "fsagen::slc_bwd" in OPDEFS
    assert OPDEFS["fsagen::slc_fwd"]._backward_fn is not None
    schema = str(torch.ops.fsagen.slc_bwd.default._schema)
    assert "block_size" in schema and "loop_order" in schema


@pytest.mark.parametrize("loop_order", [None, "kv_outer", "q_outer"])
def test_selected_attention_forward_backward_through_stub(stub_glue, loop_order):
    q, k, v, idx, cu, bs = _inputs()
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    o, lse = fsagen.selected_attention(q, k, v, idx, bs, cu, return_lse=True, loop_order=loop_order)
    o.float().square().sum().backward()
    assert [c[0] for c in stub_glue] == ["fwd", "bwd"] and stub_glue[0][1] == loop_order
    assert not lse.requires_grad
    ref_o, _ = slc_reference(q.detach(), k.detach(), v.detach(), idx, cu, bs)
    assert rel_err(o, ref_o) < 1e-2
    assert all(t.grad is not None and t.grad.dtype == t.dtype for t in (q, k, v))


def test_non_contiguous_inputs_are_copied(stub_glue):
    q, k, v, idx, cu, bs = _inputs()
    qt = q.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    assert not qt.is_contiguous()
    o = fsagen.selected_attention(qt, k, v, idx, bs, cu)
    assert torch.equal(o, fsagen.selected_attention(q, k, v, idx, bs, cu))


def test_bad_loop_order():
    q, k, v, idx, cu, bs = _inputs()
    with pytest.raises(ValueError, match="loop_order"):
        fsagen.selected_attention(q, k, v, idx, bs, cu, loop_order="sideways")


def test_opcheck_with_stub(stub_glue):
    q, k, v, idx, cu, bs = _inputs()
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.fsagen.slc_fwd.default, (q, k, v, idx, cu, bs, 0.35, "auto"))
    o, lse = torch.ops.fsagen.slc_fwd(q, k, v, idx, cu, bs, 0.35, "auto")
    args = (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o.detach(), lse, idx, cu, bs, 0.35, "auto")
    torch.library.opcheck(torch.ops.fsagen.slc_bwd.default, args)


def test_torch_compile_fullgraph_with_stub(stub_glue):
    """No graph break from validation or the op (aot_eager: no C++ compiler needed)."""
    q, k, v, idx, cu, bs = _inputs()

    def f(q, k, v):
        return fsagen.selected_attention(q, k, v, idx, bs, cu).float().sum()

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    compiled(*leaves).backward()
    eager = [t.clone().requires_grad_() for t in (q, k, v)]
    f(*eager).backward()
    for a, b in zip(leaves, eager):
        assert torch.equal(a.grad, b.grad)
