"""Sweep slc schedule variants: force a loop order and knobs, check, time, tabulate.

A variants file (TOML) names the plans to compare::

    [[variant]]
    name = "kv_x4"            # free text, one word
    phase = "bwd"             # fwd | bwd
    loop_order = "kv_outer"
    knobs = { scatter = "x4" }

Each variant becomes a schedule file (the shipped one for the arch with one rule put first that
matches the variant's phase and forces its order and knobs) in a temporary folder named by
``$FSAGEN_SCHEDULES_DIR``, so the variant runs through the public op exactly as a user's own
schedule would. Per (G, block, topk) and variant: a small varlen case against the float64
reference (relative errors, outputs poisoned), then the median CUDA-event time of the forward or
the backward alone at the benchmark shape. Compile on the GPU machine first in parallel with
``--build-only --jobs 16``.

Usage: python bench/sweep_slc.py VARIANTS.toml [--groups 8 16] [--configs 64,16] [--out DIR]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHASES = ("fwd", "bwd")


def read_variants(path: Path) -> list[dict]:
    data = tomllib.loads(Path(path).read_text())
    variants = data.get("variant")
    if not isinstance(variants, list) or not variants:
        raise ValueError(f"{path}: needs at least one [[variant]] table")
    for i, v in enumerate(variants, 1):
        where = f"{path}: [[variant]] #{i}"
        missing = {"name", "phase", "loop_order"} - set(v)
        if missing:
            raise ValueError(f"{where}: missing {sorted(missing)}")
        if v["phase"] not in PHASES:
            raise ValueError(f"{where}: phase={v['phase']!r} must be one of {PHASES}")
        if not isinstance(v.get("knobs", {}), dict):
            raise ValueError(f"{where}: knobs must be a table")
    return variants


def _toml_value(x) -> str:
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, str):
        return f'"{x}"'
    return str(x)


def variant_schedule_text(base_text: str, variant: dict) -> str:
    """The shipped schedule with the variant's rule first (first match wins)."""
    knobs = ", ".join(f"{k} = {_toml_value(v)}" for k, v in variant.get("knobs", {}).items())
    rule = (f'[[rules]]\nwhen = {{ phase = "{variant["phase"]}" }}\n'
            f'loop_order = "{variant["loop_order"]}"\n' + (f"knobs = {{ {knobs} }}\n" if knobs else "") + "\n")
    at = base_text.index("[[rules]]")
    return base_text[:at] + rule + base_text[at:]


def use_variant(variant: dict, arch: str, workdir: Path, base_dir: Path) -> None:
    """Make ``variant`` (on top of ``base_dir``'s schedule of ``arch``) the schedule of this process."""
    from fsagen import cache, schedule

    name = schedule.normalize_arch(arch)
    base = (Path(base_dir) / f"{name}.toml").read_text()
    folder = workdir / variant["name"]
    folder.mkdir(parents=True, exist_ok=True)
    # atomic: the build's worker processes all (re)write the files of the variants they compile
    path, text = folder / f"{name}.toml", variant_schedule_text(base, variant)
    if not path.exists() or path.read_text() != text:
        tmp = folder / f".{name}.{os.getpid()}.toml"
        tmp.write_text(text)
        os.replace(tmp, path)
    os.environ["FSAGEN_SCHEDULES_DIR"] = str(folder)
    schedule.load_schedule.cache_clear()
    cache._loaded.clear()


def _specs(groups, configs, variants):
    from fsagen.spec import KernelSpec

    for g in groups:
        for bs, topk in configs:
            for v in variants:
                yield v, KernelSpec(branch="slc", phase=v["phase"], G=g, D=128, block_size=bs, topk=topk,
                                    dtype="bfloat16")


def build(groups, configs, variants, arch, workdir, base_dir, jobs):
    """Compile every (variant, spec) plan into the user cache, ``jobs`` processes at a time."""
    from concurrent.futures import ProcessPoolExecutor

    tasks = [(v, s, arch, workdir, base_dir) for v, s in _specs(groups, configs, variants)]
    with ProcessPoolExecutor(jobs) as pool:
        for line in pool.map(_build_one, tasks):
            print(line, flush=True)


def _build_one(args):
    variant, spec, arch, workdir, base_dir = args
    from fsagen.cache import ensure_artifact
    from fsagen.schedule import load_schedule

    use_variant(variant, arch, workdir, base_dir)
    plan = load_schedule(arch).plan(spec)
    try:
        path, built = ensure_artifact(spec, plan, arch)
        return f"{'built' if built else 'found'} {variant['name']} {path.name}"
    except Exception as exc:  # report and go on: one bad variant must not stop the sweep
        return f"FAILED {variant['name']} {spec.name}: {type(exc).__name__}: {exc}"[:300]


