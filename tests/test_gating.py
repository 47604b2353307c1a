"""fsagen.gating.gate_sum without compiling: its argument checks, the torch path it takes when the
kernels do not apply (float32 gates give a float32 sum), and its ops on fake tensors. The kernels
themselves: tests/test_cpu_kernels.py (CPU) and tests/gpu/test_nsa_gpu.py (H100)."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fsagen import gating

N, HQ, D = 5, 4, 8


def _outs(dtype=torch.bfloat16, shape=(N, HQ, D)):
    return [torch.randn(shape).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("change,arg,message", [
    (lambda o, g: ([o[0].tolist(), o[1], o[2]], g), "o_cmp", "must be a torch.Tensor"),
    (lambda o, g: ([o[0], o[1].to(torch.int32), o[2]], g), "o_slc", "dtype must be floating point"),
    (lambda o, g: ([o[0], o[1], o[2][:, :2]], g), "o_swa", r"shape must equal o_cmp's \(5, 4, 8\)"),
    (lambda o, g: ([o[0], o[1].half(), o[2]], g), "o_slc", "dtype must equal o_cmp's torch.bfloat16"),
    (lambda o, g: ([o[0][0], o[1][0], o[2][0]], g), "o_cmp", r"must be 3-D \[N, Hq, D\]"),
    (lambda o, g: ([o[0], o[1], o[2].to("meta")], g), "o_swa", "must be on o_cmp's device cpu"),
    (lambda o, g: (o, g.to(torch.int64)), "gates", "dtype must be floating point"),
    (lambda o, g: (o, g[:, :2]), "gates", r"shape must be \[N=5, Hq=4, 3\] or \[N=5, 3\]"),
    (lambda o, g: (o, g[:, 0, :2]), "gates", r"shape must be \[N=5, Hq=4, 3\] or \[N=5, 3\]"),
    (lambda o, g: (o, g.to("meta")), "gates", "must be on o_cmp's device cpu"),
])
def test_bad_inputs_name_the_argument(change, arg, message):
    outs, gates = change(_outs(), torch.rand(N, HQ, 3).to(torch.bfloat16))
    with pytest.raises((TypeError, ValueError), match=f"^{arg}: {message}"):
        gating.gate_sum(*outs, gates)


@pytest.mark.parametrize("per_token", [False, True])
def test_float32_gates_take_the_torch_path(per_token, monkeypatch):
    """Gates of another dtype than the outputs: the sum is formed in the gates' dtype, in torch."""
    monkeypatch.setattr(gating, "forward", lambda *a: pytest.fail("the kernels ran"))
    outs = [t.requires_grad_() for t in _outs()]
    gates = torch.rand((N, 3) if per_token else (N, HQ, 3), requires_grad=True)
    o = gating.gate_sum(*outs, gates)
    g = (gates if gates.dim() == 3 else gates[:, None, :]).unsqueeze(-1)
    want = sum(g[:, :, b] * outs[b].float() for b in range(3))
    assert o.dtype == torch.float32 and torch.allclose(o, want)
    grads = torch.autograd.grad(o.sum(), (*outs, gates))
    assert all(t is not None for t in grads)


def test_kernel_choice():
    """bf16 / fp16 outputs with gates of their dtype and a head dim the (cpu) schedule covers."""
    outs = _outs(shape=(N, HQ, 32))
    assert gating._kernel_runs(outs[0], torch.rand(N, HQ, 3).to(torch.bfloat16))
    assert not gating._kernel_runs(outs[0], torch.rand(N, HQ, 3))  # float32 gates
    assert not gating._kernel_runs(_outs(torch.float32)[0], torch.rand(N, HQ, 3))
    assert not gating._kernel_runs(_outs()[0], torch.rand(N, HQ, 3).to(torch.bfloat16))  # D = 8


@pytest.mark.parametrize("gate_shape", [(N, HQ, 3), (N, 3)])
def test_ops_on_fake_tensors(gate_shape):
    from fsagen import ops_gate  # noqa: F401

    with FakeTensorMode():
        outs = [torch.empty(N, HQ, D, dtype=torch.float16) for _ in range(3)]
        gates = torch.empty(gate_shape, dtype=torch.float16)
        o = torch.ops.fsagen.gate_sum(*outs, gates)
        grads = torch.ops.fsagen.gate_sum_bwd(torch.empty_like(o), *outs, gates)
    assert o.shape == (N, HQ, D) and o.dtype == torch.float16
    assert [tuple(t.shape) for t in grads] == [(N, HQ, D)] * 3 + [gate_shape]
