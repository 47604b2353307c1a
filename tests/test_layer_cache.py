"""NativeSparseAttention with a KV cache on the CPU: prefill into the cache, then decode steps.

The prefill and the decode step run the real kernels through the ``cpu`` schedule (G = 2, D = 32,
the block / window sizes and the decode page size 16 of tests/test_cpu_kernels.py, whose artifacts
it shares). Checked:

* the cache's compressed tokens are those of the layer's prefill of the whole sequence (same
  compression kind and parameters, rotary at the window start), bit for bit, for every kind, and
  equal the float64 oracle's; its raw rows likewise;
* every decode step's output equals the last row of a prefill of the whole prefix (the kernels)
  and of the float64 layer oracle, for sequences crossing window and block boundaries;
* padded input (left padding) gives the packed results;
* bad caches, slots and sizes raise before anything changes.
"""
import copy

import pytest
import torch

from decode_standin import decode_log  # noqa: F401  (fixture)
from fsagen.kv_cache import NSAKVCache
from fsagen.nn import NativeSparseAttention
from fsagen.reference_cmp import compress_reference
from fsagen.reference_layer import nsa_layer_reference, rotary_reference, sequence_positions
from fsagen.testing import rel_err

HIDDEN, HQ, HKV, D = 64, 4, 2, 32
KS, S, BS = 32, 16, 32
CFG = dict(num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, block_size=BS, topk=4, kernel_size=KS, stride=S,
           window_size=40, init_blocks=1, local_blocks=2)
# prompt lengths: short of the first window, at a window end, just past a block end, past several
PROMPTS = [31, 47, 64, 66]
STEPS = 3  # decode steps: 31 -> 34 crosses the window / block end at 32, 47 -> 50 the window end at 48
TOL = 2e-2  # bf16 kernels against float64
PAGE = 16  # the decode kernel of tests/test_cpu_kernels.py


def _layer(kind="mean", gate="per_head", rope=10000.0, seed=0):
    torch.manual_seed(seed)
    layer = NativeSparseAttention(hidden_size=HIDDEN, rope_theta=rope, compression=kind, gate=gate, **CFG)
    with torch.no_grad():  # learned compression parameters away from their mean-pooling start
        for p in layer.compression_params.values():
            p.add_(torch.randn_like(p) * 0.05)
    return layer


def _cu(lengths):
    return torch.tensor([0] + list(lengths), dtype=torch.int32).cumsum(0, dtype=torch.int32)


def _inputs(lengths, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, HIDDEN, generator=gen) for n in lengths]


def _state(c):
    return (list(c.lengths), c.block_table.clone(), c.free_pages, c.k_pages.clone(), c.v_pages.clone(),
            c.k_cmp.clone(), c.src_k.clone())


def _same(a, b):
    return all(x == y if not isinstance(x, torch.Tensor) else torch.equal(x, y) for x, y in zip(a, b))


@torch.no_grad()
def _prefill_then_decode(layer, xs, prompts, steps, cache=None):
    """Prefill ``xs[b][:prompts[b]]`` into a cache, then ``steps`` decode steps; returns (cache,
    decode outputs ``[steps, B, hidden]``)."""
    if cache is None:
        cache = layer.new_cache(len(xs), max(p + steps for p in prompts) + 5, page_size=PAGE)
    layer(torch.cat([x[:p] for x, p in zip(xs, prompts)]), _cu(prompts), cache=cache)
    outs = [layer(torch.stack([x[p + i] for x, p in zip(xs, prompts)]), cache=cache, cache_seqs=range(len(xs)))
            for i in range(steps)]
    return cache, torch.stack(outs)


@pytest.mark.parametrize("kind", ["mean", "weighted", "linear"])
def test_cached_compressed_tokens_equal_the_prefill(decode_log, kind):
    """Windows completed during decode are pooled from the unrotated keys like the prefill's: the
    cache after prefill + decode equals the cache a prefill of the whole sequences writes."""
    layer = _layer(kind)
    xs = _inputs([p + STEPS for p in PROMPTS])
    stepped, _ = _prefill_then_decode(layer, xs, PROMPTS, STEPS)
    assert len(decode_log) == STEPS
    whole = layer.new_cache(len(xs), 80, page_size=PAGE)
    with torch.no_grad():
        layer(torch.cat(xs), _cu([x.shape[0] for x in xs]), cache=whole)
    for s, x in enumerate(xs):
        n = x.shape[0]
        assert stepped.lengths[s] == whole.lengths[s] == n
        for a, b in zip(stepped.raw(s) + stepped.compressed(s), whole.raw(s) + whole.compressed(s)):
            assert torch.equal(a, b), f"{kind} slot {s}"
        # and the float64 oracle: compression of the unrotated k, v, then rotary at i * stride
        x64 = x.double()
        k = (x64 @ layer.k_proj.weight.double().T).view(n, HKV, D)
        v = (x64 @ layer.v_proj.weight.double().T).view(n, HKV, D)
        params = {name: p.double() for name, p in layer.compression_params.items()}
        k_c, v_c, cu_c = compress_reference(k, v, _cu([n]), KS, S, kind, **params)
        k_c = rotary_reference(k_c, sequence_positions(cu_c, k_c.shape[0], step=S), layer.rope_theta)
        got_k, got_v = stepped.compressed(s)
        assert got_k.shape[0] == (n - KS) // S + 1 if n >= KS else got_k.shape[0] == 0
        if got_k.shape[0]:
            assert rel_err(got_k, k_c) < 1e-2 and rel_err(got_v, v_c) < 1e-2
        assert rel_err(stepped.raw(s)[0], rotary_reference(k, torch.arange(n), layer.rope_theta)) < 1e-2