def measure(groups, configs, variants, arch, workdir, base_dir, n_bench):
    import torch
    from triton.testing import do_bench

    import fsagen
    from fsagen.reference import slc_reference
    from fsagen.testing import random_cu_seqlens, random_topk_idx, rel_err

    rows = []
    for v, spec in _specs(groups, configs, variants):
        use_variant(v, arch, workdir, base_dir)
        g, bs, topk, d = spec.G, spec.block_size, spec.topk, spec.D
        gen = torch.Generator(device="cuda").manual_seed(0)
        row = dict(G=g, bs=bs, topk=topk, phase=v["phase"], variant=v["name"], err=math.nan, ms=math.nan,
                   error="")
        try:
            os.environ["FSAGEN_POISON"] = "1"
            cu = random_cu_seqlens(1500, 3, block_size=bs, generator=gen, device="cuda")
            idx = random_topk_idx(cu, 2, topk, bs, generator=gen)
            q, k, v_ = (torch.randn(1500, h, d, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_()
                        for h in (2 * g, 2, 2))
            o = fsagen.selected_attention(q, k, v_, idx, bs, cu)
            do = torch.randn(o.shape, device="cuda", generator=gen).to(o.dtype)
            grads = torch.autograd.grad(o, (q, k, v_), do)
            leaves = [t.detach().double().requires_grad_() for t in (q, k, v_)]
            o_r, _ = slc_reference(*leaves, idx, cu, bs)
            refs = torch.autograd.grad(o_r, leaves, do.double())
            got = (o,) if v["phase"] == "fwd" else grads
            want = (o_r,) if v["phase"] == "fwd" else refs
            row["err"] = max(rel_err(a, b) for a, b in zip(got, want))
            os.environ["FSAGEN_POISON"] = "0"

            cu = torch.tensor([0, n_bench], dtype=torch.int32, device="cuda")
            idx = random_topk_idx(cu, 4, topk, bs, generator=gen)
            q, k, v_ = (torch.randn(n_bench, h, d, device="cuda", generator=gen).to(torch.bfloat16)
                        for h in (4 * g, 4, 4))
            scale = d ** -0.5
            fwd = lambda: torch.ops.fsagen.slc_fwd(q, k, v_, idx, cu, bs, scale, "auto")  # noqa: E731
            if v["phase"] == "fwd":
                row["ms"] = do_bench(fwd, warmup=25, rep=200, return_mode="median")
            else:
                o, lse = fwd()
                do = torch.randn_like(o)
                row["ms"] = do_bench(lambda: torch.ops.fsagen.slc_bwd(do, q, k, v_, o, lse, idx, cu, bs, scale, "auto"),
                                     warmup=25, rep=200, return_mode="median")
        except Exception as exc:  # recorded in the table; the sweep goes on
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        print(f"G={g:2d} bs={bs} k={topk} {v['phase']} {v['name']:14s} err={row['err']:.1e} "
              f"{row['ms']:8.2f} ms {row['error']}", flush=True)
        rows.append(row)
    return rows


def write_table(path: Path, rows, header: list[str]) -> None:
    lines = header + ["", "| G | block, topk | phase | variant | max rel err | ms | error |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['G']} | {r['bs']}, {r['topk']} | {r['phase']} | {r['variant']} | {r['err']:.1e} | "
                     f"{r['ms']:.2f} | {r['error']} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", type=Path)
    p.add_argument("--arch", default="sm90")
    p.add_argument("--groups", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--configs", nargs="+", default=["64,16"], help="block_size,topk pairs")
    p.add_argument("--n", type=int, default=65536, help="tokens of the timed case (one sequence)")
    p.add_argument("--build-only", action="store_true", help="compile every variant, then stop (no GPU needed)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args(argv)
    variants = read_variants(args.variants)
    configs = [tuple(int(x) for x in c.split(",")) for c in args.configs]
    from fsagen.paths import schedules_dir

    base_dir = schedules_dir()  # the user's $FSAGEN_SCHEDULES_DIR or the shipped schedules
    with tempfile.TemporaryDirectory(prefix="fsagen-sweep-") as tmp:
        build(args.groups, configs, variants, args.arch, Path(tmp), base_dir, args.jobs)
        if args.build_only:
            return 0
        import torch

        if not torch.cuda.is_available():
            print("sweep_slc: timing needs a CUDA GPU (use --build-only to compile)", file=sys.stderr)
            return 2
        rows = measure(args.groups, configs, variants, args.arch, Path(tmp), base_dir, args.n)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"sweep_{args.variants.stem}.md"
    header = [f"# slc sweep: {args.variants.name}", "",
              f"- device: {torch.cuda.get_device_name()}, N={args.n} (one sequence), Hkv=4, D=128, bf16",
              "- err: max relative error (o for fwd; dq, dk, dv for bwd) on a small varlen case vs float64",
              "- ms: median CUDA-event time (triton do_bench) of the phase alone, random valid selection"]
    write_table(out, rows, header)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
