import dataclasses
from pathlib import Path

import pytest

from fsagen.errors import NoGPU, ScheduleError, UnsupportedSpec
from fsagen.kernels import REQUIRED_KNOBS
from fsagen.schedule import (BRANCH_LOOP_ORDERS, KNOBS, LOOP_ORDERS, TARGET_KEYS, Plan, Schedule, detect_arch,
                             load_schedule, normalize_arch)
from fsagen.spec import BRANCH_RULES, BRANCHES, KernelSpec, load_grid

SM90 = load_schedule("sm90")


def spec(**kw):
    return dataclasses.replace(KernelSpec("slc", "fwd", 4, 128, 64, 16, "bfloat16"), **kw)


def cmp_spec(**kw):
    return dataclasses.replace(KernelSpec("cmp", "fwd", 4, 128, 0, 0, "bfloat16"), **kw)


def sel_spec(**kw):
    return dataclasses.replace(KernelSpec("sel", "fwd", 4, 128, 64, 16, "bfloat16", kernel_size=32, stride=16), **kw)


def test_branch_loop_orders_cover_every_branch():
    assert set(BRANCH_LOOP_ORDERS) == set(BRANCHES)
    for branch, orders in BRANCH_LOOP_ORDERS.items():
        assert orders and set(orders) <= set(LOOP_ORDERS), branch
    # the kernels read knobs for every (loop order, phase) a branch can reach
    phases = {b: BRANCH_RULES[b][0] for b in BRANCHES}
    assert {(o, p) for b, orders in BRANCH_LOOP_ORDERS.items() for o in orders for p in phases[b]} <= set(
        REQUIRED_KNOBS)
    assert set(SM90.loop_orders) == set(LOOP_ORDERS)
    assert {b: SM90.loop_orders_for(b) for b in BRANCHES} == BRANCH_LOOP_ORDERS


def test_target_and_aliases():
    assert SM90.target == {"kind": "cuda", "arch": "sm_90a"}
    for alias in ("sm90", "sm_90", "sm_90a", "SM90a", "90"):
        assert normalize_arch(alias) == "sm90"
        assert load_schedule(alias).arch == "sm90"


def test_unknown_arch_lists_known():
    with pytest.raises(ScheduleError, match=r"unknown arch 'sm70'; known: \[.*'sm80', 'sm90'\]") as info:
        load_schedule("sm70")
    assert "schedule files in" in str(info.value)


# The sm90 rules as measured (bench/results/sweep_chunks.md): forward kv_outer except G=16 at
# block 64 (q_outer); backward kv_outer everywhere (accumulator windows keep memory under 1 GiB).
@pytest.mark.parametrize("G,bs,phase,order", [
    (1, 64, "fwd", "kv_outer"), (4, 64, "fwd", "kv_outer"), (8, 64, "fwd", "kv_outer"),
    (16, 64, "fwd", "q_outer"), (8, 128, "fwd", "kv_outer"), (16, 128, "fwd", "kv_outer"),
    (1, 64, "bwd", "kv_outer"), (8, 64, "bwd", "kv_outer"), (16, 64, "bwd", "kv_outer"),
    (16, 128, "bwd", "kv_outer"), (8, 128, "bwd", "kv_outer"),
])
def test_sm90_rules(G, bs, phase, order):
    plan = SM90.plan(spec(G=G, phase=phase, block_size=bs, topk=16 if bs == 64 else 8))
    assert plan.loop_order == order
    assert [k for k, _ in plan.knobs] == sorted(REQUIRED_KNOBS[(order, phase)])


@pytest.mark.parametrize("s", [
    cmp_spec(), cmp_spec(phase="bwd"), cmp_spec(branch="swa", G=16, D=64, dtype="float16"),
    cmp_spec(branch="swa", phase="bwd", G=1), sel_spec(), sel_spec(block_size=128, kernel_size=64, stride=32, topk=8),
], ids=lambda s: s.name.split("-")[0])
def test_sm90_dense_rule(s):
    """The tuned knobs of sm90.toml's cmp / swa / sel rules (see the measurements quoted there)."""
    plan = SM90.plan(s)
    order = "sel" if s.branch == "sel" else "dense"
    assert plan.loop_order == order
    assert [k for k, _ in plan.knobs] == sorted(REQUIRED_KNOBS[(order, s.phase)])
    big = s.branch == "cmp"
    keys = 64 if s.phase == "bwd" or not big else 128  # cmp's backward: 128 x 64 tiles
    assert plan.knob("rows") == (128 if big else 64) and plan.knob("keys") == keys
    if s.phase == "bwd":
        assert plan.knob("bwd_threads") == (256 if big else 128)
        assert plan.knob("q_split") == (4096 if big else 0)
        if s.branch != "sel":
            assert plan.knob("dkdv_rows") == "gather_async"
    else:
        assert plan.knob("threads") == (256 if big else 128)
        if s.branch != "sel":
            assert plan.knob("num_stages") == 2


