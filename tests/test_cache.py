"""Artifact cache: atomic publish, locking between processes, keys, reload without recompiling."""
import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from fsagen import cache, lower
from fsagen.errors import ArtifactError
from fsagen.schedule import load_schedule
from fsagen.spec import KernelSpec

TESTS = Path(__file__).resolve().parent
SPEC = KernelSpec("slc", "fwd", 4, 128, 64, 16, "bfloat16")
TARGET = {"kind": "cuda", "arch": "sm_90a"}


def fake_compile(programs, target, staging: Path, delay=0.0, log: Path | None = None):
    """Stands in for fsagen.lower.compile_programs: writes one 'library' per stage."""
    if log is not None:
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
    time.sleep(delay)
    stages = {}
    for stage, text in programs.items():
        (staging / f"{stage}.so").write_text(text)
        stages[stage] = {"library": f"{stage}.so", "source": f"{stage}.so", "entry": stage}
    return stages


def _build_in_process(dest: str, log: str, delay: float) -> bool:
    return cache.build_artifact(
        {"main": "x"}, {"k": 1}, TARGET, Path(dest),
        compile=lambda p, t, s: fake_compile(p, t, s, delay=delay, log=Path(log)),
    )


def test_build_publishes_complete_artifact_once(tmp_path):
    dest = tmp_path / "sm90" / "art"
    calls = []

    def programs():
        calls.append(1)
        return {"a": "1", "b": "2"}

    assert cache.build_artifact(programs, {"k": 1}, TARGET, dest, compile=fake_compile) is True
    meta = json.loads((dest / "meta.json").read_text())
    assert meta["key"] == {"k": 1} and meta["target"] == TARGET and list(meta["stages"]) == ["a", "b"]
    assert (dest / "a.so").read_text() == "1"
    # a second build is a no-op: programs are not even built
    assert cache.build_artifact(programs, {"k": 1}, TARGET, dest, compile=fake_compile) is False
    assert calls == [1]
    assert not list(dest.parent.glob(".staging-*"))


def test_failed_build_leaves_nothing(tmp_path):
    dest = tmp_path / "sm90" / "art"

    def broken(programs, target, staging):
        (staging / "half.so").write_text("partial")
        raise RuntimeError("compiler exploded")

    with pytest.raises(RuntimeError, match="exploded"):
        cache.build_artifact({"main": "x"}, {}, TARGET, dest, compile=broken)
    assert not dest.exists()
    assert not list(dest.parent.glob(".staging-*"))


def test_two_processes_build_the_same_artifact_once(tmp_path):
    dest, log = tmp_path / "sm90" / "art", tmp_path / "compiles.log"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = [pool.apply_async(_build_in_process, (str(dest), str(log), 1.5)) for _ in range(2)]
        built = sorted(r.get(timeout=60) for r in results)
    assert built == [False, True]
    assert len(log.read_text().split()) == 1  # compiled by one process only
    assert cache.is_complete(dest)
    assert not list(dest.parent.glob(".staging-*"))


def test_incomplete_artifact_is_rebuilt(tmp_path):
    dest = tmp_path / "art"
    dest.mkdir()
    (dest / "junk").write_text("left by a crash outside fsagen")
    assert cache.build_artifact({"main": "x"}, {}, TARGET, dest, compile=fake_compile)
    assert not (dest / "junk").exists() and cache.is_complete(dest)


def test_key_covers_spec_plan_arch_versions_and_kernel_sources(monkeypatch):
    sched = load_schedule("sm90")
    kv, q = sched.plan(SPEC, "kv_outer"), sched.plan(SPEC, "q_outer")
    name, key = cache.artifact_ref(SPEC, kv, "sm90")
    assert name.startswith(SPEC.name + ".kv_outer.")
    assert set(key) >= {"spec", "plan", "arch", "target", "fsagen", "tilelang", "kernel_sources"}
    assert cache.artifact_ref(SPEC, q, "sm90")[0] != name
    other = KernelSpec("slc", "fwd", 8, 128, 64, 16, "bfloat16")
    assert cache.artifact_ref(other, kv, "sm90")[0] != name
    monkeypatch.setitem(cache._sources_hashes, SPEC.branch, "edited kernel")
    assert cache.artifact_ref(SPEC, kv, "sm90")[0] != name
    monkeypatch.setattr(cache, "tilelang_version", lambda: "9.9.9")
    assert cache.artifact_ref(SPEC, kv, "sm90")[1]["tilelang"] == "9.9.9"


