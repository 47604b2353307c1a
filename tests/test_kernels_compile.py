"""The real programs compile for sm_90a on this (GPU-less) machine, every stage of every loop
order a branch can use, for the grid's `ci` subset. No run: the numerics are checked by tests/gpu on the H100.

Slow-ish (a TileLang + nvcc compile per stage), so each (spec, loop order) builds once, in a
process pool, into a temporary artifact root through the same path as `fsagen build`.
"""
import concurrent.futures
import json
import os

import pytest

from fsagen.kernels import stage_names
from fsagen.schedule import load_schedule
from fsagen.spec import load_grid

CASES = [(spec, order) for spec in load_grid(subset="ci") for order in load_schedule("sm90").loop_orders_for(spec.branch)]


def _build(args):
    spec, order, root = args
    from fsagen.cache import ensure_artifact

    plan = load_schedule("sm90").plan(spec, loop_order=order)
    path, _ = ensure_artifact(spec, plan, "sm90", root=root)
    return str(path)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("aot")
    jobs = min(len(CASES), os.cpu_count() or 1)
    with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
        paths = list(pool.map(_build, [(spec, order, root) for spec, order in CASES]))
    return dict(zip(CASES, paths))


@pytest.mark.parametrize("spec,order", CASES, ids=[f"{s.name}-{o}" for s, o in CASES])
def test_every_stage_compiles_for_sm90a(built, spec, order):
    path = built[(spec, order)]
    meta = json.loads(open(os.path.join(path, "meta.json")).read())
    assert sorted(meta["stages"]) == sorted(stage_names(spec.branch, order, spec.phase))
    for stage, info in meta["stages"].items():
        assert os.path.getsize(os.path.join(path, info["library"])) > 0
        source = open(os.path.join(path, info["source"])).read()
        assert "__global__" in source
        if stage.startswith(("kv_", "dense_", "sel_")):
            # these tiles are 64+ rows: they must use Hopper's warpgroup MMA
            assert "wgmma" in source, f"{stage}: no wgmma in the generated code"
