"""The real programs compile on this (GPU-less) machine: for sm_90a every stage of every loop order a
branch can use, for the grid's `ci` subset; for sm_80 one ci spec per (loop order, phase), i.e.
every program once. No run: the numerics are checked by tests/gpu on the H100 (sm80 through its
PTX: tests/gpu/test_sm80_ptx.py).

Slow-ish (a TileLang + nvcc compile per stage), so each (arch, spec, loop order) builds once, in a
process pool, into a temporary artifact root through the same path as `fsagen build`.
"""
import concurrent.futures
import json
import os

import pytest

from fsagen.kernels import stage_names
from fsagen.lower import fatbin_entries
from fsagen.schedule import load_schedule
from fsagen.spec import load_grid

CI = load_grid(subset="ci")  # the one list of specs both arches compile


def _cases(arch, specs):
    return [(arch, spec, order) for spec in specs for order in load_schedule(arch).loop_orders_for(spec.branch)]


def _one_per_program(cases):
    """The first case of each (loop order, phase): every program family and phase once."""
    seen, picked = set(), []
    for arch, spec, order in cases:
        if (order, spec.phase) not in seen:
            seen.add((order, spec.phase))
            picked.append((arch, spec, order))
    return picked


CASES = _cases("sm90", CI) + _one_per_program(_cases("sm80", CI))


def _build(args):
    arch, spec, order, root = args
    from fsagen.cache import ensure_artifact

    plan = load_schedule(arch).plan(spec, loop_order=order)
    path, _ = ensure_artifact(spec, plan, arch, root=root)
    return str(path)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("aot")
    jobs = min(len(CASES), os.cpu_count() or 1)
    with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
        paths = list(pool.map(_build, [(*case, root) for case in CASES]))
    return dict(zip(CASES, paths))


def _stages(meta, path):
    """(stage, stage meta, library path, CUDA source) of each stage of an artifact."""
    for stage, info in meta["stages"].items():
        yield stage, info, os.path.join(path, info["library"]), open(os.path.join(path, info["source"])).read()


@pytest.mark.parametrize("arch,spec,order", CASES, ids=[f"{a}-{s.name}-{o}" for a, s, o in CASES])
def test_every_stage_compiles(built, arch, spec, order):
    path = built[(arch, spec, order)]
    meta = json.loads(open(os.path.join(path, "meta.json")).read())
    assert sorted(meta["stages"]) == sorted(stage_names(spec.branch, order, spec.phase))
    limit = load_schedule(arch).target.get("max_shared_memory_per_block")
    for stage, info, library, source in _stages(meta, path):
        assert os.path.getsize(library) > 0
        assert "__global__" in source
        assert all(0 < n <= (limit or n) for n in info["shared_memory_bytes"].values()), info["shared_memory_bytes"]
        tiled = stage.startswith(("kv_", "dense_", "sel_"))
        if arch == "sm90":
            # these tiles are 64+ rows: they must use Hopper's warpgroup MMA
            assert not tiled or "wgmma" in source, f"{stage}: no wgmma in the generated code"
            assert fatbin_entries(library) == []  # a plain sm_90a cubin
        else:
            # Ampere: mma.sync, no Hopper instructions; sm_80 SASS and compute_80 PTX for newer GPUs
            assert "wgmma" not in source and "tma_load" not in source and "CUtensorMap" not in source, stage
            assert not tiled or "mma_sync" in source, f"{stage}: no mma.sync in the generated code"
            assert sorted(set(fatbin_entries(library))) == [("ptx", 80), ("sass", 80)], stage


def test_occupancy_knobs_reach_the_compiler(edited_schedule, tmp_path):
    """ctas_per_sm / q_ctas_per_sm become ``__launch_bounds__``' second argument, and the register
    budget follows (65536 registers an SM / (CTAs x threads)); q_keys halves the K/V stage buffers."""
    from fsagen.cache import ensure_artifact
    from fsagen.lower import resource_usage
    from fsagen.spec import KernelSpec

    edited_schedule("sm90", "ctas_per_sm = 0", "ctas_per_sm = 3")
    edited_schedule("sm90", "q_ctas_per_sm = 0", "q_ctas_per_sm = 3")
    edited_schedule("sm90", "q_keys = 0", "q_keys = 32")
    sched = load_schedule("sm90")
    spec = KernelSpec("slc", "fwd", 16, 128, 64, 16, "bfloat16")
    want = {"kv_fwd_stats": 128, "kv_fwd_accum": 128, "q_fwd": 256}  # threads (q_fwd: + TMA producers)
    for order in ("kv_outer", "q_outer"):
        path, _ = ensure_artifact(spec, sched.plan(spec, loop_order=order), "sm90", root=tmp_path)
        meta = json.loads(open(os.path.join(path, "meta.json")).read())
        for stage, info, _, source in _stages(meta, path):
            if stage.startswith("index_"):  # the block index's lane programs take no occupancy knob
                continue
            assert f"__launch_bounds__({want[stage]}, 3)" in source, stage
            (usage,) = resource_usage(source, sched.target).values()
            assert usage["registers"] <= 65536 // (3 * want[stage]), (stage, usage)
            if stage == "q_fwd":  # 2 stages of 32-row K and V tiles, not 64-row ones
                assert max(info["shared_memory_bytes"].values()) < 48 * 1024, info["shared_memory_bytes"]


