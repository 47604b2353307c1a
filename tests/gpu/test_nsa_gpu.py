"""The NativeSparseAttention layer on the GPU (real kernels: compress, cmp, selection, slc, swa)
against the float64 layer reference, forward and backward.

The reference is given the kernels' own selection (``topk_idx`` from the layer's
``return_parts``): near-ties in the block scores may legitimately select differently in float64
than in the kernel's float32, and with the same selection everything else is compared exactly.
How often the reference's own selection agrees with the kernel's is reported (``sel_agree``,
fraction of equal (kv head, query) rows), not asserted.

Outputs are NaN-poisoned before the kernels run (FSAGEN_POISON=1).  Relative errors
``||out - ref|| / ||ref||`` of the layer output, of the three branch outputs and of the gradients
of x and of every parameter (grouped by projection, the largest error of the group) are printed
(``-s``) and logged with ``FSAGEN_GPU_LOG``; bound 2e-2 (bf16 kernels, float32 parameters).
"""
import copy
import time

import pytest
import torch

from fsagen.nn import NativeSparseAttention
from fsagen.reference_layer import nsa_layer_reference
from fsagen.testing import log_errors, rel_err

pytestmark = pytest.mark.gpu

TOL = 2e-2
HKV, D, HIDDEN = 2, 64, 256
# a one-token sequence, one shorter than kernel_size, and sequences past topk * block_size = 1024
# (so selection really chooses), none starting on a block boundary of the packed layout
LENGTHS = (1, 31, 200, 1300, 2100)
LAYER = dict(block_size=64, topk=16, kernel_size=32, stride=16, window_size=128, init_blocks=1, local_blocks=2)
GROUPS = ("q_proj", "k_proj", "v_proj", "o_proj", "g_proj", "compression_params")
FIELDS = ("out", "o_cmp", "o_slc", "o_swa", "x") + GROUPS + ("sel_agree",)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("FSAGEN_POISON", "1")


def _seed() -> int:
    return time.time_ns() % 2**31


def _layer(G, kind, gate, seed):
    torch.manual_seed(seed)
    m = NativeSparseAttention(hidden_size=HIDDEN, num_q_heads=HKV * G, num_kv_heads=HKV, head_dim=D, compression=kind,
                              gate=gate, rope_theta=10000.0, bias=True, device="cuda", **LAYER)
    with torch.no_grad():  # move the compression parameters away from their mean-pooling start
        for p in m.compression_params.values():
            p.add_(torch.randn_like(p) * p.abs().mean().clamp_min(0.02))
    return m


def _cu():
    return torch.tensor((0,) + LENGTHS, device="cuda").cumsum(0).to(torch.int32)


@pytest.mark.parametrize("kind,gate", [("mean", "per_head"), ("weighted", "per_token"), ("linear", "per_head")])
@pytest.mark.parametrize("G", [1, 4, 16])
def test_layer_matches_float64_reference(G, kind, gate):
    seed = _seed()
    m, cu = _layer(G, kind, gate, seed), _cu()
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(int(cu[-1]), HIDDEN, device="cuda", generator=gen).requires_grad_()
    out, parts = m(x, cu, return_parts=True)
    do = torch.randn(out.shape, device="cuda", generator=gen)
    names = ["x"] + [name for name, _ in m.named_parameters()]
    grads = torch.autograd.grad(out, [x] + list(m.parameters()), do)

    r = copy.deepcopy(m).double()
    x64 = x.detach().double().requires_grad_()
    ref, rparts = nsa_layer_reference(r, x64, cu, topk_idx=parts["topk_idx"], return_parts=True)
    ref_grads = torch.autograd.grad(ref, [x64] + list(r.parameters()), do.double())
    with torch.no_grad():
        own = nsa_layer_reference(r, x64, cu, return_parts=True)[1]["topk_idx"]

    errs = {"out": rel_err(out, ref)}
    errs.update({name: rel_err(parts[name], rparts[name]) for name in ("o_cmp", "o_slc", "o_swa")})
    for name, g, rg in zip(names, grads, ref_grads):
        group = name.split(".")[0]
        errs[group] = max(errs.get(group, 0.0), rel_err(g, rg))
    sel_agree = (own == parts["topk_idx"]).all(dim=-1).double().mean().item()
    case = f"G={G} D={D} {kind} {gate} N={int(cu[-1])} seed={seed}"
    log_errors("nsa-layer-gpu", case, {**errs, "sel_agree": sel_agree}, FIELDS)
    for name, t in zip(names, grads):
        assert not torch.isnan(t).any(), f"{case}: NaN in the gradient of {name}"
    bad = {k: v for k, v in errs.items() if not v < TOL}
    assert not bad, f"{case}: relative errors above {TOL}: {bad}"


def test_padded_input_matches_packed():
    m, cu = _layer(4, "linear", "per_head", _seed()), _cu()
    gen = torch.Generator(device="cuda").manual_seed(_seed())
    x = torch.randn(int(cu[-1]), HIDDEN, device="cuda", generator=gen)
    packed = m(x, cu)
    t = max(LENGTHS)
    xp = x.new_zeros(len(LENGTHS), t, HIDDEN)
    mask = torch.zeros(len(LENGTHS), t, dtype=torch.bool, device="cuda")
    for b, (s0, s1) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        xp[b, : s1 - s0], mask[b, : s1 - s0] = x[s0:s1], True
    out = m(xp, attention_mask=mask)
    assert rel_err(out[mask], packed) < 1e-3  # the same packed batch: equal up to kernel non-determinism
    assert not out[~mask].any()
