"""NativeSparseAttention with a KV cache on the GPU: prefill into the cache, then decode steps
through the real decode kernels (``fsagen.decode.nsa_decode``), against the float64 layer oracle
and the layer's own full prefill.

A varlen batch is prefilled with prompts at and just past the compression-window ends
(``kernel_size + i * stride``), the block ends and ``topk * block_size`` (where selection really
chooses), then every sequence decodes ``STEPS`` tokens, one per step, batched. Each step's output
is compared with the last row of the float64 oracle over the whole prefix, given the decode's own
selection for that row (near-ties may select differently in float32 than in float64; with the same
selection everything else is compared exactly) and with the last row of a prefill of the whole
prefix (bf16 kernels both). How often the decode's selection equals the prefill kernel's
(``sel_agree``) is reported, not asserted. At the end, the cache's compressed tokens (windows
completed during decode were pooled by the layer's hook from the unrotated keys) are compared
with those a prefill of the whole sequences writes.

Kernels: the default grid (slc 64/16, sel 64/32/16/16, cmp, swa, comp, dec G in 1, 4, 16 at
page size 64). tests/gpu/test_llama_cache_gpu.py runs the llama example's greedy generation with
the cache.
"""
import pytest
import torch

from fsagen.reference_layer import nsa_layer_reference
from fsagen.testing import log_errors, rel_err
from test_nsa_gpu import D, HIDDEN, TOL, _layer, _poison, _seed  # noqa: F401  (_poison: autouse fixture)

pytestmark = pytest.mark.gpu

# the layer of test_nsa_gpu: Hkv = 2, D = 64, block_size 64, topk 16, kernel_size 32, stride 16,
# window 128, init_blocks 1, local_blocks 2, bias, rotary; compression parameters off their start.
# Prompts: one short of the first window, at window ends (32 + 16 i: 47 -> 48), one short of and at
# a block end (63, 64), past 2 blocks, and past topk * block_size = 1024 (1023 -> 1024 crosses it)
PROMPTS = (1, 31, 47, 63, 64, 129, 1023, 1300)
STEPS = 3
FIELDS = ("out_vs_oracle", "out_vs_prefill", "sel_agree", "cmp_equal")


def _cu(lengths):
    return torch.tensor((0,) + tuple(lengths), device="cuda").cumsum(0).to(torch.int32)


def _sorted_sel(t):
    return t.sort(dim=-1).values


@pytest.mark.parametrize("kind,gate,autocast", [("mean", "per_head", False), ("linear", "per_token", False),
                                                ("weighted", "per_head", True)])
@pytest.mark.parametrize("G", [1, 4, 16])
@torch.no_grad()
def test_layer_decode_matches_the_oracle_and_the_prefill(G, kind, gate, autocast):
    seed = _seed()
    m = _layer(G, kind, gate, seed)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    xs = [torch.randn(p + STEPS, HIDDEN, device="cuda", generator=gen) for p in PROMPTS]
    cache = m.new_cache(len(PROMPTS), max(PROMPTS) + STEPS)
    b = len(PROMPTS)
    case = f"G={G} D={D} {kind} {gate} autocast={autocast} prompts={PROMPTS} seed={seed}"
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        m(torch.cat([x[:p] for x, p in zip(xs, PROMPTS)]), _cu(PROMPTS), cache=cache)
        for i in range(STEPS):
            lengths = [p + i + 1 for p in PROMPTS]
            out, parts = m(torch.stack([x[n - 1] for x, n in zip(xs, lengths)]), cache=cache, cache_seqs=range(b),
                           return_parts=True)
            assert out.isfinite().all(), case
            x_all, cu = torch.cat([x[:n] for x, n in zip(xs, lengths)]), _cu(lengths)
            last = cu[1:].long() - 1
            full, fparts = m(x_all, cu, return_parts=True)
            # the oracle with the prefill kernel's selection, the decode's for the last rows
            sel = fparts["topk_idx"].clone()
            sel[:, last] = parts["topk_idx"].to(sel.dtype)
            with torch.autocast("cuda", enabled=False):
                oracle = nsa_layer_reference(m, x_all, cu, topk_idx=sel)[last]
            agree = (_sorted_sel(fparts["topk_idx"][:, last]) == _sorted_sel(parts["topk_idx"])).all(-1)
            errs = {"out_vs_oracle": max(rel_err(out[j], oracle[j]) for j in range(b)),
                    "out_vs_prefill": max([rel_err(out[j], full[last[j]]) for j in range(b) if agree[:, j].all()],
                                          default=0.0),
                    "sel_agree": agree.double().mean().item()}
            log_errors("layer-cache-gpu", f"{case} step {i}", errs, FIELDS)
            # under autocast the layer's projections run in bf16 too, which the float64 oracle does not
            assert errs["out_vs_oracle"] < (2 * TOL if autocast else TOL) and errs["out_vs_prefill"] < TOL, \
                f"{case} step {i}: {errs}"
        whole = m.new_cache(b, max(PROMPTS) + STEPS)
        m(torch.cat(xs), _cu([x.shape[0] for x in xs]), cache=whole)
    equal = []
    for s in range(b):
        assert cache.lengths[s] == whole.lengths[s]
        # v is never rotated, but one token's projection and a whole sequence's are different GEMMs
        # on a GPU (cuBLAS picks its algorithm by shape): equal up to float32 rounding, then bf16
        v_err = rel_err(cache.raw(s)[1], whole.raw(s)[1])
        assert v_err < 1e-2, f"{case}: raw v rows of slot {s}: {v_err}"
        for got, want in zip(cache.compressed(s), whole.compressed(s)):
            if got.numel():
                assert rel_err(got, want) < 1e-2, f"{case}: compressed tokens of slot {s}"
            equal.append(torch.equal(got, want))
    log_errors("layer-cache-gpu", f"{case} compressed store", {"cmp_equal": sum(equal) / len(equal)}, FIELDS)