@pytest.mark.parametrize("gate,rope", [("per_head", 10000.0), ("per_token", None)])
def test_decode_equals_the_last_row_of_a_full_prefill(decode_log, gate, rope):
    layer = _layer("weighted", gate, rope)
    xs = _inputs([p + STEPS for p in PROMPTS], seed=2)
    _, outs = _prefill_then_decode(layer, xs, PROMPTS, STEPS)
    for i in range(STEPS):
        lengths = [p + i + 1 for p in PROMPTS]
        x = torch.cat([x[:n] for x, n in zip(xs, lengths)])
        last = _cu(lengths)[1:].long() - 1
        with torch.no_grad():
            kernels = layer(x, _cu(lengths))[last]
            oracle = nsa_layer_reference(layer, x, _cu(lengths))[last]
        for b in range(len(xs)):
            assert rel_err(outs[i, b], oracle[b]) < TOL, (i, b, lengths[b])
            assert rel_err(outs[i, b], kernels[b]) < TOL, (i, b, lengths[b])


def test_several_tokens_per_sequence_equal_a_full_prefill(decode_log):
    """One call bringing several tokens per slot (speculative drafts; a chunk onto a prefix; an
    empty slot's first tokens) after a prefill: each row equals the same row of a prefill of the
    whole sequence (kernels) and of the float64 oracle, and the cache equals the whole prefill's."""
    layer = _layer("weighted")
    counts = [3, 1, 18, 4]  # 31 -> 34 (a window end at 31); 47 -> 48; 64 -> 82 (a window, a block); empty -> 4
    prompts = [31, 47, 64, 0]
    xs = _inputs([p + c for p, c in zip(prompts, counts)], seed=3)
    cache = layer.new_cache(len(xs), 90, page_size=PAGE)
    with torch.no_grad():
        layer(torch.cat([x[:p] for x, p in zip(xs, prompts)]), _cu(prompts), cache=cache)
        out = layer(torch.cat([x[p:] for x, p in zip(xs, prompts)]), _cu(counts), cache=cache)
        x_all, cu_all = torch.cat(xs), _cu([x.shape[0] for x in xs])
        kernels = layer(x_all, cu_all)
        oracle = nsa_layer_reference(layer, x_all, cu_all)
    whole = layer.new_cache(len(xs), 90, page_size=PAGE)
    with torch.no_grad():
        layer(x_all, cu_all, cache=whole)
    row = 0
    for s, (x, p, c) in enumerate(zip(xs, prompts, counts)):
        first = int(cu_all[s]) + p
        for t in range(c):
            assert rel_err(out[row], oracle[first + t]) < TOL, (s, t)
            assert rel_err(out[row], kernels[first + t]) < TOL, (s, t)
            row += 1
        for a, b in zip(cache.raw(s) + cache.compressed(s), whole.raw(s) + whole.compressed(s)):
            assert torch.equal(a, b), f"slot {s}"


def test_padded_input_matches_packed(decode_log):
    layer = _layer("mean")
    xs = _inputs([p + STEPS for p in PROMPTS], seed=3)
    packed, outs = _prefill_then_decode(layer, xs, PROMPTS, STEPS)
    t = max(PROMPTS)
    x = torch.zeros(len(xs), t, HIDDEN)
    mask = torch.zeros(len(xs), t, dtype=torch.bool)
    for b, (xb, p) in enumerate(zip(xs, PROMPTS)):  # left padding
        x[b, t - p:], mask[b, t - p:] = xb[:p], True
    padded = layer.new_cache(len(xs), 80, page_size=PAGE)
    with torch.no_grad():
        pre = layer(x, attention_mask=mask, cache=padded)
        steps = [layer(torch.stack([xb[p + i] for xb, p in zip(xs, PROMPTS)])[:, None], cache=padded)
                 for i in range(STEPS)]
        ref = layer(torch.cat([xb[:p] for xb, p in zip(xs, PROMPTS)]), _cu(PROMPTS))
    assert torch.equal(pre[mask], ref) and not pre[~mask].any()
    assert torch.equal(torch.stack(steps)[:, :, 0], outs)
    for s in range(len(xs)):
        assert torch.equal(padded.compressed(s)[0], packed.compressed(s)[0])


