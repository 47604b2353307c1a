"""Schedules: per-arch TOML files (top-level schedules/) that map a KernelSpec to a Plan.

A Plan is what the kernel builder needs besides the spec: the loop order and its knobs.  Adding
hardware means adding a schedule file, nothing else.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from pathlib import Path

from fsagen.errors import NoGPU, ScheduleError, UnsupportedSpec
from fsagen.paths import schedules_dir
from fsagen.spec import BRANCHES, KernelSpec, read_toml, canonical_key

LOOP_ORDERS = ("kv_outer", "q_outer", "dense", "sel", "comp", "dec", "gate")
# The loop orders (program families, fsagen/kernels) that can run each branch: the selected blocks
# in either order; the contiguous key ranges of cmp and swa by the dense programs; sel and comp by
# their own.
BRANCH_LOOP_ORDERS = {
    "slc": ("kv_outer", "q_outer"),
    "cmp": ("dense",),
    "swa": ("dense",),
    "sel": ("sel",),
    "comp": ("comp",),  # compression (pooling of raw k/v)
    "dec": ("dec",),  # decode attention over a paged cache (split-KV)
    "gate": ("gate",),  # the gated sum of the branches' outputs
}
# Every knob a schedule may set, its type, and a rule each value must keep.  Which knobs a plan
# needs is the kernels' business: fsagen.kernels.REQUIRED_KNOBS[(loop_order, phase)].
_THREADS = (lambda v: v > 0 and v % 32 == 0, "a positive multiple of 32")
KNOBS: dict[str, tuple[type, object, str]] = {
    "rows": (int, lambda v: v > 0 and v % 16 == 0, "a positive multiple of 16"),
    "keys": (int, lambda v: v > 0 and v % 16 == 0, "a positive multiple of 16"),
    "tiles_per_item": (int, lambda v: v >= 1, ">= 1"),
    "threads": (int, *_THREADS),
    "bwd_threads": (int, *_THREADS),
    "q_threads": (int, *_THREADS),
    "num_stages": (int, lambda v: v >= 0, ">= 0"),
    "bulk_copy": (bool, lambda v: True, "true or false"),
    "scatter": (str, lambda v: v in ("x2", "x4", "tma"), 'one of "x2", "x4", "tma"'),
    "q_split": (int, lambda v: v >= 0, ">= 0"),
    "chunk_rows": (int, lambda v: v >= 0, ">= 0"),
    "q_keys": (int, lambda v: v >= 0 and v % 16 == 0, "0 or a positive multiple of 16"),
    "q_ctas_per_sm": (int, lambda v: v >= 0, ">= 0"),
    "q_tokens": (int, lambda v: 1 <= v <= 31, "in [1, 31]"),
    "ctas_per_sm": (int, lambda v: v >= 0, ">= 0"),
    "dkdv_rows": (str, lambda v: v in ("gather", "gather_async"), 'one of "gather", "gather_async"'),
    "gather": (str, lambda v: v in ("sync", "async"), 'one of "sync", "async"'),
}

# Knobs read by the host glue only, never by a program: they are left out of the plan an artifact
# is built from and named by (Plan.program_plan), so retuning them renames no artifact.
GLUE_KNOBS = frozenset({"chunk_rows"})

# Knob values that need a newer GPU than the schedule's [target] arch: (knob, value) -> the lowest
# SM version that can run them (scatter "tma": TMA bulk reduce-adds, Hopper and later).
KNOB_MIN_SM = {("scatter", "tma"): 90}


def required_knobs(loop_order: str, phase: str) -> tuple[str, ...]:
    """The knobs the kernels read for (loop_order, phase); imported lazily (no TileLang import)."""
    from fsagen.kernels import REQUIRED_KNOBS

    return tuple(REQUIRED_KNOBS[(loop_order, phase)])


@dataclass(frozen=True)
class Plan:
    """How to build one KernelSpec: `loop_order` and `knobs`, a sorted tuple of (name, value)."""

    loop_order: str
    knobs: tuple[tuple[str, object], ...]

    def __post_init__(self):
        if self.loop_order not in LOOP_ORDERS:
            raise ScheduleError(f"Plan.loop_order={self.loop_order!r}: must be one of {list(LOOP_ORDERS)}")
        object.__setattr__(self, "knobs", tuple(sorted((str(k), v) for k, v in self.knobs)))

    @property
    def key(self) -> str:
        return canonical_key(self)

    def knob(self, name: str):
        for k, v in self.knobs:
            if k == name:
                return v
        raise KeyError(f"plan for {self.loop_order} has no knob {name!r}; knobs are {[k for k, _ in self.knobs]}")

    def to_dict(self) -> dict:
        return {"loop_order": self.loop_order, "knobs": dict(self.knobs)}

    def program_plan(self) -> "Plan":
        """This plan without its glue-only knobs (``GLUE_KNOBS``): what the programs are built from."""
        return Plan(self.loop_order, tuple((k, v) for k, v in self.knobs if k not in GLUE_KNOBS))

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        return cls(data["loop_order"], tuple(data["knobs"].items()))


def _matches(condition, value) -> bool:
    if isinstance(condition, dict):
        return condition.get("min", value) <= value <= condition.get("max", value)
    if isinstance(condition, list):
        return value in condition
    return value == condition


def _describe(condition) -> str:
    if isinstance(condition, dict):
        return f"in [{condition.get('min', '-inf')}, {condition.get('max', 'inf')}]"
    if isinstance(condition, list):
        return f"one of {condition}"
    return f"== {condition!r}"


_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(KernelSpec))


@dataclass(frozen=True)
class Rule:
    when: tuple[tuple[str, object], ...]
    loop_order: str
    knobs: tuple[tuple[str, object], ...]
    index: int

    def matches(self, spec: KernelSpec) -> bool:
        return all(_matches(cond, getattr(spec, name)) for name, cond in self.when)


class Schedule:
    """A parsed schedule file.  Construct with `load_schedule(arch)` or `Schedule.from_file(path)`."""

    def __init__(self, arch: str, path: Path, target: dict, supports: dict, defaults: dict, rules: list[Rule],
                 branch_supports: dict | None = None):
        self.arch = arch
        self.path = path
        self.target = target
        self.supports = supports  # conditions every spec must meet
        self.branch_supports = branch_supports or {}  # branch -> conditions its specs must also meet
        self.defaults = defaults  # loop order -> {knob: value}
        self.rules = rules

    @property
    def loop_orders(self) -> tuple[str, ...]:
        return tuple(self.defaults)

    def loop_orders_for(self, branch: str) -> tuple[str, ...]:
        """The loop orders of this schedule that can run `branch`."""
        return tuple(order for order in self.defaults if order in BRANCH_LOOP_ORDERS[branch])

    @classmethod
    def from_file(cls, path: str | Path) -> "Schedule":
        path = Path(path)
        data = read_toml(path, error=ScheduleError)
        where = str(path)
        unknown = sorted(set(data) - {"target", "supports", "knobs", "rules"})
        if unknown:
            raise ScheduleError(f"{where}: unknown table(s) {unknown}")
        target = data.get("target")
        if not isinstance(target, dict) or "kind" not in target:
            raise ScheduleError(f"{where}: [target] must be a table with at least 'kind'")
        _check_target(target, f"{where}: [target]")
        supports, branch_supports = _split_supports(data.get("supports", {}), where)
        defaults = {}
        for order, knobs in data.get("knobs", {}).items():
            if order not in LOOP_ORDERS:
                raise ScheduleError(f"{where}: [knobs.{order}]: unknown loop order; known: {list(LOOP_ORDERS)}")
            _check_knobs(knobs, f"{where}: [knobs.{order}]", target)
            defaults[order] = dict(knobs)
        if not defaults:
            raise ScheduleError(f"{where}: no [knobs.<loop order>] table")
        rules = []
        for i, raw in enumerate(data.get("rules", [])):
            at = f"{where}: [[rules]] #{i + 1}"
            extra = sorted(set(raw) - {"when", "loop_order", "knobs"})
            if extra:
                raise ScheduleError(f"{at}: unknown key(s) {extra}")
            order = raw.get("loop_order")
            if order not in defaults:
                raise ScheduleError(f"{at}: loop_order={order!r} must be one of {list(defaults)}")
            when = raw.get("when", {})
            _check_conditions(when, f"{at} when")
            _check_rule_branches(when, order, at)
            knobs = raw.get("knobs", {})
            _check_knobs(knobs, f"{at} knobs", target)
            rules.append(Rule(tuple(when.items()), order, tuple(knobs.items()), i + 1))
        return cls(path.stem, path, target, supports, defaults, rules, branch_supports)

    def check_supported(self, spec: KernelSpec) -> None:
        """The [supports] conditions, then those of the spec's branch table ([supports.<branch>])."""
        tables = [(self.supports, "")]
        if spec.branch in self.branch_supports:
            scope = f" for branch {spec.branch!r} ([supports.{spec.branch}])"
            tables.append((self.branch_supports[spec.branch], scope))
        for conditions, scope in tables:
            for name, cond in conditions.items():
                value = getattr(spec, name)
                if not _matches(cond, value):
                    raise UnsupportedSpec(
                        f"KernelSpec.{name}={value!r} is not supported by schedule {self.arch} ({self.path}): "
                        f"{name} must be {_describe(cond)}{scope}"
                    )

    def plan(self, spec: KernelSpec, loop_order: str | None = None) -> Plan:
        """The plan for `spec`: the first matching rule's loop order, or `loop_order` if forced.

        Only rules whose loop order can run the spec's branch (BRANCH_LOOP_ORDERS) apply.  A forced
        loop order still takes the knob overrides of the first rule that matches the spec and picks
        that same loop order, so tuned knobs stay in force in comparisons.
        """
        self.check_supported(spec)
        usable = BRANCH_LOOP_ORDERS[spec.branch]
        if loop_order is not None and loop_order not in self.defaults:
            raise UnsupportedSpec(
                f"loop_order={loop_order!r} is not available in schedule {self.arch} ({self.path}); "
                f"available: {list(self.defaults)}"
            )
        if loop_order is not None and loop_order not in usable:
            raise UnsupportedSpec(
                f"loop_order={loop_order!r} cannot run branch {spec.branch!r} ({spec.name}); "
                f"branch {spec.branch!r} runs with {list(usable)}"
            )
        for rule in self.rules:
            if rule.matches(spec) and rule.loop_order in usable and loop_order in (None, rule.loop_order):
                return self._make_plan(spec, rule.loop_order, dict(rule.knobs), f"[[rules]] #{rule.index}")
        if loop_order is not None:
            return self._make_plan(spec, loop_order, {}, "(forced loop order)")
        raise UnsupportedSpec(f"no rule of schedule {self.arch} ({self.path}) matches {spec.name} ({spec.key})")

    def _make_plan(self, spec: KernelSpec, loop_order: str, overrides: dict, origin: str) -> Plan:
        """Only the knobs the kernels read go into the plan, so its key changes only when they do."""
        knobs = {**self.defaults[loop_order], **overrides}
        needed = required_knobs(loop_order, spec.phase)
        missing = [name for name in needed if name not in knobs]
        if missing:
            raise ScheduleError(
                f"{self.path}: [knobs.{loop_order}] (with {origin}) lacks knob(s) {missing} "
                f"needed by {loop_order} {spec.phase}"
            )
        return Plan(loop_order, tuple((name, knobs[name]) for name in needed))


