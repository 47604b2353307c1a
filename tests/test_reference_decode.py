"""The decode reference equals the last rows of the prefill reference over the same prefix."""
import pytest
import torch

from fsagen.reference_cmp import compress_reference
from fsagen.reference_decode import nsa_decode_reference
from fsagen.reference_nsa import nsa_attention_reference

HKV, D = 2, 16
KS, S, BS, TOPK, INIT, LOCAL, WINDOW = 32, 16, 64, 4, 1, 2, 40
BRANCH = dict(kernel_size=KS, stride=S, block_size=BS, topk=TOPK, init_blocks=INIT, local_blocks=LOCAL,
              window_size=WINDOW)
# lengths at and just past the boundaries of a compression window, a selection block and the window
LENGTHS = [1, KS - 1, KS, KS + 1, KS + S, BS, BS + 1, WINDOW, WINDOW + 1, 2 * BS + S + 1, 5 * BS + 3]


def _prefix(length, g, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(length, HKV * g, D, generator=gen, dtype=torch.float64)
    k = torch.randn(length, HKV, D, generator=gen, dtype=torch.float64)
    v = torch.randn(length, HKV, D, generator=gen, dtype=torch.float64)
    gates = torch.rand(length, HKV * g, 3, generator=gen, dtype=torch.float64)
    return q, k, v, gates


@pytest.mark.parametrize("new_rows", [1, 3])
@pytest.mark.parametrize("g", [1, 4])
@pytest.mark.parametrize("length", LENGTHS)
def test_decode_rows_equal_last_rows_of_prefill(length, g, new_rows):
    rows = min(new_rows, length)
    q, k, v, gates = _prefix(length, g, seed=length * 10 + g)
    cu = torch.tensor([0, length], dtype=torch.int32)
    o_full, parts = nsa_attention_reference(q, k, v, gates, cu, **BRANCH, return_parts=True)
    k_cmp, v_cmp, _ = compress_reference(k, v, cu, KS, S, "mean")
    positions = torch.arange(length - rows, length)
    o, got = nsa_decode_reference(q[-rows:], k, v, k_cmp, v_cmp, positions, gates[-rows:], **BRANCH,
                                  return_parts=True)
    assert torch.equal(got["topk_idx"], parts["topk_idx"][:, -rows:])
    torch.testing.assert_close(o, o_full[-rows:], rtol=1e-10, atol=1e-12)
    for name in ("o_cmp", "o_slc", "o_swa", "lse_cmp", "lse_slc", "lse_swa"):
        torch.testing.assert_close(got[name], parts[name][-rows:], rtol=1e-10, atol=1e-12)


def test_decode_reference_bad_inputs():
    q, k, v, gates = _prefix(70, 1, 0)
    k_cmp, v_cmp, _ = compress_reference(k, v, torch.tensor([0, 70], dtype=torch.int32), KS, S, "mean")
    pos = torch.tensor([69])
    with pytest.raises(ValueError, match="positions"):
        nsa_decode_reference(q[-1:], k, v, k_cmp, v_cmp, torch.tensor([70]), gates[-1:], **BRANCH)
    with pytest.raises(ValueError, match="k_cmp"):
        nsa_decode_reference(q[-1:], k, v, k_cmp[:-1], v_cmp[:-1], pos, gates[-1:], **BRANCH)
    with pytest.raises(ValueError, match="q"):
        nsa_decode_reference(q[-1:, :1].expand(1, 3, D), k, v, k_cmp, v_cmp, pos, gates[-1:, :1].expand(1, 3, 3), **BRANCH)
    with pytest.raises(ValueError, match="window_size"):
        nsa_decode_reference(q[-1:], k, v, k_cmp, v_cmp, pos, gates[-1:], **{**BRANCH, "window_size": 0})
