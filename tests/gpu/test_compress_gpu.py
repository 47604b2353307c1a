"""fsagen.compress on the GPU against the float64 reference: k_cmp, v_cmp and every gradient.

bf16 and fp16 inputs at N ~ 5000 packed tokens, varlen (random boundaries, and a batch with empty
entries, sequences shorter than / exactly kernel_size and lengths not aligned to the stride).
``test_kernels_match_reference`` runs the generated compression kernels (mean / weighted, D = Dv
in {64, 128}, outputs NaN-poisoned first); ``test_matches_reference`` the torch path (linear, and
D != Dv, which the kernels do not take).
Every relative error ``||out - ref|| / ||ref||`` is printed (run pytest with ``-s``) and, with
``FSAGEN_GPU_LOG=path``, appended to that file as a markdown table; bounds: bf16 < 1e-2,
fp16 < 2e-3.
"""

import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the CPU test's helpers
from test_compress import KIND_IDS, KINDS, _params, compare_with_grads  # noqa: E402

from fsagen import compression  # noqa: E402
from fsagen.compression import compress  # noqa: E402
from fsagen.testing import capture_cuda_graph, log_errors, random_cu_seqlens, rel_err  # noqa: E402
from fsagen.validate_dense import expected_cu_seqlens_cmp  # noqa: E402

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}  # fp16 carries 3 more mantissa bits
FIELDS = ("k_cmp", "v_cmp", "dk", "dv", "dweight", "dproj_k", "dproj_v", "dpos_emb")
HKV = 2
KERNELS = [(32, 16), (64, 32), (32, 32)]
KERNEL_KINDS = ["mean", "weighted"]  # the kinds the generated kernels run


def _gen(seed=None):
    return torch.Generator(device="cuda").manual_seed(seed if seed is not None else time.time_ns() % 2**31)


def _cu(layout, ks, s, gen):
    if layout == "random":
        return random_cu_seqlens(5000, 7, generator=gen, device="cuda")
    lengths = [0, ks - 1, ks, 0, ks + s + 3, 1, 2500, 3 * ks + s // 2 + 1, 2000, 0]
    return torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)


def _inputs(layout, kind, pos, ks, s, dtype, gen, dims=None):
    d, dv = dims or ((128, 128) if pos else (192, 128))  # default: D != Dv wherever the kind allows it
    cu = _cu(layout, ks, s, gen)
    n = int(cu[-1])
    k = torch.randn(n, HKV, d, device="cuda", generator=gen).to(dtype)
    v = torch.randn(n, HKV, dv, device="cuda", generator=gen).to(dtype)
    return k, v, cu, _params(kind, pos, HKV, ks, d, dv, dtype, gen)


def _syncs(fn):
    """The synchronising calls torch's sync debug mode reports while ``fn`` runs."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    try:
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return [str(w.message) for w in caught if "synchroniz" in str(w.message)]


def _check(case, errs, dtype):
    """Record the relative errors (FSAGEN_GPU_LOG), then bound them."""
    log_errors("compress-gpu", case, errs, FIELDS)
    bad = {name: e for name, e in errs.items() if not e < TOL[dtype]}
    assert not bad, f"{case}: relative errors over {TOL[dtype]}: {bad}"


@pytest.mark.parametrize("layout", ["random", "edge_lengths"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("ks,s", KERNELS)
@pytest.mark.parametrize("kind,pos", KINDS, ids=KIND_IDS)
def test_matches_reference(kind, pos, ks, s, dtype, layout):
    gen = _gen()
    k, v, cu, params = _inputs(layout, kind, pos, ks, s, dtype, gen)
    case = f"{KIND_IDS[KINDS.index((kind, pos))]} ks={ks} s={s} {str(dtype)[6:]} {layout} N={k.shape[0]}"
    _check(case, compare_with_grads(k, v, cu, ks, s, kind, params, gen, None)[0], dtype)


@pytest.mark.parametrize("kind,pos", KINDS, ids=KIND_IDS)
def test_forward_syncs_once(kind, pos):
    """The forward reads one thing on the host: the number of compressed tokens (with the
    cu_seqlens checks), so torch's sync debug mode sees exactly one synchronising call."""
    gen = _gen(0)
    k, v, cu, params = _inputs("random", kind, pos, 32, 16, torch.bfloat16, gen)
    syncs = _syncs(lambda: compress(k, v, cu, 32, 16, kind, **params))
    assert len(syncs) == 1, syncs


