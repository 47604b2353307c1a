"""The sm80 (Ampere) schedule's kernels on a newer GPU, through their embedded compute_80 PTX.

``FSAGEN_ARCH=sm80`` makes the ops plan with schedules/sm80.toml and load sm80 artifacts (from
``$FSAGEN_GENERATED_DIR``/sm80 when built ahead of time, else compiled into the user cache). On an
H100 their sm_80 machine code cannot load, so each stage runs only if the driver JIT-compiles its
PTX: a pass checks both the PTX path and the sm80 programs' numerics. Each family (slc in both loop
orders, cmp, swa, sel, comp, dec, gate), forward and backward, runs once per spec of the grid's ``ci`` subset
through the existing GPU tests' own cases (float64 references, NaN-poisoned outputs); every kernel
they loaded must be an sm80 artifact carrying compute_80 PTX.

    python -m pytest -m gpu -s tests/gpu/test_sm80_ptx.py

The whole GPU suite runs on the sm80 kernels the same way:
``FSAGEN_ARCH=sm80 python -m pytest -m gpu tests/gpu/test_slc_gpu.py tests/gpu/test_dense_gpu.py``.
"""
import pytest
import torch

import test_compress_gpu as compress_cases
import test_decode_gpu as decode_cases
import test_dense_gpu as dense_cases  # tests/gpu is on sys.path (rootdir-less), as in test_aot_artifacts
import test_gate_gpu as gate_cases
import test_slc_gpu as slc_cases

from fsagen import cache
from fsagen.lower import fatbin_entries
from fsagen.spec import load_grid

pytestmark = pytest.mark.gpu

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _family_cases():
    """One call per (family, shape) of the ci subset; a call runs forward and backward."""
    cases = {}
    for s in load_grid(subset="ci"):
        dtype = DTYPES[s.dtype]
        if s.branch == "slc":
            for order in slc_cases.LOOP_ORDERS:
                cases[f"slc-G{s.G}-D{s.D}-bs{s.block_size}-{s.dtype}-{order}"] = (
                    slc_cases.test_grid, (s.G, s.D, s.block_size, s.topk, s.dtype, order))
        elif s.branch == "cmp":
            cases[f"cmp-G{s.G}-D{s.D}-{s.dtype}"] = (dense_cases.test_cmp_attention, (s.G, s.D, 32, 16, dtype, "edges"))
        elif s.branch == "swa":
            cases[f"swa-G{s.G}-D{s.D}-{s.dtype}"] = (
                dense_cases.test_sliding_window_attention, (s.G, s.D, 100, dtype, "random"))
        elif s.branch == "sel":
            cases[f"sel-G{s.G}-D{s.D}-bs{s.block_size}-{s.dtype}"] = (
                dense_cases.test_select_blocks, (s.G, s.D, s.kernel_size, s.stride, s.block_size, dtype, "random"))
        elif s.branch == "comp":
            cases[f"comp-D{s.D}-ks{s.kernel_size}-s{s.stride}-{s.dtype}"] = (
                _compress_case, ("weighted", s.kernel_size, s.stride, s.D, dtype, "edge_lengths"))
        elif s.branch == "dec":
            cases[f"dec-G{s.G}-D{s.D}-{s.dtype}"] = (decode_cases.check_decode, (s.G, s.D, dtype, "slc"))
        elif s.branch == "gate":
            cases[f"gate-D{s.D}-{s.dtype}"] = (_gate_case, (64, s.D, dtype, True))
        else:
            raise AssertionError(f"test_sm80_ptx has no case for branch {s.branch!r} of the ci subset")
    return cases


def _compress_case(*args):
    # test_kernels_match_reference takes pytest's monkeypatch only to set FSAGEN_POISON, which the
    # sm80_kernels fixture below already sets
    compress_cases.test_kernels_match_reference(*args, pytest.MonkeyPatch())


def _gate_case(*args):
    with pytest.MonkeyPatch.context() as mp:  # the test spies on the glue through monkeypatch
        gate_cases.test_gate_sum(*args, mp)


CASES = _family_cases()


@pytest.fixture(autouse=True)
def sm80_kernels(monkeypatch):
    monkeypatch.setenv("FSAGEN_ARCH", "sm80")
    monkeypatch.setenv("FSAGEN_POISON", "1")
    monkeypatch.setattr(cache, "_loaded", {})
    yield cache._loaded


@pytest.mark.parametrize("name", sorted(CASES))
def test_sm80_kernels_through_ptx(name, sm80_kernels):
    run, args = CASES[name]
    run(*args)
    assert sm80_kernels, f"{name}: no kernel was loaded"
    for (spec, plan, arch), kernel in sm80_kernels.items():
        assert arch == "sm80" and kernel.path.parent.name == "sm80", kernel.path
        for stage in kernel.stages:
            library = kernel.path / kernel.meta["stages"][stage]["library"]
            assert ("ptx", 80) in fatbin_entries(library), f"{kernel.name} {stage}: no compute_80 PTX"
    print(f"\n[sm80-ptx] {name} on {torch.cuda.get_device_name()}: "
          + ", ".join(sorted({k.name.split('-')[0] + '.' + p.loop_order for (_, p, _), k in sm80_kernels.items()})))