def _split_supports(supports: dict, where: str) -> tuple[dict, dict]:
    """([supports] conditions, {branch: [supports.<branch>] conditions}): a key of [supports] that
    names a branch is that branch's table, every other key a condition on a KernelSpec field."""
    common = {name: cond for name, cond in supports.items() if name not in BRANCHES}
    _check_conditions(common, f"{where}: [supports]")
    per_branch = {}
    for branch in BRANCHES:
        if branch not in supports:
            continue
        table = supports[branch]
        at = f"{where}: [supports.{branch}]"
        if not isinstance(table, dict):
            raise ScheduleError(f"{at} must be a table of conditions, got {table!r}")
        _check_conditions(table, at)
        per_branch[branch] = dict(table)
    return common, per_branch


def _check_rule_branches(when: dict, loop_order: str, where: str) -> None:
    """A rule limited to branches that its loop order cannot run would never apply: an error."""
    if "branch" not in when:
        return
    branches = [b for b in BRANCHES if _matches(when["branch"], b)]
    if not branches:
        raise ScheduleError(f"{where}: when branch {_describe(when['branch'])} matches no branch of {list(BRANCHES)}")
    if not any(loop_order in BRANCH_LOOP_ORDERS[b] for b in branches):
        raise ScheduleError(
            f"{where}: loop_order={loop_order!r} cannot run branch(es) {branches} of its 'when'; "
            f"loop orders per branch: {BRANCH_LOOP_ORDERS}"
        )


