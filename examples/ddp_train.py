"""The NSA decoder of train_recall.py trained under torch.distributed (DDP and FSDP2), checked
against one GPU on the same global batch.

Every rank draws the same global batches (``--batch`` sequences of ``--seq-len`` tokens, the
associative-recall data of ``examples/train_recall.py``) and trains on its share (``batch / world``
whole sequences, rank r taking sequences ``[r * batch / world, (r + 1) * batch / world)``), with the
same seeded initial weights.  Each rank's loss is the mean over its query positions, and every row
has the same number of them, so the mean over ranks of the rank losses is the loss of the global
batch, and the gradients averaged by DDP / FSDP2 are the global batch's.  After the distributed
runs, rank 0 trains the unwrapped model alone on the whole global batch (the reference) and prints,
per step, the reference loss, each distributed loss and their relative difference.  The check passes
when every relative difference is at most ``--rtol`` (the runs differ only in summation order and
bf16 rounding; float32 atomics in the kernels make even two one-GPU runs differ slightly).

    torchrun --nproc_per_node 2 examples/ddp_train.py --out runs/ddp.md      # two GPUs
    python examples/ddp_train.py --out runs/ddp.md                           # world size 1

``--mode ddp`` (DistributedDataParallel), ``fsdp`` (``torch.distributed.fsdp.fully_shard`` per
block and on the root, float32 parameters, bf16 autocast as in the one-GPU step) or ``both``
(default).  The other options are those of train_recall.py (model size, data, learning rate), with
defaults for a short check: 10 steps, warmup 2, 4 sequences of 8192 tokens a step.  Exit status 0
when the check passes, 3 when it does not (every rank exits with rank 0's verdict).

Without torchrun (no ``WORLD_SIZE`` in the environment) the script makes a one-process group on a
free local port itself.  ``--device cpu`` (gloo) exists for the CPU test suite, which swaps float64
reference stubs in for the CUDA kernels; fsagen itself needs CUDA.
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_recall as recall  # noqa: E402

MODES = ("ddp", "fsdp")
# train_recall.py defaults replaced for a short check (a user's own flags come after and win)
SHORT_RUN = ["--steps", "10", "--warmup", "2", "--batch", "4", "--log-every", "1"]


def parse_args(argv=None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """(this script's options, train_recall's options)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    p.add_argument("--mode", choices=MODES + ("both",), default="both")
    p.add_argument("--rtol", type=float, default=2e-2, help="largest relative loss difference that passes")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: for the CPU tests only")
    p.add_argument("--out", type=Path, default=None, help="markdown report (written by rank 0)")
    p.add_argument("-h", "--help", action="store_true")
    own, rest = p.parse_known_args(argv)
    if own.help:
        p.print_help()
        print("\nthe options of train_recall.py (defaults there; here first " + " ".join(SHORT_RUN) + "):")
        recall.parse_args(["--help"])
    return own, recall.parse_args(SHORT_RUN + rest)


# --------------------------------------------------------------------------- process group


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_group(device_type: str) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device), joining torchrun's group or making a one-process one."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timedelta(minutes=15))
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timedelta(minutes=15))
    return dist.get_rank(), dist.get_world_size(), device


# --------------------------------------------------------------------------- data and models


def shard_batch(batch, rank: int, world: int):
    """Rank ``rank``'s whole sequences of a packed global batch ``(tokens, cu_seqlens, positions,
    targets)``: sequences ``[rank * B / world, (rank + 1) * B / world)``, offsets and positions
    re-based to the shard."""
    tokens, cu, positions, targets = batch
    b = cu.numel() - 1
    if b % world:
        raise ValueError(f"--batch: {b} sequences do not split evenly over {world} ranks")
    lo, hi = rank * b // world, (rank + 1) * b // world
    start, stop = int(cu[lo]), int(cu[hi])
    keep = (positions >= start) & (positions < stop)
    return tokens[start:stop], cu[lo:hi + 1] - cu[lo], positions[keep] - start, targets[keep]


