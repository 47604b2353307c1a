"""bench/bench_layer.py on a CPU: speedups, the crossover, its report writers (with made-up rows),
the CSV round trip behind --plot-only, and its no-GPU exit."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from test_nsa_layer import stub_glue  # noqa: F401  (fixture)

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH_DIR))  # bench_layer imports bench_slc and bench_cmp from beside it
    spec = importlib.util.spec_from_file_location("bench_layer", BENCH_DIR / "bench_layer.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_layer"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


# dense ms grows as N^2, fsagen's as N: dense wins at 8K (fwd), fsagen from 16K on
DENSE_MS = {8192: 2.0, 16384: 8.0, 32768: 32.0, 65536: 128.0}
FSAGEN_MS = {8192: 4.0, 16384: 8.0 / 1.5, 32768: 16.0, 65536: 32.0}


def _rows(bench):
    rows = []
    for g in (1, 16):
        for n in DENSE_MS:
            meta = dict(N=n, G=g, Hq=4 * g)
            for phase, scale in (("fwd", 1.0), ("fwd+bwd", 3.0)):
                rows.append(bench.Row(**meta, contender=bench.FSAGEN, stage=bench.LAYER_STAGE, phase=phase,
                                      ms=FSAGEN_MS[n] * scale * (g if g > 1 else 1), extra_mib=10.0))
                rows.append(bench.Row(**meta, contender=bench.DENSE, stage=bench.LAYER_STAGE, phase=phase,
                                      ms=DENSE_MS[n] * scale, extra_mib=5.0, note="enable_gqa=True"))
    for stage in bench.STAGES_FWD:
        rows.append(bench.Row(N=65536, G=1, Hq=4, contender=bench.FSAGEN, stage=stage, phase="fwd", ms=1.0))
    for stage in bench.STAGES_BWD:
        rows.append(bench.Row(N=65536, G=1, Hq=4, contender=bench.FSAGEN, stage=stage, phase="bwd", ms=2.0))
    failed = rows[-1]
    failed.ms, failed.error = math.nan, "RuntimeError: out of memory | badly"
    bench.add_speedups(rows)
    return rows


def test_speedups_and_crossover(bench):
    rows = _rows(bench)
    sp = {(r.N, r.G, r.phase): r.speedup_vs_dense for r in rows
          if r.contender == bench.FSAGEN and r.stage == bench.LAYER_STAGE}
    assert sp[(8192, 1, "fwd")] == pytest.approx(0.5) and sp[(65536, 1, "fwd")] == pytest.approx(4.0)
    assert all(math.isnan(r.speedup_vs_dense) for r in rows if r.contender == bench.DENSE or r.stage != "layer")
    cross = bench.crossovers(rows)
    # G=1: speedup 0.5 at 8K, 1.5 at 16K -> log-linear: 8192 * 2 ** (log 2 / log 3)
    n_star, text = cross[(1, "fwd")]
    assert n_star == pytest.approx(8192 * 2 ** (math.log(2) / math.log(3)))
    assert text.startswith("dense wins below N ~ 12,")
    # G=16: fsagen 16x slower than at G=1, dense wins up to 32K, fsagen 128 / 512 < 1 at 64K too
    assert math.isnan(cross[(16, "fwd")][0]) and "every measured N" in cross[(16, "fwd")][1]


@pytest.mark.parametrize("points,n,text", [
    ([(8192, 2.0), (65536, 5.0)], None, "dense never wins in the measured range"),
    ([(8192, 2.0), (65536, 0.5)], None, "dense wins at the largest measured N (crossover above N=65536)"),
    ([(8192, 0.5), (16384, 2.0), (32768, 0.9), (65536, 1.1)], 32768 * 2 ** (math.log(1 / 0.9) / math.log(1.1 / 0.9)),
     "between 32768 and 65536"),
    ([(8192, math.nan)], None, "no measurement"),
])
def test_crossover_cases(bench, points, n, text):
    n_star, got = bench.crossover(points)
    assert text in got
    assert math.isnan(n_star) if n is None else n_star == pytest.approx(n)


def test_writers_and_plot_only(bench, tmp_path):
    rows = _rows(bench)
    bench.write_csv(tmp_path / "layer_bench.csv", rows)
    bench.write_markdown(tmp_path / "layer_bench.md", rows, {"device": "X100"})
    md = (tmp_path / "layer_bench.md").read_text()
    assert "- device: X100" in md
    # whole-layer line G=1, N=65536: fsagen 32 ms fwd vs dense 128 ms -> 4.00; fwd+bwd 96 vs 384 -> 4.00
    assert "| 1 | 65536 | 32.00 | 128.00 | 4.00 | 96.00 | 384.00 | 4.00 | 10 / 10 | 5 / 5 |" in md
    assert "| 1 | fwd | dense wins below N ~ 12," in md
    assert "ERROR RuntimeError: out of memory / badly" in md  # gate bwd, with the '|' escaped
    # stage table: fwd stages 1 ms each, sum 6 ms vs the whole layer (32 ms)
    assert "| 1 | fwd | 1.00 | 1.00 | 1.00 | 1.00 | 1.00 | 1.00 | 6.00 | 32.00 |" in md
    # select has no backward; the failed gate backward is left out of the sum; the layer's backward
    # is its fwd+bwd (96 ms) less its fwd (32 ms)
    assert "| 2.00 | 2.00 |  | 2.00 | 2.00 | ERROR RuntimeError: out of memory / badly | 8.00 | 64.00 (fwd+bwd - fwd) |" in md

    back = bench.read_csv(tmp_path / "layer_bench.csv")
    assert len(back) == len(rows)
    for a, b in zip(rows, back):
        for name in bench.CSV_FIELDS:
            x, y = getattr(a, name), getattr(b, name)
            if isinstance(x, float):
                assert (math.isnan(x) and math.isnan(y)) or y == pytest.approx(x, rel=1e-3), name
            else:
                assert x == y, name
    pytest.importorskip("matplotlib")
    out = tmp_path / "png"
    assert bench.main(["--plot-only", str(tmp_path / "layer_bench.csv"), "--out", str(out)]) == 0
    assert (out / "layer_bench.png").stat().st_size > 10_000


def test_no_gpu_exits_2(bench, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 2


def test_measurements_on_reference_stubs(bench, stub_glue, monkeypatch):
    """The measuring code (whole layer, dense, every stage fwd and bwd) runs end to end on the CPU with
    the float64 reference stubs, a fake timer and a CPU SDPA: every row is measured, none errs."""
    import torch
    import torch.nn.functional as F

    monkeypatch.setattr(bench, "_peak_extra", lambda fn: (fn(), 0.0)[1])
    monkeypatch.setattr(bench, "_sdpa_call", lambda name, q4, k4, v4: (
        lambda: F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, enable_gqa=True), "enable_gqa=True"))
    calls = []

    def timeit(fn):
        calls.append(fn())
        return 1.0

    n, hkv, g, d = 300, 2, 2, 16
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, h, d, generator=gen).bfloat16() for h in (g * hkv, hkv, hkv))
    gates = torch.rand(n, g * hkv, 3, generator=gen).bfloat16()
    cu = torch.tensor([0, n], dtype=torch.int32)
    rows, meta = [], dict(N=n, G=g, Hq=g * hkv)
    bench.bench_layer(rows, timeit, q, k, v, gates, cu, meta)
    bench.bench_dense(rows, timeit, q, k, v, meta)
    bench.bench_stages(rows, timeit, q, k, v, gates, cu, meta)
    assert [r.error for r in rows] == [""] * len(rows)
    assert {(r.contender, r.stage, r.phase) for r in rows} == (
        {(c, "layer", p) for c in (bench.FSAGEN, bench.DENSE) for p in bench.PHASES}
        | {(bench.FSAGEN, s, "fwd") for s in bench.STAGES_FWD} | {(bench.FSAGEN, s, "bwd") for s in bench.STAGES_BWD})
    assert all(r.ms == 1.0 for r in rows)
    # the fwd+bwd calls return the gradients of q, k, v (and the gates for fsagen)
    assert [t.shape for t in calls[1]] == [q.shape, k.shape, v.shape, gates.shape]
    assert [t.shape for t in calls[3]] == [(1, g * hkv, n, d), (1, hkv, n, d), (1, hkv, n, d)]
