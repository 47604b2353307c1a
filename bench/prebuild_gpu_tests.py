"""Compile, in parallel, the artifacts of the GPU tests of the knobs and kernels not yet run on a GPU
(``bench/run_gpu.sh newtests``), so that pytest then only loads them.

Those tests edit the sm90 schedule (``edited_schedule``) to force a knob; compiled one by one
inside pytest, their ~100 artifacts would take most of a device call. This script takes each
test's edits from the test module itself (``dkdv_edits``, ``ASYNC_GATHER_EDITS``), writes the
same edited schedule into a folder per edit set, and builds every plan the tests will ask for into
the user cache (``$FSAGEN_CACHE_DIR``), where ``fsagen.cache`` finds them by their key. The shipped
schedule's plans (forward specs, the gated sum, the query-chunk test's glue-only knob) are built
with no edits.

Usage: python bench/prebuild_gpu_tests.py [--jobs 16] [--arch sm90] [--list] [--only NAME_PART] [--group NAME ...]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def case_groups() -> dict[str, list[tuple[tuple[tuple[str, str], ...], object, str | None]]]:
    """Per test: (schedule edits, KernelSpec, forced loop order or None) of every artifact it loads."""
    from gpu.test_dense_gpu import DKDV_GS, DKDV_VARIANTS, DS, dkdv_edits
    from gpu.test_slc_gpu import ASYNC_GATHER_CASES, ASYNC_GATHER_EDITS, TOKEN_TILE_CASES, token_tile_edits

    from fsagen.spec import KernelSpec

    groups = {name: [] for name in ("dkdv_modes", "async_gather", "token_tiles", "query_chunks", "gate")}
    for variant in sorted(DKDV_VARIANTS):
        branch = DKDV_VARIANTS[variant][0]
        for g in DKDV_GS:
            for d in DS:
                groups["dkdv_modes"].append((tuple(dkdv_edits(variant)), KernelSpec(branch, "bwd", g, d, 0, 0, "bfloat16"), None))
                groups["dkdv_modes"].append(((), KernelSpec(branch, "fwd", g, d, 0, 0, "bfloat16"), None))
    for g, d, bs, topk in ASYNC_GATHER_CASES:
        for phase in ("fwd", "bwd"):
            groups["async_gather"].append((tuple(ASYNC_GATHER_EDITS), KernelSpec("slc", phase, g, d, bs, topk, "bfloat16"),
                                           "kv_outer"))
    for g, d, bs, topk, tokens in TOKEN_TILE_CASES:  # the forward's edits; the shipped q_outer backward
        groups["token_tiles"].append((tuple(token_tile_edits(tokens)), KernelSpec("slc", "fwd", g, d, bs, topk, "bfloat16"),
                                      "q_outer"))
        groups["token_tiles"].append(((), KernelSpec("slc", "bwd", g, d, bs, topk, "bfloat16"), "q_outer"))
    for g in (1, 4, 16):  # test_kv_outer_query_chunks: chunk_rows is glue-only, the shipped programs
        for phase in ("fwd", "bwd"):
            groups["query_chunks"].append(((), KernelSpec("slc", phase, g, 128, 64, 16, "bfloat16"), "kv_outer"))
    for d in (64, 128):  # tests/gpu/test_gate_gpu.py
        for dtype in ("bfloat16", "float16"):
            for phase in ("fwd", "bwd"):
                groups["gate"].append(((), KernelSpec("gate", phase, 1, d, 0, 0, dtype), None))
    return groups


def cases(groups=None) -> list[tuple[tuple[tuple[str, str], ...], object, str | None]]:
    """The cases of ``groups`` (names of ``case_groups``; None: all), each artifact once."""
    found = case_groups()
    unknown = set(groups or ()) - set(found)
    if unknown:
        raise ValueError(f"unknown group(s) {sorted(unknown)}; known: {sorted(found)}")
    return list(dict.fromkeys(c for name in (groups or found) for c in found[name]))  # forward specs repeat


def plan_of(edits, spec, order, arch: str, base: Path, folder) -> object:
    """The plan the tests get for ``spec``: the schedule of ``base`` (the shipped folder, or the
    user's ``$FSAGEN_SCHEDULES_DIR`` when this script started) with ``edits`` applied (exactly what
    their ``edited_schedule`` fixture does), made this process's schedule."""
    from fsagen import schedule

    text = (Path(base) / f"{arch}.toml").read_text()
    for old, new in edits:
        if old not in text:
            raise ValueError(f"the {arch} schedule has no {old!r}")
        text = text.replace(old, new, 1)
    target = Path(folder) / hashlib.sha256(repr(edits).encode()).hexdigest()[:12]
    target.mkdir(parents=True, exist_ok=True)
    path = target / f"{arch}.toml"
    if not path.exists():
        tmp = target / f".{arch}.{os.getpid()}.toml"
        tmp.write_text(text)
        os.replace(tmp, path)
    os.environ["FSAGEN_SCHEDULES_DIR"] = str(target)
    schedule.load_schedule.cache_clear()
    return schedule.load_schedule(arch).plan(spec, loop_order=order)


def _build(args) -> str:
    edits, spec, order, arch, base, folder = args
    from fsagen.cache import ensure_artifact

    try:
        artifact, built = ensure_artifact(spec, plan_of(edits, spec, order, arch, base, folder), arch)
        return f"{'built' if built else 'found'} {artifact.name}"
    except Exception as exc:  # report and go on: the test of that case will fail with the cause
        return f"FAILED {spec.name} {order or ''}: {type(exc).__name__}: {exc}"[:300]


def main(argv=None) -> int:
    from concurrent.futures import ProcessPoolExecutor

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--arch", default="sm90")
    p.add_argument("--list", action="store_true", help="print the cases, build nothing")
    p.add_argument("--only", default="", help="build only the specs whose name contains this")
    p.add_argument("--group", nargs="+", default=None, help="only these tests' artifacts (default: all groups)")
    args = p.parse_args(argv)
    todo = [c for c in cases(args.group) if args.only in c[1].name]
    if args.list:
        for edits, spec, order in todo:
            print(spec.name, order or "", f"{len(edits)} edit(s)")
        return 0
    print(f"prebuild: {len(todo)} artifacts, {args.jobs} jobs", flush=True)
    from fsagen.paths import schedules_dir

    base = schedules_dir()  # read once: each case then points $FSAGEN_SCHEDULES_DIR at its edits
    failed = 0
    with tempfile.TemporaryDirectory(prefix="fsagen-prebuild-") as folder:
        with ProcessPoolExecutor(args.jobs) as pool:
            for line in pool.map(_build, [(e, s, o, args.arch, base, folder) for e, s, o in todo]):
                failed += line.startswith("FAILED")
                print(line, flush=True)
    print(f"prebuild: {len(todo) - failed} ok, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
