"""bench/sweep.py without a GPU: variant files and the schedule each variant becomes."""
import os

import pytest
from conftest import REPO as ROOT
from conftest import load_script

from fsagen import schedule
from fsagen.paths import schedules_dir
from fsagen.spec import KernelSpec


@pytest.fixture(scope="module")
def sweep():
    return load_script("bench/sweep.py")


def test_shipped_variant_files_parse(sweep):
    for path in (ROOT / "bench" / "variants").glob("*.toml"):
        assert sweep.read_variants(path)


@pytest.mark.parametrize("text,message", [
    ("", "at least one"),
    ('[[variant]]\nname = "a"\nphase = "fwd"\n', "missing \\['loop_order'\\]"),
    ('[[variant]]\nname = "a"\nphase = "sideways"\nloop_order = "kv_outer"\n', "phase='sideways'"),
])
def test_bad_variant_files(sweep, tmp_path, text, message):
    path = tmp_path / "v.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        sweep.read_variants(path)


@pytest.mark.parametrize("G", [1, 16])
def test_variant_becomes_the_schedule(sweep, tmp_path, monkeypatch, G):
    """The variant's rule wins for its phase at every G; the other phase keeps the shipped rules."""
    shipped = schedule.load_schedule("sm90")
    variant = {"name": "q_s3", "phase": "fwd", "loop_order": "q_outer", "knobs": {"num_stages": 3}}
    monkeypatch.delenv("FSAGEN_SCHEDULES_DIR", raising=False)
    base = schedules_dir()
    try:
        sweep.use_variant(variant, "sm90", tmp_path, base)
        fwd = KernelSpec("slc", "fwd", G, 128, 64, 16, "bfloat16")
        plan = schedule.load_schedule("sm90").plan(fwd)
        assert plan.loop_order == "q_outer" and plan.knob("num_stages") == 3
        bwd = KernelSpec("slc", "bwd", G, 128, 64, 16, "bfloat16")
        assert schedule.load_schedule("sm90").plan(bwd) == shipped.plan(bwd)
    finally:  # use_variant set it with os.environ: monkeypatch.delenv would restore it at teardown
        os.environ.pop("FSAGEN_SCHEDULES_DIR", None)
        schedule.load_schedule.cache_clear()


def test_dense_variant_becomes_the_schedule_of_its_branch_only(sweep, tmp_path):
    """A swa variant's rule matches swa's backward only: cmp and slc keep the shipped plans."""
    shipped = schedule.load_schedule("sm90")
    variant = {"name": "swa_gasync128", "branch": "swa", "phase": "bwd", "loop_order": "dense",
               "knobs": {"dkdv_rows": "gather_async", "rows": 128}}
    base = schedules_dir()
    try:
        sweep.use_variant(variant, "sm90", tmp_path, base)
        plan = schedule.load_schedule("sm90").plan(KernelSpec("swa", "bwd", 4, 128, 0, 0, "bfloat16"))
        assert (plan.knob("dkdv_rows"), plan.knob("rows")) == ("gather_async", 128)
        for other in (KernelSpec("cmp", "bwd", 4, 128, 0, 0, "bfloat16"), KernelSpec("swa", "fwd", 4, 128, 0, 0, "bfloat16"),
                      KernelSpec("slc", "bwd", 4, 128, 64, 16, "bfloat16")):
            assert schedule.load_schedule("sm90").plan(other) == shipped.plan(other)
    finally:
        os.environ.pop("FSAGEN_SCHEDULES_DIR", None)
        schedule.load_schedule.cache_clear()


def test_dense_variants_build_one_spec_per_group(sweep, tmp_path):
    path = tmp_path / "v.toml"
    path.write_text('[[variant]]\nname = "a"\nbranch = "cmp"\nphase = "bwd"\nloop_order = "dense"\n'
                    '[[variant]]\nname = "b"\nphase = "fwd"\nloop_order = "kv_outer"\n')
    variants = sweep.read_variants(path)
    specs = [(v["name"], s.branch, s.G, s.block_size) for v, s in sweep._specs([1, 4], [(64, 16), (128, 8)], variants)]
    assert specs == [("a", "cmp", 1, 0), ("b", "slc", 1, 64), ("b", "slc", 1, 128),
                     ("a", "cmp", 4, 0), ("b", "slc", 4, 64), ("b", "slc", 4, 128)]


def test_bad_variant_branch(sweep, tmp_path):
    path = tmp_path / "v.toml"
    path.write_text('[[variant]]\nname = "a"\nbranch = "sel"\nphase = "fwd"\nloop_order = "sel"\n')
    with pytest.raises(ValueError, match="branch='sel'"):
        sweep.read_variants(path)


def test_variant_names_must_not_repeat_across_files(sweep, tmp_path, capsys):
    """Several files sweep in one run; a name in two of them would make the table ambiguous."""
    text = '[[variant]]\nname = "twice"\nphase = "fwd"\nloop_order = "kv_outer"\n'
    for name in ("a.toml", "b.toml"):
        (tmp_path / name).write_text(text)
    with pytest.raises(SystemExit):
        sweep.main([str(tmp_path / "a.toml"), str(tmp_path / "b.toml"), "--build-only"])
    assert "twice" in capsys.readouterr().err
