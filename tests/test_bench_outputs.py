"""bench/bench_slc.py on a CPU: its report writers (with made-up rows) and its no-GPU exit."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_slc.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_slc", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_slc"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _rows(bench):
    rows = []
    for g in (1, 4):
        meta = dict(G=g, Hq=4 * g, block_size=64, topk=16, published=bench.PUBLISHED.get((g, 64, 16), {}))
        for c in ("fsagen auto", "sdpa cudnn (dense causal)"):
            for ph, ms in (("fwd", 10.0), ("bwd", 20.0)):
                rows.append(bench.Row(**meta, contender=c, phase=ph, ms=ms, tflops=1.0))
    rows[-1].ms, rows[-1].error = math.nan, "RuntimeError: failed | badly"
    return rows


SHAPE = (65536, 4, 128)


def test_writers(bench, tmp_path):
    rows = _rows(bench)
    bench.write_csv(tmp_path / "slc_bench.csv", rows, SHAPE)
    bench.write_markdown(tmp_path / "slc_bench.md", rows, {"device": "none"}, SHAPE)
    md = (tmp_path / "slc_bench.md").read_text()
    assert "ERROR RuntimeError: failed / badly" in md
    csv_lines = (tmp_path / "slc_bench.csv").read_text().splitlines()
    assert len(csv_lines) == len(rows) + 1
    # fsagen auto fwd at G=1: published FSA 12.6 ms / 10 ms, cuDNN measured here 10 ms / 10 ms.
    rec = bench._table(rows, SHAPE)[0]
    assert rec["speedup_vs_pub_fsa"] == pytest.approx(1.26) and rec["speedup_vs_sdpa_cudnn"] == 1.0
    # floor columns: 1 TFLOP/s of 680; fwd min bytes at G=1: q, o (2 x 16.8 MB), k, v (134 MB),
    # topk_idx (16.8 MB), lse (1 MB) = 186.6 MB in 10 ms
    assert rec["pct_matmul"] == pytest.approx(100 / 680)
    n, hkv, d = SHAPE
    want = (2 * n * 4 * d * 2 + 2 * n * hkv * d * 2 + hkv * n * 16 * 4 + n * 4 * 4) / 10.0 / 1e9
    assert rec["min_bytes_tbps"] == pytest.approx(want)
    pytest.importorskip("matplotlib")
    assert bench.write_plot(tmp_path / "slc_bench.png", rows, "t") and (tmp_path / "slc_bench.png").stat().st_size


def test_render_round_trip(bench, tmp_path):
    """--render rebuilds the same table from the CSV and the header of the earlier report."""
    rows = _rows(bench)
    bench.write_csv(tmp_path / "slc_bench.csv", rows, SHAPE)
    bench.write_markdown(tmp_path / "slc_bench.md", rows, {"device": "X100"}, SHAPE)
    before = (tmp_path / "slc_bench.md").read_text()
    out = tmp_path / "out"
    out.mkdir()
    assert bench.main(["--render", str(tmp_path / "slc_bench.csv"), "--out", str(out)]) == 0
    after = (out / "slc_bench.md").read_text()
    assert "- device: X100" in after
    table = lambda md: [line for line in md.splitlines() if line.startswith("|")]  # noqa: E731
    assert table(after) == table(before)


def test_no_gpu_exits_2(bench, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 2


def test_profile_slc_without_gpu_exits_2(tmp_path, capsys):
    """bench/profile_slc.py: a clear refusal on a machine without CUDA, nothing written."""
    import torch
    from conftest import load_script

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    profile = load_script("bench/profile_slc.py")
    assert profile.main(["--groups", "1", "--out", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_scaling_writer_reports_graph_replays(tmp_path, monkeypatch):
    """bench/bench_slc_scaling.py's report: eager and CUDA-graph times side by side, each with its
    ratio to linear growth, and the mixed batch's row."""
    import torch
    from conftest import load_script

    scaling_mod = load_script("bench/bench_slc_scaling.py")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "X100")
    rows = [dict(G=1, bs=64, topk=16, N=n, picked="kv_outer/kv_outer", tflops=1.0, fwd_ms=ms, bwd_ms=2 * ms,
                 fwd_graph_ms=n / 65536, bwd_graph_ms=2 * n / 65536, extra_mib=1.0,
                 fwd_vs_linear=ms / n * 65536, bwd_vs_linear=ms / n * 65536, fwd_graph_vs_linear=1.0,
                 bwd_graph_vs_linear=1.0) for n, ms in ((8192, 2.0), (65536, 1.0))]
    one = dict(fwd_ms=1.0, bwd_ms=2.0, extra_mib=1.0)
    varlen = [dict(G=1, bs=64, topk=16, picked="kv_outer/kv_outer", one=one, mixed=one, work=0.9, ratio=1.0)]
    scaling_mod.write(tmp_path, rows, varlen, "t")
    md = (tmp_path / "slc_scaling.md").read_text()
    assert "fwd graph ms" in md and "bwd graph vs linear" in md
    assert "| 1 | 64,16 | 8192 | kv_outer/kv_outer | 2.00 | 1.0 | 16.00 | 0.12 | 1.00 | 4.00 | 16.00 | 0.25 | 1.00 | 1 |" in md


def test_count_host_ops_without_gpu_exits_2(capsys):
    """bench/count_host_ops.py --device cuda: a clear refusal without CUDA (its CPU counts are
    tests/test_cpu_kernels.py::test_layer_host_ops_on_cpu's business)."""
    import torch
    from conftest import load_script

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    script = load_script("bench/count_host_ops.py")
    assert script.main(["--device", "cuda"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
