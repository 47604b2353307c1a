import copy
import dataclasses

import pytest

from fsagen.errors import GridError, SpecError, UnsupportedSpec
from fsagen.spec import BRANCHES, DTYPES, PHASES, KernelSpec, NSASpec, load_grid

SPEC = KernelSpec("slc", "fwd", 4, 128, 64, 16, "bfloat16")
# one valid spec per branch
SPECS = {
    "slc": SPEC,
    "cmp": KernelSpec("cmp", "fwd", 4, 128, 0, 0, "bfloat16"),
    "swa": KernelSpec("swa", "bwd", 2, 64, 0, 0, "float16"),
    "sel": KernelSpec("sel", "fwd", 4, 128, 64, 16, "bfloat16", kernel_size=32, stride=16),
    "comp": KernelSpec("comp", "fwd", 1, 128, 0, 0, "bfloat16", kernel_size=32, stride=16),
    "dec": KernelSpec("dec", "fwd", 4, 128, 64, 0, "bfloat16"),
    "gate": KernelSpec("gate", "fwd", 1, 128, 0, 0, "bfloat16"),
}


def test_every_branch_has_a_spec_here():
    assert tuple(SPECS) == BRANCHES


def _changed(obj, field):
    """A copy of `obj` with one field changed (validation bypassed: only the key is under test)."""
    value = getattr(obj, field.name)
    new = copy.copy(obj)
    choices = {"dtype": list(DTYPES), "phase": list(PHASES), "branch": list(BRANCHES)}.get(field.name, [])
    if len(choices) > 1:
        other = next(c for c in choices if c != value)
    elif isinstance(value, str):
        other = value + "x"
    elif value is None:
        other = 7
    else:
        other = value + 1
    object.__setattr__(new, field.name, other)
    return new


@pytest.mark.parametrize("obj", [*SPECS.values(), NSASpec(32, 4, 128)], ids=[*SPECS, "NSASpec"])
def test_every_field_changes_the_key(obj):
    keys = {obj.key}
    for field in dataclasses.fields(obj):
        other = _changed(obj, field)
        assert other.key != obj.key, field.name
        keys.add(other.key)
    assert len(keys) == len(dataclasses.fields(obj)) + 1


def test_kernel_spec_fields_in_order():
    assert [f.name for f in dataclasses.fields(KernelSpec)] == [
        "branch", "phase", "G", "D", "block_size", "topk", "dtype", "kernel_size", "stride"]


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS)
def test_every_field_changes_name_and_hash(spec):
    for field in dataclasses.fields(spec):
        other = _changed(spec, field)
        assert other.short_hash != spec.short_hash, field.name
        assert other.name != spec.name, field.name


@pytest.mark.parametrize("branch,readable", [
    ("slc", "slc_fwd_bf16_g4_d128_bs64_k16"),
    ("cmp", "cmp_fwd_bf16_g4_d128"),
    ("swa", "swa_bwd_fp16_g2_d64"),
    ("sel", "sel_fwd_bf16_g4_d128_bs64_ks32_s16_k16"),
    ("comp", "comp_fwd_bf16_g1_d128_ks32_s16"),
    ("gate", "gate_fwd_bf16_g1_d128"),
])
def test_name_is_readable_with_short_hash(branch, readable):
    spec = SPECS[branch]
    assert spec.name == f"{readable}-{spec.short_hash}"
    assert len(spec.short_hash) == 8
    assert KernelSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("field,value", [
    ("branch", "xyz"), ("phase", "decode"), ("dtype", "float32"),
    ("G", 0), ("D", "128"), ("block_size", True), ("topk", -1), ("kernel_size", -1), ("stride", 1.0),
])
def test_invalid_field_names_the_field(field, value):
    with pytest.raises(SpecError, match=rf"KernelSpec\.{field}="):
        dataclasses.replace(SPEC, **{field: value})


