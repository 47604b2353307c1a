"""Sweep schedule variants: force a loop order and knobs, check, time, tabulate.

A variants file (TOML) names the plans to compare::

    [[variant]]
    name = "kv_x4"            # free text, one word
    branch = "slc"            # slc (default) | swa | cmp
    phase = "bwd"             # fwd | bwd
    loop_order = "kv_outer"   # slc: kv_outer | q_outer; swa, cmp: dense
    knobs = { scatter = "x4" }

Each variant becomes a schedule file (the shipped one for the arch with one rule put first that
matches the variant's branch and phase and forces its order and knobs) in a temporary folder named
by ``$FSAGEN_SCHEDULES_DIR``, so the variant runs through the public op exactly as a user's own
schedule would. Per G (and, for slc, (block, topk)) and variant: a small varlen case against the
float64 reference (relative errors, outputs poisoned), then the median CUDA-event time of the
forward or the backward alone at the benchmark shape (one sequence of ``--n`` tokens, Hkv = 4,
D = 128, bf16; swa window 512, cmp kernel 32 / stride 16). Compile on the GPU machine first in
parallel with ``--build-only --jobs 16``.

Usage: python bench/sweep.py VARIANTS.toml [MORE.toml ...] [--groups 8 16] [--configs 64,16] [--out DIR]
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
BRANCHES = ("slc", "swa", "cmp")
WINDOW, KERNEL_SIZE, STRIDE = 512, 32, 16  # swa's window, cmp's compression (NSA's defaults)


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
        if v.setdefault("branch", "slc") not in BRANCHES:
            raise ValueError(f"{where}: branch={v['branch']!r} must be one of {BRANCHES}")
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
    when = f'{{ branch = "{variant.get("branch", "slc")}", phase = "{variant["phase"]}" }}'
    rule = (f'[[rules]]\nwhen = {when}\n'
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
    """(variant, KernelSpec) pairs: per G, per (block, topk) for slc, once for swa / cmp."""
    from fsagen.spec import KernelSpec

    for g in groups:
        for i, (bs, topk) in enumerate(configs):
            for v in variants:
                if v["branch"] == "slc":
                    yield v, KernelSpec("slc", v["phase"], g, 128, bs, topk, "bfloat16")
                elif i == 0:
                    yield v, KernelSpec(v["branch"], v["phase"], g, 128, 0, 0, "bfloat16")


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


def _slc_case(spec, phase, gen, n_bench):
    """(max relative error of a small varlen case, the phase alone at the benchmark shape)."""
    import torch

    import fsagen
    from fsagen.reference import slc_reference
    from fsagen.testing import random_cu_seqlens, random_topk_idx, rel_err

    g, bs, topk, d = spec.G, spec.block_size, spec.topk, spec.D
    cu = random_cu_seqlens(1500, 3, block_size=bs, generator=gen, device="cuda")
    idx = random_topk_idx(cu, 2, topk, bs, generator=gen)
    q, k, v = (torch.randn(1500, h, d, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_()
               for h in (2 * g, 2, 2))
    o = fsagen.selected_attention(q, k, v, idx, bs, cu)
    do = torch.randn(o.shape, device="cuda", generator=gen).to(o.dtype)
    grads = torch.autograd.grad(o, (q, k, v), do)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o_r, _ = slc_reference(*leaves, idx, cu, bs)
    refs = torch.autograd.grad(o_r, leaves, do.double())
    got, want = ((o,), (o_r,)) if phase == "fwd" else (grads, refs)
    err = max(rel_err(a, b) for a, b in zip(got, want))

    cu = torch.tensor([0, n_bench], dtype=torch.int32, device="cuda")
    idx = random_topk_idx(cu, 4, topk, bs, generator=gen)
    q, k, v = (torch.randn(n_bench, h, d, device="cuda", generator=gen).to(torch.bfloat16) for h in (4 * g, 4, 4))
    scale = d ** -0.5

    def fwd():
        return torch.ops.fsagen.slc_fwd(q, k, v, idx, cu, bs, scale, "auto")

    if phase == "fwd":
        return err, fwd
    o, lse = fwd()
    do = torch.randn_like(o)
    return err, lambda: torch.ops.fsagen.slc_bwd(do, q, k, v, o, lse, idx, cu, bs, scale, "auto")


def _dense_case(spec, phase, gen, n_bench):
    """The same for swa (window ``WINDOW``) and cmp (``KERNEL_SIZE`` / ``STRIDE``, random
    compressed keys): small varlen check, then the phase at the benchmark shape."""
    import torch

    import fsagen
    from fsagen.reference_cmp import cmp_attention_reference, num_compressed
    from fsagen.reference_nsa import swa_reference
    from fsagen.testing import random_cu_seqlens, rel_err

    g, d, branch = spec.G, spec.D, spec.branch

    def compressed_offsets(cu):
        lens = (cu[1:] - cu[:-1]).tolist()
        return torch.tensor([0] + [num_compressed(n, KERNEL_SIZE, STRIDE) for n in lens],
                            device=cu.device).cumsum(0).to(torch.int32)

    def inputs(cu, hkv):
        n = int(cu[-1])
        cu_k = cu if branch == "swa" else compressed_offsets(cu)
        nk = int(cu_k[-1])
        q = torch.randn(n, hkv * g, d, device="cuda", generator=gen).to(torch.bfloat16)
        k, v = (torch.randn(nk, hkv, d, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(2))
        return q, k, v, cu_k

    def op(q, k, v, cu, cu_k):
        if branch == "swa":
            return fsagen.sliding_window_attention(q, k, v, cu, WINDOW)
        return fsagen.compressed_attention(q, k, v, cu, cu_k, KERNEL_SIZE, STRIDE)

    def reference(q, k, v, cu, cu_k):
        if branch == "swa":
            return swa_reference(q, k, v, cu, WINDOW)[0]
        return cmp_attention_reference(q, k, v, cu, cu_k, KERNEL_SIZE, STRIDE)[0]

    cu = random_cu_seqlens(1500, 3, block_size=64, generator=gen, device="cuda")
    q, k, v, cu_k = inputs(cu, 2)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    o = op(*leaves, cu, cu_k)
    do = torch.randn(o.shape, device="cuda", generator=gen).to(o.dtype)
    grads = torch.autograd.grad(o, leaves, do)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o_r = reference(*leaves64, cu, cu_k)
    refs = torch.autograd.grad(o_r, leaves64, do.double())
    got, want = ((o,), (o_r,)) if phase == "fwd" else (grads, refs)
    err = max(rel_err(a, b) for a, b in zip(got, want))

    cu = torch.tensor([0, n_bench], dtype=torch.int32, device="cuda")
    q, k, v, cu_k = inputs(cu, 4)
    a, b = (WINDOW, 0) if branch == "swa" else (KERNEL_SIZE, STRIDE)
    scale = d ** -0.5

    def fwd():
        return torch.ops.fsagen.dense_fwd(q, k, v, cu, cu_k, branch, a, b, scale)

    if phase == "fwd":
        return err, fwd
    o, lse = fwd()
    do = torch.randn_like(o)
    return err, lambda: torch.ops.fsagen.dense_bwd(do, q, k, v, o, lse, cu, cu_k, branch, a, b, scale)


def measure(groups, configs, variants, arch, workdir, base_dir, n_bench):
    import torch
    from triton.testing import do_bench

    rows = []
    for v, spec in _specs(groups, configs, variants):
        use_variant(v, arch, workdir, base_dir)
        gen = torch.Generator(device="cuda").manual_seed(0)
        row = dict(branch=spec.branch, G=spec.G, bs=spec.block_size, topk=spec.topk, phase=v["phase"],
                   variant=v["name"], err=math.nan, ms=math.nan, error="")
        case = _slc_case if spec.branch == "slc" else _dense_case
        try:
            os.environ["FSAGEN_POISON"] = "1"
            row["err"], timed = case(spec, v["phase"], gen, n_bench)
            os.environ["FSAGEN_POISON"] = "0"
            row["ms"] = do_bench(timed, warmup=25, rep=200, return_mode="median")
        except Exception as exc:  # recorded in the table; the sweep goes on
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        print(f"{spec.branch} G={spec.G:2d} bs={spec.block_size} k={spec.topk} {v['phase']} {v['name']:14s} "
              f"err={row['err']:.1e} {row['ms']:8.2f} ms {row['error']}", flush=True)
        rows.append(row)
    return rows


def write_table(path: Path, rows, header: list[str]) -> None:
    lines = header + ["", "| branch | G | block, topk | phase | variant | max rel err | ms | error |",
                      "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = f"{r['bs']}, {r['topk']}" if r["branch"] == "slc" else "-"
        lines.append(f"| {r['branch']} | {r['G']} | {shape} | {r['phase']} | {r['variant']} | {r['err']:.1e} | "
                     f"{r['ms']:.2f} | {r['error']} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", type=Path, nargs="+", help="one or more variants files, swept in one run")
    p.add_argument("--arch", default="sm90")
    p.add_argument("--groups", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--configs", nargs="+", default=["64,16"], help="block_size,topk pairs")
    p.add_argument("--n", type=int, default=65536, help="tokens of the timed case (one sequence)")
    p.add_argument("--build-only", action="store_true", help="compile every variant, then stop (no GPU needed)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args(argv)
    variants = [v for path in args.variants for v in read_variants(path)]
    names = [v["name"] for v in variants]
    if len(set(names)) != len(names):
        p.error(f"variant names repeat across {[str(x) for x in args.variants]}: {sorted({n for n in names if names.count(n) > 1})}")
    configs = [tuple(int(x) for x in c.split(",")) for c in args.configs]
    from fsagen.paths import schedules_dir

    base_dir = schedules_dir()  # the user's $FSAGEN_SCHEDULES_DIR or the shipped schedules
    with tempfile.TemporaryDirectory(prefix="fsagen-sweep-") as tmp:
        build(args.groups, configs, variants, args.arch, Path(tmp), base_dir, args.jobs)
        if args.build_only:
            return 0
        import torch

        if not torch.cuda.is_available():
            print("sweep: timing needs a CUDA GPU (use --build-only to compile)", file=sys.stderr)
            return 2
        rows = measure(args.groups, configs, variants, args.arch, Path(tmp), base_dir, args.n)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"sweep_{'+'.join(path.stem for path in args.variants)}.md"
    header = [f"# schedule sweep: {', '.join(path.name for path in args.variants)}", "",
              f"- device: {torch.cuda.get_device_name()}, N={args.n} (one sequence), Hkv=4, D=128, bf16; "
              f"swa window {WINDOW}, cmp kernel {KERNEL_SIZE} / stride {STRIDE}",
              "- err: max relative error (o for fwd; dq, dk, dv for bwd) on a small varlen case vs float64",
              "- ms: median CUDA-event time (triton do_bench) of the phase alone; slc: random valid selection"]
    write_table(out, rows, header)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
