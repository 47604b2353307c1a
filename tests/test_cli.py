"""The fsagen command, with the tiny fixture program standing in for the real kernels."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fsagen.cli import _plans, main
from fsagen.schedule import BRANCH_LOOP_ORDERS, load_schedule
from fsagen.spec import load_grid

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def run_cli(*argv, env_extra=None, code=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")])
    env.update(env_extra or {})
    cmd = [sys.executable, "-c", code, *argv] if code else [sys.executable, "-m", "fsagen.cli", *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def env(tmp_path):
    return {
        "FSAGEN_PROGRAMS": "fixture_programs:build_programs",
        "FSAGEN_CACHE_DIR": str(tmp_path / "cache"),
        "FSAGEN_GENERATED_DIR": str(tmp_path / "generated"),
    }


@pytest.mark.parametrize("argv,message", [
    (["build", "--arch", "sm70"], "unknown arch 'sm70'; known: ['cpu', 'sm80', 'sm90']"),
    (["build", "--arch", "sm80", "--subset", "nightly"], "no subset 'nightly'"),
    (["list", "--arch", "ampere"], "unknown arch 'ampere'"),
    (["build", "--arch", "sm90", "--grid", "/nonexistent.toml"], "not found"),
    (["build", "--arch", "sm90", "--subset", "nightly"], "no subset 'nightly'"),
    (["show", "no_such_kernel"], "no artifact named"),
])
def test_errors_are_one_line_exit_2(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FSAGEN_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("FSAGEN_GENERATED_DIR", str(tmp_path / "g"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fsagen: error:") and message in err and err.count("\n") == 1


# The second build must not import TileLang or torch: it only checks which artifacts exist.
NOOP_CHECK = (
    "import sys; from fsagen.cli import main; rc = main(sys.argv[1:]); "
    "heavy = [m for m in ('tilelang', 'torch') if m in sys.modules]; "
    "assert not heavy, heavy; sys.exit(rc)"
)


@pytest.mark.parametrize("loop_orders", ["auto", "all"])
def test_plans_per_branch(loop_orders):
    """--loop-orders all builds every loop order of the schedule that can run the spec's branch."""
    schedule = load_schedule("sm90")
    for spec in load_grid():
        plans = _plans(schedule, spec, loop_orders)
        orders = [p.loop_order for p in plans]
        if loop_orders == "auto":
            assert plans == [schedule.plan(spec)]
        else:
            assert orders == list(BRANCH_LOOP_ORDERS[spec.branch]), spec.name


# the ci subset: 4 slc specs (2 loop orders each with --loop-orders all) + 5 cmp/swa (dense) and sel (sel)
# specs + 2 comp (compression) specs + 1 dec (decode attention) spec + 2 gate (gated sum) specs
CI_AUTO, CI_ALL = 14, 4 * 2 + 5 + 2 + 1 + 2
PROGRESS = re.compile(r"\[ *(\d+/\d+)\] (\S+)  (\S+) ")


def test_build_list_show_clean(env, tmp_path):
    pytest.importorskip("tilelang")
    out = tmp_path / "aot"
    args = ["build", "--arch", "sm90", "--subset", "ci", "--jobs", "2", "--out", str(out), "--loop-orders", "all"]
    first = run_cli(*args, env_extra=env)
    assert first.returncode == 0, first.stderr
    # progress lines "[ i/n] name  loop_order  seconds"; TileLang's warnings from the workers share
    # stdout and may run into them, hence a search rather than whole lines
    lines = PROGRESS.findall(first.stdout)
    assert len(lines) == CI_ALL and lines[-1][0] == f"{CI_ALL}/{CI_ALL}"
    built = {(name.split("_")[0], order) for _, name, order in lines}
    assert built == {("slc", "kv_outer"), ("slc", "q_outer"), ("cmp", "dense"), ("swa", "dense"), ("sel", "sel"), ("dec", "dec"),
                     ("comp", "comp"), ("gate", "gate")}
    manifest = json.loads((out / "sm90" / "manifest.json").read_text())
    assert len(manifest["artifacts"]) == CI_ALL and manifest["subset"] == "ci"
    assert manifest["versions"]["tilelang"]
    names = [a["name"] for a in manifest["artifacts"]]
    assert all((out / "sm90" / n / "meta.json").is_file() for n in names)
    md = (out / "sm90" / "MANIFEST.md").read_text()
    assert all(n in md for n in names)

    start = time.perf_counter()
    second = run_cli(*args, env_extra=env, code=NOOP_CHECK)
    assert second.returncode == 0, second.stderr
    assert time.perf_counter() - start < 20
    assert f"{CI_ALL} up to date, 0 to build" in second.stdout
    assert not PROGRESS.findall(second.stdout)

    env_aot = {**env, "FSAGEN_GENERATED_DIR": str(out)}
    listed = run_cli("list", "--arch", "sm90", env_extra=env_aot)
    assert listed.returncode == 0 and all(n in listed.stdout for n in names)
    assert len(listed.stdout.splitlines()) == CI_ALL
    for name in (names[0], next(n for n in names if n.startswith("sel_"))):
        shown = run_cli("show", name, env_extra=env_aot)
        assert shown.returncode == 0, shown.stderr
        assert "__global__" in shown.stdout and '"entry": "axpy_kernel"' in shown.stdout
    dense = run_cli("show", "cmp_bwd_bf16_g4_d128", "--meta-only", env_extra=env_aot)
    assert dense.returncode == 0, dense.stderr
    assert '"branch": "cmp"' in dense.stdout and '"loop_order": "dense"' in dense.stdout
    ambiguous = run_cli("show", "slc_", env_extra=env_aot)
    assert ambiguous.returncode == 2 and "matches several" in ambiguous.stderr

    cleaned = run_cli("clean", "--out", str(out), env_extra=env)
    assert cleaned.returncode == 0 and not (out / "sm90").exists()