# [target] keys with a meaning to fsagen (fsagen/lower.py): their type and rule.  Other keys go to
# TileLang as they are (kind, arch, code, ...), which checks them when it compiles.
TARGET_KEYS: dict[str, tuple[type, object, str]] = {
    "embed_ptx": (bool, lambda v: True, "true or false"),
    "max_shared_memory_per_block": (int, lambda v: v > 0, "a positive number of bytes"),
}


def _check_target(target: dict, where: str) -> None:
    _check_values(target, TARGET_KEYS, where, "key", known_only=False)
    if target.get("embed_ptx") and not str(target.get("arch", "")).startswith("sm_"):
        raise ScheduleError(f"{where}: embed_ptx = true needs arch = 'sm_XX' (the PTX is compute_XX), "
                            f"got arch={target.get('arch')!r}")


def _check_conditions(conditions: dict, where: str) -> None:
    for name, cond in conditions.items():
        if name not in _SPEC_FIELDS:
            raise ScheduleError(f"{where}: unknown KernelSpec field {name!r}; fields are {list(_SPEC_FIELDS)}")
        if isinstance(cond, dict) and (not cond or set(cond) - {"min", "max"}):
            raise ScheduleError(f"{where}: {name} range must have only 'min' and/or 'max', got {cond}")