@pytest.mark.parametrize("layout", ["random", "edge_lengths"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("ks,s", KERNELS)
@pytest.mark.parametrize("kind", KERNEL_KINDS)
def test_kernels_match_reference(kind, ks, s, d, dtype, layout, monkeypatch):
    """The generated kernels (fsagen::compress_pool, forward, dk/dv and dweight), outputs poisoned."""
    monkeypatch.setenv("FSAGEN_POISON", "1")
    gen = _gen()
    k, v, cu, params = _inputs(layout, kind, False, ks, s, dtype, gen, dims=(d, d))
    assert compression._kernel_runs(k, v, kind, ks, s), "the kernels should take this call"
    case = f"kernel {kind} ks={ks} s={s} D={d} {str(dtype)[6:]} {layout} N={k.shape[0]}"
    _check(case, compare_with_grads(k, v, cu, ks, s, kind, params, gen, None)[0], dtype)


def _num_compressed(cu, ks, s):
    return int(expected_cu_seqlens_cmp(cu, ks, s)[-1])


@pytest.mark.parametrize("kind,pos", KINDS, ids=KIND_IDS)
def test_no_sync_with_num_compressed(kind, pos):
    """Given num_compressed and check_values=False, forward and backward read nothing on the host."""
    gen = _gen(0)
    k, v, cu, params = _inputs("random", kind, pos, 32, 16, torch.bfloat16, gen, dims=(128, 128))
    nc = _num_compressed(cu, 32, 16)
    leaves = [t.detach().requires_grad_() for t in (k, v, *params.values())]
    named = dict(zip(params, leaves[2:]))
    compress(leaves[0], leaves[1], cu, 32, 16, kind, num_compressed=nc, check_values=False, **named)  # warm-up

    def step():
        kc, vc, _ = compress(leaves[0], leaves[1], cu, 32, 16, kind, num_compressed=nc, check_values=False, **named)
        torch.autograd.grad((kc, vc), leaves, (torch.ones_like(kc), torch.ones_like(vc)))

    assert _syncs(step) == []


@pytest.mark.parametrize("kind", KERNEL_KINDS)
def test_cuda_graph_capture_and_replay(kind):
    """compress (kernels) forward + backward captured once, replayed on new k, v, weight and
    cu_seqlens of the same shapes and the same number of compressed tokens."""
    ks, s = 32, 16
    gen = _gen()
    lengths = [700, 33, 1500, 31, 900]  # Nc = 42 + 1 + 92 + 0 + 55 for every permutation
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    nc = _num_compressed(cu, ks, s)
    params0 = _params(kind, False, HKV, ks, 128, 128, torch.bfloat16, gen)
    n = int(cu[-1])
    k = torch.randn(n, HKV, 128, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_()
    v = torch.randn(n, HKV, 128, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_()
    params = {name: t.detach().clone().requires_grad_() for name, t in params0.items()}
    leaves = [k, v, *params.values()]
    dk_out = torch.randn(nc, HKV, 128, device="cuda", generator=gen).to(torch.bfloat16)
    dv_out = torch.randn(nc, HKV, 128, device="cuda", generator=gen).to(torch.bfloat16)

    def step():
        kc, vc, _ = compress(k, v, cu, ks, s, kind, num_compressed=nc, check_values=False, **params)
        return (kc, vc, *torch.autograd.grad((kc, vc), leaves, (dk_out, dv_out)))

    graph, outs = capture_cuda_graph(step)

    new_lengths = [1500, 31, 900, 33, 700]
    with torch.no_grad():
        cu.copy_(torch.tensor([0] + new_lengths, device="cuda").cumsum(0))
        for t in leaves:
            t.copy_(torch.randn(t.shape, device="cuda", generator=gen) * (t.float().std() + 1e-3))
        dk_out.copy_(torch.randn(dk_out.shape, device="cuda", generator=gen))
        dv_out.copy_(torch.randn(dv_out.shape, device="cuda", generator=gen))
    graph.replay()
    torch.cuda.synchronize()
    want_cmp = compress(k.detach(), v.detach(), cu, ks, s, kind, **{n_: t.detach() for n_, t in params.items()})
    fresh = [t.detach().clone().requires_grad_() for t in leaves]
    kc, vc, _ = compress(fresh[0], fresh[1], cu, ks, s, kind, **dict(zip(params, fresh[2:])))
    want_grads = torch.autograd.grad((kc, vc), fresh, (dk_out, dv_out))
    errs = {f"out{i}": rel_err(o, w) for i, (o, w) in enumerate(zip(outs, (*want_cmp[:2], *want_grads)))}
    assert all(e < 1e-6 for e in errs.values()), errs
