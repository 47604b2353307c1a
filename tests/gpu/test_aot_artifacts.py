"""Artifacts compiled on a machine without a GPU load and run on the GPU without recompiling.

Point ``FSAGEN_AOT_SAMPLE`` at a copy of a ``generated/`` root built elsewhere (for example by
``fsagen build --arch sm90`` on the CPU machine; see bench/results/aot_build_cpu.md). Every
artifact in it is loaded from there, runs forward + backward at its own spec against the float64
reference, and the user cache must stay empty: nothing was compiled here.
"""
import json
import os
from pathlib import Path

import pytest
import torch

from test_slc_gpu import DTYPES, _gen, _qkv, run_and_compare  # tests/gpu is on sys.path (rootdir-less)

from fsagen import cache
from fsagen.schedule import Plan
from fsagen.spec import KernelSpec
from fsagen.testing import random_cu_seqlens, random_topk_idx

pytestmark = pytest.mark.gpu


def _sample_artifacts():
    root = os.environ.get("FSAGEN_AOT_SAMPLE")
    if not root:
        return []
    arch_dir = Path(root) / "sm90"
    if not arch_dir.is_dir():
        raise FileNotFoundError(f"FSAGEN_AOT_SAMPLE={root}: no sm90/ folder of artifacts there")
    return sorted(p for p in arch_dir.iterdir() if (p / "meta.json").is_file())


@pytest.mark.skipif(not os.environ.get("FSAGEN_AOT_SAMPLE"), reason="FSAGEN_AOT_SAMPLE not set")
@pytest.mark.parametrize("artifact", _sample_artifacts(), ids=lambda p: p.name)
def test_cpu_built_artifact_runs_without_compiling(artifact, tmp_path, monkeypatch):
    meta = json.loads((artifact / "meta.json").read_text())
    spec, plan = KernelSpec.from_dict(meta["spec"]), Plan.from_dict(meta["plan"])
    monkeypatch.setenv("FSAGEN_GENERATED_DIR", os.environ["FSAGEN_AOT_SAMPLE"])
    monkeypatch.setenv("FSAGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "_loaded", {})
    kernel = cache.get_kernel(spec, plan, "sm90")
    assert kernel.path == artifact, f"{spec.name}: resolved to {kernel.path}, not the sample"

    gen = _gen()
    hkv, n = 2, 1500
    cu = random_cu_seqlens(n, 3, block_size=spec.block_size, generator=gen, device="cuda")
    idx = random_topk_idx(cu, hkv, spec.topk, spec.block_size, generator=gen)
    q, k, v = _qkv(n, spec.G * hkv, hkv, spec.D, DTYPES[spec.dtype], gen)
    # the phase not in the sample (fwd for a bwd artifact and vice versa) may compile into the
    # cache: only this artifact's own phase is checked for "no compile"
    run_and_compare(f"aot {artifact.name}", q, k, v, idx, cu, spec.block_size, plan.loop_order, gen)
    built_here = [p.name for p in (tmp_path / "cache").glob("sm90/*") if p.is_dir()]
    assert not [b for b in built_here if b.startswith(spec.name)], f"recompiled: {built_here}"
