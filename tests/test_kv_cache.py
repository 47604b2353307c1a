"""NSAKVCache bookkeeping on the CPU: paged writes, compressed tokens emitted as windows complete,
errors that leave the cache unchanged, and decode from the cache equal to the prefill reference."""
import pytest
import torch

from fsagen.kv_cache import NSAKVCache
from fsagen.reference_cmp import compress_reference
from fsagen.reference_decode import nsa_decode_reference
from fsagen.reference_nsa import nsa_attention_reference

HKV, D, KS, S, PAGE = 2, 16, 32, 16, 16


def _cache(batch=3, num_pages=40, max_len=300, dtype=torch.float32):
    return NSAKVCache(batch, num_pages, PAGE, max_len, HKV, D, kernel_size=KS, stride=S, dtype=dtype)


def _rows(n, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, HKV, D, generator=gen).to(dtype), torch.randn(n, HKV, D, generator=gen).to(dtype))


def _state(c):
    return (list(c.lengths), c.block_table.clone(), c.free_pages, c.k_pages.clone(), c.k_cmp.clone())


def _same(a, b):
    return a[0] == b[0] and torch.equal(a[1], b[1]) and a[2] == b[2] and torch.equal(a[3], b[3]) and torch.equal(a[4], b[4])


def test_interleaved_appends_match_the_whole_sequences():
    c = _cache()
    full = {0: [], 1: [], 2: []}
    steps = [([0, 1], [100, 33]), ([0], [1]), ([1, 2], [1, 31]), ([2, 0], [1, 15]), ([0, 1, 2], [1, 1, 3]),
             ([1], [47]), ([0, 1, 2], [1, 1, 1])]
    for i, (seqs, counts) in enumerate(steps):
        k, v = _rows(sum(counts), seed=i)
        c.append(seqs, k, v, counts)
        at = 0
        for s, n in zip(seqs, counts):
            full[s].append((k[at:at + n], v[at:at + n]))
            at += n
    for s, parts in full.items():
        k = torch.cat([p[0] for p in parts])
        v = torch.cat([p[1] for p in parts])
        rk, rv = c.raw(s)
        assert torch.equal(rk, k) and torch.equal(rv, v)
        ref_k, ref_v, _ = compress_reference(k, v, torch.tensor([0, k.shape[0]], dtype=torch.int32), KS, S, "mean")
        ck, cv = c.compressed(s)
        assert ck.shape[0] == c.num_compressed(k.shape[0]) == ref_k.shape[0]
        torch.testing.assert_close(ck.double(), ref_k, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cv.double(), ref_v, rtol=1e-5, atol=1e-6)
        assert len(c.pages_of(s)) == -(-k.shape[0] // PAGE)
    used = sum(len(c.pages_of(s)) for s in full)
    assert c.free_pages == c.num_pages - used


@pytest.mark.parametrize("case", ["seq_out_of_range", "repeated_seq", "over_max_len", "out_of_pages",
                                  "wrong_shape", "wrong_dtype", "row_count"])
def test_bad_appends_raise_and_leave_the_cache_unchanged(case):
    c = _cache(num_pages=10, max_len=200)
    k, v = _rows(40, 0)
    c.append([0, 1], k, v, [20, 20])
    before = _state(c)
    k2, v2 = _rows(8, 1)
    call, err = {
        "seq_out_of_range": (lambda: c.append([3], k2, v2, [8]), IndexError),
        "repeated_seq": (lambda: c.append([0, 0], k2, v2, [4, 4]), ValueError),
        "over_max_len": (lambda: c.append([0], *_rows(181, 2), [181]), ValueError),
        "out_of_pages": (lambda: c.append([0, 2], *_rows(150, 3), [50, 100]), RuntimeError),
        "wrong_shape": (lambda: c.append([0], k2[:, :1], v2[:, :1], [8]), ValueError),
        "wrong_dtype": (lambda: c.append([0], k2.double(), v2.double(), [8]), ValueError),
        "row_count": (lambda: c.append([0], k2, v2, [7]), ValueError),
    }[case]
    with pytest.raises(err, match="NSAKVCache"):
        call()
    assert _same(before, _state(c))


def test_set_pages_adopts_filled_pages_and_rejects_bad_tables():
    c = _cache(num_pages=12, max_len=96)
    k, v = _rows(40, 5)
    pages = [7, 3, 9]
    for i, p in enumerate(pages):
        c.k_pages[p, : min(PAGE, 40 - i * PAGE)] = k[i * PAGE:(i + 1) * PAGE]
        c.v_pages[p, : min(PAGE, 40 - i * PAGE)] = v[i * PAGE:(i + 1) * PAGE]
    before = _state(c)
    with pytest.raises(ValueError, match="outside the pool"):
        c.set_pages(0, [7, 3, 12], 40)
    with pytest.raises(ValueError, match="need 3 pages"):
        c.set_pages(0, [7, 3], 40)
    assert _same(before, _state(c))
    c.set_pages(0, pages, 40)
    assert c.pages_of(0) == pages and c.free_pages == 9
    rk, _ = c.raw(0)
    assert torch.equal(rk, k)
    ref_k, _, _ = compress_reference(k, v, torch.tensor([0, 40], dtype=torch.int32), KS, S, "mean")
    torch.testing.assert_close(c.compressed(0)[0].double(), ref_k, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="in use elsewhere"):
        c.set_pages(1, [3], 10)
    c.check()
    c.block_table[0, 1] = 99  # a table corrupted from outside
    with pytest.raises(ValueError, match="outside the pool"):
        c.check()


def test_release_returns_pages():
    c = _cache(num_pages=8)
    c.append([1], *_rows(50, 0), [50])
    assert c.free_pages == 4
    c.release(1)
    assert c.free_pages == 8 and c.lengths[1] == 0 and c.compressed(1)[0].shape[0] == 0


def test_constructor_and_read_errors():
    with pytest.raises(ValueError, match="kernel_size"):
        NSAKVCache(1, 4, PAGE, 64, HKV, D, kernel_size=24, stride=16)
    with pytest.raises(ValueError, match="page_size"):
        NSAKVCache(1, 4, 0, 64, HKV, D, kernel_size=KS, stride=S)
    c = _cache()
    c.append([0], *_rows(10, 0), [10])
    with pytest.raises(IndexError, match="outside sequence"):
        c.raw(0, 0, 11)


@pytest.mark.parametrize("length", [KS - 1, KS, 2 * 64 + S + 1])
def test_decode_from_the_cache_equals_the_last_prefill_row(length):
    """Prefill ``length - 1`` rows, append one: the decode reference over the cache's contents
    gives the prefill reference's last row."""
    g = 2
    branch = dict(kernel_size=KS, stride=S, block_size=64, topk=4, init_blocks=1, local_blocks=2, window_size=40)
    def reference_pool(k_span, v_span, cu, starts):  # fsagen.compress takes no float64: the reference pools
        return compress_reference(k_span, v_span, cu, KS, S, "mean")[:2]

    c = NSAKVCache(1, 20, PAGE, 320, HKV, D, kernel_size=KS, stride=S, dtype=torch.float64,
                   compress_fn=reference_pool)
    k, v = _rows(length, 7, torch.float64)
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(length, HKV * g, D, generator=gen, dtype=torch.float64)
    gates = torch.rand(length, HKV * g, 3, generator=gen, dtype=torch.float64)
    c.append([0], k[:-1], v[:-1], [length - 1])
    c.append([0], k[-1:], v[-1:], [1])
    o_full = nsa_attention_reference(q, k, v, gates, torch.tensor([0, length], dtype=torch.int32), **branch)
    kr, vr = c.raw(0)
    kc, vc = c.compressed(0)
    o = nsa_decode_reference(q[-1:], kr, vr, kc, vc, torch.tensor([length - 1]), gates[-1:], **branch)
    torch.testing.assert_close(o, o_full[-1:], rtol=1e-9, atol=1e-11)


# --------------------------------------------------------------------------- source rows (source_dtype)


def _source_cache(calls, num_pages=40, max_len=300):
    """A bf16 cache pooling windows from float32 source rows with the reference mean, plus each
    window's start position added to its k (so a wrong start shows), recording every call."""
    def pool(k, v, cu, starts):
        calls.append((k.dtype, cu.tolist(), starts.tolist()))
        k_c, v_c, _ = compress_reference(k, v, cu, KS, S, "mean")
        return k_c + starts[:, None, None], v_c

    return NSAKVCache(3, num_pages, PAGE, max_len, HKV, D, kernel_size=KS, stride=S, dtype=torch.bfloat16,
                      compress_fn=pool, source_dtype=torch.float32)


def test_source_rows_are_pooled_in_batched_calls_across_appends():
    calls = []
    c = _source_cache(calls)
    src = {s: _rows(n, 10 + s) for s, n in enumerate((90, 60, 33))}
    at = {0: 0, 1: 0, 2: 0}
    steps = [([0, 1], [40, 17]), ([0, 1, 2], [1, 1, 31]), ([2, 0], [1, 15]), ([0, 1, 2], [34, 42, 1])]
    for seqs, counts in steps:
        ks = [src[s][0][at[s]:at[s] + n] for s, n in zip(seqs, counts)]
        vs = [src[s][1][at[s]:at[s] + n] for s, n in zip(seqs, counts)]
        k, v = torch.cat(ks), torch.cat(vs)
        c.append(seqs, (2 * k).bfloat16(), v.bfloat16(), counts, source=(k, v))  # pages hold something else
        for s, n in zip(seqs, counts):
            at[s] += n
    # one call per append that completes windows (the second completes none), every sequence in it
    assert len(calls) == 3 and all(dtype == torch.float32 for dtype, _, _ in calls)
    assert calls[1][1:] == ([0, 32, 64], [0, 16])  # seq 2 completes window 0, then seq 0 window 1 (start 16)
    for s, (k, v) in src.items():
        ref_k, ref_v, cu_c = compress_reference(k, v, torch.tensor([0, k.shape[0]], dtype=torch.int32), KS, S, "mean")
        ref_k = ref_k + (torch.arange(ref_k.shape[0]) * S).double()[:, None, None]
        ck, cv = c.compressed(s)
        assert torch.equal(ck, ref_k.bfloat16()) and torch.equal(cv, ref_v.bfloat16()), s
        assert torch.equal(c.raw(s)[0], (2 * k).bfloat16())
        assert torch.equal(c.src_k[s, torch.arange(k.shape[0] - KS, k.shape[0]) % KS], k[-KS:])  # the ring


def test_source_rows_in_a_narrower_dtype_reach_the_hook_in_it():
    calls = []
    c = _source_cache(calls)
    k, v = _rows(KS, 3, torch.bfloat16)
    c.append([1], k, v, [KS], source=(k, v))
    assert calls[0][0] == torch.bfloat16
    assert torch.equal(c.src_k[1].bfloat16(), k)


def test_precomputed_compressed_tokens_skip_the_hook():
    calls = []
    c = _source_cache(calls)
    k, v = _rows(50, 4)
    k_c, v_c = _rows(2, 5, torch.bfloat16)  # 50 rows complete windows 0 and 1
    c.append([0], k.bfloat16(), v.bfloat16(), [50], source=(k, v), compressed=(k_c, v_c))
    assert not calls and torch.equal(c.compressed(0)[0], k_c) and torch.equal(c.compressed(0)[1], v_c)
    k2, v2 = _rows(14, 6)  # rows 50..63 complete window 2 (rows 32..63) from the ring and the new rows
    c.append([0], k2.bfloat16(), v2.bfloat16(), [14], source=(k2, v2))
    whole_k, whole_v = torch.cat([k, k2]), torch.cat([v, v2])
    ref_k, _, _ = compress_reference(whole_k[32:64], whole_v[32:64], torch.tensor([0, 32], dtype=torch.int32), KS, S,
                                   "mean")
    assert calls[0][1:] == ([0, 32], [32])
    assert torch.equal(c.compressed(0)[0][2], (ref_k[0] + 32).bfloat16())


@pytest.mark.parametrize("case", ["missing", "page_mode", "too_wide", "shape", "mixed", "compressed_rows",
                                  "set_pages"])
def test_bad_source_calls_raise_and_leave_the_cache_unchanged(case):
    calls = []
    c = _source_cache(calls)
    k, v = _rows(20, 0)
    c.append([0], k.bfloat16(), v.bfloat16(), [20], source=(k, v))
    before = _state(c) + (c.src_k.clone(),)
    k2, v2 = _rows(12, 1)  # completes window 0 of sequence 0
    kb, vb = k2.bfloat16(), v2.bfloat16()
    page_mode = _cache(dtype=torch.bfloat16)
    call, err, match = {
        "missing": (lambda: c.append([0], kb, vb, [12]), ValueError, "pass source="),
        "page_mode": (lambda: page_mode.append([0], kb, vb, [12], source=(k2, v2)), ValueError,
                      "pools windows from its pages"),
        "too_wide": (lambda: c.append([0], kb, vb, [12], source=(k2.double(), v2.double())), ValueError,
                     "not held exactly"),
        "shape": (lambda: c.append([0], kb, vb, [12], source=(k2[:11], v2)), ValueError, r"source\[0\] must be"),
        "mixed": (lambda: c.append([0], kb, vb, [12], source=(k2, v2.bfloat16())), ValueError, "share a dtype"),
        "compressed_rows": (lambda: c.append([0], kb, vb, [12], source=(k2, v2), compressed=(kb[:2], vb[:2])),
                            ValueError, "the 1 compressed tokens"),
        "set_pages": (lambda: c.set_pages(1, [5], 10), ValueError, "pools windows from source rows"),
    }[case]
    with pytest.raises(err, match=match):
        call()
    assert _same(before, _state(c)) and torch.equal(before[-1], c.src_k) and not calls
    assert page_mode.lengths == [0, 0, 0]