def _check_knobs(knobs: dict, where: str, target: dict) -> None:
    _check_values(knobs, KNOBS, where, "knob")
    sm = _target_sm(target)
    for name, value in knobs.items():
        needed = KNOB_MIN_SM.get((name, value))
        if needed is not None and sm is not None and sm < needed:
            raise ScheduleError(f"{where}: knob {name!r}={value!r} needs sm_{needed} or newer; "
                                f"[target] arch is {target.get('arch')!r}")


def _target_sm(target: dict) -> int | None:
    """80 for arch 'sm_80', 90 for 'sm_90a'; None when the arch is not an sm_XX token."""
    digits = str(target.get("arch", "")).removeprefix("sm_").rstrip("abf")
    return int(digits) if str(target.get("arch", "")).startswith("sm_") and digits.isdigit() else None


def _check_values(values: dict, table: dict, where: str, what: str, known_only: bool = True) -> None:
    """Each of `values` against `table` ({name: (type, check, rule)}); names not in it are an
    error when `known_only`, else left alone."""
    for name, value in values.items():
        if name not in table:
            if known_only:
                raise ScheduleError(f"{where}: unknown {what} {name!r}; {what}s are {list(table)}")
            continue
        kind, ok, rule = table[name]
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
            raise ScheduleError(f"{where}: {what} {name!r} must be {kind.__name__}, got {value!r}")
        if not ok(value):
            raise ScheduleError(f"{where}: {what} {name!r}={value!r} must be {rule}")


def known_arches() -> list[str]:
    return sorted(p.stem for p in schedules_dir().glob("*.toml"))


def normalize_arch(arch: str) -> str:
    """'sm90', 'sm_90', 'sm_90a' and '90' all name the sm90 schedule."""
    a = arch.strip().lower().replace("_", "")
    if a.isdigit():
        a = "sm" + a
    return a[:-1] if a.startswith("sm") and a.endswith("a") else a


@functools.lru_cache(maxsize=None)
def load_schedule(arch: str) -> Schedule:
    name = normalize_arch(arch)
    path = schedules_dir() / f"{name}.toml"
    if not path.is_file():
        raise ScheduleError(f"unknown arch {arch!r}; known: {known_arches()} (schedule files in {schedules_dir()})")
    return Schedule.from_file(path)


def detect_arch(device=None) -> str:
    """The schedule arch of ``device`` (a torch.device; None: the current CUDA device): 'sm90'
    for compute capability 9.0, 'cpu' for a CPU device (TileLang's C backend, schedules/cpu.toml).

    For a GPU, $FSAGEN_ARCH overrides it (any spelling normalize_arch accepts): the way to run
    another schedule's kernels on this GPU, e.g. FSAGEN_ARCH=sm80 on an H100 runs the sm80 kernels
    through their embedded compute_80 PTX (schedules/README.md).
    """
    import torch

    if device is not None and torch.device(device).type == "cpu":
        return "cpu"
    forced = os.environ.get("FSAGEN_ARCH")
    if forced:
        return normalize_arch(forced)
    if not torch.cuda.is_available():
        raise NoGPU("no CUDA device visible; pass arch= explicitly (e.g. arch='sm90') to use prebuilt kernels")
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"
