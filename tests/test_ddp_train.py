"""examples/ddp_train.py on a CPU: batch sharding, the loss comparison, and a whole run with world
size 1 (gloo, DDP and FSDP2) on the float64 reference stubs of tests/test_nsa_layer.py."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from test_nsa_layer import TINY, stub_glue  # noqa: F401  (fixture)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def ex():
    sys.path.insert(0, str(EXAMPLES))  # ddp_train imports train_recall from beside it
    spec = importlib.util.spec_from_file_location("ddp_train", EXAMPLES / "ddp_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shards_cover_the_global_batch(ex):
    _, args = ex.parse_args(TINY + ["--batch", "4"])
    batch = ex.recall.make_batch(args, torch.Generator().manual_seed(0), "cpu")
    tokens, cu, positions, targets = batch
    shards = [ex.shard_batch(batch, r, 2) for r in range(2)]
    assert torch.equal(torch.cat([s[0] for s in shards]), tokens)
    for r, (t, c, p, y) in enumerate(shards):
        assert c.tolist() == [0, 64, 128] and t.shape == (128,)
        assert torch.equal(t[p], tokens[p + 128 * r]) and torch.equal(y, targets[positions // 128 == r])
        assert y.numel() == 2 * args.queries
    with pytest.raises(ValueError, match="^--batch: 4 sequences do not split evenly over 3 ranks"):
        ex.shard_batch(batch, 0, 3)


def test_compare(ex):
    ref = [{"loss": 2.0}, {"loss": 1.0}]
    assert ex.compare(ref, {"ddp": [{"loss": 2.01}, {"loss": 1.0}]}, 1e-2) == (True, pytest.approx(0.005))
    assert not ex.compare(ref, {"ddp": [{"loss": 2.0}, {"loss": 1.1}]}, 1e-2)[0]
    assert not ex.compare(ref, {"fsdp": [{"loss": 2.0}]}, 1e-2)[0]  # a run cut short fails


def test_world_size_one_run(ex, stub_glue, tmp_path, monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "ddp.md"
    code = ex.main(TINY + ["--steps", "3", "--device", "cpu", "--out", str(out)])
    text = out.read_text()
    assert code == 0, text
    assert "PASS" in text and "| step | reference loss | ddp loss | ddp rel diff | fsdp loss | fsdp rel diff |" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 3
    assert not torch.distributed.is_initialized()
    # a tolerance nothing meets fails with status 3 (the losses are not all bit-identical... or they are:
    # then a negative rtol still fails)
    assert ex.main(TINY + ["--steps", "1", "--device", "cpu", "--mode", "ddp", "--rtol", "-1"]) == 3


def test_two_processes(ex, tmp_path):
    """torchrun with 2 CPU processes (gloo): each trains on its half of the global batch and the losses
    match the one-process reference."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp2.md"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(Path(__file__).parent / "ddp_on_stubs.py"),
           *TINY, "--steps", "3", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "world size 2" in text and "each rank trains on 1 whole sequence(s)" in text and "PASS" in text
