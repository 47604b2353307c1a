"""Production compression op of the cmp branch: k, v -> k_cmp, v_cmp, in the input dtype.

Semantics are those of :func:`fsagen.reference_cmp.compress_reference` (../shared/DESIGN.md
section 2): a sequence of length L gives ``Lc = (L - ks) // s + 1`` compressed tokens (0 if
``L < ks``), token i pooling raw tokens ``[i*s, i*s + ks)`` of its sequence.

Two implementations, one result:

* **kernels** (bf16 / fp16, ``Dv == D``, a (D, ks, s) the device's schedule supports; mean and
  weighted): the generated TileLang programs of ``fsagen/kernels/compress.py`` behind the
  ``fsagen::compress_pool`` op (``fsagen.ops_compress``), on a CUDA device or, for CPU tensors,
  compiled by TileLang's C backend (the ``cpu`` schedule, ``schedules/CPU.md``; serial and slow,
  for tests and debugging). Mean is weighted pooling with weights ``1 / ks``. Each tile's span of
  raw rows is read once; the backward writes every raw row once (no atomics) and reduces the
  weights' gradient in float32.
* **torch** (linear, and any other input: float32, unsupported shapes, other devices): every
  sequence is copied once, head-major, into a layout where it starts on a stride boundary, so a
  window is ``ks / s`` consecutive stride segments and the pooling is ``ks / s`` batched products
  over shifted *views* of the segments (linear: ``bmm`` with the matching rows of ``proj``; mean /
  weighted: a float32 weighted sum). No ``[Nc, ks, D]`` window gather is materialised. Linear
  stays in torch because it is a GEMM (``[Nc, ks*D] @ [ks*D, D]`` per kv head) that cuBLAS runs
  at the tensor-core rate on those views, with autograd giving its three gradients; a TileLang
  GEMM would add three kernels (forward, dX by raw rows, dW / dpos_emb reductions) for a product
  that is already on tensor cores and a copy of k that is 1x, not 2x.

Host synchronisation: sizing the outputs needs ``Nc``. By default it is read on the host together
with the value checks of ``cu_seqlens``, in one small device->host copy. Pass ``num_compressed``
(when the lengths are known on the host) with ``check_values=False``, or call during CUDA-graph
capture / torch.compile, and compression reads nothing on the host.
"""

from __future__ import annotations

import numbers

import torch

from fsagen.errors import ScheduleError, UnsupportedSpec
from fsagen.reference_cmp import COMPRESS_KINDS, COMPRESS_OPTIONAL, COMPRESS_REQUIRED, compress_param_shapes
from fsagen.slc_index import token_sequence
from fsagen.seqlens_cache import SEQLENS_CACHE
from fsagen.validate import check_tensor, fail, index_checks_possible
from fsagen.validate_dense import check_int, expected_cu_seqlens_cmp

__all__ = ["compress", "COMPRESS_DTYPES"]

