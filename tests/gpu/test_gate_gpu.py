"""The gated sum's kernels on the GPU (fsagen.gating.gate_sum -> fsagen::gate_sum) against the
float64 sum and gradients, outputs NaN-poisoned (FSAGEN_POISON=1); bounds bf16 1e-2, fp16 2e-3.
Rows (3001 tokens x Hq) are not a multiple of the tile's."""
import time

import pytest
import torch

from fsagen import gating
from fsagen.testing import log_errors, rel_err

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
FIELDS = ("o", "d_cmp", "d_slc", "d_swa", "d_gates")


@pytest.mark.parametrize("per_token", [False, True], ids=["per-head", "per-token"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("hq", [4, 64])
def test_gate_sum(hq, D, dtype, per_token, monkeypatch):
    monkeypatch.setenv("FSAGEN_POISON", "1")
    calls = []
    for name in ("forward", "backward"):
        glue = getattr(gating, name)
        monkeypatch.setattr(gating, name, lambda *a, _g=glue, _n=name: calls.append(_n) or _g(*a))
    gen = torch.Generator(device="cuda").manual_seed(time.time_ns() % 2**31)
    n = 3001
    outs = [torch.randn(n, hq, D, device="cuda", generator=gen).to(dtype).requires_grad_() for _ in range(3)]
    gates = torch.rand((n, 3) if per_token else (n, hq, 3), device="cuda", generator=gen).to(dtype).requires_grad_()
    o = gating.gate_sum(*outs, gates)
    do = torch.randn(o.shape, device="cuda", generator=gen).to(dtype)
    grads = torch.autograd.grad(o, (*outs, gates), do)
    leaves = [t.detach().double().requires_grad_() for t in (*outs, gates)]
    g = (leaves[3] if not per_token else leaves[3][:, None, :]).unsqueeze(-1)
    ref = sum(g[:, :, b] * leaves[b] for b in range(3))
    rgrads = torch.autograd.grad(ref, leaves, do.double())
    assert calls == ["forward", "backward"]
    errs = {name: rel_err(got, want) for name, got, want in zip(FIELDS, (o, *grads), (ref, *rgrads))}
    log_errors("gate-gpu", f"Hq={hq} D={D} {str(dtype)[6:]} {'per-token' if per_token else 'per-head'} N={n}",
               errs, FIELDS)
    bad = {k: v for k, v in errs.items() if not v < TOL[dtype]}
    assert not bad, bad
