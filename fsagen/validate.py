"""Input validation of the slc op: every error names the argument and the rule it broke.

Checks fall in three tiers:

1. metadata (types, dtypes, devices, ndim, shapes): free, always done, also under torch.compile
   (symbolic shapes only add guards);
2. schedule support (block size, head dim, G, topk): asks ``fsagen.schedule`` whether a plan
   exists, so the rule lives in one place (the schedule files) and ``UnsupportedSpec`` from there
   propagates unchanged; skipped when the arch is unknown (a CPU tensor and no ``arch=``);
3. values of ``cu_seqlens`` and ``topk_idx``: these need a host synchronisation, so they run only
   when ``check_index_values`` is true *and* the call is eager: never during CUDA-graph capture,
   on fake/meta tensors, or while torch.compile traces (see :func:`index_checks_possible`).

Non-contiguous tensors are accepted here; :func:`fsagen.ops.selected_attention` copies them with
``.contiguous()`` before calling the op (the kernels assume packed row-major layouts, and a copy
is cheaper than a second set of strided kernels).
"""

from __future__ import annotations

import functools
import math
import numbers

import torch

__all__ = ["check_slc_inputs", "index_checks_possible", "SUPPORTED_DTYPES", "dtype_name", "fail", "check_tensor",
           "check_cu_seqlens", "check_scale", "check_plans", "device_arch"]

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def dtype_name(dtype: torch.dtype) -> str:
    """The spec's name of a torch dtype ("bfloat16" / "float16")."""
    return _DTYPE_NAMES[dtype]


def _is_plain(t: torch.Tensor) -> bool:
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type != "meta"


def index_checks_possible(*tensors: torch.Tensor) -> bool:
    """Whether reading tensor values on the host is allowed right now.

    False while torch.compile / dynamo traces, for fake, meta or other subclass tensors (e.g.
    FakeTensor, FunctionalTensor under make_fx), and while the current CUDA stream is capturing
    a graph (a host sync there would invalidate the capture).
    """
    if torch.compiler.is_compiling():
        return False
    if not all(_is_plain(t) for t in tensors):
        return False
    if any(t.device.type == "cuda" for t in tensors) and torch.cuda.is_current_stream_capturing():
        return False
    return True


def fail(kind, arg: str, rule: str, got) -> None:
    raise kind(f"{arg}: {rule}, got {got}")


def check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        fail(TypeError, name, "must be a torch.Tensor", type(t).__name__)


def _check_metadata(q, k, v, topk_idx, cu_seqlens, block_size, scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("topk_idx", topk_idx), ("cu_seqlens", cu_seqlens)):
        check_tensor(name, t)
    if q.dtype not in SUPPORTED_DTYPES:
        fail(TypeError, "q", "dtype must be torch.bfloat16 or torch.float16", q.dtype)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            fail(TypeError, name, f"dtype must equal q's dtype {q.dtype}", t.dtype)
    for name, t in (("topk_idx", topk_idx), ("cu_seqlens", cu_seqlens)):
        if t.dtype != torch.int32:
            fail(TypeError, name, "dtype must be torch.int32", t.dtype)
    for name, t in (("k", k), ("v", v), ("topk_idx", topk_idx), ("cu_seqlens", cu_seqlens)):
        if t.device != q.device:
            fail(ValueError, name, f"must be on q's device {q.device}", t.device)
    for name, t, nd, layout in (
        ("q", q, 3, "[N, Hq, D]"),
        ("k", k, 3, "[N, Hkv, D]"),
        ("v", v, 3, "[N, Hkv, Dv]"),
        ("topk_idx", topk_idx, 3, "[Hkv, N, topk]"),
        ("cu_seqlens", cu_seqlens, 1, "[B + 1]"),
    ):
        if t.dim() != nd:
            fail(ValueError, name, f"must be {nd}-D {layout}", f"shape {tuple(t.shape)}")
    n, hq, d = q.shape
    hkv = k.shape[1]
    if k.shape[0] != n:
        fail(ValueError, "k", f"must have N={n} tokens like q (dim 0)", f"shape {tuple(k.shape)}")
    if hkv == 0 or hq % hkv != 0:
        fail(ValueError, "k", f"number of kv heads must divide q's Hq={hq}", f"Hkv={hkv}")
    if k.shape[2] != d:
        fail(ValueError, "k", f"head dim must equal q's D={d}", f"shape {tuple(k.shape)}")
    if v.shape[:2] != k.shape[:2]:
        fail(ValueError, "v", f"must be [N={n}, Hkv={hkv}, Dv] like k", f"shape {tuple(v.shape)}")
    if v.shape[2] != d:
        # The kernels read K and V rows with one head dim (KernelSpec has a single D).
        fail(ValueError, "v", f"head dim Dv must equal D={d} (the slc kernels use one head dim)", f"Dv={v.shape[2]}")
    if topk_idx.shape[0] != hkv or topk_idx.shape[1] != n or topk_idx.shape[2] < 1:
        fail(ValueError, "topk_idx", f"shape must be [Hkv={hkv}, N={n}, topk >= 1]", f"shape {tuple(topk_idx.shape)}")
    if cu_seqlens.shape[0] < 2:
        fail(ValueError, "cu_seqlens", "must hold B + 1 >= 2 offsets", f"shape {tuple(cu_seqlens.shape)}")
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral):
        fail(TypeError, "block_size", "must be an int", type(block_size).__name__)
    if block_size <= 0:
        fail(ValueError, "block_size", "must be positive", block_size)
    check_scale(scale)


