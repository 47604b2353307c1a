"""Kernel and model specs, and the grid of kernel specs that an AOT build compiles.

A `KernelSpec` names one kernel family instance (branch, phase, shapes, dtype).  Its canonical key is
derived from every dataclass field, so adding a field can never leave two different kernels with the
same key or artifact name.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import tomllib
from dataclasses import dataclass
from pathlib import Path

from fsagen.errors import GridError, SpecError, UnsupportedSpec
from fsagen.paths import default_grid_file

# slc: attention over the selected blocks; cmp: attention over the compressed tokens; swa: sliding
# window attention; sel: top-k block selection from the compressed branch's scores; comp: compression
# of raw k/v into compressed tokens (mean / weighted pooling; no query heads, so G is 1); dec: decode
# attention, one new query per sequence over pages of a paged KV cache (block_size = the page size);
# gate: the gated sum of the three branches' outputs (per (token, head) row; G is 1).
BRANCHES = ("slc", "cmp", "swa", "sel", "comp", "dec", "gate")
PHASES = ("fwd", "bwd")
# dtype name -> short form used in readable names
DTYPES = {"bfloat16": "bf16", "float16": "fp16"}

# Per branch: the phases it has, and which of the shape fields block_size, topk, kernel_size and
# stride are compile-time parameters (">= 1") or unused ("== 0": cmp and swa take their key ranges
# as runtime arguments).
_POSITIVE, _ZERO = ">= 1", "== 0"
BRANCH_RULES: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "slc": (PHASES, {"block_size": _POSITIVE, "topk": _POSITIVE, "kernel_size": _ZERO, "stride": _ZERO}),
    "cmp": (PHASES, {"block_size": _ZERO, "topk": _ZERO, "kernel_size": _ZERO, "stride": _ZERO}),
    "swa": (PHASES, {"block_size": _ZERO, "topk": _ZERO, "kernel_size": _ZERO, "stride": _ZERO}),
    "sel": (("fwd",), {"block_size": _POSITIVE, "topk": _POSITIVE, "kernel_size": _POSITIVE,
                       "stride": _POSITIVE}),
    "comp": (PHASES, {"block_size": _ZERO, "topk": _ZERO, "kernel_size": _POSITIVE, "stride": _POSITIVE}),
    "dec": (("fwd",), {"block_size": _POSITIVE, "topk": _ZERO, "kernel_size": _ZERO, "stride": _ZERO}),
    "gate": (PHASES, {"block_size": _ZERO, "topk": _ZERO, "kernel_size": _ZERO, "stride": _ZERO}),
}
_UNUSED_WHY = {"cmp": "its key range is a runtime argument", "swa": "its key range is a runtime argument"}
# (branch, field, divisor field): field must be a multiple of the divisor field
_MULTIPLES = (("sel", "kernel_size", "stride"), ("sel", "block_size", "stride"), ("comp", "kernel_size", "stride"))
# (branch, field, the only value it may take)
_FIXED = (("comp", "G", 1), ("gate", "G", 1))


def _check_choice(owner: str, field: str, value, choices) -> None:
    if value not in choices:
        raise SpecError(f"{owner}.{field}={value!r}: must be one of {list(choices)}")


def _check_int(owner: str, field: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{owner}.{field}={value!r}: must be an int")
    if value < minimum:
        raise SpecError(f"{owner}.{field}={value!r}: must be >= {minimum}")


def canonical_key(obj) -> str:
    """`Type(field=value,...)` over every dataclass field, in declaration order."""
    body = ",".join(f"{f.name}={getattr(obj, f.name)!r}" for f in dataclasses.fields(obj))
    return f"{type(obj).__name__}({body})"


def short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


@dataclass(frozen=True)
class KernelSpec:
    """One kernel to generate.  G = query heads per kv head, D = head dim (q, k and v).

    Which of block_size, topk, kernel_size and stride a branch uses: `BRANCH_RULES` (unused ones
    are 0; kernel_size and stride default to 0 so that slc, cmp and swa specs may omit them).
    """

    branch: str
    phase: str
    G: int
    D: int
    block_size: int
    topk: int
    dtype: str
    kernel_size: int = 0
    stride: int = 0

    def __post_init__(self):
        _check_choice("KernelSpec", "branch", self.branch, BRANCHES)
        _check_choice("KernelSpec", "phase", self.phase, PHASES)
        phases, shape_rules = BRANCH_RULES[self.branch]
        if self.phase not in phases:
            raise SpecError(
                f"KernelSpec.phase={self.phase!r}: must be one of {list(phases)} for branch {self.branch!r}"
            )
        _check_choice("KernelSpec", "dtype", self.dtype, DTYPES)
        for name in ("G", "D"):
            _check_int("KernelSpec", name, getattr(self, name))
        for name, rule in shape_rules.items():
            value = getattr(self, name)
            _check_int("KernelSpec", name, value, minimum=0)
            if (value >= 1) != (rule == _POSITIVE):
                why = "" if rule == _POSITIVE else f" ({_UNUSED_WHY.get(self.branch, 'unused by its kernels')})"
                raise SpecError(f"KernelSpec.{name}={value!r}: must be {rule} for branch {self.branch!r}{why}")
        for branch, name, divisor in _MULTIPLES:
            value, by = getattr(self, name), getattr(self, divisor)
            if self.branch == branch and value % by:
                raise SpecError(
                    f"KernelSpec.{name}={value!r}: must be a multiple of {divisor}={by} for branch {branch!r}"
                )
        for branch, name, only in _FIXED:
            if self.branch == branch and getattr(self, name) != only:
                raise SpecError(f"KernelSpec.{name}={getattr(self, name)!r}: must be {only} for branch {branch!r}")

    @property
    def key(self) -> str:
        return canonical_key(self)

    @property
    def short_hash(self) -> str:
        return short_hash(self.key)

    @property
    def name(self) -> str:
        """Readable name; the hash covers every field, the readable part those the branch uses."""
        shape = {
            "slc": f"_bs{self.block_size}_k{self.topk}",
            "sel": f"_bs{self.block_size}_ks{self.kernel_size}_s{self.stride}_k{self.topk}",
            "comp": f"_ks{self.kernel_size}_s{self.stride}",
            "dec": f"_ps{self.block_size}",
        }.get(self.branch, "")
        return f"{self.branch}_{self.phase}_{DTYPES[self.dtype]}_g{self.G}_d{self.D}{shape}-{self.short_hash}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "KernelSpec") -> "KernelSpec":
        """Fields with a default (kernel_size, stride) may be left out."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        missing = [n for n in _REQUIRED_FIELDS if n not in data]
        if unknown:
            raise SpecError(f"{where}: unknown KernelSpec field(s) {unknown}; fields are {names}")
        if missing:
            raise SpecError(f"{where}: missing KernelSpec field(s) {missing}")
        try:
            return cls(**data)
        except SpecError as exc:
            raise SpecError(f"{where}: {exc}") from None


