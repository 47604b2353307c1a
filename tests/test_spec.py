import copy
import dataclasses

import pytest

from fsagen.errors import GridError, SpecError, UnsupportedSpec
from fsagen.spec import DTYPES, PHASES, KernelSpec, NSASpec, load_grid

SPEC = KernelSpec("slc", "fwd", 4, 128, 64, 16, "bfloat16")


def _changed(obj, field):
    """A copy of `obj` with one field changed (validation bypassed: only the key is under test)."""
    value = getattr(obj, field.name)
    new = copy.copy(obj)
    choices = {"dtype": list(DTYPES), "phase": list(PHASES)}.get(field.name, [])
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


@pytest.mark.parametrize("obj", [SPEC, NSASpec(32, 4, 128)], ids=["KernelSpec", "NSASpec"])
def test_every_field_changes_the_key(obj):
    keys = {obj.key}
    for field in dataclasses.fields(obj):
        other = _changed(obj, field)
        assert other.key != obj.key, field.name
        keys.add(other.key)
    assert len(keys) == len(dataclasses.fields(obj)) + 1


def test_every_field_changes_name_and_hash():
    for field in dataclasses.fields(SPEC):
        other = _changed(SPEC, field)
        assert other.short_hash != SPEC.short_hash, field.name
        assert other.name != SPEC.name, field.name


def test_name_is_readable_with_short_hash():
    assert SPEC.name == f"slc_fwd_bf16_g4_d128_bs64_k16-{SPEC.short_hash}"
    assert len(SPEC.short_hash) == 8
    assert KernelSpec.from_dict(SPEC.to_dict()) == SPEC


@pytest.mark.parametrize("field,value", [
    ("branch", "xyz"), ("phase", "decode"), ("dtype", "float32"),
    ("G", 0), ("D", "128"), ("block_size", True), ("topk", -1),
])
def test_invalid_field_names_the_field(field, value):
    with pytest.raises(SpecError, match=rf"KernelSpec\.{field}="):
        dataclasses.replace(SPEC, **{field: value})


def test_from_dict_reports_unknown_and_missing_fields():
    with pytest.raises(SpecError, match="unknown KernelSpec field"):
        KernelSpec.from_dict({**SPEC.to_dict(), "Dv": 64})
    data = SPEC.to_dict()
    del data["topk"]
    with pytest.raises(SpecError, match="missing KernelSpec field.*topk"):
        KernelSpec.from_dict(data)


def test_nsa_spec_kernel_specs():
    nsa = NSASpec(num_q_heads=64, num_kv_heads=4, head_dim=128, block_size=64, topk=16)
    assert nsa.G == 16
    assert [s.phase for s in nsa.kernel_specs()] == ["fwd", "bwd"]
    assert all(s.G == 16 and s.D == 128 and s.topk == 16 for s in nsa.kernel_specs())
    with pytest.raises(UnsupportedSpec, match="v_head_dim"):
        NSASpec(8, 2, 128, v_head_dim=64).kernel_specs()
    with pytest.raises(SpecError, match="num_q_heads must be a multiple of num_kv_heads"):
        NSASpec(6, 4, 128)
    with pytest.raises(SpecError, match="NSASpec.compression"):
        NSASpec(8, 2, 128, compression="max")


def test_default_grid():
    specs = load_grid()
    assert len(specs) == 2 * 5 * 2 * 2 * 2
    assert len({s.name for s in specs}) == len(specs)
    assert {(s.block_size, s.topk) for s in specs} == {(64, 16), (128, 8)}
    assert {s.G for s in specs} == {1, 2, 4, 8, 16}
    ci = load_grid(subset="ci")
    assert 0 < len(ci) < 10 and set(ci) <= set(specs)
    assert {s.phase for s in ci} == {"fwd", "bwd"}


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
