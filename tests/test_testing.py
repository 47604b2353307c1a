"""fsagen.testing: generated selections are valid NSA-like rows; error metric edge cases."""

import math

import pytest
import torch

from fsagen.testing import poisoned_like, random_cu_seqlens, random_topk_idx, rel_err, token_positions
from fsagen.validate import check_slc_inputs


@pytest.mark.parametrize("bs,topk,init,local", [(16, 4, 1, 2), (8, 6, 2, 1), (64, 16, 1, 2)])
def test_random_topk_idx_is_valid_and_nsa_like(bs, topk, init, local):
    gen = torch.Generator().manual_seed(bs + topk)
    cu = random_cu_seqlens(700, 5, block_size=bs, generator=gen)
    idx = random_topk_idx(cu, 3, topk, bs, init_blocks=init, local_blocks=local, generator=gen)
    assert idx.shape == (3, 700, topk) and idx.dtype == torch.int32
    n = 700
    q = torch.zeros(n, 3, 64, dtype=torch.bfloat16)
    check_slc_inputs(q, q, q, idx, cu, bs, None)  # in range, distinct, well formed
    pos, _ = token_positions(cu)
    own = (pos // bs).long()
    valid = idx >= 0
    assert torch.all(torch.where(valid, idx.long(), own[None, :, None]) <= own[None, :, None])  # causal
    avail = torch.clamp(own + 1, max=topk)
    assert torch.equal(valid.sum(-1), avail[None].expand(3, -1))  # as many as available, up to topk
    # valid entries ascend and come first; -1 only as trailing padding
    key = torch.where(valid, idx.long(), torch.full_like(idx.long(), 1 << 30))
    assert torch.all(key[..., 1:] >= key[..., :-1])
    for b in range(init):
        assert torch.all((idx == b).any(-1) | (own < b)[None])
    for back in range(local):
        blk = own - back
        assert torch.all((idx.long() == blk[None, :, None]).any(-1) | (blk < 0)[None])


def test_random_topk_idx_rejects_small_topk():
    with pytest.raises(ValueError, match="topk"):
        random_topk_idx(torch.tensor([0, 100], dtype=torch.int32), 1, 2, 16, init_blocks=1, local_blocks=2)


def test_random_cu_seqlens_unaligned():
    cu = random_cu_seqlens(1000, 9, block_size=64, generator=torch.Generator().manual_seed(0))
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == 1000 and cu.numel() == 10
    assert torch.all(cu[1:] > cu[:-1]) and torch.all(cu[1:-1] % 64 != 0)


def test_rel_err_edge_cases():
    ref = torch.tensor([1.0, -math.inf, 2.0])
    assert rel_err(ref.clone(), ref) == 0.0
    assert math.isinf(rel_err(torch.tensor([1.0, 0.0, 2.0]), ref))
    assert math.isnan(rel_err(torch.tensor([1.0, -math.inf, math.nan]), ref))
    assert rel_err(torch.tensor([3.0, 4.0]), torch.zeros(2)) == 5.0
    assert poisoned_like(torch.zeros(3)).isnan().all()
    assert (poisoned_like(torch.zeros(3, dtype=torch.int32)) == -(2**31)).all()
