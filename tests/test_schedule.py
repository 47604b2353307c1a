import dataclasses
from pathlib import Path

import pytest

from fsagen.errors import NoGPU, ScheduleError, UnsupportedSpec
from fsagen.kernels import REQUIRED_KNOBS
from fsagen.schedule import Plan, Schedule, detect_arch, load_schedule, normalize_arch
from fsagen.spec import KernelSpec, load_grid

SM90 = load_schedule("sm90")


def spec(**kw):
    return dataclasses.replace(KernelSpec("slc", "fwd", 4, 128, 64, 16, "bfloat16"), **kw)


def test_target_and_aliases():
    assert SM90.target == {"kind": "cuda", "arch": "sm_90a"}
    for alias in ("sm90", "sm_90", "sm_90a", "SM90a", "90"):
        assert normalize_arch(alias) == "sm90"
        assert load_schedule(alias).arch == "sm90"


def test_unknown_arch_lists_known():
    with pytest.raises(ScheduleError, match=r"unknown arch 'sm70'.*\['sm90'\]"):
        load_schedule("sm70")


# The sm90 rules as measured (bench/results/slc_tune.md): forward kv_outer up to G=4 at block 64
# and up to G=8 at block 128, q_outer above; backward kv_outer except G=16 (memory).
@pytest.mark.parametrize("G,bs,phase,order", [
    (1, 64, "fwd", "kv_outer"), (4, 64, "fwd", "kv_outer"), (8, 64, "fwd", "q_outer"),
    (16, 64, "fwd", "q_outer"), (8, 128, "fwd", "kv_outer"), (16, 128, "fwd", "q_outer"),
    (1, 64, "bwd", "kv_outer"), (8, 64, "bwd", "kv_outer"), (16, 64, "bwd", "q_outer"),
    (16, 128, "bwd", "q_outer"), (8, 128, "bwd", "kv_outer"),
])
def test_sm90_rules(G, bs, phase, order):
    plan = SM90.plan(spec(G=G, phase=phase, block_size=bs, topk=16 if bs == 64 else 8))
    assert plan.loop_order == order
    assert [k for k, _ in plan.knobs] == sorted(REQUIRED_KNOBS[(order, phase)])


def test_sm90_rule_knob_override():
    assert SM90.plan(spec(G=1, phase="bwd", block_size=128, topk=8)).knob("bwd_threads") == 256


def test_forced_loop_order_is_honoured():
    s = spec(G=4)
    for order in SM90.loop_orders:
        assert SM90.plan(s, loop_order=order).loop_order == order
    assert SM90.plan(s, "q_outer").key != SM90.plan(s, "kv_outer").key
    with pytest.raises(UnsupportedSpec, match="loop_order='zigzag'"):
        SM90.plan(s, loop_order="zigzag")


def test_every_grid_spec_has_a_plan():
    for s in load_grid():
        SM90.plan(s)


def test_knob_values_and_plan_api():
    plan = SM90.plan(spec(G=4, phase="fwd"))
    assert plan.knob("rows") == 64 and plan.knob("threads") == 128 and plan.knob("tiles_per_item") == 8
    with pytest.raises(KeyError, match="no knob 'nope'"):
        plan.knob("nope")
    assert Plan.from_dict(plan.to_dict()) == plan
    assert Plan("q_outer", (("b", 1), ("a", 2))).knobs == (("a", 2), ("b", 1))
    with pytest.raises(ScheduleError, match="loop_order"):
        Plan("diagonal", ())


@pytest.mark.parametrize("field,value", [("D", 96), ("block_size", 32), ("G", 32)])
def test_unsupported_spec_names_field_and_rule(field, value):
    with pytest.raises(UnsupportedSpec, match=rf"KernelSpec\.{field}={value}.*sm90") as info:
        SM90.plan(spec(**{field: value}))
    assert "must be" in str(info.value)


BASE = Path(SM90.path).read_text()


def _schedule(tmp_path, text) -> Path:
    path = tmp_path / "sm99.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("edit,pattern", [
    (("rows = 64", "rows = 64\nwarps = 4"), r"unknown knob 'warps'"),
    (("tiles_per_item = 8\nthreads", "tiles_per_item = '8'\nthreads"), r"knob 'tiles_per_item' must be int"),
    (("num_stages = 2\n\n[knobs.q_outer]", "num_stages = true\n\n[knobs.q_outer]"), r"knob 'num_stages' must be int"),
    (("rows = 64", "rows = 60"), r"knob 'rows'=60 must be a positive multiple of 16"),
    (("[knobs.q_outer]", "[knobs.diag]\nthreads = 1\n[knobs.q_outer]"), r"\[knobs.diag\]: unknown loop order"),
    (('loop_order = "q_outer"', 'loop_order = "diag"'), r"\[\[rules\]\] #3: loop_order='diag'"),
    (('when = { phase = "fwd" }', "when = { heads = 8 }"), r"unknown KernelSpec field 'heads'"),
    (("[target]", "[targets]\n[target]"), r"unknown table"),
])
def test_schedule_file_errors_name_file_and_knob(tmp_path, edit, pattern):
    old, new = edit
    assert old in BASE
    path = _schedule(tmp_path, BASE.replace(old, new, 1))
    with pytest.raises(ScheduleError, match=pattern) as info:
        Schedule.from_file(path)
    assert str(path) in str(info.value)


def test_missing_knob_is_an_error_naming_it(tmp_path):
    path = _schedule(tmp_path, BASE.replace("q_threads = 128", ""))
    schedule = Schedule.from_file(path)
    with pytest.raises(ScheduleError, match=r"lacks knob\(s\) \['q_threads'\]") as info:
        schedule.plan(spec(G=16))
    assert str(path) in str(info.value)


def test_rule_knob_overrides(tmp_path):
    text = BASE.replace('[[rules]]',
                        '[[rules]]\nwhen = { G = { max = 8 }, D = 64 }\nloop_order = "kv_outer"\nknobs = { rows = 128 }\n\n'
                        '[[rules]]\nwhen = { G = { max = 8 } }\nloop_order = "kv_outer"\n\n[[rules]]', 1)
    schedule = Schedule.from_file(_schedule(tmp_path, text))
    assert schedule.plan(spec(D=64)).knob("rows") == 128
    assert schedule.plan(spec(D=128)).knob("rows") == 64
    # a forced loop order keeps the overrides of the first matching rule of that order
    assert schedule.plan(spec(D=64, G=16), loop_order="kv_outer").knob("rows") == 64
    assert schedule.plan(spec(D=64, G=2), loop_order="kv_outer").knob("rows") == 128


def test_detect_arch_without_gpu():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(NoGPU):
        detect_arch()
