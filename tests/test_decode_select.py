"""Decode-time block selection from cmp scores (``fsagen.decode.select_from_scores``, the torch ops
``nsa_decode`` runs on the GPU) against the float64 decode reference's own selection.

Scores are given in float64 here, so the two must agree block for block (random data has no
ties; the forced blocks tie at +inf and both break them towards the lower block)."""
import math

import pytest
import torch

from fsagen.decode import select_from_scores
from fsagen.reference_cmp import compress_reference
from fsagen.reference_decode import nsa_decode_reference

HKV, D, KS, S = 2, 16, 32, 16
LENGTHS = [1, KS - 1, KS, KS + 1, 63, 64, 65, 128 + S + 1, 5 * 64 + 3, 700]
MAX_LEN = 768


@pytest.mark.parametrize("block_size,topk,init,local", [(64, 4, 1, 2), (64, 16, 0, 1), (32, 3, 1, 1), (128, 2, 1, 1)])
@pytest.mark.parametrize("g", [1, 4])
def test_selection_matches_reference(g, block_size, topk, init, local):
    gen = torch.Generator().manual_seed(g * 100 + block_size + topk)
    b = len(LENGTHS)
    ns = (MAX_LEN - KS) // S + 1
    scores2 = torch.full((b, HKV * g, ns), float("nan"), dtype=torch.float64)  # unwritten entries: ignored
    lse = torch.full((b, HKV * g), -math.inf, dtype=torch.float64)
    want = []
    q = torch.randn(b, HKV * g, D, generator=gen, dtype=torch.float64)
    for i, n in enumerate(LENGTHS):
        k = torch.randn(n, HKV, D, generator=gen, dtype=torch.float64)
        v = torch.randn(n, HKV, D, generator=gen, dtype=torch.float64)
        kc, vc, _ = compress_reference(k, v, torch.tensor([0, n], dtype=torch.int32), KS, S, "mean")
        lc = kc.shape[0]
        _, parts = nsa_decode_reference(q[i:i + 1], k, v, kc, vc, torch.tensor([n - 1]),
                                        torch.ones(1, 3, dtype=torch.float64), kernel_size=KS, stride=S,
                                        block_size=block_size, topk=topk, init_blocks=init, local_blocks=local,
                                        window_size=16, return_parts=True)
        want.append(parts["topk_idx"])
        if lc:
            s = torch.einsum("hd,chd->hc", q[i], kc.repeat_interleave(g, dim=1))
            scores2[i, :, :lc] = s * D ** -0.5 / math.log(2)
            lse[i] = parts["lse_cmp"][0]
    pos = torch.tensor(LENGTHS) - 1
    num_cmp = torch.tensor([max(0, (n - KS) // S + 1) for n in LENGTHS])
    got = select_from_scores(scores2, lse, num_cmp, pos, num_kv_heads=HKV, kernel_size=KS, stride=S,
                             block_size=block_size, topk=topk, init_blocks=init, local_blocks=local,
                             num_blocks=-(-MAX_LEN // block_size))
    assert got.dtype == torch.int32 and got.shape == (b, HKV, topk)
    for i, n in enumerate(LENGTHS):
        assert torch.equal(got[i], want[i][:, 0]), f"length {n}: {got[i].tolist()} != {want[i][:, 0].tolist()}"