def test_failed_kernel_is_reported_and_others_still_build(env, tmp_path):
    out = tmp_path / "aot"
    bad = {**env, "FSAGEN_PROGRAMS": "fixture_programs:no_such_function"}
    result = run_cli("build", "--arch", "sm90", "--subset", "ci", "--jobs", "1", "--out", str(out), env_extra=bad)
    assert result.returncode == 1
    assert result.stdout.count("FAILED: AttributeError") == CI_AUTO
    assert "no_such_function" in (out / "sm90" / "build-errors.log").read_text()
    assert json.loads((out / "sm90" / "manifest.json").read_text())["artifacts"] == []


def test_build_without_arch_needs_a_gpu_or_says_which_arch(capsys, monkeypatch, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the arch is detected")
    monkeypatch.setenv("FSAGEN_GENERATED_DIR", str(tmp_path / "g"))
    assert main(["build", "--subset", "ci"]) == 2
    err = capsys.readouterr().err
    assert "pass --arch" in err and "sm90" in err and err.count("\n") == 1


def test_build_without_arch_uses_the_detected_gpu(env, monkeypatch, capsys, tmp_path):
    """With a GPU present (stood in for by detect_arch), --arch defaults to its arch."""
    pytest.importorskip("tilelang")
    from fsagen import schedule

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setattr(schedule, "detect_arch", lambda: "sm90")
    out = tmp_path / "aot"
    assert main(["build", "--subset", "ci", "--jobs", "1", "--out", str(out)]) == 0
    assert "detected sm90" in capsys.readouterr().out
    assert (out / "sm90" / "manifest.json").is_file()


GRID_D96 = """
[[grid]]
branch = ["swa"]
phase = ["fwd"]
G = [2]
D = [96]
dtype = ["float16"]
block_size = [0]
topk = [0]
"""


@pytest.mark.parametrize("arch", ["sm80", "sm90"])
def test_spec_the_schedule_does_not_support_names_schedule_and_field(arch, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FSAGEN_GENERATED_DIR", str(tmp_path / "g"))
    grid = tmp_path / "d96.toml"
    grid.write_text(GRID_D96)
    assert main(["build", "--arch", arch, "--grid", str(grid)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"KernelSpec.D=96 is not supported by schedule {arch} ({load_schedule(arch).path})" in err
    assert "D must be one of [64, 128]" in err


def test_broken_schedule_file_is_one_line_naming_file_and_knob(capsys, monkeypatch, tmp_path):
    """A user's schedule directory (FSAGEN_SCHEDULES_DIR) with a wrong knob value."""
    text = load_schedule("sm80").path.read_text().replace("q_threads = 128", "q_threads = 100", 1)
    (tmp_path / "sm80.toml").write_text(text)
    monkeypatch.setenv("FSAGEN_SCHEDULES_DIR", str(tmp_path))
    monkeypatch.setenv("FSAGEN_GENERATED_DIR", str(tmp_path / "g"))
    from fsagen import schedule

    schedule.load_schedule.cache_clear()
    try:
        assert main(["build", "--arch", "sm80", "--subset", "ci"]) == 2
    finally:
        schedule.load_schedule.cache_clear()
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"{tmp_path / 'sm80.toml'}: [knobs.q_outer]: knob 'q_threads'=100 must be a positive multiple of 32" in err


def test_build_skips_branches_the_schedule_does_not_run(env, tmp_path):
    """A schedule that does not list a branch (here a user's cpu schedule without comp): the
    grid's specs of that branch are skipped, said so."""
    schedules = tmp_path / "schedules"
    schedules.mkdir()
    text = load_schedule("cpu").path.read_text()
    listed = 'branch = ["slc", "cmp", "swa", "sel", "comp", "dec", "gate"]'
    assert listed in text
    (schedules / "cpu.toml").write_text(text.replace(listed, 'branch = ["slc", "cmp", "swa", "sel", "dec", "gate"]', 1))
    grid = tmp_path / "grid.toml"
    grid.write_text('[[grid]]\nbranch = ["comp"]\nphase = ["fwd"]\nG = [1]\nD = [64]\ndtype = ["float16"]\n'
                    'block_size = [0]\ntopk = [0]\nkernel_size = [32]\nstride = [16]\n')
    result = run_cli("build", "--arch", "cpu", "--grid", str(grid),
                     env_extra={**env, "FSAGEN_SCHEDULES_DIR": str(schedules)})
    assert result.returncode == 0, result.stderr
    assert "skipping the grid's comp specs (schedule cpu supports the branches" in result.stdout
    assert "0 artifacts" in result.stdout


def test_build_only_the_named_branches(env, tmp_path):
    """--branch keeps the grid's specs of those branches (here the ci subset's slc specs, both loop
    orders) and says so in the manifest; an unknown branch is refused by name."""
    pytest.importorskip("tilelang")
    out = tmp_path / "aot"
    result = run_cli("build", "--arch", "sm90", "--subset", "ci", "--branch", "slc", "--loop-orders", "all",
                     "--jobs", "2", "--out", str(out), env_extra=env)
    assert result.returncode == 0, result.stderr
    names = [name for _, name, _ in PROGRESS.findall(result.stdout)]
    assert len(names) == 4 * 2 and all(n.startswith("slc_") for n in names)
    manifest = json.loads((out / "sm90" / "manifest.json").read_text())
    assert manifest["branches"] == ["slc"] and len(manifest["artifacts"]) == 8
    bad = run_cli("build", "--arch", "sm90", "--branch", "slcx", "--out", str(out), env_extra=env)
    assert bad.returncode == 2 and "slcx" in bad.stderr