# Per-branch rules: (branch, changed fields, field named in the error, rule in the error)
BRANCH_CASES = [
    ("slc", {"block_size": 0}, "block_size", r"must be >= 1 for branch 'slc'"),
    ("slc", {"topk": 0}, "topk", r"must be >= 1 for branch 'slc'"),
    ("slc", {"kernel_size": 32}, "kernel_size", r"must be == 0 for branch 'slc'"),
    ("slc", {"stride": 16}, "stride", r"must be == 0 for branch 'slc'"),
    *[(b, {name: v}, name, rf"must be == 0 for branch '{b}' \(its key range is a runtime argument\)")
      for b in ("cmp", "swa")
      for name, v in (("block_size", 64), ("topk", 16), ("kernel_size", 32), ("stride", 16))],
    ("sel", {"phase": "bwd"}, "phase", r"must be one of \['fwd'\] for branch 'sel'"),
    ("sel", {"block_size": 0}, "block_size", r"must be >= 1 for branch 'sel'"),
    ("sel", {"topk": 0}, "topk", r"must be >= 1 for branch 'sel'"),
    ("sel", {"kernel_size": 0}, "kernel_size", r"must be >= 1 for branch 'sel'"),
    ("sel", {"stride": 0}, "stride", r"must be >= 1 for branch 'sel'"),
    ("sel", {"kernel_size": 48, "stride": 32}, "kernel_size", r"must be a multiple of stride=32 for branch 'sel'"),
    ("sel", {"block_size": 80, "kernel_size": 64, "stride": 32}, "block_size",
     r"must be a multiple of stride=32 for branch 'sel'"),
    ("comp", {"G": 4}, "G", r"must be 1 for branch 'comp'"),
    ("comp", {"kernel_size": 0}, "kernel_size", r"must be >= 1 for branch 'comp'"),
    ("comp", {"stride": 0}, "stride", r"must be >= 1 for branch 'comp'"),
    ("comp", {"block_size": 64}, "block_size", r"must be == 0 for branch 'comp' \(unused by its kernels\)"),
    ("comp", {"topk": 16}, "topk", r"must be == 0 for branch 'comp'"),
    ("comp", {"kernel_size": 48, "stride": 32}, "kernel_size", r"must be a multiple of stride=32 for branch 'comp'"),
]


@pytest.mark.parametrize("branch,changes,field,rule", BRANCH_CASES,
                         ids=[f"{b}-{'-'.join(f'{k}{v}' for k, v in c.items())}" for b, c, _, _ in BRANCH_CASES])
def test_branch_rules_name_field_and_rule(branch, changes, field, rule):
    with pytest.raises(SpecError, match=rf"KernelSpec\.{field}={changes[field]!r}: {rule}"):
        dataclasses.replace(SPECS[branch], **changes)


@pytest.mark.parametrize("branch", ["cmp", "swa", "comp"])
def test_dense_branches_have_both_phases(branch):
    for phase in PHASES:
        assert dataclasses.replace(SPECS[branch], phase=phase).phase == phase


def test_from_dict_reports_unknown_and_missing_fields():
    with pytest.raises(SpecError, match="unknown KernelSpec field"):
        KernelSpec.from_dict({**SPEC.to_dict(), "Dv": 64})
    data = SPEC.to_dict()
    del data["topk"]
    with pytest.raises(SpecError, match="missing KernelSpec field.*topk"):
        KernelSpec.from_dict(data)


@pytest.mark.parametrize("branch", ["slc", "cmp", "swa"])
def test_from_dict_fills_defaulted_fields(branch):
    data = SPECS[branch].to_dict()
    del data["kernel_size"], data["stride"]
    assert KernelSpec.from_dict(data) == SPECS[branch]


def test_nsa_spec_kernel_specs():
    nsa = NSASpec(num_q_heads=64, num_kv_heads=4, head_dim=128, block_size=64, topk=16, kernel_size=32, stride=16)
    assert nsa.G == 16
    specs = nsa.kernel_specs()
    assert [(s.branch, s.phase) for s in specs] == [
        ("slc", "fwd"), ("slc", "bwd"), ("cmp", "fwd"), ("cmp", "bwd"), ("swa", "fwd"), ("swa", "bwd"), ("sel", "fwd")]
    assert all(s.G == 16 and s.D == 128 and s.dtype == "bfloat16" for s in specs)
    assert all((s.block_size, s.topk, s.kernel_size, s.stride) == (64, 16, 0, 0) for s in specs[:2])
    assert all((s.block_size, s.topk, s.kernel_size, s.stride) == (0, 0, 0, 0) for s in specs[2:6])
    assert specs[6] == KernelSpec("sel", "fwd", 16, 128, 64, 16, "bfloat16", kernel_size=32, stride=16)
    other = NSASpec(8, 2, 64, block_size=128, topk=8, kernel_size=64, stride=32, dtype="float16").kernel_specs()[-1]
    assert (other.G, other.D, other.block_size, other.topk, other.kernel_size, other.stride, other.dtype) == (
        4, 64, 128, 8, 64, 32, "float16")
    with pytest.raises(UnsupportedSpec, match="v_head_dim"):
        NSASpec(8, 2, 128, v_head_dim=64).kernel_specs()
    with pytest.raises(SpecError, match="num_q_heads must be a multiple of num_kv_heads"):
        NSASpec(6, 4, 128)
    with pytest.raises(SpecError, match="NSASpec.compression"):
        NSASpec(8, 2, 128, compression="max")


