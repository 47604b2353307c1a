"""The block -> queries index (fsagen.slc_index) on CPU tensors.

Checks that the work items cover exactly the valid (head, query, slot) entries, once each, with the
right KV block, and that the two-pass KV-outer algorithm the GPU programs run (per-entry log-sum-exp,
exact reduction, then P @ V accumulation) reproduces the float64 reference when emulated with the
index in torch.
"""
import math

import pytest
import torch

from fsagen.reference import slc_reference
from fsagen.slc_index import build_block_index, token_layout, valid_selection
from fsagen.testing import random_cu_seqlens, random_topk_idx


def _case(seed, n=700, seqs=3, hkv=2, topk=5, bs=32, pad_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    cu = random_cu_seqlens(n, seqs, block_size=bs, generator=g)
    idx = random_topk_idx(cu, hkv, topk, bs, generator=g)
    drop = torch.rand(idx.shape, generator=g) < pad_frac
    idx = torch.where(drop, torch.full_like(idx, -1), idx)
    return cu, idx


def _entries(index, topk_idx):
    """(h, t, slot) of every entry reachable through the work items, with its block's first token."""
    out = []
    for h, first_tok, begin, end in index.items.tolist():
        assert end - begin >= 0
        for e in range(begin, end):
            out.append((h, int(index.ent_q[e]), int(index.ent_k[e]), first_tok))
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("per_item", [1, 3, 16])
@pytest.mark.parametrize("h_lo", [0, 1])
@pytest.mark.parametrize("query_chunk", [0, 1, 100, 4096])
def test_items_cover_valid_entries_once(seed, per_item, h_lo, query_chunk):
    bs = 32
    cu, idx = _case(seed, bs=bs)
    n = int(cu[-1])
    layout = token_layout(cu, n, bs)
    sub = idx[h_lo:]
    index = build_block_index(sub, layout, bs, h_lo, per_item, query_chunk)
    got = _entries(index, sub)
    valid = valid_selection(sub, layout, bs)
    want = {(h_lo + h, t, s) for h, t, s in valid.nonzero().tolist()}
    assert sorted((h, t, s) for h, t, s, _ in got) == sorted(want)
    cu_l = cu.tolist()
    for h, t, s, first_tok in got:
        seq = max(i for i in range(len(cu_l) - 1) if cu_l[i] <= t)
        assert first_tok == cu_l[seq] + int(idx[h, t, s]) * bs
    for h, first_tok, begin, end in index.items.tolist():
        assert end - begin <= per_item
        if query_chunk and end > begin:  # an item's queries lie in one chunk, ascending
            toks = index.ent_q[begin:end].tolist()
            assert toks == sorted(toks)
            assert toks[0] // query_chunk == toks[-1] // query_chunk


def test_query_chunks_order_items_by_chunk_first():
    """Items run chunk after chunk (the point of chunking: the adds in flight stay within one chunk)."""
    bs, chunk = 32, 100
    cu, idx = _case(3, bs=bs, hkv=1)
    n = int(cu[-1])
    index = build_block_index(idx, token_layout(cu, n, bs), bs, 0, 4, chunk)
    firsts = [int(index.ent_q[b]) // chunk for _, _, b, e in index.items.tolist() if e > b]
    assert firsts == sorted(firsts) and len(set(firsts)) == -(-n // chunk)


def test_two_pass_emulation_matches_reference():
    """Emulate kv_fwd_stats + logsumexp + kv_fwd_accum over the index in float64."""
    bs, topk, hkv, G, D = 32, 5, 2, 3, 16
    cu, idx = _case(7, n=400, hkv=hkv, topk=topk, bs=bs)
    n = int(cu[-1])
    g = torch.Generator().manual_seed(1)
    q = torch.randn(n, hkv * G, D, generator=g, dtype=torch.float64)
    k = torch.randn(n, hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(n, hkv, D, generator=g, dtype=torch.float64)
    scale = D ** -0.5
    layout = token_layout(cu, n, bs)
    index = build_block_index(idx, layout, bs, 0, 4)
    part = torch.full((hkv, n, topk, G), -math.inf, dtype=torch.float64)
    entries = _entries(index, idx)
    def scores(h, t, first_tok):
        keys = torch.arange(first_tok, first_tok + bs)
        keys = keys[keys <= t]
        return (q[t, h * G:(h + 1) * G] @ k[keys, h].T) * scale, keys
    for h, t, s, first_tok in entries:
        sc, _ = scores(h, t, first_tok)
        part[h, t, s] = torch.logsumexp(sc, dim=1)
    lse = torch.logsumexp(part, dim=2)  # [hkv, n, G]
    o = torch.zeros(n, hkv * G, D, dtype=torch.float64)
    for h, t, s, first_tok in entries:
        sc, keys = scores(h, t, first_tok)
        p = torch.exp(sc - lse[h, t][:, None])
        o[t, h * G:(h + 1) * G] += p @ v[keys, h]
    o_ref, lse_ref = slc_reference(q, k, v, idx, cu, bs, scale)
    torch.testing.assert_close(o, o_ref.to(o.dtype), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse.permute(1, 0, 2).reshape(n, -1), lse_ref.to(o.dtype))


@pytest.mark.parametrize("n,chunk,row_bytes,budget,want", [
    (1000, 0, 64, 1, [(0, 1000)]),                       # no query chunks: one window
    (1000, 100, 64, 64 * 250, [(0, 200), (200, 400), (400, 600), (600, 800), (800, 1000)]),
    (1000, 100, 64, 1, [(i, i + 100) for i in range(0, 1000, 100)]),  # at least one chunk
    (950, 100, 64, 64 * 1000, [(0, 950)]),
    (80, 100, 64, 1, [(0, 80)]),
])
def test_accumulator_windows_are_whole_chunks(n, chunk, row_bytes, budget, want, monkeypatch):
    from fsagen.slc import _acc_windows

    monkeypatch.setenv("FSAGEN_ACC_BYTES", str(budget))
    assert _acc_windows(n, chunk, row_bytes) == want


def test_entry_count_past_int32_is_refused():
    """Entries are numbered in int32; a selection with 2**31 of them is refused before any work
    (an expanded topk_idx: no memory behind it)."""
    from types import SimpleNamespace

    idx = torch.zeros(1, 1, 1, dtype=torch.int32).expand(2, 2**26, 16)
    layout = SimpleNamespace(num_blocks_bound=1)
    with pytest.raises(ValueError, match="overflow int32"):
        build_block_index(idx, layout, 64, 0, 8, query_chunk=2**26)