def test_slots_map_sequences_and_empty_slots_decode(decode_log):
    """cache_seqs picks the slots; a decode step may start an empty slot (its first token)."""
    layer = _layer("mean")
    xs = _inputs([40, 3])
    cache = layer.new_cache(4, 64, page_size=PAGE)
    with torch.no_grad():
        layer(xs[0][:39], cache=cache, cache_seqs=[2])
        out = layer(torch.stack([xs[0][39], xs[1][0]]), cache=cache, cache_seqs=[2, 0])
        ref = [layer(xs[0])[-1], layer(xs[1][:1])[-1]]
    assert cache.lengths == [1, 0, 40, 0]
    assert rel_err(out[0], ref[0]) < TOL and rel_err(out[1], ref[1]) < TOL


def test_bad_calls_raise_and_leave_the_cache_unchanged(decode_log):
    layer = _layer("mean")
    xs = _inputs([40, 20], seed=4)
    cache = layer.new_cache(3, 48, num_pages=6, page_size=16)
    with torch.no_grad():
        layer(torch.cat(xs), _cu([40, 20]), cache=cache)
    before = _state(cache)
    one = torch.randn(2, HIDDEN)

    def other(**kw):  # a cache of another geometry
        fields = dict(batch=3, num_pages=6, page_size=16, max_len=48, num_kv_heads=HKV, head_dim=D, kernel_size=KS,
                      stride=S, dtype=torch.bfloat16, compress_fn=layer._compress_windows, source_dtype=torch.float32)
        fields.update(kw)
        return NSAKVCache(fields.pop("batch"), fields.pop("num_pages"), fields.pop("page_size"),
                          fields.pop("max_len"), fields.pop("num_kv_heads"), fields.pop("head_dim"), **fields)

    cases = [
        (lambda: layer(one, cache=object()), TypeError, r"^cache: must be an fsagen.NSAKVCache"),
        (lambda: layer(one, cache=other(num_kv_heads=1)), ValueError, r"^cache: num_kv_heads must be 2"),
        (lambda: layer(one, cache=other(head_dim=16)), ValueError, r"^cache: head_dim must be 32"),
        (lambda: layer(one, cache=other(kernel_size=64)), ValueError, r"^cache: kernel_size must be 32"),
        (lambda: layer(one, cache=other(stride=32)), ValueError, r"^cache: stride must be 16"),
        (lambda: layer(one, cache=other(dtype=torch.float16)), ValueError, r"^cache: dtype must be torch.bfloat16"),
        (lambda: layer(one, cache=other(device="meta")), ValueError, r"^cache: device must be cpu"),
        (lambda: layer(one, cache=other(page_size=64, num_pages=2)), ValueError, r"^cache: page_size must divide"),
        (lambda: layer(one, cache=other(compress_fn=None)), ValueError, r"^cache: must pool its windows"),
        (lambda: layer(one, cache=other(source_dtype=None)), ValueError, r"^cache: must pool its windows"),
        (lambda: layer(one, cache=copy.deepcopy(layer).new_cache(3, 48, page_size=PAGE)), ValueError,
         r"^cache: must pool"),
        # slots
        (lambda: layer(one, cache=cache, cache_seqs=[0, 3]), IndexError, "out of range"),
        (lambda: layer(one, cache=cache, cache_seqs=[1, 1]), ValueError, r"^cache_seqs: must not repeat"),
        (lambda: layer(one, _cu([1, 1]), cache=cache, cache_seqs=[0]), ValueError, r"^cache_seqs: must list one"),
        (lambda: layer(one, cache=cache, cache_seqs=[0, 1, 2]), ValueError, r"^x: without cu_seqlens"),
        (lambda: layer(one, cache_seqs=[0, 1]), ValueError, r"^cache_seqs: names cache slots"),
        # a decode step with a sequence that brings nothing
        (lambda: layer(one, _cu([2, 0]), cache=cache, cache_seqs=[0, 1]), ValueError,
         r"^cache: a decode step brings every sequence at least one token; slot 1 gets 0"),
        # room: max_len (48) and pages (6 x 16 rows, 4 + 2 in use)
        (lambda: layer(torch.randn(49, HIDDEN), cache=cache, cache_seqs=[2]), ValueError, "over max_len=48"),
        (lambda: layer(torch.randn(17, HIDDEN), cache=cache, cache_seqs=[2]), RuntimeError, "needs 2 free pages"),
        (lambda: layer(torch.randn(2, HIDDEN), _cu([2]).to(torch.int64), cache=cache, cache_seqs=[2]), ValueError,
         r"^cu_seqlens: must be int32"),
        (lambda: layer(torch.randn(2, HIDDEN), torch.tensor([0, 3], dtype=torch.int32), cache=cache,
                       cache_seqs=[2]), ValueError, r"^cu_seqlens: must run non-decreasing from 0 to N=2"),
    ]
    for call, err, match in cases:
        with pytest.raises(err, match=match):
            call()
        assert _same(before, _state(cache)), match
    # a block table corrupted from outside: the decode step names it before writing
    cache.block_table[1, 0] = 99
    before = _state(cache)
    with pytest.raises(ValueError, match="block table of sequence 1 points outside the pool"):
        with torch.no_grad():
            layer(one, cache=cache, cache_seqs=[0, 1])
    assert _same(before, _state(cache))
    assert not decode_log  # no decode ran
    with pytest.raises(ValueError, match=r"^page_size: must divide block_size=32"):
        layer.new_cache(2, 64, page_size=64)
