"""bench/prebuild_gpu_tests.py without compiling: its cases cover the new GPU tests, and its edited
schedules give the plans those tests force."""
import os

import pytest
from conftest import load_script

from fsagen import schedule


@pytest.fixture(scope="module")
def prebuild():
    return load_script("bench/prebuild_gpu_tests.py")


@pytest.fixture
def restore_schedules():
    yield
    os.environ.pop("FSAGEN_SCHEDULES_DIR", None)  # plan_of sets it with os.environ
    schedule.load_schedule.cache_clear()


def test_cases_cover_every_new_gpu_test(prebuild):
    from gpu.test_dense_gpu import DKDV_GS, DKDV_VARIANTS, DS
    from gpu.test_slc_gpu import ASYNC_GATHER_CASES, TOKEN_TILE_CASES

    cases = prebuild.cases()
    names = {(spec.branch, spec.phase, len(edits)) for edits, spec, _ in cases}
    assert {("gate", "fwd", 0), ("gate", "bwd", 0), ("slc", "bwd", 1), ("swa", "bwd", 1), ("cmp", "bwd", 1)} <= names
    head = [c for c in cases if c[0] and c[1].branch in ("swa", "cmp")]
    assert len(head) == len(DKDV_VARIANTS) * len(DKDV_GS) * len(DS)
    assert len([c for c in cases if c[0] and c[1].branch == "slc"]) == 2 * len(ASYNC_GATHER_CASES) + len(TOKEN_TILE_CASES)
    assert len(set(cases)) == len(cases)
    token_tiles = prebuild.cases(["token_tiles"])
    assert len(token_tiles) == 2 * len(TOKEN_TILE_CASES) and all(c[2] == "q_outer" for c in token_tiles)
    with pytest.raises(ValueError, match="unknown group"):
        prebuild.cases(["no_such_test"])


def test_edited_plans_are_the_tests_plans(prebuild, tmp_path, restore_schedules):
    """Every case in one process, as a build worker runs several: each starts from the base."""
    from fsagen.paths import schedules_dir

    base = schedules_dir()
    for edits, spec, order in prebuild.cases():
        plan = prebuild.plan_of(edits, spec, order, "sm90", base, tmp_path)
        if spec.branch in ("swa", "cmp") and spec.phase == "bwd":
            assert plan.knob("dkdv_rows") == "gather_async", spec.name
        elif spec.branch == "slc" and edits and order == "q_outer":  # token tiles: no 3-CTA register cap
            assert plan.knob("q_tokens") == min(31, max(2, 64 // spec.G)) and plan.knob("q_ctas_per_sm") == 0, spec.name
        elif spec.branch == "slc" and edits:
            assert plan.loop_order == "kv_outer" and plan.knob("gather") == "async", spec.name
        elif spec.branch == "slc":  # the shipped schedule's plans (query chunks: kv_outer; token tiles' backward)
            assert plan == schedule.load_schedule("sm90").plan(spec, loop_order=order), spec.name


def test_run_gpu_build_only_mode(tmp_path):
    """bench/run_gpu.sh with FSAGEN_BUILD_ONLY=1 (compiling ahead on a CPU machine): GPU-only parts
    are skipped and said so, nothing sources .gpu/env.sh, and the cache folder to pack is required."""
    import subprocess

    from conftest import REPO

    env = {k: v for k, v in os.environ.items() if k not in ("FSAGEN_CACHE_DIR", "FSAGEN_PREBUILT")}
    env["FSAGEN_BUILD_ONLY"] = "1"
    cmd = ["bash", str(REPO / "bench" / "run_gpu.sh"), str(tmp_path / "log"), "smoke", "profile", "recall_nsa"]
    refused = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "needs FSAGEN_CACHE_DIR" in refused.stdout
    env["FSAGEN_CACHE_DIR"] = str(tmp_path / "cache")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (tmp_path / "log" / "summary.txt").read_text()
    for part in ("smoke", "profile", "recall_nsa"):
        assert f"{part}: needs the GPU, skipped" in summary
