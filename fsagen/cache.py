"""Compiled artifacts: keyed, published atomically, shared between processes, loaded lazily.

An artifact is a directory `<root>/<arch>/<name>/` holding one compiled file per stage, its CUDA
source, and `meta.json` (written last; an artifact without it does not exist).  `<name>` is
`<spec.name>.<loop_order>.<hash>`, the hash covering the spec key, the plan key, the arch and target,
the fsagen and TileLang versions and a hash of the kernel sources its branch is built from
(`kernel_source_files`): editing a kernel gives its family new names, and stale artifacts are
simply never looked up again.

Roots, in lookup order: generated/ (AOT builds, fsagen.paths.generated_dir), then the user cache
(fsagen.paths.cache_dir); a miss compiles (JIT) into the user cache.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Mapping

from fsagen import __version__
from fsagen.errors import ArtifactError, ScheduleError
from fsagen.paths import cache_dir, generated_dir, kernels_dir
from fsagen.schedule import Plan, detect_arch, load_schedule
from fsagen.spec import KernelSpec, short_hash

# Bump when the artifact layout or the way stages are compiled (fsagen/lower.py) changes.
ARTIFACT_FORMAT = 1
META = "meta.json"


def tilelang_version() -> str:
    """TileLang's version without importing it (3 s) where package metadata is available."""
    from importlib import metadata

    try:
        return metadata.version("tilelang")
    except metadata.PackageNotFoundError:
        import tilelang

        return tilelang.__version__


_sources_hashes: dict = {}


def _relative_imports(path: Path) -> set:
    """Module names a kernel module imports from its own package (``from .x import``,
    ``from . import x``), at any depth of its body."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names.update([node.module] if node.module else [alias.name for alias in node.names])
    return names


def kernel_source_files(branch: str | None = None) -> list:
    """The kernel sources a branch's programs are built from: ``fsagen/kernels/__init__.py`` (the
    builders), the branch's family modules (``kernels.FAMILY_MODULES``) and, transitively, the
    modules they import from the package. ``None``: every kernel source."""
    root = kernels_dir()
    if branch is None:
        return sorted(root.glob("*.py"))
    from fsagen.kernels import FAMILY_MODULES

    todo, seen = list(FAMILY_MODULES[branch]), {"__init__"}
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(_relative_imports(root / f"{name}.py"))
    return sorted(root / f"{name}.py" for name in seen)


def kernel_sources_hash(branch: str | None = None) -> str:
    """sha256 over :func:`kernel_source_files` (names and contents), once per process: editing
    one family's module (say ``decode.py``) renames that family's artifacts only."""
    if branch not in _sources_hashes:
        digest = hashlib.sha256()
        for path in kernel_source_files(branch):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        _sources_hashes[branch] = digest.hexdigest()
    return _sources_hashes[branch]


def artifact_key(spec: KernelSpec, plan: Plan, arch: str, target: dict) -> dict:
    """Everything an artifact depends on."""
    return {
        "spec": spec.key,
        "plan": plan.key,
        "arch": arch,
        "target": dict(sorted(target.items())),
        "format": ARTIFACT_FORMAT,
        "fsagen": __version__,
        "tilelang": tilelang_version(),
        "kernel_sources": kernel_sources_hash(spec.branch),
    }


def artifact_name(spec: KernelSpec, plan: Plan, key: dict) -> str:
    return f"{spec.name}.{plan.loop_order}.{short_hash(json.dumps(key, sort_keys=True), 12)}"


def is_complete(path: Path) -> bool:
    return (path / META).is_file()


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive flock on `path` (created if needed, never deleted: deleting lock files races)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_artifact(
    programs: Mapping | Callable[[], Mapping],
    key: dict,
    target: dict,
    dest: Path,
    *,
    extra_meta: dict | None = None,
    compile: Callable[[Mapping, dict, Path], dict] | None = None,
) -> bool:
    """Make `dest` a complete artifact unless it already is.  Returns True if this call built it.

    `programs` is {stage: PrimFunc} or a callable returning it (called only when a build is
    needed, so a hit never builds PrimFuncs).  `compile(programs, target, staging_dir) -> {stage:
    meta}` defaults to fsagen.lower.compile_programs.  Builders of the same `dest` serialise on a
    lock file beside it; the loser finds the winner's artifact and returns False.  The build happens
    in a staging directory in the same parent and is renamed into place, so readers never see a
    partial artifact.
    """
    dest = Path(dest)
    if is_complete(dest):
        return False
    with _file_lock(dest.parent / f".{dest.name}.lock"):
        if is_complete(dest):
            return False
        if compile is None:
            from fsagen.lower import compile_programs as compile
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{dest.name}-", dir=dest.parent))
        try:
            start = time.perf_counter()
            stages = compile(programs() if callable(programs) else programs, target, staging)
            meta = {
                "name": dest.name,
                "key": key,
                "target": target,
                "stages": stages,
                "build_seconds": round(time.perf_counter() - start, 3),
                **(extra_meta or {}),
            }
            (staging / META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
            staging.chmod(0o755)  # mkdtemp makes it 0700; artifacts are shared
            if dest.exists():  # an incomplete leftover (no meta.json) from outside fsagen
                shutil.rmtree(dest)
            os.rename(staging, dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return True


class CompiledKernel:
    """The stages of one artifact.  `kernel[stage](*args)` launches a stage.

    Arguments: every PrimFunc parameter in order (outputs included; fsagen compiles without
    out_idx), torch tensors and python ints/floats.  The launch goes to torch's current CUDA stream
    of the first tensor's device (see fsagen/lower.py).  Stage libraries load on first use.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_file = self.path / META
        if not meta_file.is_file():
            raise ArtifactError(f"{self.path}: not a complete artifact (no {META})")
        self.meta = json.loads(meta_file.read_text())
        self._functions: dict = {}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(self.meta["stages"])

    @property
    def spec(self) -> KernelSpec:
        return KernelSpec.from_dict(self.meta["spec"])

    @property
    def plan(self) -> Plan:
        return Plan.from_dict(self.meta["plan"])

    def _stage_meta(self, stage: str) -> dict:
        try:
            return self.meta["stages"][stage]
        except KeyError:
            raise ArtifactError(f"{self.name}: no stage {stage!r}; stages are {list(self.stages)}") from None

    def __getitem__(self, stage: str):
        function = self._functions.get(stage)
        if function is None:
            info = self._stage_meta(stage)
            from fsagen.lower import load_function

            with self._lock:
                function = self._functions.get(stage)
                if function is None:
                    spec = self.meta["spec"]
                    function = _ProfiledStage(load_function(self.path / info["library"], info["entry"], info),
                                              f"fsagen::{spec['branch']}_{spec['phase']}.{stage}")
                    self._functions[stage] = function
        return function

    def source(self, stage: str) -> str:
        return (self.path / self._stage_meta(stage)["source"]).read_text()

    def __repr__(self) -> str:
        return f"CompiledKernel({str(self.path)!r}, stages={list(self.stages)})"