def test_dense_gather_async_is_cp_async(edited_schedule, tmp_path):
    """``dkdv_rows = "gather_async"``: the dK/dV stage copies its rows with 16-byte cp.async and
    leaves the next tile in flight (``wait_group 1``); the dq stage still gathers."""
    from fsagen.cache import ensure_artifact
    from fsagen.spec import KernelSpec

    edited_schedule("sm90", 'dkdv_rows = "gather"', 'dkdv_rows = "gather_async"')
    spec = KernelSpec("swa", "bwd", 4, 128, 0, 0, "bfloat16")
    path, _ = ensure_artifact(spec, load_schedule("sm90").plan(spec), "sm90", root=tmp_path)
    meta = json.loads(open(os.path.join(path, "meta.json")).read())
    sources = {stage: source for stage, _, _, source in _stages(meta, path)}
    assert "cp_async_gs_conditional<16>" in sources["dense_bwd_dkdv"] and "cp_async_wait<1>" in sources["dense_bwd_dkdv"]
    assert "cp_async" not in sources["dense_bwd_dq"]


@pytest.mark.parametrize("arch", ["sm90", "sm80"])
def test_async_gather_is_cp_async(edited_schedule, tmp_path, arch):
    """``gather = "async"``: every kv-outer stage copies its query rows with cp.async and waits
    for them explicitly (the sync gather has neither)."""
    from fsagen.cache import ensure_artifact
    from fsagen.spec import KernelSpec

    edited_schedule(arch, 'gather = "sync"', 'gather = "async"')
    sched = load_schedule(arch)
    for phase in ("fwd", "bwd"):
        spec = KernelSpec("slc", phase, 4, 128, 64, 16, "bfloat16")
        path, _ = ensure_artifact(spec, sched.plan(spec, loop_order="kv_outer"), arch, root=tmp_path)
        meta = json.loads(open(os.path.join(path, "meta.json")).read())
        for stage, _, _, source in _stages(meta, path):
            if stage != "row_dot" and not stage.startswith("index_"):  # 16-byte copies, one group a tile: wait for all but the next
                assert "cp_async_gs_conditional<16>" in source and "cp_async_wait<1>" in source, stage


def test_q_outer_token_tiles_compile(edited_schedule, tmp_path):
    """q_tokens = 4 at G = 16 (64 rows: a wgmma tile): the forward gains its work-list stage, the
    attention stage's matmuls are wgmma, its blocks arrive by TMA, and it does not spill
    with registers for 2 CTAs an SM."""
    from fsagen.cache import ensure_artifact
    from fsagen.lower import resource_usage
    from fsagen.spec import KernelSpec

    edited_schedule("sm90", "q_tokens = 1", "q_tokens = 4")
    edited_schedule("sm90", "knobs = { q_ctas_per_sm = 3 }", "knobs = { q_ctas_per_sm = 2 }")
    sched = load_schedule("sm90")
    spec = KernelSpec("slc", "fwd", 16, 128, 64, 16, "bfloat16")
    plan = sched.plan(spec, loop_order="q_outer")
    assert stage_names("slc", "q_outer", "fwd", plan) == ("q_fwd_plan", "q_fwd")
    path, _ = ensure_artifact(spec, plan, "sm90", root=tmp_path)
    meta = json.loads(open(os.path.join(path, "meta.json")).read())
    sources = {stage: source for stage, _, _, source in _stages(meta, path)}
    assert sorted(sources) == ["q_fwd", "q_fwd_plan"]
    assert "wgmma" in sources["q_fwd"] and "tma_load" in sources["q_fwd"]
    assert "__launch_bounds__(256, 2)" in sources["q_fwd"]
    (usage,) = resource_usage(sources["q_fwd"], sched.target).values()
    assert usage["registers"] <= 128 and usage["bytes spill stores"] <= 64, usage


def test_a_register_cap_that_cannot_fit_names_the_knob(edited_schedule, tmp_path):
    """64 rows a CTA (q_tokens = 4 at G = 16) under a 3-CTA register cap: ptxas refuses the wgmma;
    the error says which knob set the cap and what to change, not only ptxas' words."""
    from fsagen.cache import ensure_artifact
    from fsagen.errors import ScheduleError
    from fsagen.spec import KernelSpec

    edited_schedule("sm90", "q_tokens = 1", "q_tokens = 4")  # the G >= 9 rule keeps q_ctas_per_sm = 3
    sched = load_schedule("sm90")
    spec = KernelSpec("slc", "fwd", 16, 128, 64, 16, "bfloat16")
    plan = sched.plan(spec, loop_order="q_outer")
    assert plan.knob("q_ctas_per_sm") == 3 and plan.knob("q_tokens") == 4
    with pytest.raises(ScheduleError, match=r"'q_fwd' needs at least \d+ registers.*q_ctas_per_sm\) caps it at 80: lower"):
        ensure_artifact(spec, plan, "sm90", root=tmp_path)