def test_glue_only_knobs_do_not_rename_artifacts():
    """chunk_rows changes the host glue's block index, not a program: same artifact."""
    from fsagen.schedule import GLUE_KNOBS, Plan

    kv = load_schedule("sm90").plan(SPEC, "kv_outer")
    assert kv.knob("chunk_rows") is not None and "chunk_rows" in GLUE_KNOBS
    other = Plan(kv.loop_order, tuple((k, 12345 if k == "chunk_rows" else v) for k, v in kv.knobs))
    assert cache.artifact_ref(SPEC, other, "sm90") == cache.artifact_ref(SPEC, kv, "sm90")
    assert "chunk_rows" not in dict(kv.program_plan().knobs)
    tiles = Plan(kv.loop_order, tuple((k, 4 if k == "tiles_per_item" else v) for k, v in kv.knobs))
    assert cache.artifact_ref(SPEC, tiles, "sm90") != cache.artifact_ref(SPEC, kv, "sm90")


def test_compiled_kernel_rejects_incomplete(tmp_path):
    with pytest.raises(ArtifactError, match="no meta.json"):
        cache.CompiledKernel(tmp_path)


# ---- real TileLang compile of a tiny fixture program (one compile, a few seconds) ----------------

@pytest.fixture
def fixture_env(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setenv("FSAGEN_PROGRAMS", "fixture_programs:build_programs")
    monkeypatch.setenv("FSAGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FSAGEN_GENERATED_DIR", str(tmp_path / "generated"))
    monkeypatch.setattr(cache, "_loaded", {})
    return tmp_path


def test_jit_compile_then_reload_without_recompiling(fixture_env, monkeypatch):
    pytest.importorskip("tilelang")
    kernel = cache.get_kernel(SPEC, arch="sm90")
    assert kernel.path.parent == fixture_env / "cache" / "sm90"
    assert {p.name for p in kernel.path.iterdir()} == {"main.so", "main.cu", "meta.json"}
    info = kernel.meta["stages"]["main"]
    assert info["entry"] == "axpy_kernel"
    assert [p["name"] for p in info["params"]] == ["A", "B", "C", "alpha"]
    assert info["params"][0]["shape"] == ["N"] and info["params"][3]["kind"] == "scalar"
    assert "__global__" in kernel.source("main")
    usage = lower.resource_usage(kernel.source("main"), kernel.meta["target"])
    (device_kernel,) = usage.values()  # one __global__ function (named after the PrimFunc)
    assert device_kernel["registers"] > 0 and device_kernel["bytes spill stores"] == 0
    assert kernel.spec == SPEC and kernel.plan == load_schedule("sm90").plan(SPEC).program_plan()
    assert cache.get_kernel(SPEC, arch="sm90") is kernel  # memoised

    def no_compile(*args, **kwargs):
        raise AssertionError("recompiled")

    monkeypatch.setattr(lower, "compile_programs", no_compile)
    monkeypatch.setattr(cache, "_loaded", {})
    again = cache.get_kernel(SPEC, arch="sm90")
    assert again.path == kernel.path
    # The exported library loads on a machine without a GPU; the host wrapper checks devices.
    torch = pytest.importorskip("torch")
    function = again["main"]
    x = torch.zeros(8)
    with pytest.raises(Exception, match="device_type mismatch, expected cuda"):
        function(x, x, x, 2.0)

    # AOT artifacts (generated/) are found before the user cache
    aot = fixture_env / "generated" / "sm90" / kernel.path.name
    aot.parent.mkdir(parents=True)
    os.rename(kernel.path, aot)
    monkeypatch.setattr(cache, "_loaded", {})
    assert cache.get_kernel(SPEC, arch="sm90").path == aot


@pytest.mark.gpu
def test_reloaded_stage_runs_on_current_stream(fixture_env):
    import torch

    kernel = cache.get_kernel(SPEC, arch=None)
    a, b = torch.randn(1000, device="cuda"), torch.randn(1000, device="cuda")
    c = torch.empty_like(a)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        kernel["main"](a, b, c, 2.0)
    stream.synchronize()
    torch.testing.assert_close(c, a + 2.0 * b)
    # CUDA-graph capture: the launch must go to the capturing stream
    graph, c2 = torch.cuda.CUDAGraph(), torch.zeros_like(a)
    with torch.cuda.graph(graph):
        kernel["main"](a, b, c2, 3.0)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(c2, a + 3.0 * b)


def test_kernel_source_files_follow_each_family():
    """Each branch hashes __init__.py, its family's modules and what they import; another
    family's module is not in it (editing decode.py keeps the slc artifacts)."""
    import ast

    from fsagen import kernels
    from fsagen.paths import kernels_dir

    names = {b: {p.stem for p in cache.kernel_source_files(b)} for b in kernels.FAMILY_MODULES}
    assert names["slc"] == {"__init__", "slc", "block_index", "tiles", "target"}
    assert {"dense", "slc", "tiles", "target"} <= names["cmp"] and "decode" not in names["cmp"]
    assert "dense" in names["sel"]  # select.py imports dense.key_range
    assert "slc" not in names["dec"] and "decode" in names["dec"]
    assert {p.stem for p in cache.kernel_source_files()} >= set().union(*names.values())
    # every module a branch's builder imports is listed for that branch
    tree = ast.parse((kernels_dir() / "__init__.py").read_text())
    builders = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name.endswith("_builders")}
    family_of = {"slc": "_slc_builders", "cmp": "_dense_builders", "swa": "_dense_builders",
                 "sel": "_sel_builders", "comp": "_comp_builders", "dec": "_dec_builders",
                 "gate": "_gate_builders"}
    assert set(family_of.values()) == set(builders)
    for branch, fname in family_of.items():
        imported = {a.name for n in ast.walk(builders[fname]) if isinstance(n, ast.ImportFrom) and n.level == 1
                    for a in n.names}
        assert imported <= set(kernels.FAMILY_MODULES[branch]), (branch, imported)