def test_sm90_rule_knob_override():
    assert SM90.plan(spec(G=1, phase="bwd", block_size=128, topk=8)).knob("bwd_threads") == 256


def test_forced_loop_order_is_honoured():
    s = spec(G=4)
    for order in SM90.loop_orders_for("slc"):
        assert SM90.plan(s, loop_order=order).loop_order == order
    assert SM90.plan(cmp_spec(), loop_order="dense") == SM90.plan(cmp_spec())
    assert SM90.plan(s, "q_outer").key != SM90.plan(s, "kv_outer").key
    with pytest.raises(UnsupportedSpec, match="loop_order='zigzag'"):
        SM90.plan(s, loop_order="zigzag")


@pytest.mark.parametrize("s,order", [
    (spec(), "dense"), (cmp_spec(), "kv_outer"), (cmp_spec(phase="bwd"), "q_outer"),
    (cmp_spec(branch="swa"), "kv_outer"), (sel_spec(), "q_outer"), (sel_spec(), "kv_outer"),
], ids=lambda x: x if isinstance(x, str) else x.branch)
def test_forced_loop_order_the_branch_cannot_use(s, order):
    with pytest.raises(UnsupportedSpec, match=rf"loop_order='{order}' cannot run branch '{s.branch}'") as info:
        SM90.plan(s, loop_order=order)
    assert str(list(BRANCH_LOOP_ORDERS[s.branch])) in str(info.value)


def test_every_grid_spec_has_a_plan():
    for s in load_grid():
        assert SM90.plan(s).loop_order in BRANCH_LOOP_ORDERS[s.branch]


def test_knob_values_and_plan_api():
    plan = SM90.plan(spec(G=4, phase="fwd"))
    assert plan.knob("rows") == 64 and plan.knob("threads") == 128 and plan.knob("tiles_per_item") == 8
    with pytest.raises(KeyError, match="no knob 'nope'"):
        plan.knob("nope")
    assert Plan.from_dict(plan.to_dict()) == plan
    assert Plan("q_outer", (("b", 1), ("a", 2))).knobs == (("a", 2), ("b", 1))
    with pytest.raises(ScheduleError, match="loop_order"):
        Plan("diagonal", ())


@pytest.mark.parametrize("make,field,value,scope,extra", [
    (spec, "D", 96, "", {}), (spec, "G", 32, "", {}), (cmp_spec, "D", 256, "", {}), (sel_spec, "G", 17, "", {}),
    (spec, "block_size", 32, "slc", {}), (spec, "topk", 65, "slc", {}),
    (sel_spec, "block_size", 32, "sel", {}), (sel_spec, "topk", 65, "sel", {}),
    (sel_spec, "kernel_size", 256, "sel", {}), (sel_spec, "stride", 8, "sel", {"kernel_size": 16}),
    (sel_spec, "stride", 128, "sel", {"block_size": 128, "kernel_size": 128}),
], ids=lambda x: x.__name__ if callable(x) else None)
def test_unsupported_spec_names_field_and_rule(make, field, value, scope, extra):
    with pytest.raises(UnsupportedSpec, match=rf"KernelSpec\.{field}={value}.*sm90") as info:
        SM90.plan(make(**{field: value}, **extra))
    assert f"{field} must be" in str(info.value) and str(SM90.path) in str(info.value)
    assert (f"for branch '{scope}' ([supports.{scope}])" in str(info.value)) == bool(scope)


def test_branch_tables_apply_to_their_branch_only():
    assert set(SM90.branch_supports) == {"slc", "sel", "comp", "dec"}
    assert "block_size" not in SM90.supports  # cmp and swa specs have block_size 0
    SM90.check_supported(cmp_spec())
    SM90.check_supported(cmp_spec(branch="swa", phase="bwd"))


BASE = Path(SM90.path).read_text()