COMPRESS_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
KERNEL_DTYPES = (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------- validation


def _check_kernel(kernel_size, stride) -> None:
    for name, value in (("kernel_size", kernel_size), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            fail(TypeError, name, "must be an int", type(value).__name__)
        if value < 1:
            fail(ValueError, name, "must be a positive int", value)
    if kernel_size % stride:
        fail(ValueError, "kernel_size", f"must be a multiple of stride={stride}", kernel_size)


def _check_kv(k, v) -> None:
    check_tensor("k", k)
    check_tensor("v", v)
    if k.dtype not in COMPRESS_DTYPES:
        fail(TypeError, "k", "dtype must be torch.bfloat16, torch.float16 or torch.float32", k.dtype)
    if v.dtype != k.dtype:
        fail(TypeError, "v", f"dtype must equal k's dtype {k.dtype}", v.dtype)
    if v.device != k.device:
        fail(ValueError, "v", f"must be on k's device {k.device}", v.device)
    for name, t, layout in (("k", k, "[N, Hkv, D]"), ("v", v, "[N, Hkv, Dv]")):
        if t.dim() != 3:
            fail(ValueError, name, f"must be 3-D {layout}", f"shape {tuple(t.shape)}")
    if v.shape[:2] != k.shape[:2]:
        n, hkv = k.shape[:2]
        fail(ValueError, "v", f"must be [N={n}, Hkv={hkv}, Dv] like k", f"shape {tuple(v.shape)}")


def _check_params(kind, params: dict, k, v, kernel_size: int) -> None:
    if not isinstance(kind, str) or kind not in COMPRESS_KINDS:
        fail(ValueError, "kind", f"must be one of {list(COMPRESS_KINDS)}", repr(kind))
    allowed = COMPRESS_REQUIRED[kind] + COMPRESS_OPTIONAL[kind]  # any other parameter is an error
    for name, value in params.items():
        if value is None and name in COMPRESS_REQUIRED[kind]:
            fail(ValueError, name, f"is required by kind={kind!r}", None)
        if value is not None and name not in allowed:
            fail(ValueError, name, f"is not used by kind={kind!r} (it takes {list(allowed) or 'no parameters'})",
                 "a tensor")
    d, dv = k.shape[2], v.shape[2]
    expected = compress_param_shapes(k.shape[1], kernel_size, d, dv)
    for name, value in params.items():
        if value is None:
            continue
        check_tensor(name, value)
        if not value.dtype.is_floating_point:
            fail(TypeError, name, "dtype must be floating point", value.dtype)
        if value.device != k.device:
            fail(ValueError, name, f"must be on k's device {k.device}", value.device)
        shape, layout = expected[name]
        if tuple(value.shape) != shape:
            fail(ValueError, name, f"shape must be {layout} = {list(shape)}", f"shape {tuple(value.shape)}")
    if params.get("pos_emb") is not None and dv != d:
        fail(ValueError, "pos_emb", f"is added to v too, so v's head dim must equal D={d}", f"Dv={dv}")


def _check_cu_seqlens_meta(cu_seqlens, k) -> None:
    check_tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dtype != torch.int32:
        fail(TypeError, "cu_seqlens", "dtype must be torch.int32", cu_seqlens.dtype)
    if cu_seqlens.device != k.device:
        fail(ValueError, "cu_seqlens", f"must be on k's device {k.device}", cu_seqlens.device)
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        got = f"shape {tuple(cu_seqlens.shape)}"
        fail(ValueError, "cu_seqlens", "must be 1-D [B + 1] with B + 1 >= 2 offsets", got)


def _read_total(cu_seqlens: torch.Tensor, cu_cmp: torch.Tensor, n: int) -> int:
    """Nc = ``cu_cmp[-1]``, read on the host together with the value checks of ``cu_seqlens``
    (one sync)."""
    cu = cu_seqlens.long()
    decreasing = cu[1:] < cu[:-1]
    first, last, any_decreasing, total = torch.stack([cu[0], cu[-1], decreasing.any().long(), cu_cmp[-1]]).tolist()
    if first != 0:
        fail(ValueError, "cu_seqlens", "must start at 0", f"cu_seqlens[0]={first}")
    if any_decreasing:
        at = int(torch.nonzero(decreasing)[0, 0])
        fail(ValueError, "cu_seqlens", "must be non-decreasing", f"cu_seqlens[{at}:{at + 2}]={cu[at:at + 2].tolist()}")
    if last != n:
        fail(ValueError, "cu_seqlens", f"must end at N={n} (k.shape[0])", f"cu_seqlens[-1]={last}")
    return total


# --------------------------------------------------------------------------- compression


def _num_compressed(cu_seqlens, cu_cmp, n, kernel_size, stride, num_compressed, check_values) -> int:
    """Nc: read on the host with the value checks (num_compressed None), else the given count,
    checked against the offsets when ``check_values`` and a host read is possible. The read is
    kept per ``cu_seqlens`` tensor (``fsagen.seqlens_cache``): the layers of a model after the
    first, given the same tensor, do not stop the host to wait for the GPU."""
    def read():
        return SEQLENS_CACHE.get(cu_seqlens, ("num_compressed", n, kernel_size, stride),
                                 lambda: _read_total(cu_seqlens, cu_cmp, n))

    if num_compressed is None:
        return read()
    check_int("num_compressed", num_compressed, 0)
    if check_values and index_checks_possible(cu_seqlens):
        total = read()
        if total != num_compressed:
            fail(ValueError, "num_compressed", f"must be the number of compressed tokens of cu_seqlens ({total})",
                 num_compressed)
    return int(num_compressed)


# --------------------------------------------------------------------------- kernels (mean, weighted)


def _kernel_runs(k, v, kind, kernel_size, stride) -> bool:
    """Whether the generated kernels take this call: mean / weighted pooling of bf16 / fp16 k and
    v of one head dim on a CUDA device or the CPU (TileLang's C backend), with forward and
    backward plans on the device's schedule (a CPU tensor: the ``cpu`` schedule)."""
    device = k.device
    if kind == "linear" or device.type not in ("cuda", "cpu") or k.dtype not in KERNEL_DTYPES \
            or v.shape[2] != k.shape[2]:
        return False
    index = 0 if device.type == "cpu" else device.index if device.index is not None else torch.cuda.current_device()
    return _kernels_cover(device.type, index, k.dtype, k.shape[2], kernel_size, stride)


@torch.compiler.assume_constant_result  # decided at trace time under torch.compile, not traced
def _kernels_cover(device_type: str, device_index: int, dtype: torch.dtype, head_dim: int, kernel_size: int,
                   stride: int) -> bool:
    from fsagen.schedule import detect_arch
    from fsagen.spec import KernelSpec
    from fsagen.validate import _plan_of as plan_of  # the schedule's plan, memoised
    from fsagen.validate import dtype_name

    arch = detect_arch(torch.device(device_type, device_index))  # the arch fsagen.pooling dispatches to
    try:
        for phase in ("fwd", "bwd"):
            plan_of(arch, KernelSpec("comp", phase, G=1, D=head_dim, block_size=0, topk=0, dtype=dtype_name(dtype),
                                     kernel_size=kernel_size, stride=stride))
    except (UnsupportedSpec, ScheduleError):  # no kernel for these shapes, or no schedule for this GPU
        return False
    return True


def _pool_weights(kind, weight, hkv, kernel_size, device) -> torch.Tensor:
    """float32 ``[Hkv, ks]``: the learned weights, or ``1 / ks`` for mean pooling."""
    if kind == "mean":
        return torch.full((hkv, kernel_size), 1.0 / kernel_size, dtype=torch.float32, device=device)
    return weight.float().contiguous()


# --------------------------------------------------------------------------- torch (linear, fallback)


def _segments(x, cu_seqlens, cu_cmp, nc, kernel_size, stride):
    """``(seg [Hkv, M, s, D], first [Nc])``: x copied head-major with every sequence starting on a
    stride boundary (segment m = rows ``[m*s, (m+1)*s)``; zeros between sequences and after the
    last), and the first segment of each compressed token's window. ``M = N // s + B + ks // s``
    bounds the segments without reading a value on the host; a window is ``ks // s`` consecutive
    segments, all inside its sequence."""
    n, hkv, d = x.shape
    cu = cu_seqlens.long()
    per_seq = (cu[1:] - cu[:-1] + stride - 1) // stride
    seg0 = torch.cumsum(per_seq, 0) - per_seq  # first segment of each sequence
    seq = token_sequence(cu, n)
    dest = seg0[seq] * stride + torch.arange(n, device=x.device) - cu[seq]
    cseq = token_sequence(cu_cmp, nc)
    first = seg0[cseq] + torch.arange(nc, device=x.device) - cu_cmp.long()[cseq]
    m = n // stride + (cu.numel() - 1) + kernel_size // stride
    padded = x.new_zeros((hkv, m * stride, d)).index_copy(1, dest, x.transpose(0, 1))
    return padded.view(hkv, m, stride, d), first


def _pool_torch(x, cu_seqlens, cu_cmp, nc, kernel_size, stride, kind, weight, proj, pos_emb) -> torch.Tensor:
    """Compressed ``[Nc, Hkv, Dout]`` of ``x [N, Hkv, D]`` in x's dtype: every window start of the
    segment layout is pooled from ``ks // s`` shifted views, then the Nc real windows are kept."""
    hkv, d = x.shape[1], x.shape[2]
    seg, first = _segments(x, cu_seqlens, cu_cmp, nc, kernel_size, stride)
    nu, m = kernel_size // stride, seg.shape[1]
    starts = m - nu + 1
    if kind == "linear":
        rows = seg.view(hkv, m, stride * d)
        p = proj.to(x.dtype)
        parts = p.view(hkv, nu, stride * d, p.shape[-1])
        out = sum(torch.bmm(rows[:, u:u + starts], parts[:, u]) for u in range(nu))
        if pos_emb is not None:  # (window + pos_emb) @ proj = window @ proj + pos_emb @ proj
            out = out + torch.bmm(pos_emb.to(x.dtype).reshape(hkv, 1, kernel_size * d), p)
    else:
        w = _pool_weights(kind, weight, hkv, kernel_size, x.device).view(hkv, nu, stride)
        segf = seg.float()
        out = sum(torch.einsum("hmpd,hp->hmd", segf[:, u:u + starts], w[:, u]) for u in range(nu))
    return out[:, first].transpose(0, 1).to(x.dtype).contiguous()


def compress(
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    kernel_size: int,
    stride: int,
    kind: str = "mean",
    *,
    weight: torch.Tensor | None = None,
    proj_k: torch.Tensor | None = None,
    proj_v: torch.Tensor | None = None,
    pos_emb: torch.Tensor | None = None,
    num_compressed: int | None = None,
    check_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compress k ``[N, Hkv, D]`` and v ``[N, Hkv, Dv]`` per sequence of the packed batch.

    Exactly the semantics of :func:`fsagen.reference_cmp.compress_reference`, computed in the
    input dtype (bfloat16, float16 or float32) with float32 accumulation, on k's device:

    * kind ``"mean"``: mean over each window of ``kernel_size`` raw tokens;
    * ``"weighted"``: ``weight [Hkv, kernel_size]``, a weighted sum over the window per kv head
      (the same weights for k and v);
    * ``"linear"``: ``proj_k [Hkv, kernel_size*D, D]`` and ``proj_v [Hkv, kernel_size*Dv, Dv]``
      applied to the flattened window (window position first, then feature), after adding the
      optional ``pos_emb [Hkv, kernel_size, D]`` to every window of k and of v (then ``Dv`` must
      equal ``D``).

    Compressed token i of a sequence of length L covers raw tokens ``[i*stride, i*stride +
    kernel_size)``; there are ``(L - kernel_size) // stride + 1`` of them (0 if L < kernel_size);
    ``kernel_size % stride == 0`` is required.  ``cu_seqlens`` is int32 ``[B + 1]`` on k's device.

    Mean and weighted pooling of bf16 / fp16 inputs with ``Dv == D`` (CUDA, or CPU through the
    ``cpu`` schedule) run the generated kernels (``fsagen::compress_pool``; weights in float32)
    where the schedule covers the shape; everything else runs in torch (module docstring).
    Parameters may have any floating dtype; the linear ones are cast to k's dtype for the
    products; gradients come back in each parameter's own dtype.  Inputs of any strides are
    accepted.

    Host synchronisation: the number of compressed tokens ``Nc`` sizes the outputs. With
    ``num_compressed=None`` it is read on the host, in one small device->host copy that also
    carries the value checks of ``cu_seqlens`` (starts at 0, non-decreasing, ends at N).  Give
    ``num_compressed`` (the sum over sequences of ``(L - kernel_size) // stride + 1``, 0 for
    short ones) to skip that read; it is then checked against ``cu_seqlens`` (one sync) only if
    ``check_values`` and outside CUDA-graph capture / torch.compile tracing, so with
    ``check_values=False`` compression reads nothing on the host and can be captured.

    Returns ``(k_cmp [Nc, Hkv, D], v_cmp [Nc, Hkv, Dv], cu_seqlens_cmp int32 [B + 1])``, contiguous,
    in k's dtype, on k's device.  Differentiable (autograd) with respect to k, v and the parameters.

    Raises TypeError / ValueError naming the argument and the rule it broke.
    """
    _check_kernel(kernel_size, stride)
    _check_kv(k, v)
    params = {"weight": weight, "proj_k": proj_k, "proj_v": proj_v, "pos_emb": pos_emb}
    _check_params(kind, params, k, v, kernel_size)
    _check_cu_seqlens_meta(cu_seqlens, k)
    cu_cmp = SEQLENS_CACHE.get(cu_seqlens, ("cu_seqlens_cmp", kernel_size, stride),
                               lambda: expected_cu_seqlens_cmp(cu_seqlens, kernel_size, stride))
    nc = _num_compressed(cu_seqlens, cu_cmp, k.shape[0], kernel_size, stride, num_compressed, check_values)
    if _kernel_runs(k, v, kind, kernel_size, stride):
        from fsagen import ops_compress  # noqa: F401  (registers torch.ops.fsagen.compress_pool)

        w = _pool_weights(kind, weight, k.shape[1], kernel_size, k.device)
        k_cmp, v_cmp = torch.ops.fsagen.compress_pool(k.contiguous(), v.contiguous(), w, cu_seqlens.contiguous(),
                                                      cu_cmp, nc, kernel_size, stride)
        return k_cmp, v_cmp, cu_cmp
    pool = (cu_seqlens, cu_cmp, nc, kernel_size, stride, kind, weight)
    k_cmp = _pool_torch(k, *pool, proj_k, pos_emb)
    v_cmp = _pool_torch(v, *pool, proj_v, pos_emb)
    return k_cmp, v_cmp, cu_cmp