def test_editing_one_family_keeps_the_others(monkeypatch):
    dec = KernelSpec("dec", "fwd", 4, 128, 64, 0, "bfloat16")
    sched = load_schedule("sm90")
    before = (cache.artifact_ref(SPEC, sched.plan(SPEC), "sm90")[0], cache.artifact_ref(dec, sched.plan(dec), "sm90")[0])
    monkeypatch.setitem(cache._sources_hashes, "dec", "edited decode.py")
    after = (cache.artifact_ref(SPEC, sched.plan(SPEC), "sm90")[0], cache.artifact_ref(dec, sched.plan(dec), "sm90")[0])
    assert after[0] == before[0] and after[1] != before[1]


def test_stage_calls_are_profiler_ranges():
    """TileLang names every kernel main_kernel; a stage call is a named range while a profiler runs
    (bench/profile_slc.py charges kernel time to it) and a plain call otherwise."""
    from torch.profiler import ProfilerActivity, profile

    from fsagen.cache import _ProfiledStage

    calls = []
    stage = _ProfiledStage(lambda *a: calls.append(a) or len(calls), "fsagen::slc_fwd.kv_fwd_stats")
    assert stage(1, 2) == 1
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        assert stage(3) == 2
    assert calls == [(1, 2), (3,)]
    assert [e.name for e in prof.events()].count("fsagen::slc_fwd.kv_fwd_stats") == 1
