"""fsagen.compress on the GPU against the float64 reference: k_cmp, v_cmp and every gradient.

bf16 and fp16 inputs at N ~ 5000 packed tokens, varlen (random boundaries, and a batch with empty
entries, sequences shorter than / exactly kernel_size and lengths not aligned to the stride).
Every relative error ``||out - ref|| / ||ref||`` is printed (run pytest with ``-s``) and, with
``FSAGEN_GPU_LOG=path``, appended to that file as a markdown table; bounds: bf16 < 1e-2,
fp16 < 2e-3.
"""

import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the CPU test's helpers
from test_compress import KIND_IDS, KINDS, _params, compare_with_grads  # noqa: E402

from fsagen.compression import compress  # noqa: E402
from fsagen.testing import log_errors, random_cu_seqlens  # noqa: E402

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}  # fp16 carries 3 more mantissa bits
FIELDS = ("k_cmp", "v_cmp", "dk", "dv", "dweight", "dproj_k", "dproj_v", "dpos_emb")
HKV = 2


def _gen(seed=None):
    return torch.Generator(device="cuda").manual_seed(seed if seed is not None else time.time_ns() % 2**31)


def _cu(layout, ks, s, gen):
    if layout == "random":
        return random_cu_seqlens(5000, 7, generator=gen, device="cuda")
    lengths = [0, ks - 1, ks, 0, ks + s + 3, 1, 2500, 3 * ks + s // 2 + 1, 2000, 0]
    return torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)


def _inputs(layout, kind, pos, ks, s, dtype, gen):
    d, dv = (128, 128) if pos else (192, 128)  # D != Dv wherever the kind allows it
    cu = _cu(layout, ks, s, gen)
    n = int(cu[-1])
    k = torch.randn(n, HKV, d, device="cuda", generator=gen).to(dtype)
    v = torch.randn(n, HKV, dv, device="cuda", generator=gen).to(dtype)
    return k, v, cu, _params(kind, pos, HKV, ks, d, dv, dtype, gen)


@pytest.mark.parametrize("layout", ["random", "edge_lengths"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("ks,s", [(32, 16), (64, 32)])
@pytest.mark.parametrize("kind,pos", KINDS, ids=KIND_IDS)
def test_matches_reference(kind, pos, ks, s, dtype, layout):
    gen = _gen()
    k, v, cu, params = _inputs(layout, kind, pos, ks, s, dtype, gen)
    case = f"{KIND_IDS[KINDS.index((kind, pos))]} ks={ks} s={s} {str(dtype)[6:]} {layout} N={k.shape[0]}"
    errs, _, _ = compare_with_grads(k, v, cu, ks, s, kind, params, gen, None)  # bounded below, once recorded
    log_errors("compress-gpu", case, errs, FIELDS)
    bad = {name: e for name, e in errs.items() if not e < TOL[dtype]}
    assert not bad, f"{case}: relative errors over {TOL[dtype]}: {bad}"


@pytest.mark.parametrize("kind,pos", KINDS, ids=KIND_IDS)
def test_forward_syncs_once(kind, pos):
    """The forward reads one thing on the host: the number of compressed tokens (with the
    cu_seqlens checks), so torch's sync debug mode sees exactly one synchronising call."""
    gen = _gen(0)
    k, v, cu, params = _inputs("random", kind, pos, 32, 16, torch.bfloat16, gen)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    try:
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compress(k, v, cu, 32, 16, kind, **params)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