class _ProfiledStage:
    """A loaded stage, run inside a profiler range named ``label`` while torch.profiler records.

    TileLang names every kernel ``main_kernel``; the range is what tells the stages apart in a
    profile (bench/profile_slc.py). When no profiler runs, the cost is one attribute read. Other
    attributes are the stage function's own."""

    __slots__ = ("function", "label", "profiler")

    def __init__(self, function: Callable, label: str):
        import torch

        self.function, self.label = function, label
        self.profiler = torch._C._autograd._profiler_enabled, torch.autograd.profiler.record_function

    def __call__(self, *args):
        enabled, record_function = self.profiler
        if enabled():
            with record_function(self.label):
                return self.function(*args)
        return self.function(*args)

    def __getattr__(self, name: str):
        return getattr(self.function, name)



def programs_factory() -> Callable:
    """The function (spec, plan, target) -> {stage: PrimFunc}: fsagen.kernels.build_programs.

    $FSAGEN_PROGRAMS="module:function" substitutes another one (tests use a small fixture
    program; it is also a way to try an alternative kernel module without editing fsagen).
    """
    override = os.environ.get("FSAGEN_PROGRAMS")
    if override:
        module, _, attr = override.partition(":")
        return getattr(importlib.import_module(module), attr)
    from fsagen.kernels import build_programs

    return build_programs


def search_roots() -> list[Path]:
    return [generated_dir(), cache_dir()]


def find_artifact(arch: str, name: str) -> Path | None:
    for root in search_roots():
        path = root / arch / name
        if is_complete(path):
            return path
    return None


def artifact_ref(spec: KernelSpec, plan: Plan, arch: str) -> tuple[str, dict]:
    """(name, key) of the artifact of (spec, plan) for `arch`; cheap (no TileLang import)."""
    schedule = load_schedule(arch)
    plan = plan.program_plan()
    key = artifact_key(spec, plan, schedule.arch, schedule.target)
    return artifact_name(spec, plan, key), key


def ensure_artifact(spec: KernelSpec, plan: Plan, arch: str, root: Path | None = None) -> tuple[Path, bool]:
    """(path, built): the artifact of (spec, plan, arch), built into `root`/<arch> if missing.

    With `root` None the lookup covers generated/ and the user cache and a build goes to the cache;
    with `root` given (AOT builds) only that root is looked at.
    """
    schedule = load_schedule(arch)
    plan = plan.program_plan()
    name, key = artifact_ref(spec, plan, arch)
    if root is None:
        found = find_artifact(schedule.arch, name)
        if found is not None:
            return found, False
        root = cache_dir()
    dest = Path(root) / schedule.arch / name
    try:
        built = build_artifact(
            lambda: programs_factory()(spec, plan, schedule.target), key, schedule.target, dest,
            extra_meta={"spec": spec.to_dict(), "plan": plan.to_dict(), "arch": schedule.arch},
        )
    except ScheduleError as exc:  # e.g. a stage over the target's shared memory: name the plan
        raise ScheduleError(f"schedule {schedule.arch} ({schedule.path}), {spec.name}, "
                            f"{plan.loop_order} knobs {dict(plan.knobs)}: {exc}") from None
    return dest, built


_loaded: dict[tuple, CompiledKernel] = {}
_loaded_lock = threading.Lock()


def get_kernel(spec: KernelSpec, plan: Plan | None = None, arch: str | None = None) -> CompiledKernel:
    """The compiled kernel of `spec` (AOT, else user cache, else JIT), memoised per process.

    `plan` None: the schedule's choice.  `arch` None: the current GPU's (error without one).
    """
    schedule = load_schedule(arch or detect_arch())
    arch = schedule.arch
    plan = (plan or schedule.plan(spec)).program_plan()
    memo_key = (spec, plan, arch)
    kernel = _loaded.get(memo_key)
    if kernel is None:
        with _loaded_lock:
            kernel = _loaded.get(memo_key)
            if kernel is None:
                path, _ = ensure_artifact(spec, plan, arch)
                kernel = _loaded[memo_key] = CompiledKernel(path)
    return kernel