def check_scale(scale) -> None:
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            fail(TypeError, "scale", "must be a float or None", type(scale).__name__)
        if not math.isfinite(scale) or scale == 0:
            fail(ValueError, "scale", "must be finite and non-zero", scale)


@functools.lru_cache(maxsize=256)
def _plan(arch: str, phase: str, G: int, D: int, block_size: int, topk: int, dtype: str):
    from fsagen.schedule import load_schedule  # lazy: written by another part, loads TOML
    from fsagen.spec import KernelSpec

    spec = KernelSpec(branch="slc", phase=phase, G=G, D=D, block_size=block_size, topk=topk, dtype=dtype)
    return load_schedule(arch).plan(spec)


@functools.lru_cache(maxsize=512)
def _plan_of(arch: str, spec):
    from fsagen.schedule import load_schedule

    return load_schedule(arch).plan(spec)


def check_plans(device: torch.device, specs, arch: str | None = None) -> None:
    """Raise ``UnsupportedSpec`` (from the schedule) unless every KernelSpec in ``specs`` has a
    plan on ``arch`` (default: the arch of ``device``; nothing is checked for a non-CUDA device
    and no ``arch``). Skipped while torch.compile traces (the plans were checked eagerly)."""
    if torch.compiler.is_compiling():
        return
    arch = arch or device_arch(device)
    if arch is None:
        return
    for spec in specs:
        _plan_of(arch, spec)


def device_arch(device: torch.device) -> str | None:
    """The schedule arch name (e.g. "sm90") of a CUDA device; None for other devices."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def _check_schedule(q, k, topk_idx, block_size, arch, phases) -> None:
    arch = arch or device_arch(q.device)
    if arch is None:
        return
    G, D = q.shape[1] // k.shape[1], q.shape[2]
    for phase in phases:
        _plan(arch, phase, int(G), int(D), int(block_size), int(topk_idx.shape[2]), dtype_name(q.dtype))


def check_cu_seqlens(cu_seqlens: torch.Tensor, n: int) -> None:
    cu = cu_seqlens.long()
    first, last, decreasing = torch.stack([cu[0], cu[-1], (cu[1:] < cu[:-1]).any().long()]).tolist()
    if first != 0:
        fail(ValueError, "cu_seqlens", "must start at 0", f"cu_seqlens[0]={first}")
    if decreasing:
        at = int(torch.nonzero(cu[1:] < cu[:-1])[0, 0])
        fail(ValueError, "cu_seqlens", "must be non-decreasing", f"cu_seqlens[{at}:{at + 2}]={cu[at:at + 2].tolist()}")
    if last != n:
        fail(ValueError, "cu_seqlens", f"must end at N={n} (q.shape[0])", f"cu_seqlens[-1]={last}")


def _check_topk_values(topk_idx: torch.Tensor, cu_seqlens: torch.Tensor, block_size: int) -> None:
    from fsagen.slc_index import token_positions

    n = topk_idx.shape[1]
    _, seq_len = token_positions(cu_seqlens, n)
    nblk = (seq_len + block_size - 1) // block_size  # [N] blocks of the token's sequence
    idx = topk_idx.long()
    too_low = idx < -1
    too_high = idx >= nblk[None, :, None]
    # Rows as select_blocks writes them (valid entries strictly ascending, then -1 padding) hold no
    # duplicates: that elementwise test spares the row sort (~0.2 ms at N = 65536) unless it fails.
    valid = idx >= 0
    ordered = ((idx[..., 1:] > idx[..., :-1]) | ~valid[..., 1:]) & (valid[..., :-1] | ~valid[..., 1:])
    flags = torch.stack([too_low.any(), too_high.any(), ordered.all()]).tolist()
    dup = torch.zeros_like(idx, dtype=torch.bool)
    if not flags[2]:
        srt = torch.sort(idx, dim=-1).values
        dup[..., 1:] = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
        flags[2] = bool(dup.any())
    else:
        flags[2] = False
    rules = (
        (too_low, "entries must be >= -1 (-1 is padding)"),
        (too_high, "entries must be < the number of blocks of the query's sequence"),
        (dup, "valid (>= 0) entries must be distinct within a row"),
    )
    for flag, (bad, rule) in zip(flags, rules):
        if flag:
            h, t = (int(x) for x in torch.nonzero(bad.any(-1))[0])
            row = topk_idx[h, t].tolist()
            got = f"row [kv head {h}, token {t}] = {row} (sequence has {int(nblk[t])} blocks)"
            fail(ValueError, "topk_idx", rule, got)


def check_slc_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    topk_idx: torch.Tensor,
    cu_seqlens: torch.Tensor,
    block_size: int,
    scale: float | None,
    *,
    check_index_values: bool = True,
    arch: str | None = None,
    phases: tuple[str, ...] = ("fwd",),
) -> None:
    """Raise TypeError/ValueError (or ``fsagen.errors.UnsupportedSpec``) for bad slc inputs.

    ``arch`` overrides the detected arch (for CPU tests of the schedule check); ``phases`` lists
    the kernel phases that must have a plan (``("fwd", "bwd")`` when a backward will follow).
    """
    _check_metadata(q, k, v, topk_idx, cu_seqlens, block_size, scale)
    if not torch.compiler.is_compiling():
        _check_schedule(q, k, topk_idx, block_size, arch, phases)
    if check_index_values and index_checks_possible(q, k, v, topk_idx, cu_seqlens):
        check_cu_seqlens(cu_seqlens, q.shape[0])
        _check_topk_values(topk_idx, cu_seqlens, block_size)
