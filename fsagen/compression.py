"""Production compression op of the cmp branch: k, v -> k_cmp, v_cmp, in the input dtype.

Semantics are those of :func:`fsagen.reference_cmp.compress_reference` (../shared/DESIGN.md
section 2): a sequence of length L gives ``Lc = (L - ks) // s + 1`` compressed tokens (0 if
``L < ks``), token i pooling raw tokens ``[i*s, i*s + ks)`` of its sequence.  Here the work is
vectorised over the whole packed batch in plain torch ops (so it runs on CUDA and on the CPU, and
autograd gives the backward into k, v and the parameters):

1. the first raw token of every compressed token, ``cu_seqlens[b] + i*stride``, is built on the
   device from ``cu_seqlens`` (one searchsorted over the compressed offsets);
2. one gather per tensor reads every window, laid out kv-head-major ``[Hkv, ., ., D]``;
3. pooling: mean (a float32 sum), weighted (one bmm per kv head, ``weight [1, ks]`` times the
   windows) or linear (one bmm per kv head: the window, plus ``pos_emb``, flattened window
   position first then feature, times ``proj``), so the products run on tensor cores with float32
   accumulation and the result is rounded to the input dtype once.

Sizing the outputs needs the number of compressed tokens on the host: it is read together with
the ``cu_seqlens`` value checks in one small device->host copy, the op's only synchronisation.
"""

from __future__ import annotations

import numbers

import torch

from fsagen.reference_cmp import COMPRESS_KINDS, COMPRESS_OPTIONAL, COMPRESS_REQUIRED, compress_param_shapes
from fsagen.slc_index import token_sequence
from fsagen.validate import check_tensor, fail
from fsagen.validate_dense import expected_cu_seqlens_cmp

__all__ = ["compress", "COMPRESS_DTYPES"]

COMPRESS_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


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


def _compressed_offsets(cu_seqlens: torch.Tensor, n: int, kernel_size: int, stride: int):
    """``(cu int64, cu_cmp int64, Nc)``: the compressed offsets, built on the device, and their
    total, read on the host together with the value checks of ``cu_seqlens`` (one sync)."""
    cu = cu_seqlens.long()
    cu_cmp = expected_cu_seqlens_cmp(cu, kernel_size, stride).long()
    decreasing = cu[1:] < cu[:-1]
    first, last, any_decreasing, total = torch.stack([cu[0], cu[-1], decreasing.any().long(), cu_cmp[-1]]).tolist()
    if first != 0:
        fail(ValueError, "cu_seqlens", "must start at 0", f"cu_seqlens[0]={first}")
    if any_decreasing:
        at = int(torch.nonzero(decreasing)[0, 0])
        fail(ValueError, "cu_seqlens", "must be non-decreasing", f"cu_seqlens[{at}:{at + 2}]={cu[at:at + 2].tolist()}")
    if last != n:
        fail(ValueError, "cu_seqlens", f"must end at N={n} (k.shape[0])", f"cu_seqlens[-1]={last}")
    return cu, cu_cmp, total


# --------------------------------------------------------------------------- compression


def _window_index(cu: torch.Tensor, cu_cmp: torch.Tensor, nc: int, kernel_size: int, stride: int) -> torch.Tensor:
    """int64 ``[Nc, ks]``: the packed raw tokens of every compressed token's window."""
    seq = token_sequence(cu_cmp, nc)  # sequence of each compressed token (empty ones skipped)
    pos = torch.arange(nc, device=cu.device) - cu_cmp[seq]
    first = cu[seq] + pos * stride
    return first[:, None] + torch.arange(kernel_size, device=cu.device)[None, :]


def _pool(x: torch.Tensor, index: torch.Tensor, kind: str, weight, proj, pos_emb) -> torch.Tensor:
    """Compressed ``[Nc, Hkv, Dout]`` of ``x [N, Hkv, D]`` in x's dtype (float32 accumulation).

    Windows are gathered kv-head-major: ``[Hkv, ks, Nc, D]`` for mean / weighted (the window
    position is the contracted dim, next to the heads, so weighted is one bmm over ``Nc * D``
    columns), ``[Hkv, Nc, ks, D]`` for linear (a row is one flattened window).
    """
    hkv, d = x.shape[1], x.shape[2]
    xt = x.transpose(0, 1)  # [Hkv, N, D] view; the gather reads any strides
    if kind == "linear":
        win = xt[:, index]  # [Hkv, Nc, ks, D]
        if pos_emb is not None:
            win = win + pos_emb.to(x.dtype)[:, None]
        out = torch.bmm(win.reshape(hkv, index.shape[0], index.shape[1] * d), proj.to(x.dtype))  # [Hkv, Nc, Dout]
    else:
        win = xt[:, index.t().contiguous()]  # [Hkv, ks, Nc, D]
        ks, nc = win.shape[1], win.shape[2]
        if kind == "mean":
            out = (win.sum(dim=1, dtype=torch.float32) / ks).to(x.dtype)
        else:
            out = torch.bmm(weight.to(x.dtype)[:, None, :], win.reshape(hkv, ks, nc * d)).view(hkv, nc, d)
    return out.transpose(0, 1).contiguous()


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

    Parameters may have any floating dtype; they are cast to k's dtype for the products (their
    gradients come back in their own dtype).  Inputs of any strides are accepted: the window
    gather reads them directly (it copies every window anyway), so no separate ``.contiguous()``
    copy is made.

    Memory: the gathered windows of k and v are ``kernel_size / stride`` times the size of k and v
    (autograd keeps them for the weighted and linear backward).

    Host synchronisation: the number of compressed tokens sizes the outputs, so it is read on the
    host, in one small device->host copy that also carries the value checks of ``cu_seqlens``
    (starts at 0, non-decreasing, ends at N).  Everything else stays on the device.  (Hence the
    op is not capturable in a CUDA graph and torch.compile breaks the graph there.)

    Returns ``(k_cmp [Nc, Hkv, D], v_cmp [Nc, Hkv, Dv], cu_seqlens_cmp int32 [B + 1])``, contiguous,
    in k's dtype, on k's device.  Differentiable (autograd) with respect to k, v and the parameters.

    Raises TypeError / ValueError naming the argument and the rule it broke.
    """
    _check_kernel(kernel_size, stride)
    _check_kv(k, v)
    params = {"weight": weight, "proj_k": proj_k, "proj_v": proj_v, "pos_emb": pos_emb}
    _check_params(kind, params, k, v, kernel_size)
    _check_cu_seqlens_meta(cu_seqlens, k)
    cu, cu_cmp, nc = _compressed_offsets(cu_seqlens, k.shape[0], kernel_size, stride)
    index = _window_index(cu, cu_cmp, nc, kernel_size, stride)
    k_cmp = _pool(k, index, kind, weight, proj_k, pos_emb)
    v_cmp = _pool(v, index, kind, weight, proj_v, pos_emb)
    return k_cmp, v_cmp, cu_cmp.to(torch.int32)
