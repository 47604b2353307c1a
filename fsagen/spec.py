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

BRANCHES = ("slc",)
PHASES = ("fwd", "bwd")
# dtype name -> short form used in readable names
DTYPES = {"bfloat16": "bf16", "float16": "fp16"}


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
    """One kernel to generate.  G = query heads per kv head, D = head dim (q, k and v)."""

    branch: str
    phase: str
    G: int
    D: int
    block_size: int
    topk: int
    dtype: str

    def __post_init__(self):
        _check_choice("KernelSpec", "branch", self.branch, BRANCHES)
        _check_choice("KernelSpec", "phase", self.phase, PHASES)
        _check_choice("KernelSpec", "dtype", self.dtype, DTYPES)
        for name in ("G", "D", "block_size", "topk"):
            _check_int("KernelSpec", name, getattr(self, name))

    @property
    def key(self) -> str:
        return canonical_key(self)

    @property
    def short_hash(self) -> str:
        return short_hash(self.key)

    @property
    def name(self) -> str:
        """Readable name; the hash covers every field, the readable part only the usual ones."""
        return (
            f"{self.branch}_{self.phase}_{DTYPES[self.dtype]}_g{self.G}_d{self.D}"
            f"_bs{self.block_size}_k{self.topk}-{self.short_hash}"
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "KernelSpec") -> "KernelSpec":
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        missing = [n for n in names if n not in data]
        if unknown:
            raise SpecError(f"{where}: unknown KernelSpec field(s) {unknown}; fields are {names}")
        if missing:
            raise SpecError(f"{where}: missing KernelSpec field(s) {missing}")
        return cls(**data)


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
        """The kernels of the branches implemented so far (slc fwd and bwd)."""
        if self.v_head_dim not in (None, self.head_dim):
            raise UnsupportedSpec(
                f"NSASpec.v_head_dim={self.v_head_dim}: the slc kernels need v_head_dim == head_dim "
                f"({self.head_dim}) for now"
            )
        return [
            KernelSpec("slc", phase, self.G, self.head_dim, self.block_size, self.topk, self.dtype)
            for phase in PHASES
        ]


# ---------------------------------------------------------------------------------------------
# Grid files
#
# [grid]                       every KernelSpec field appears exactly once, either as an axis ...
# branch = ["slc"]
# G = [1, 2, 4]
# [[grid.together]]            ... or inside a group of fields that vary together
# fields = ["block_size", "topk"]
# values = [[64, 16], [128, 8]]
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


def _expand_grid(grid: dict, path: Path) -> list[KernelSpec]:
    field_names = [f.name for f in dataclasses.fields(KernelSpec)]
    axes: list[tuple[tuple[str, ...], list[tuple]]] = []
    for name, values in grid.items():
        if name == "together":
            continue
        if not isinstance(values, list) or not values:
            raise GridError(f"{path}: [grid] {name} must be a non-empty list")
        axes.append(((name,), [(v,) for v in values]))
    for i, group in enumerate(grid.get("together", [])):
        fields, values = group.get("fields"), group.get("values")
        if not isinstance(fields, list) or not isinstance(values, list) or not values:
            raise GridError(f"{path}: [[grid.together]] #{i + 1} needs a 'fields' list and a non-empty 'values' list")
        for row in values:
            if not isinstance(row, list) or len(row) != len(fields):
                raise GridError(f"{path}: [[grid.together]] #{i + 1}: value {row!r} does not match fields {fields}")
        axes.append((tuple(fields), [tuple(row) for row in values]))
    seen = [name for names, _ in axes for name in names]
    unknown = sorted(set(seen) - set(field_names))
    duplicated = sorted({n for n in seen if seen.count(n) > 1})
    missing = [n for n in field_names if n not in seen]
    if unknown:
        raise GridError(f"{path}: unknown KernelSpec field(s) {unknown}; fields are {field_names}")
    if duplicated:
        raise GridError(f"{path}: field(s) {duplicated} given more than once")
    if missing:
        raise GridError(f"{path}: [grid] lacks field(s) {missing}")
    specs = []
    for combo in itertools.product(*(values for _, values in axes)):
        fields = {}
        for (names, _), row in zip(axes, combo):
            fields.update(zip(names, row))
        try:
            specs.append(KernelSpec(**fields))
        except SpecError as exc:
            raise GridError(f"{path}: {exc}") from None
    return specs


def load_grid(path: str | Path | None = None, subset: str | None = None) -> list[KernelSpec]:
    """The KernelSpecs of a grid file (default: fsagen/grids/default.toml), or of one named subset."""
    path = Path(path) if path is not None else default_grid_file()
    data = read_toml(path)
    if "grid" not in data:
        raise GridError(f"{path}: no [grid] table")
    specs = _expand_grid(data["grid"], path)
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
