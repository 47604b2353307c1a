"""fsagen.seqlens_cache: tables of a cu_seqlens tensor built once while it lives unmodified."""
import gc

import torch

from fsagen.seqlens_cache import SEQLENS_CACHE, SeqlensCache, cacheable
from fsagen.slc_index import _build_token_layout, token_layout
from fsagen.tile_index import _build_seq_tiles, seq_tiles


def _cu(*lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def test_a_table_is_built_once_per_tensor_and_arguments():
    cu = _cu(100, 37, 250)
    n = int(cu[-1])
    first = seq_tiles(cu, n, 16)
    assert seq_tiles(cu, n, 16) is first
    assert torch.equal(first, _build_seq_tiles(cu, n, 16, True))
    other = seq_tiles(cu, n, 32)  # other arguments: another table
    assert other is not first and torch.equal(other, _build_seq_tiles(cu, n, 32, True))
    assert seq_tiles(cu, n, 16, longest_first=False) is not first
    assert seq_tiles(cu.clone(), n, 16) is not first  # equal values, another tensor: built again
    layout = token_layout(cu, n, 64)
    assert token_layout(cu, n, 64) is layout
    want = _build_token_layout(cu, n, 64)
    for name in ("tok_start", "tok_block_base", "tok_pos", "block_first_tok"):
        assert torch.equal(getattr(layout, name), getattr(want, name)), name


def test_an_in_place_write_rebuilds():
    cu = _cu(100, 37, 250)
    n = int(cu[-1])
    before = seq_tiles(cu, n, 16)
    cu[1:3] = torch.tensor([50, 300], dtype=torch.int32)  # the version counter moves
    after = seq_tiles(cu, n, 16)
    assert after is not before and torch.equal(after, _build_seq_tiles(cu, n, 16, True))
    assert not torch.equal(after, before)


def test_entries_go_with_their_tensor():
    cache = SeqlensCache()
    cu = _cu(10, 20)
    cache.get(cu, ("t",), lambda: torch.zeros(1))
    cache.get(cu, ("u",), lambda: torch.zeros(1))
    assert len(cache) == 2
    del cu
    gc.collect()
    assert len(cache) == 0


def test_not_cached_where_it_cannot_be_checked():
    with torch.inference_mode():
        cu = _cu(10, 20)  # an inference tensor has no version counter
        assert not cacheable(cu)
        first = seq_tiles(cu, 30, 8)
        assert seq_tiles(cu, 30, 8) is not first and torch.equal(seq_tiles(cu, 30, 8), first)
    assert not cacheable(torch.empty(3, dtype=torch.int32, device="meta"))


def test_repeated_calls_build_no_tables():
    """Calls on the same cu_seqlens build each table once: the cache grows on the first call only."""
    cu = _cu(100, 37, 250)
    n = int(cu[-1])
    SEQLENS_CACHE.clear()
    for _ in range(3):
        seq_tiles(cu, n, 16)
        seq_tiles(cu, n, 64, longest_first=False)
        token_layout(cu, n, 64)
        assert len(SEQLENS_CACHE) == 3


def test_a_kept_tensor_written_by_its_user_is_built_again():
    """compress hands its cached cu_seqlens_cmp to the caller: a write to it is seen."""
    from fsagen.compression import compress

    cu = _cu(100, 37, 250)
    n = int(cu[-1])
    k = torch.randn(n, 2, 16)
    _, _, cu_cmp = compress(k, k, cu, 32, 16)
    assert compress(k, k, cu, 32, 16)[2] is cu_cmp
    want = cu_cmp.clone()
    cu_cmp.zero_()
    again = compress(k, k, cu, 32, 16)[2]
    assert again is not cu_cmp and torch.equal(again, want)


def test_nothing_kept_in_inference_mode():
    cu = _cu(10, 20)
    with torch.inference_mode():
        assert not cacheable(cu)
        assert seq_tiles(cu, 30, 8) is not seq_tiles(cu, 30, 8)
