"""The vectorised float64 oracle against the naive per-query loop, values and gradients."""

import math

import pytest
import torch

from fsagen import reference
from fsagen.reference import slc_reference, slc_reference_naive
from fsagen.testing import random_cu_seqlens, random_topk_idx, rel_err


def _qkv(n, hq, hkv, d, dv, gen, requires_grad=False):
    shapes = ((n, hq, d), (n, hkv, d), (n, hkv, dv))
    return tuple(torch.randn(s, dtype=torch.float64, generator=gen).requires_grad_(requires_grad) for s in shapes)


def _messy_topk(cu, hkv, topk, bs, gen):
    """Raw random indices in [-1, blocks of the longest sequence]: -1 anywhere, duplicates,
    blocks after the query's own and past the sequence end, all of which the oracle ignores."""
    lens = cu[1:] - cu[:-1]
    hi = int((lens.max() + bs - 1) // bs) + 1
    return torch.randint(-1, hi, (hkv, int(cu[-1]), topk), generator=gen, dtype=torch.int32)


CASES = {
    # name: (cu_seqlens or (total, num_seqs), Hq, Hkv, D, Dv, block_size, topk)
    "varlen_unaligned_gqa2": ((150, 3), 4, 2, 8, 8, 16, 3),
    "mha_dv_differs": ((90, 2), 2, 2, 8, 5, 8, 4),
    "gqa4_single_seq": ((70, 1), 4, 1, 4, 4, 16, 2),
    "topk_exceeds_blocks": ((60, 3), 2, 1, 4, 4, 16, 8),
    "short_sequences": ([0, 3, 5, 40, 41, 60], 2, 2, 4, 4, 16, 2),
    "empty_sequence": ([0, 10, 10, 50], 2, 1, 4, 4, 8, 3),
}


def _case(name, seed):
    cu_spec, hq, hkv, d, dv, bs, topk = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    if isinstance(cu_spec, tuple):
        cu = random_cu_seqlens(*cu_spec, block_size=bs, generator=gen)
    else:
        cu = torch.tensor(cu_spec, dtype=torch.int32)
    return cu, hq, hkv, d, dv, bs, topk, gen


@pytest.mark.parametrize("selection", ["nsa_like", "messy"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_vectorised_matches_naive(name, selection):
    cu, hq, hkv, d, dv, bs, topk, gen = _case(name, seed=hash(name) % 1000)
    if selection == "nsa_like":
        idx = random_topk_idx(cu, hkv, topk, bs, init_blocks=1, local_blocks=1, generator=gen)
    else:
        idx = _messy_topk(cu, hkv, topk, bs, gen)
    q, k, v = _qkv(int(cu[-1]), hq, hkv, d, dv, gen)
    o, lse = slc_reference(q, k, v, idx, cu, bs)
    o_n, lse_n = slc_reference_naive(q, k, v, idx, cu, bs)
    assert o.dtype == lse.dtype == torch.float64
    assert o.shape == (q.shape[0], hq, dv) and lse.shape == (q.shape[0], hq)
    assert rel_err(o, o_n) < 1e-12
    assert rel_err(lse, lse_n) < 1e-12


def test_query_that_sees_nothing_gives_zero_and_minus_inf():
    cu = torch.tensor([0, 20], dtype=torch.int32)
    gen = torch.Generator().manual_seed(1)
    q, k, v = _qkv(20, 2, 1, 4, 4, gen)
    idx = torch.full((1, 20, 2), -1, dtype=torch.int32)
    idx[0, 10:, 0] = 0  # tokens >= 10 see block 0; tokens < 10 see nothing
    idx[0, 5, 1] = 1  # a future block for token 5 (bs = 8): ignored
    o, lse = slc_reference(q, k, v, idx, cu, 8)
    assert torch.all(o[:10] == 0) and torch.all(torch.isneginf(lse[:10]))
    assert torch.all(torch.isfinite(lse[10:]))


def test_scale_argument():
    cu, hq, hkv, d, dv, bs, topk, gen = _case("varlen_unaligned_gqa2", 3)
    idx = random_topk_idx(cu, hkv, topk, bs, generator=gen)
    q, k, v = _qkv(int(cu[-1]), hq, hkv, d, dv, gen)
    o1, l1 = slc_reference(q, k, v, idx, cu, bs, scale=0.3)
    o2, l2 = slc_reference(q * (0.3 * math.sqrt(d)), k, v, idx, cu, bs)
    assert rel_err(o1, o2) < 1e-12 and rel_err(l1, l2) < 1e-12


@pytest.mark.parametrize("chunk_elems", [None, 2048])
@pytest.mark.parametrize("name", ["varlen_unaligned_gqa2", "mha_dv_differs", "short_sequences"])
def test_gradients_match_naive(name, chunk_elems, monkeypatch):
    """Autograd through the vectorised oracle (checkpointed chunks; with 2048, a few queries per
    chunk) equals autograd through the naive loop, for a loss using o and the finite lse entries."""
    if chunk_elems is not None:
        monkeypatch.setattr(reference, "_CHUNK_ELEMS", chunk_elems)
    cu, hq, hkv, d, dv, bs, topk, gen = _case(name, seed=7)
    idx = random_topk_idx(cu, hkv, topk, bs, init_blocks=1, local_blocks=1, generator=gen)
    n = int(cu[-1])
    do = torch.randn(n, hq, dv, dtype=torch.float64, generator=gen)
    dl = torch.randn(n, hq, dtype=torch.float64, generator=gen)
    grads = []
    for fn in (slc_reference, slc_reference_naive):
        q, k, v = _qkv(n, hq, hkv, d, dv, torch.Generator().manual_seed(11), requires_grad=True)
        o, lse = fn(q, k, v, idx, cu, bs)
        lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        loss = (o * do).sum() + (lse * dl).sum()
        grads.append(torch.autograd.grad(loss, (q, k, v)))
    for g_vec, g_naive in zip(*grads):
        assert torch.all(torch.isfinite(g_vec))
        assert rel_err(g_vec, g_naive) < 1e-12


def test_gradcheck_finite_differences():
    cu = torch.tensor([0, 7, 19], dtype=torch.int32)
    gen = torch.Generator().manual_seed(5)
    q, k, v = _qkv(19, 2, 1, 3, 2, gen, requires_grad=True)
    idx = random_topk_idx(cu, 1, 3, 4, init_blocks=1, local_blocks=1, generator=gen)
    idx[0, 0] = -1  # token 0 sees nothing: its gradient must be zero, not NaN
    fn = lambda q, k, v: slc_reference(q, k, v, idx, cu, 4)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_accepts_low_precision_inputs():
    cu, hq, hkv, d, dv, bs, topk, gen = _case("gqa4_single_seq", 2)
    idx = random_topk_idx(cu, hkv, topk, bs, init_blocks=1, local_blocks=1, generator=gen)
    q, k, v = (t.to(torch.bfloat16) for t in _qkv(int(cu[-1]), hq, hkv, d, dv, gen))
    o, lse = slc_reference(q, k, v, idx, cu, bs)
    o64, lse64 = slc_reference(q.double(), k.double(), v.double(), idx, cu, bs)
    assert o.dtype == torch.float64 and torch.equal(o, o64) and torch.equal(lse, lse64)
