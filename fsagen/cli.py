"""The `fsagen` command: build, list, show, clean.

Errors of fsagen's own (unknown arch, bad grid or schedule file, ...) print one line and exit 2.
The parent process never imports TileLang or torch: builds run in worker processes, so a build
with nothing to do finishes in well under a second.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import multiprocessing
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

from fsagen import __version__
from fsagen.errors import ArtifactError, FsagenError
from fsagen.spec import BRANCHES


def _build_one(spec_dict: dict, plan_dict: dict, arch: str, out: str) -> tuple[float, str | None]:
    """Worker: build one artifact.  Returns (seconds, None) or (seconds, formatted traceback)."""
    from fsagen.cache import ensure_artifact
    from fsagen.schedule import Plan
    from fsagen.spec import KernelSpec

    start = time.perf_counter()
    try:
        import tilelang

        tilelang.set_log_level("WARNING")  # its per-kernel INFO lines would drown the progress lines
        start = time.perf_counter()  # the per-kernel time leaves out the worker's one-off import
        ensure_artifact(KernelSpec(**spec_dict), Plan.from_dict(plan_dict), arch, root=Path(out))
        return time.perf_counter() - start, None
    except Exception:  # reported by the parent; one failed kernel must not stop the others
        return time.perf_counter() - start, traceback.format_exc()


def _plans(schedule, spec, loop_orders: str):
    """auto: the schedule's plan; all: one plan per loop order of the schedule that runs the spec's branch."""
    if loop_orders == "auto":
        return [schedule.plan(spec)]
    return [schedule.plan(spec, order) for order in schedule.loop_orders_for(spec.branch)]


def _detected_arch() -> str:
    """The arch of the GPU present, for `fsagen build` without --arch."""
    from fsagen.errors import NoGPU
    from fsagen.schedule import detect_arch, known_arches

    try:
        arch = detect_arch()
    except NoGPU:
        raise NoGPU(f"no GPU here to detect the arch from; pass --arch (known: {', '.join(known_arches())})") from None
    print(f"fsagen build: detected {arch}")
    return arch


def cmd_build(args) -> int:
    from fsagen.cache import artifact_ref, is_complete, kernel_sources_hash, tilelang_version
    from fsagen.manifest import write_manifest
    from fsagen.paths import default_grid_file, generated_dir
    from fsagen.schedule import load_schedule
    from fsagen.spec import load_grid

    schedule = load_schedule(args.arch or _detected_arch())
    arch = schedule.arch
    grid = Path(args.grid) if args.grid else default_grid_file()
    specs = load_grid(grid, subset=args.subset)
    if args.branch:
        specs = [s for s in specs if s.branch in args.branch]
    # A schedule need not run every branch (a user schedule may list fewer): the grid's
    # specs of branches it does not list are skipped, and said so; any other unsupported value
    # still fails with the schedule's error.
    branches = schedule.supports.get("branch")
    skipped = sorted({s.branch for s in specs if branches is not None and s.branch not in branches})
    if skipped:
        specs = [s for s in specs if s.branch not in skipped]
        print(f"fsagen build {arch}: skipping the grid's {', '.join(skipped)} specs (schedule {arch} "
              f"supports the branches {list(branches)})")
    arch_dir = (Path(args.out) if args.out else generated_dir()) / arch
    arch_dir.mkdir(parents=True, exist_ok=True)

    wanted, pending = [], []
    for spec in specs:
        for plan in _plans(schedule, spec, args.loop_orders):
            name, _ = artifact_ref(spec, plan, arch)
            wanted.append(arch_dir / name)
            if not is_complete(arch_dir / name):
                pending.append((spec, plan, name))
    print(f"fsagen build {arch}: {len(wanted)} artifacts, {len(wanted) - len(pending)} up to date, "
          f"{len(pending)} to build in {arch_dir}")

    failures = []
    if pending:
        jobs = max(1, min(args.jobs or os.cpu_count() or 1, len(pending)))
        width = len(str(len(pending)))
        with futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            submitted = {
                pool.submit(_build_one, spec.to_dict(), plan.to_dict(), arch, str(arch_dir.parent)): (name, plan)
                for spec, plan, name in pending
            }
            for done, fut in enumerate(futures.as_completed(submitted), 1):
                name, plan = submitted[fut]
                seconds, error = fut.result()
                status = f"{seconds:5.1f} s"
                if error:
                    failures.append((name, error))
                    status += "  FAILED: " + error.strip().splitlines()[-1]
                print(f"[{done:>{width}}/{len(pending)}] {name}  {plan.loop_order}  {status}", flush=True)

    header = {
        "arch": arch,
        "target": schedule.target,
        "versions": {"fsagen": __version__, "tilelang": tilelang_version(), "kernel_sources": kernel_sources_hash()},
        "grid": str(grid),
        "subset": args.subset,
        "branches": args.branch,
        "loop_orders": args.loop_orders,
    }
    write_manifest(arch_dir, header, [p for p in wanted if is_complete(p)])
    if failures:
        log = arch_dir / "build-errors.log"
        log.write_text("".join(f"== {name}\n{error}\n" for name, error in failures))
        print(f"{len(failures)} of {len(pending)} builds failed; tracebacks in {log}", file=sys.stderr)
        return 1
    return 0


def _artifact_dirs(arch: str | None):
    """(root label, path) of every complete artifact in generated/ and the user cache."""
    from fsagen.cache import is_complete
    from fsagen.paths import cache_dir, generated_dir

    for label, root in (("aot", generated_dir()), ("cache", cache_dir())):
        arch_dirs = [root / arch] if arch else sorted(p for p in root.glob("*") if p.is_dir())
        for arch_dir in arch_dirs:
            for path in sorted(arch_dir.glob("*")):
                if path.is_dir() and not path.name.startswith(".") and is_complete(path):
                    yield label, path


def _arch_arg(arch: str | None) -> str | None:
    from fsagen.schedule import load_schedule

    return load_schedule(arch).arch if arch else None


def cmd_list(args) -> int:
    from fsagen.cache import ARTIFACT_FORMAT, kernel_sources_hash, tilelang_version

    current = {"format": ARTIFACT_FORMAT, "fsagen": __version__, "tilelang": tilelang_version()}
    for label, path in _artifact_dirs(_arch_arg(args.arch)):
        meta = json.loads((path / "meta.json").read_text())
        current["kernel_sources"] = kernel_sources_hash(meta["spec"]["branch"])
        changed = [name for name, value in current.items() if meta["key"].get(name) != value]
        stale = f"  (stale: {', '.join(changed)} changed)" if changed else ""
        print(f"{label:5}  {meta['arch']}  {meta['name']}  stages={','.join(meta['stages'])}{stale}")
    return 0


def cmd_show(args) -> int:
    from fsagen.cache import CompiledKernel

    matches = [path for _, path in _artifact_dirs(_arch_arg(args.arch)) if path.name.startswith(args.name)]
    if not matches:
        raise ArtifactError(f"no artifact named {args.name!r} (see `fsagen list`)")
    if len({p.name for p in matches}) > 1:
        names = "\n  ".join(sorted({p.name for p in matches}))
        raise ArtifactError(f"{args.name!r} matches several artifacts; give more of the name:\n  {names}")
    kernel = CompiledKernel(matches[0])
    print(f"# {kernel.path}")
    print(json.dumps(kernel.meta, indent=2, sort_keys=True))
    if args.resources:
        from fsagen.lower import resource_usage

        for stage in kernel.stages:
            for entry, usage in resource_usage(kernel.source(stage), kernel.meta["target"]).items():
                print(f"{stage}: {entry}: " + ", ".join(f"{n} {what}" for what, n in usage.items()))
    if not args.meta_only:
        for stage in kernel.stages:
            if args.stage in (None, stage):
                print(f"\n// ===== stage {stage} =====")
                print(kernel.source(stage))
    return 0


def cmd_clean(args) -> int:
    from fsagen.paths import cache_dir, generated_dir

    roots = []
    if args.generated or args.out:
        roots.append(Path(args.out) if args.out else generated_dir())
    if args.cache or not roots:
        roots.append(cache_dir())
    arch = _arch_arg(args.arch)
    for root in roots:
        arch_dirs = [root / arch] if arch else [p for p in root.glob("*") if p.is_dir()]
        for arch_dir in arch_dirs:
            if arch_dir.is_dir():
                shutil.rmtree(arch_dir)
                print(f"removed {arch_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fsagen", description="Generate and manage TileLang NSA kernels.")
    parser.add_argument("--version", action="version", version=f"fsagen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="compile a grid of kernels ahead of time into generated/<arch>/")
    build.add_argument("--arch", help="schedule name, e.g. sm90 (default: the arch of the GPU present)")
    build.add_argument("--grid", help="grid TOML file (default: fsagen/grids/default.toml)")
    build.add_argument("--subset", help="a named subset of the grid, e.g. ci")
    build.add_argument("--branch", nargs="+", choices=BRANCHES, metavar="BRANCH",
                       help=f"only the grid's specs of these branches ({', '.join(BRANCHES)})")
    build.add_argument("--jobs", "-j", type=int, default=None, help="parallel compile processes (default: cores)")
    build.add_argument("--out", help="output root (default: $FSAGEN_GENERATED_DIR or the repo's generated/)")
    build.add_argument("--loop-orders", choices=("auto", "all"), default="auto",
                       help="auto: the schedule's choice per spec; all: every loop order that can run the "
                            "spec's branch (for benchmarks)")
    build.set_defaults(func=cmd_build)

    lst = sub.add_parser("list", help="list compiled artifacts (generated/ and the user cache)")
    lst.add_argument("--arch")
    lst.set_defaults(func=cmd_list)

    show = sub.add_parser("show", help="print an artifact's metadata and CUDA source")
    show.add_argument("name", help="artifact name or a unique prefix of it")
    show.add_argument("--arch")
    show.add_argument("--stage", help="only this stage's source")
    show.add_argument("--meta-only", action="store_true", help="metadata only, no source")
    show.add_argument("--resources", action="store_true",
                      help="registers, shared memory and spills per kernel (recompiles with ptxas -v: seconds)")
    show.set_defaults(func=cmd_show)

    clean = sub.add_parser("clean", help="remove compiled artifacts (default: the user cache)")
    clean.add_argument("--arch")
    clean.add_argument("--cache", action="store_true", help="the user cache (default when nothing else is named)")
    clean.add_argument("--generated", action="store_true", help="the AOT output root (generated/)")
    clean.add_argument("--out", help="another AOT output root")
    clean.set_defaults(func=cmd_clean)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FsagenError as exc:
        print(f"fsagen: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
