"""Train a small decoder-only model built on NativeSparseAttention on synthetic associative recall.

Task (multi-query associative recall over long sequences): every sequence of ``--seq-len`` tokens
(default 8192) starts with ``--pairs`` key-value pairs ``k1 v1 k2 v2 ...`` (distinct keys), then
noise tokens, then ``--queries`` queries at the very end, each a key of the pairs followed by its
value.  The loss is the cross-entropy of predicting the value after each query key (those
positions only); a query sits about ``seq_len`` tokens after its pair, far outside the sliding
window, so only the compressed and selected branches can answer it.  Chance accuracy is
``1 / --values``.

Model: token embedding, ``--layers`` blocks of ``x += NSA(RMSNorm(x)); x += MLP(RMSNorm(x))``,
a final RMSNorm and a linear LM head.  Parameters are float32; the step runs under bf16 autocast
(the NSA kernels run in bf16).  A batch is ``--batch`` sequences packed into one varlen batch
(``cu_seqlens``).

``--attention dense`` swaps the NSA layer for plain causal attention (same projections, rotary, torch
SDPA) as a control: if the dense model learns the task with the same data and optimiser and the
NSA model does not, the difference is the layer's, not the task's.

Prints the loss and accuracy every ``--log-every`` steps and writes ``loss.csv`` and (when
matplotlib is importable) ``loss.png`` to ``--out``.

    python examples/train_recall.py --out runs/recall

Needs a CUDA GPU.  The kernels come from the AOT build (``fsagen build --arch sm90``; the default
sizes here are in the default grid) or are JIT-compiled into the user cache on the first step, which
can take minutes once; the first step's time is printed apart.  Sizing of the defaults (estimated
from bench/results, not measured end to end): 2 layers x 32K tokens a step, a few tens of ms a step
on an H100, so the 1500 steps take on the order of a minute after the kernels are loaded.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fsagen import NativeSparseAttention
from fsagen.nn import rotary
from fsagen.slc_index import token_positions


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/train_recall"), help="output directory")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=4, help="sequences per step (packed)")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4, help="query heads")
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--kernel-size", type=int, default=32)
    p.add_argument("--stride", type=int, default=16)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--compression", default="mean", choices=["mean", "weighted", "linear"])
    p.add_argument("--attention", default="nsa", choices=["nsa", "dense"],
                   help="dense: causal SDPA attention in place of the NSA layer (a control run)")
    p.add_argument("--pairs", type=int, default=128, help="key-value pairs at the start of a sequence")
    p.add_argument("--queries", type=int, default=128, help="queries at the end (keys of the pairs)")
    p.add_argument("--keys", type=int, default=512, help="key vocabulary size")
    p.add_argument("--values", type=int, default=256, help="value vocabulary size")
    p.add_argument("--noise", type=int, default=256, help="noise vocabulary size")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.pairs > args.keys:
        p.error(f"--pairs={args.pairs} needs at least as many keys (--keys={args.keys})")
    if args.queries > args.pairs:
        p.error(f"--queries={args.queries} must be <= --pairs={args.pairs} (each key is asked once)")
    if 2 * (args.pairs + args.queries) > args.seq_len:
        p.error(f"--seq-len={args.seq_len} must hold 2 * (pairs + queries) = {2 * (args.pairs + args.queries)}")
    return args


# --------------------------------------------------------------------------- model


class DenseCausalAttention(nn.Module):
    """The control of ``--attention dense``: GQA causal attention per packed sequence, with the
    NSA layer's projections and rotary embedding, through torch's SDPA."""

    def __init__(self, args, device=None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = args.heads, args.kv_heads, args.head_dim
        h, d = args.hidden, args.head_dim
        self.q_proj = nn.Linear(h, args.heads * d, bias=False, device=device)
        self.kv_proj = nn.Linear(h, 2 * args.kv_heads * d, bias=False, device=device)
        self.o_proj = nn.Linear(args.heads * d, h, bias=False, device=device)

    def forward(self, x, cu_seqlens):
        n, d = x.shape[0], self.head_dim
        pos, _ = token_positions(cu_seqlens, n)
        q = rotary(self.q_proj(x).view(n, self.heads, d), pos, 10000.0)
        k, v = self.kv_proj(x).view(n, 2, self.kv_heads, d).unbind(1)
        k = rotary(k, pos, 10000.0)
        out = torch.empty_like(q)
        for s in range(cu_seqlens.numel() - 1):
            a, b = int(cu_seqlens[s]), int(cu_seqlens[s + 1])
            o = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                                               is_causal=True, enable_gqa=True)
            out[a:b] = o.transpose(0, 1)
        return self.o_proj(out.reshape(n, -1))


class Block(nn.Module):
    def __init__(self, args, device=None):
        super().__init__()
        h = args.hidden
        self.attn_norm = nn.RMSNorm(h, device=device)
        if args.attention == "dense":
            self.attn = DenseCausalAttention(args, device)
        else:
            self.attn = NativeSparseAttention(
                hidden_size=h, num_q_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.head_dim,
                block_size=args.block_size, topk=args.topk, kernel_size=args.kernel_size, stride=args.stride,
                window_size=args.window, compression=args.compression, rope_theta=10000.0, device=device)
        self.mlp_norm = nn.RMSNorm(h, device=device)
        self.mlp = nn.Sequential(nn.Linear(h, 4 * h, device=device), nn.GELU(), nn.Linear(4 * h, h, device=device))

    def forward(self, x, cu_seqlens):
        x = x + self.attn(self.attn_norm(x), cu_seqlens)
        return x + self.mlp(self.mlp_norm(x))


class RecallModel(nn.Module):
    """Decoder-only LM over packed tokens ``[N]`` with offsets ``cu_seqlens``."""

    def __init__(self, args, device=None):
        super().__init__()
        self.embed = nn.Embedding(vocab_size(args), args.hidden, device=device)
        self.blocks = nn.ModuleList(Block(args, device) for _ in range(args.layers))
        self.norm = nn.RMSNorm(args.hidden, device=device)
        self.head = nn.Linear(args.hidden, vocab_size(args), bias=False, device=device)

    def forward(self, tokens, cu_seqlens, positions=None):
        """Logits ``[N, vocab]``, or only at ``positions`` (a 1-D index into the packed tokens)."""
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cu_seqlens)
        if positions is not None:
            x = x[positions]
        return self.head(self.norm(x))


def build_model(args, device="cuda") -> RecallModel:
    return RecallModel(args, device=device)


# --------------------------------------------------------------------------- data


def vocab_size(args) -> int:
    return args.keys + args.values + args.noise  # keys, then values, then noise tokens


def make_batch(args, gen: torch.Generator, device):
    """``(tokens [B*L], cu_seqlens [B+1] int32, positions, targets)``: positions are the packed
    indices of the query keys, targets the values that must follow them."""
    b, length, pairs, queries = args.batch, args.seq_len, args.pairs, args.queries
    keys = torch.argsort(torch.rand(b, args.keys, generator=gen), dim=1)[:, :pairs]  # distinct keys per row
    values = args.keys + torch.randint(0, args.values, (b, pairs), generator=gen)
    tokens = args.keys + args.values + torch.randint(0, args.noise, (b, length), generator=gen)
    tokens[:, 0:2 * pairs:2], tokens[:, 1:2 * pairs:2] = keys, values
    asked = torch.argsort(torch.rand(b, pairs, generator=gen), dim=1)[:, :queries]  # which pairs are asked
    start = length - 2 * queries
    tokens[:, start::2] = torch.gather(keys, 1, asked)
    tokens[:, start + 1::2] = torch.gather(values, 1, asked)
    rows = torch.arange(b)[:, None] * length
    positions = (rows + start + 2 * torch.arange(queries)[None, :]).flatten()  # the query keys
    targets = tokens.flatten()[positions + 1]
    cu = torch.arange(b + 1, dtype=torch.int32) * length
    return tuple(t.to(device) for t in (tokens.flatten(), cu, positions, targets))


# --------------------------------------------------------------------------- training


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train_step(model, opt, batch, step: int, args, device_type: str = "cuda"):
    """One optimiser step; returns (loss, accuracy) as tensors (no host sync here)."""
    tokens, cu, positions, targets = batch
    for group in opt.param_groups:
        group["lr"] = lr_at(step, args)
    with torch.autocast(device_type, dtype=torch.bfloat16):
        logits = model(tokens, cu, positions)
    loss = F.cross_entropy(logits.float(), targets)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.detach(), (logits.argmax(-1) == targets).float().mean()


def write_outputs(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "loss.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out / 'loss.csv'}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not importable: no loss.png (the CSV has the curve)")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy at query positions")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["accuracy"] for r in rows], color="tab:orange", label="accuracy")
    ax2.set_ylabel("recall accuracy")
    ax2.set_ylim(0, 1)
    fig.legend(loc="upper right")
    ax.set_title("associative recall with NativeSparseAttention")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
    print(f"wrote {out / 'loss.png'}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("train_recall.py needs a CUDA GPU", file=sys.stderr)
        return 1
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = build_model(args, device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters; {args.batch} x {args.seq_len} tokens per step; "
          f"chance accuracy {1 / args.values:.4f}")
    rows, t0 = [], time.perf_counter()
    for step in range(args.steps):
        loss, acc = train_step(model, opt, make_batch(args, gen, "cuda"), step, args)
        if step == 0:
            torch.cuda.synchronize()
            print(f"first step (kernel loading / JIT compilation included): {time.perf_counter() - t0:.1f} s")
            t0 = time.perf_counter()
        if step % args.log_every == 0 or step == args.steps - 1:
            row = {"step": step, "loss": round(loss.item(), 5), "accuracy": round(acc.item(), 4),
                   "elapsed_s": round(time.perf_counter() - t0, 2)}
            rows.append(row)
            print(f"step {step:5d}  loss {row['loss']:.4f}  acc {row['accuracy']:.3f}  {row['elapsed_s']:.1f} s")
    write_outputs(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
