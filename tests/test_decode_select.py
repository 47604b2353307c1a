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
LN2 = math.log(2.0)
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


def _gpu(*values):
    return pytest.param(*values, marks=pytest.mark.gpu)


# (device, G, page, D): on the CPU the spec test_cpu_kernels compiles (one artifact for both files)
STAGE_CASES = [("cpu", 2, 16, 32), _gpu("cuda", 1, 64, 128), _gpu("cuda", 4, 64, 128), _gpu("cuda", 16, 64, 128)]


@pytest.mark.parametrize("device,g,page,dim", STAGE_CASES)
@pytest.mark.parametrize("blocks_per_page,topk,init,local,window", [(2, 3, 1, 1, 20), (1, 4, 0, 2, 150)])
def test_selection_stages_match_torch(device, g, page, dim, blocks_per_page, topk, init, local, window, monkeypatch):
    """The generated selection (``decode_block_keys``, the top-k, ``decode_tiles``, through
    ``fsagen.decode.select_tiles``) against its torch spelling: the same blocks, and the same
    slc and swa tile lists (pages through a shuffled block table, counts), on random cmp scores
    split into runs (entries past each sequence's compressed tokens are NaN: never read)."""
    from fsagen.decode import _raw_tiles, _slc_pages, _swa_pages, select_tiles
    from fsagen.glue import kernel_spec, plan_and_kernel
    from fsagen.kv_cache import NSAKVCache

    monkeypatch.setenv("FSAGEN_POISON", "1")
    block_size = page * blocks_per_page
    lengths = [1, KS - 1, KS, KS + 1, block_size, block_size + 1, 5 * block_size + 3, 700]
    max_len, b = 768, len(lengths)
    gen = torch.Generator().manual_seed(g * 10 + topk)
    cache = NSAKVCache(b, 2 * b * (max_len // page), page, max_len, HKV, dim, kernel_size=KS, stride=S,
                       dtype=torch.bfloat16, device=device)
    seqs = list(range(b))
    for part in (0.5, 1.0):  # two appends: the sequences' pages interleave in the pool
        n_new = [int(n * part) - int(n * (part - 0.5)) for n in lengths]
        cache.append(seqs, *(torch.randn(sum(n_new), HKV, dim, generator=gen).to(torch.bfloat16).to(device)
                             for _ in range(2)), n_new)
    assert cache.lengths == lengths
    seq_idx = cache.seq_index(seqs)
    pos = (cache.lengths_dev.index_select(0, seq_idx) - 1).to(torch.int32)
    num_cmp = cache.num_compressed_dev(pos + 1).to(torch.int32)
    hq, ns = HKV * g, cache.max_cmp
    scores2 = torch.randn(b, hq, ns, generator=gen) * 3
    visible = torch.arange(ns) < num_cmp.cpu()[:, None, None]
    scores2 = torch.where(visible, scores2, float("nan"))
    runs = torch.arange(ns) * 3 // ns  # three split runs of the columns
    lse_part = torch.stack([torch.logsumexp(torch.where(visible & (runs == r), scores2 * LN2, -math.inf), dim=-1)
                            for r in range(3)], dim=-1)
    q = torch.empty(b, hq, dim, dtype=torch.bfloat16, device=device)
    kern, _ = plan_and_kernel(kernel_spec("dec", "fwd", q, cache.k_pages[0], block_size=page), device=torch.device(device))
    rules = dict(block_size=block_size, topk=topk, init_blocks=init, local_blocks=local)
    got_idx, (tile_page, tile_pos, tile_count) = select_tiles(
        kern, cache, seq_idx, pos, num_cmp, scores2.to(device), lse_part.to(device), window_size=window, **rules)

    want_idx = select_from_scores(scores2.double(), torch.logsumexp(lse_part, dim=-1).double(), num_cmp.cpu(),
                                  pos.cpu().long(), num_kv_heads=HKV, kernel_size=KS, stride=S,
                                  num_blocks=-(-max_len // block_size), **rules)
    assert torch.equal(got_idx.cpu(), want_idx), "selected blocks differ"
    pos64 = pos.long()
    for row0, pages in ((0, _slc_pages(cache, pos64, want_idx.to(device), block_size)),
                        (b, _swa_pages(cache, pos64, window))):
        w_page, w_pos, w_count = (t.cpu() for t in _raw_tiles(cache, seq_idx, pos64, pages))
        count = tile_count[row0:row0 + b].cpu()
        assert torch.equal(count, w_count), f"rows {row0}..: tile counts {count.tolist()} != {w_count.tolist()}"
        for i in range(b):
            for h in range(HKV):
                n = int(count[i, h])
                assert tile_page[row0 + i, h, :n].cpu().tolist() == w_page[i, h, :n].tolist(), (row0, i, h)
                assert tile_pos[row0 + i, h, :n].cpu().tolist() == w_pos[i, h, :n].tolist(), (row0, i, h)


def test_glue_knows_the_tile_kernels_lanes():
    """nsa_decode rejects a topk the decode_tiles kernel cannot sort; its bound is the kernel's lane count."""
    from fsagen import decode
    from fsagen.kernels import decode as decode_kernels

    assert decode._TILE_LANES == decode_kernels.LANES