def _schedule(tmp_path, text) -> Path:
    path = tmp_path / "sm99.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("edit,pattern", [
    (("rows = 64", "rows = 64\nwarps = 4"), r"unknown knob 'warps'"),
    (("tiles_per_item = 8\nthreads", "tiles_per_item = '8'\nthreads"), r"knob 'tiles_per_item' must be int"),
    (("num_stages = 2\nchunk_rows", "num_stages = true\nchunk_rows"), r"knob 'num_stages' must be int"),
    (("chunk_rows = 16384", "chunk_rows = -1"), r"knob 'chunk_rows'=-1 must be >= 0"),
    (("rows = 64", "rows = 60"), r"knob 'rows'=60 must be a positive multiple of 16"),
    (("[knobs.q_outer]", "[knobs.diag]\nthreads = 1\n[knobs.q_outer]"), r"\[knobs.diag\]: unknown loop order"),
    (('loop_order = "q_outer"', 'loop_order = "diag"'), r"\[\[rules\]\] #6: loop_order='diag'"),
    (('when = { branch = "slc", phase = "fwd" }', "when = { heads = 8 }"), r"unknown KernelSpec field 'heads'"),
    (("keys = 64", "keys = 40"), r"\[knobs.dense\]: knob 'keys'=40 must be a positive multiple of 16"),
    (("keys = 64", "keys = 0"), r"\[knobs.dense\]: knob 'keys'=0 must be a positive multiple of 16"),
    (("q_split = 0", "q_split = -1"), r"\[knobs.dense\]: knob 'q_split'=-1 must be >= 0"),
    (('dkdv_rows = "gather"', 'dkdv_rows = "head"'),  # a TMA row mode that was removed
     r"\[knobs.dense\]: knob 'dkdv_rows'='head' must be one of \"gather\", \"gather_async\"$"),
    (("[supports.slc]", "[supports.slc]\nheads = 8"), r"\[supports.slc\]: unknown KernelSpec field 'heads'"),
    (("[supports.sel]\nblock_size = [64, 128]", "[supports.sel]\nblock_size = { lo = 64 }"),
     r"\[supports.sel\]: block_size range must have only 'min' and/or 'max'"),
    (("[supports]", "[supports]\nslcx = [64]"), r"\[supports\]: unknown KernelSpec field 'slcx'"),
    (("[supports]", "[supports]\nswa = [64]"), r"\[supports.swa\] must be a table of conditions"),
    (('when = { branch = "swa" }', 'when = { branch = "swa" }\nknobs = {}'), None),
    (('when = { branch = "cmp" }\nloop_order = "dense"', 'when = { branch = "cmp" }\nloop_order = "kv_outer"'),
     r"\[\[rules\]\] #2: loop_order='kv_outer' cannot run branch\(es\) \['cmp'\]"),
    (('when = { branch = "slc", phase = "fwd" }', 'when = { branch = ["sel", "swa"], phase = "fwd" }'),
     r"\[\[rules\]\] #8: loop_order='kv_outer' cannot run branch\(es\) \['swa', 'sel'\]"),
    (('when = { branch = "cmp" }', 'when = { branch = ["cmp", "swab"] }'), None),
    (('when = { branch = "cmp" }', 'when = { branch = "cmpx" }'),
     r"\[\[rules\]\] #2: when branch == 'cmpx' matches no branch"),
    (("[target]", "[targets]\n[target]"), r"unknown table"),
])
def test_schedule_file_errors_name_file_and_knob(tmp_path, edit, pattern):
    old, new = edit
    assert old in BASE
    path = _schedule(tmp_path, BASE.replace(old, new, 1))
    if pattern is None:  # a valid edit (the file stays loadable)
        Schedule.from_file(path)
        return
    with pytest.raises(ScheduleError, match=pattern) as info:
        Schedule.from_file(path)
    assert str(path) in str(info.value)


def test_missing_knob_is_an_error_naming_it(tmp_path):
    path = _schedule(tmp_path, BASE.replace("q_threads = 128", ""))
    schedule = Schedule.from_file(path)
    with pytest.raises(ScheduleError, match=r"lacks knob\(s\) \['q_threads'\]") as info:
        schedule.plan(spec(G=16))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("make,knob", [(lambda: cmp_spec(branch="swa"), "keys"),
                                       (lambda: cmp_spec(branch="swa", phase="bwd"), "q_split")])
def test_missing_dense_knob_is_an_error_naming_it(tmp_path, make, knob):
    path = _schedule(tmp_path, BASE.replace(f"\n{knob} = ", f"\n# {knob} = ", 1))
    with pytest.raises(ScheduleError, match=rf"\[knobs.dense\].*lacks knob\(s\) \['{knob}'\]") as info:
        Schedule.from_file(path).plan(make())
    assert str(path) in str(info.value)