def wrap(model, mode: str, device: torch.device):
    """The model under DDP, or sharded by FSDP2 (each block, then the root)."""
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def train(args, batches, device, mode: str | None, rank: int, world: int) -> list[dict]:
    """Train a freshly seeded model for ``len(batches)`` steps; ``mode`` None: unwrapped, whole batches
    (the reference).  Returns per step the global loss (rank losses averaged) and the step time."""
    torch.manual_seed(args.seed)
    model = recall.build_model(args, device=device)
    if mode is not None:
        model = wrap(model, mode, device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    rows = []
    for step, batch in enumerate(batches):
        if mode is not None:
            batch = shard_batch(batch, rank, world)
        t0 = time.perf_counter()
        loss, acc = recall.train_step(model, opt, tuple(t.to(device) for t in batch), step, args,
                                      device_type=device.type)
        if mode is not None:
            stats = torch.stack([loss, acc]).float()
            dist.all_reduce(stats)
            loss, acc = stats / world
        rows.append({"loss": loss.item(), "accuracy": acc.item(), "s": time.perf_counter() - t0})
    return rows


# --------------------------------------------------------------------------- report


def rel_diff(a: float, ref: float) -> float:
    return abs(a - ref) / max(abs(ref), 1e-12)


def compare(reference: list[dict], runs: dict[str, list[dict]], rtol: float) -> tuple[bool, float]:
    """(passed, largest relative loss difference) of the distributed runs against the reference."""
    worst = max((rel_diff(r["loss"], ref["loss"]) for rows in runs.values() for r, ref in zip(rows, reference)),
                default=0.0)
    same_length = all(len(rows) == len(reference) for rows in runs.values())
    return same_length and worst <= rtol, worst


def report(args, own, reference, runs, world: int, device_name: str) -> str:
    passed, worst = compare(reference, runs, own.rtol)
    per_rank = args.batch // world
    lines = [f"# NSA decoder under torch.distributed: {', '.join(m.upper() for m in runs)} on {world} rank(s) "
             f"vs one device", "",
             f"- device: {device_name}; torch {torch.__version__}; world size {world}",
             f"- model: train_recall.py's decoder, {args.layers} layers, hidden {args.hidden}, {args.heads} query / "
             f"{args.kv_heads} kv heads, head dim {args.head_dim}, NSA block {args.block_size}, topk {args.topk}, "
             f"window {args.window}; float32 parameters, bf16 autocast, AdamW lr {args.lr} (warmup {args.warmup})",
             f"- data: global batch {args.batch} x {args.seq_len} tokens a step (associative recall, seed {args.seed}); "
             f"each rank trains on {per_rank} whole sequence(s); the reference trains on all {args.batch} at once",
             "- loss: mean cross-entropy at the query positions of the global batch (distributed: the mean of the "
             "rank losses, equal query counts per rank)",
             f"- check: |loss - reference| / reference <= {own.rtol} at every step", ""]
    cols = ["step", "reference loss"] + [c for m in runs for c in (f"{m} loss", f"{m} rel diff")] + \
           ["reference s"] + [f"{m} s" for m in runs]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for step, ref in enumerate(reference):
        cells = [str(step), f"{ref['loss']:.5f}"]
        for rows in runs.values():
            r = rows[step]
            cells += [f"{r['loss']:.5f}", f"{rel_diff(r['loss'], ref['loss']):.2e}"]
        cells += [f"{ref['s']:.2f}"] + [f"{rows[step]['s']:.2f}" for rows in runs.values()]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Largest relative difference {worst:.2e}: {'PASS' if passed else 'FAIL'} (rtol {own.rtol}). "
                  "Step 0's time includes kernel loading."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    own, args = parse_args(argv)
    if own.device == "cuda" and not torch.cuda.is_available():
        print("ddp_train.py needs CUDA GPUs (the fsagen kernels are CUDA-only)", file=sys.stderr)
        return 1
    rank, world, device = init_group(own.device)
    try:
        gen = torch.Generator().manual_seed(args.seed)
        batches = [recall.make_batch(args, gen, "cpu") for _ in range(args.steps)]
        modes = MODES if own.mode == "both" else (own.mode,)
        runs = {}
        for mode in modes:
            if rank == 0:
                print(f"== {mode}: {world} rank(s), {args.batch // world} sequence(s) of {args.seq_len} each", flush=True)
            runs[mode] = train(args, batches, device, mode, rank, world)
        verdict = torch.zeros(1, dtype=torch.int64, device=device)
        if rank == 0:
            print("== reference: one device, the whole global batch", flush=True)
            reference = train(args, batches, device, None, rank, world)
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            text = report(args, own, reference, runs, world, name)
            print(text)
            if own.out:
                own.out.parent.mkdir(parents=True, exist_ok=True)
                own.out.write_text(text)
                print(f"wrote {own.out}")
            verdict += 0 if compare(reference, runs, own.rtol)[0] else 3
        dist.broadcast(verdict, src=0)  # the other ranks wait here for the reference run
        # Drop the wrapped models (and the collectives' work objects they hold) and let every rank's
        # pending collectives finish before the group goes: gloo's worker threads otherwise may still
        # hold tensors at interpreter exit, which aborted rank 0 now and then (SIGABRT, "terminate
        # called without an active exception") after a passing run. Not on an error: a rank that
        # failed would never reach the barrier.
        gc.collect()
        dist.barrier()
        return int(verdict.item())
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