def test_default_grid():
    specs = load_grid()
    by_branch = {b: [s for s in specs if s.branch == b] for b in BRANCHES}
    assert {b: len(v) for b, v in by_branch.items()} == {
        "slc": 2 * 5 * 2 * 2 * 2, "cmp": 2 * 5 * 2 * 2, "swa": 2 * 5 * 2 * 2, "sel": 5 * 2 * 2 * 3,
        "comp": 2 * 2 * 2 * 3, "dec": 5 * 2 * 2, "gate": 2 * 2 * 2}
    assert len(specs) == 272
    assert len({s.name for s in specs}) == len(specs)
    assert {(s.block_size, s.topk) for s in by_branch["slc"]} == {(64, 16), (128, 8)}
    assert {(s.block_size, s.kernel_size, s.stride, s.topk) for s in by_branch["sel"]} == {
        (64, 32, 16, 16), (128, 64, 32, 8), (64, 32, 32, 16)}
    assert {s.phase for s in by_branch["sel"]} == {"fwd"}
    assert {(s.kernel_size, s.stride) for s in by_branch["comp"]} == {(32, 16), (64, 32), (32, 32)}
    assert {s.G for s in by_branch["comp"]} == {1}  # compression has no query heads
    for b in BRANCHES:
        assert {s.G for s in by_branch[b]} == ({1} if b in ("comp", "gate") else {1, 2, 4, 8, 16})
        assert {s.D for s in by_branch[b]} == {64, 128}
        assert {s.dtype for s in by_branch[b]} == set(DTYPES)
    for b in ("cmp", "swa", "comp", "gate"):
        assert {s.phase for s in by_branch[b]} == set(PHASES)
    assert {(s.phase, s.block_size) for s in by_branch["dec"]} == {("fwd", 64)}  # decode: page size 64
    ci = load_grid(subset="ci")
    assert 0 < len(ci) < 17 and set(ci) <= set(specs)
    assert {s.phase for s in ci} == {"fwd", "bwd"}
    assert [(s.branch, s.phase, s.G, s.D, s.dtype) for s in ci if s.branch != "slc"] == [
        ("cmp", "fwd", 4, 128, "bfloat16"), ("cmp", "bwd", 4, 128, "bfloat16"),
        ("swa", "fwd", 2, 64, "float16"), ("swa", "bwd", 1, 128, "bfloat16"), ("sel", "fwd", 4, 128, "bfloat16"),
        ("comp", "fwd", 1, 128, "bfloat16"), ("comp", "bwd", 1, 64, "float16"), ("dec", "fwd", 4, 128, "bfloat16"),
        ("gate", "fwd", 1, 128, "bfloat16"), ("gate", "bwd", 1, 64, "float16")]
    assert ci[-6] == SPECS["sel"] and ci[-5] == SPECS["comp"] and ci[-3] == SPECS["dec"]


GRID = """
[grid]
branch = ["slc"]
phase = ["fwd"]
G = [1, 2]
D = [64]
dtype = ["bfloat16"]
[[grid.together]]
fields = ["block_size", "topk"]
values = [[64, 16]]
"""