# fields without a default: a grid table or a subset entry must give them
_REQUIRED_FIELDS = tuple(f.name for f in dataclasses.fields(KernelSpec) if f.default is dataclasses.MISSING)


COMPRESSIONS = ("mean", "weighted", "linear")
GATES = ("per_head", "per_token")


@dataclass(frozen=True)
class NSASpec:
    """A whole NSA layer (model level).  `kernel_specs()` lists the kernels it needs."""

    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int | None = None  # None: same as head_dim
    block_size: int = 64
    topk: int = 16
    kernel_size: int = 32
    stride: int = 16
    window_size: int = 512  # query t sees keys [t - window_size + 1, t]
    init_blocks: int = 1
    local_blocks: int = 2
    compression: str = "mean"
    gate: str = "per_head"
    dtype: str = "bfloat16"

    def __post_init__(self):
        for name in ("num_q_heads", "num_kv_heads", "head_dim", "block_size", "topk", "kernel_size",
                     "stride", "window_size"):
            _check_int("NSASpec", name, getattr(self, name))
        for name in ("init_blocks", "local_blocks"):
            _check_int("NSASpec", name, getattr(self, name), minimum=0)
        if self.v_head_dim is not None:
            _check_int("NSASpec", "v_head_dim", self.v_head_dim)
        _check_choice("NSASpec", "compression", self.compression, COMPRESSIONS)
        _check_choice("NSASpec", "gate", self.gate, GATES)
        _check_choice("NSASpec", "dtype", self.dtype, DTYPES)
        rules = [
            (self.num_q_heads % self.num_kv_heads == 0, "num_q_heads must be a multiple of num_kv_heads"),
            (self.kernel_size % self.stride == 0, "kernel_size must be a multiple of stride"),
            (self.block_size % self.stride == 0, "block_size must be a multiple of stride"),
            (self.topk >= self.init_blocks + self.local_blocks, "topk must be >= init_blocks + local_blocks"),
        ]
        for ok, rule in rules:
            if not ok:
                raise SpecError(f"NSASpec: {rule} (got {self})")

    @property
    def G(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def key(self) -> str:
        return canonical_key(self)

    def kernel_specs(self) -> list[KernelSpec]:
        """Every kernel of the layer: slc, cmp and swa forward and backward, sel forward."""
        if self.v_head_dim not in (None, self.head_dim):
            raise UnsupportedSpec(
                f"NSASpec.v_head_dim={self.v_head_dim}: the kernels need v_head_dim == head_dim "
                f"({self.head_dim}) for now"
            )
        common = dict(G=self.G, D=self.head_dim, dtype=self.dtype)
        specs = [KernelSpec("slc", phase, block_size=self.block_size, topk=self.topk, **common) for phase in PHASES]
        specs += [KernelSpec(branch, phase, block_size=0, topk=0, **common)
                  for branch in ("cmp", "swa") for phase in PHASES]
        specs.append(KernelSpec("sel", "fwd", block_size=self.block_size, topk=self.topk,
                                kernel_size=self.kernel_size, stride=self.stride, **common))
        return specs


# ---------------------------------------------------------------------------------------------
# Grid files
#
# [[grid]]                     one table or several; the grid is the union of their specs.  In each,
# branch = ["slc"]             every KernelSpec field without a default appears exactly once, either
# G = [1, 2, 4]                as an axis ...
# [[grid.together]]            ... or inside a group of fields that vary together (a group belongs
# fields = ["block_size", "topk"]   to the [[grid]] table above it)
# values = [[64, 16], [128, 8]]
# A single [grid] table is one table.  The same spec from two tables is an error.
# [[subset.ci]]                named subsets: explicit specs, each of which must be in the grid
# branch = "slc"  ...
# ---------------------------------------------------------------------------------------------


def read_toml(path: Path, error=GridError) -> dict:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: invalid TOML: {exc}") from None


def _expand_grid(grid: dict, path: Path, where: str = "[grid]") -> list[KernelSpec]:
    """The specs of one grid table; `where` names the table in errors."""
    field_names = [f.name for f in dataclasses.fields(KernelSpec)]
    if not isinstance(grid, dict):
        raise GridError(f"{path}: {where} must be a table")
    axes: list[tuple[tuple[str, ...], list[tuple]]] = []
    for name, values in grid.items():
        if name == "together":
            continue
        if not isinstance(values, list) or not values:
            raise GridError(f"{path}: {where} {name} must be a non-empty list")
        axes.append(((name,), [(v,) for v in values]))
    for i, group in enumerate(grid.get("together", [])):
        at = f"{where} [[grid.together]] #{i + 1}"
        fields, values = group.get("fields"), group.get("values")
        if not isinstance(fields, list) or not isinstance(values, list) or not values:
            raise GridError(f"{path}: {at} needs a 'fields' list and a non-empty 'values' list")
        for row in values:
            if not isinstance(row, list) or len(row) != len(fields):
                raise GridError(f"{path}: {at}: value {row!r} does not match fields {fields}")
        axes.append((tuple(fields), [tuple(row) for row in values]))
    seen = [name for names, _ in axes for name in names]
    unknown = sorted(set(seen) - set(field_names))
    duplicated = sorted({n for n in seen if seen.count(n) > 1})
    missing = [n for n in _REQUIRED_FIELDS if n not in seen]
    if unknown:
        raise GridError(f"{path}: {where}: unknown KernelSpec field(s) {unknown}; fields are {field_names}")
    if duplicated:
        raise GridError(f"{path}: {where}: field(s) {duplicated} given more than once")
    if missing:
        raise GridError(f"{path}: {where} lacks field(s) {missing}")
    specs = []
    for combo in itertools.product(*(values for _, values in axes)):
        fields = {}
        for (names, _), row in zip(axes, combo):
            fields.update(zip(names, row))
        try:
            specs.append(KernelSpec(**fields))
        except SpecError as exc:
            raise GridError(f"{path}: {where}: {exc}") from None
    return specs


def _grid_specs(grid, path: Path) -> list[KernelSpec]:
    """The union of a [grid] table's or of every [[grid]] table's specs; a spec twice is an error."""
    if isinstance(grid, dict):
        tables = [(grid, "[grid]")]
    elif isinstance(grid, list) and grid:
        tables = [(table, f"[[grid]] #{i + 1}") for i, table in enumerate(grid)]
    else:
        raise GridError(f"{path}: no [grid] table (grid must be one table or an array of tables)")
    specs: dict[KernelSpec, str] = {}
    for table, where in tables:
        for spec in _expand_grid(table, path, where):
            if spec in specs:
                raise GridError(f"{path}: {where} gives {spec.name} again (also from {specs[spec]})")
            specs[spec] = where
    return list(specs)


def load_grid(path: str | Path | None = None, subset: str | None = None) -> list[KernelSpec]:
    """The KernelSpecs of a grid file (default: fsagen/grids/default.toml), or of one named subset."""
    path = Path(path) if path is not None else default_grid_file()
    data = read_toml(path)
    if "grid" not in data:
        raise GridError(f"{path}: no [grid] table")
    specs = _grid_specs(data["grid"], path)
    if subset is None:
        return specs
    subsets = data.get("subset", {})
    if subset not in subsets:
        raise GridError(f"{path}: no subset {subset!r}; subsets are {sorted(subsets)}")
    chosen = []
    for i, entry in enumerate(subsets[subset]):
        try:
            spec = KernelSpec.from_dict(entry, where=f"{path}: [[subset.{subset}]] #{i + 1}")
        except SpecError as exc:
            raise GridError(str(exc)) from None
        if spec not in specs:
            raise GridError(f"{path}: [[subset.{subset}]] #{i + 1} {spec.name} is not in the grid")
        chosen.append(spec)
    return chosen