def test_branch_outside_supports_is_unsupported(tmp_path):
    schedule = Schedule.from_file(_schedule(tmp_path, BASE.replace('branch = ["slc", "cmp", "swa", "sel", "comp", "dec", "gate"]',
                                                                   'branch = ["slc", "cmp"]', 1)))
    schedule.plan(cmp_spec())
    with pytest.raises(UnsupportedSpec, match=r"KernelSpec\.branch='swa' is not supported.*branch must be one of"):
        schedule.plan(cmp_spec(branch="swa"))


def test_rules_for_other_branches_are_skipped(tmp_path):
    """A rule whose loop order cannot run the spec's branch never gives its plan."""
    text = BASE.replace("[[rules]]", '[[rules]]\nwhen = { phase = "fwd" }\nloop_order = "kv_outer"\n\n[[rules]]', 1)
    schedule = Schedule.from_file(_schedule(tmp_path, text))
    assert schedule.plan(spec(G=16)).loop_order == "kv_outer"  # the new first rule
    assert schedule.plan(cmp_spec()).loop_order == "dense"
    assert schedule.plan(sel_spec()).loop_order == "sel"
    # no rule for cmp: unsupported, not a plan of a loop order it cannot use
    start = BASE.index('when = { branch = "cmp" }')
    cmp_rule = BASE[start:BASE.index("[[rules]]", start)]
    text = BASE.replace(cmp_rule, 'when = { phase = "fwd" }\nloop_order = "kv_outer"\n\n', 1)
    schedule = Schedule.from_file(_schedule(tmp_path, text))
    with pytest.raises(UnsupportedSpec, match=r"no rule of schedule sm99 .* matches cmp_fwd"):
        schedule.plan(cmp_spec())
    # a forced loop order without a matching rule takes the defaults, if the branch can use it
    assert schedule.plan(cmp_spec(), loop_order="dense").knob("keys") == 64
    with pytest.raises(UnsupportedSpec, match=r"loop_order='kv_outer' cannot run branch 'cmp'"):
        schedule.plan(cmp_spec(), loop_order="kv_outer")


def test_knob_table_covers_the_kernels():
    assert {k for knobs in REQUIRED_KNOBS.values() for k in knobs} <= set(KNOBS)


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


def test_detect_arch_honours_fsagen_arch(monkeypatch):
    monkeypatch.setenv("FSAGEN_ARCH", "sm_80")
    assert detect_arch() == "sm80"


# ---- sm80 (Ampere) ---------------------------------------------------------------------------

SM80 = load_schedule("sm80")


def test_sm80_target_and_loop_orders():
    assert SM80.target["arch"] == "sm_80" and SM80.target["embed_ptx"] is True
    assert SM80.target["max_shared_memory_per_block"] == 163 * 1024  # A100: 164 KB per SM, 163 KB per block
    assert {b: SM80.loop_orders_for(b) for b in BRANCHES} == BRANCH_LOOP_ORDERS
    for alias in ("sm80", "sm_80", "80"):
        assert load_schedule(alias).path == SM80.path


@pytest.mark.parametrize("s", list(load_grid()), ids=lambda s: s.name)
def test_sm80_plans_every_grid_spec_within_ampere_limits(s):
    """Every default-grid spec has a plan, in either loop order its branch can run, and no knob asks
    for what sm_80 lacks: TMA scatter or 16-byte float atomics (x4: sm_90), or a pipelined dense
    loop (TileLang 0.1.15 cannot lower num_stages >= 2 there: ../shared/DESIGN.md section 5)."""
    plans = [SM80.plan(s)] + [SM80.plan(s, order) for order in SM80.loop_orders_for(s.branch)]
    for plan in plans:
        knobs = dict(plan.knobs)
        assert set(knobs) == set(REQUIRED_KNOBS[(plan.loop_order, s.phase)])
        assert knobs.get("scatter", "x2") == "x2"
        if plan.loop_order == "dense":
            assert knobs["num_stages"] <= 1


@pytest.mark.parametrize("G,bs,phase,order", [
    (4, 64, "fwd", "kv_outer"), (8, 64, "fwd", "q_outer"), (8, 128, "fwd", "kv_outer"), (16, 128, "fwd", "q_outer"),
    (8, 64, "bwd", "kv_outer"), (16, 64, "bwd", "q_outer"),
])
def test_sm80_slc_rules(G, bs, phase, order):
    assert SM80.plan(spec(G=G, phase=phase, block_size=bs, topk=16 if bs == 64 else 8)).loop_order == order