def test_grid_file_errors(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text(GRID)
    assert len(load_grid(path)) == 2
    cases = [
        (GRID.replace("D = [64]", "D = [64]\nDv = [64]"), r"unknown KernelSpec field.*Dv"),
        (GRID.replace("D = [64]\n", ""), r"lacks field.*'D'"),
        (GRID.replace("G = [1, 2]", "G = [0]"), r"KernelSpec\.G=0"),
        (GRID.replace("[[64, 16]]", "[[64]]"), r"does not match fields"),
        (GRID + "\n[[subset.ci]]\nbranch='slc'\nphase='fwd'\nG=4\nD=64\nblock_size=64\ntopk=16\ndtype='bfloat16'\n",
         r"is not in the grid"),
        ("[grid\n", r"invalid TOML"),
    ]
    for text, pattern in cases:
        path.write_text(text)
        with pytest.raises(GridError, match=pattern) as info:
            load_grid(path, subset="ci" if "subset" in text else None)
        assert str(path) in str(info.value)
    path.write_text(GRID)
    with pytest.raises(GridError, match="no subset 'ci'"):
        load_grid(path, subset="ci")
    with pytest.raises(GridError, match="not found"):
        load_grid(tmp_path / "missing.toml")


# GRID as the first of three [[grid]] tables
GRIDS = GRID.replace("[grid]", "[[grid]]", 1) + """
[[grid]]
branch = ["cmp", "swa"]
phase = ["fwd", "bwd"]
G = [4]
D = [128]
dtype = ["bfloat16"]
block_size = [0]
topk = [0]

[[grid]]
branch = ["sel"]
phase = ["fwd"]
G = [4]
D = [128]
dtype = ["bfloat16"]
[[grid.together]]
fields = ["block_size", "kernel_size", "stride", "topk"]
values = [[64, 32, 16, 16], [128, 64, 32, 8]]
"""

CMP_ENTRY = "\n[[subset.ci]]\nbranch='cmp'\nphase='bwd'\nG=4\nD=128\nblock_size=0\ntopk=0\ndtype='bfloat16'\n"
SEL_ENTRY = ("\n[[subset.ci]]\nbranch='sel'\nphase='fwd'\nG=4\nD=128\nblock_size=128\ntopk=8\ndtype='bfloat16'\n"
             "kernel_size=64\nstride=32\n")


def test_grid_tables_are_united(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text(GRIDS + CMP_ENTRY + SEL_ENTRY)
    specs = load_grid(path)
    assert len(specs) == 2 + 4 + 2
    assert [s.branch for s in specs] == ["slc"] * 2 + ["cmp"] * 2 + ["swa"] * 2 + ["sel"] * 2
    # each [[grid.together]] belongs to its own table; omitted defaulted fields are 0
    assert {(s.block_size, s.topk, s.kernel_size, s.stride) for s in specs if s.branch == "slc"} == {(64, 16, 0, 0)}
    assert {(s.block_size, s.kernel_size, s.stride, s.topk) for s in specs if s.branch == "sel"} == {
        (64, 32, 16, 16), (128, 64, 32, 8)}
    ci = load_grid(path, subset="ci")
    assert ci == [KernelSpec("cmp", "bwd", 4, 128, 0, 0, "bfloat16"),
                  KernelSpec("sel", "fwd", 4, 128, 128, 8, "bfloat16", kernel_size=64, stride=32)]


EXTRA_CMP = ('\n[[grid]]\nbranch = ["cmp"]\nphase = ["fwd"]\nG = [4]\nD = [128]\ndtype = ["bfloat16"]\n'
             'block_size = [0]\ntopk = [0]\n')


@pytest.mark.parametrize("text,pattern", [
    (GRIDS + EXTRA_CMP, r"\[\[grid\]\] #4 gives cmp_fwd_bf16_g4_d128-\w+ again \(also from \[\[grid\]\] #2\)"),
    (GRID.replace("G = [1, 2]", "G = [1, 2, 1]"), r"\[grid\] gives slc_fwd_bf16_g1_d64_bs64_k16-\w+ again"),
    (GRIDS.replace("topk = [0]\n", ""), r"\[\[grid\]\] #2 lacks field.*'topk'"),
    (GRIDS.replace("[64, 32, 16, 16]", "[64, 48, 32, 16]"),
     r"\[\[grid\]\] #3: KernelSpec\.kernel_size=48: must be a multiple of stride=32"),
    (GRIDS.replace("topk = [0]\n", "topk = [0]\nkernel_size = [32]\n"),
     r"\[\[grid\]\] #2: KernelSpec\.kernel_size=32: must be == 0 for branch 'cmp'"),
    (GRIDS.replace('values = [[64, 16]]', 'values = [[64, 16]]\n[[grid.together]]\nfields = ["G"]\nvalues = [[4]]'),
     r"\[\[grid\]\] #1: field\(s\) \['G'\] given more than once"),
    (GRIDS + "\n[[subset.ci]]\nbranch='sel'\nphase='fwd'\nG=4\nD=128\nblock_size=64\ntopk=16\ndtype='bfloat16'\n",
     r"\[\[subset.ci\]\] #1: KernelSpec\.kernel_size=0: must be >= 1 for branch 'sel'"),
    ("grid = [1, 2]\n", r"\[\[grid\]\] #1 must be a table"),
    ("grid = []\n", r"no \[grid\] table"),
    ("grid = 5\n", r"no \[grid\] table"),
])
def test_grid_tables_errors(tmp_path, text, pattern):
    path = tmp_path / "g.toml"
    path.write_text(text)
    with pytest.raises(GridError, match=pattern) as info:
        load_grid(path, subset="ci" if "subset" in text else None)
    assert str(path) in str(info.value)