def test_sm80_cmp_splits_its_backward():
    assert SM80.plan(cmp_spec(phase="bwd")).knob("q_split") == 4096
    assert SM80.plan(cmp_spec(branch="swa", phase="bwd")).knob("q_split") == 0


@pytest.mark.parametrize("make,field,value", [(spec, "D", 256), (cmp_spec, "G", 32), (sel_spec, "stride", 8)])
def test_sm80_unsupported_spec_names_the_schedule_file(make, field, value):
    extra = {"kernel_size": 16} if field == "stride" else {}
    with pytest.raises(UnsupportedSpec, match=rf"KernelSpec\.{field}={value} is not supported by schedule sm80") as info:
        SM80.plan(make(**{field: value}, **extra))
    assert str(SM80.path) in str(info.value)


SM80_TEXT = Path(SM80.path).read_text()


@pytest.mark.parametrize("edit,pattern", [
    (("embed_ptx = true", 'embed_ptx = "yes"'), r"\[target\]: key 'embed_ptx' must be bool"),
    (("max_shared_memory_per_block = 166912", "max_shared_memory_per_block = 0"),
     r"\[target\]: key 'max_shared_memory_per_block'=0 must be a positive number of bytes"),
    (('arch = "sm_80"', 'arch = "80"'), r"\[target\]: embed_ptx = true needs arch = 'sm_XX'"),
    (('scatter = "x2"', 'scatter = "x8"'), r"\[knobs.kv_outer\]: knob 'scatter'='x8' must be one of"),
    (('scatter = "x2"', 'scatter = "tma"'), r"\[knobs.kv_outer\]: knob 'scatter'='tma' needs sm_90 or newer; "
                                            r"\[target\] arch is 'sm_80'"),
    (("knobs = { q_split = 4096 }", 'knobs = { q_split = 4096, scatter = "tma" }'),
     r"\[\[rules\]\] #1 knobs: knob 'scatter'='tma' needs sm_90"),
    (("q_threads = 128", "q_threads = 100"), r"\[knobs.q_outer\]: knob 'q_threads'=100 must be a positive multiple of 32"),
    (("keys = 64\nthreads = 128", "key = 64\nthreads = 128"), r"\[knobs.dense\]: unknown knob 'key'"),
    (("knobs = { q_split = 4096 }", "knobs = { q_split = 4096.0 }"), r"\[\[rules\]\] #1 knobs: knob 'q_split' must be int"),
])
def test_sm80_file_errors_name_file_and_knob(tmp_path, edit, pattern):
    old, new = edit
    assert old in SM80_TEXT
    path = tmp_path / "sm80.toml"
    path.write_text(SM80_TEXT.replace(old, new, 1))
    with pytest.raises(ScheduleError, match=pattern) as info:
        Schedule.from_file(path)
    assert str(path) in str(info.value)


def test_sm80_missing_knob_names_file_loop_order_and_knob(tmp_path):
    path = tmp_path / "sm80.toml"
    path.write_text(SM80_TEXT.replace("\nbwd_threads = 256", "\n# bwd_threads = 256", 1))
    with pytest.raises(ScheduleError, match=r"\[knobs.kv_outer\] \(with \[\[rules\]\] #\d+\) lacks knob\(s\) "
                                            r"\['bwd_threads'\] needed by kv_outer bwd") as info:
        Schedule.from_file(path).plan(spec(phase="bwd", G=2))
    assert str(path) in str(info.value)


GUIDE = (Path(__file__).resolve().parent.parent / "schedules" / "README.md").read_text()


@pytest.mark.parametrize("name", [*KNOBS, *TARGET_KEYS, *LOOP_ORDERS])
def test_guide_documents_every_knob_target_key_and_loop_order(name):
    """schedules/README.md has a line starting with the name in backticks (its reference entry)."""
    assert f"| `{name}` |" in GUIDE, f"schedules/README.md does not document {name!r}"


def test_cpu_tensors_select_the_cpu_schedule():
    torch = pytest.importorskip("torch")
    assert detect_arch(torch.device("cpu")) == "cpu"
    assert detect_arch("cpu") == "cpu"
    assert load_schedule("cpu").target == {"kind": "c"}
