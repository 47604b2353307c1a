"""Float64 PyTorch oracles of the sliding-window (swa) branch, the gates, and the whole NSA mix.

Semantics: ../shared/DESIGN.md section 2.  Same packed varlen layout and error convention as
:mod:`fsagen.reference_cmp` (``ValueError("<argument>: <rule>, got <value>")``).

* :func:`swa_reference` -- causal sliding-window attention; query t sees keys
  ``[t - window_size + 1, t]`` of its own sequence.
* :func:`gates_reference` -- ``sigmoid(x @ weight.T + bias)``, per (token, head) or per token.
* :func:`gate_combine_reference` -- ``g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa``.
* :func:`nsa_attention_reference` -- compression, cmp attention, block selection, slc attention,
  swa and the gated sum, built from the branch oracles of :mod:`fsagen.reference_cmp` and
  :mod:`fsagen.reference` rather than re-derived here.

Branch order along the last gate axis is :data:`BRANCHES` = ``("cmp", "slc", "swa")``.
Everything is plain autograd, so ``torch.autograd.grad`` gives the reference gradients.
"""

from __future__ import annotations

import math
import numbers

import torch

from fsagen.reference import slc_reference
from fsagen.reference_cmp import (
    COMPRESS_KINDS,
    cmp_attention_reference,
    compress_reference,
    select_blocks_reference,
)
from fsagen.reference_common import check_int, check_ndim, fail, masked_softmax_attention, seq_bounds

__all__ = [
    "BRANCHES",
    "swa_reference",
    "gates_reference",
    "gate_combine_reference",
    "nsa_attention_reference",
]

BRANCHES = ("cmp", "slc", "swa")

# The keyword parameters compress_reference takes besides the compression kind.
_COMPRESSION_PARAM_NAMES = ("weight", "proj_k", "proj_v", "pos_emb")

# Queries per swa chunk: a chunk holds Hq x C x (C + window - 1) float64 scores, so memory is
# bounded by the window rather than by the sequence length.
_SWA_CHUNK = 256


# --------------------------------------------------------------------------- argument checks


def _check_qkv(q, k, v) -> tuple[int, int, int]:
    """Check q ``[N, Hq, D]``, k ``[N, Hkv, D]``, v ``[N, Hkv, Dv]`` with Hkv dividing Hq.

    Returns ``(N, Hq, Hkv)``.
    """
    check_ndim("q", q, 3, "[N, Hq, D]")
    check_ndim("k", k, 3, "[N, Hkv, D]")
    check_ndim("v", v, 3, "[N, Hkv, Dv]")
    n, hq, d = q.shape
    hkv = k.shape[1]
    if k.shape[0] != n or k.shape[2] != d:
        fail("k", f"must be [N={n}, Hkv, D={d}] like q", f"shape {tuple(k.shape)}")
    if hkv == 0 or hq % hkv != 0:
        fail("k", f"number of kv heads must divide q's Hq={hq}", f"Hkv={hkv}")
    if v.shape[:2] != k.shape[:2]:
        fail("v", f"must be [N={n}, Hkv={hkv}, Dv] like k", f"shape {tuple(v.shape)}")
    return n, hq, hkv


def _check_scale(scale) -> None:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        fail("scale", "must be a float or None", type(scale).__name__)


def _check_gates(gates, n: int, hq: int) -> None:
    """gates must be ``[N, Hq, 3]`` (per token and head) or ``[N, 3]`` (per token)."""
    if not isinstance(gates, torch.Tensor):
        fail("gates", "must be a torch.Tensor", type(gates).__name__)
    if tuple(gates.shape) not in ((n, hq, 3), (n, 3)):
        fail("gates", f"shape must be [N={n}, Hq={hq}, 3] or [N={n}, 3]", f"shape {tuple(gates.shape)}")


def _check_same_shape(name: str, t, like: torch.Tensor, like_name: str) -> None:
    if not isinstance(t, torch.Tensor):
        fail(name, "must be a torch.Tensor", type(t).__name__)
    if t.shape != like.shape:
        fail(name, f"shape must equal {like_name}'s {tuple(like.shape)}", f"shape {tuple(t.shape)}")


def _compression_kwargs(compression, compression_params) -> dict:
    """The keyword arguments for :func:`compress_reference`, checked under this API's names.

    Parameter-specific errors (a missing or wrong-shaped ``weight``, ...) are raised by
    :func:`compress_reference` itself and name the key of ``compression_params``.
    """
    if compression not in COMPRESS_KINDS:
        fail("compression", f"must be one of {list(COMPRESS_KINDS)}", repr(compression))
    params = {} if compression_params is None else compression_params
    if not isinstance(params, dict):
        fail("compression_params", "must be a dict or None", type(params).__name__)
    unknown = sorted(set(params) - set(_COMPRESSION_PARAM_NAMES))
    if unknown:
        fail("compression_params", f"keys must be among {list(_COMPRESSION_PARAM_NAMES)}", unknown)
    return dict(params)


# --------------------------------------------------------------------------- swa


def _window_visible(q_start: int, q_end: int, k_start: int, k_end: int, window_size: int, device):
    """``[q_end - q_start, k_end - k_start]`` bool: query t sees key j iff ``t - window < j <= t``."""
    t = torch.arange(q_start, q_end, device=device)[:, None]
    j = torch.arange(k_start, k_end, device=device)[None, :]
    return (j <= t) & (j > t - window_size)


def _swa_sequence(q, k, v, window_size: int, scale: float):
    """swa of one sequence (``q [L, Hq, D]``, k/v ``[L, Hkv, *]``), by chunks of queries."""
    outs, lses = [], []
    length = q.shape[0]
    for c0 in range(0, length, _SWA_CHUNK):
        c1 = min(length, c0 + _SWA_CHUNK)
        k0 = max(0, c0 - window_size + 1)  # the first key the chunk's first query sees
        visible = _window_visible(c0, c1, k0, c1, window_size, q.device)
        o, lse, _ = masked_softmax_attention(q[c0:c1], k[k0:c1], v[k0:c1], visible, scale)
        outs.append(o)
        lses.append(lse)
    return outs, lses


def swa_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    window_size: int,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 causal sliding-window attention over packed varlen sequences.

    Window convention: the query at position t of a sequence sees the keys at positions
    ``[t - window_size + 1, t]`` of the same sequence, i.e. exactly ``window_size`` keys (itself
    included) once ``t >= window_size - 1`` and ``t + 1`` keys before.  ``window_size = 1`` is
    attention to the token itself (``o = v[t]``); ``window_size >= L`` is full causal attention.
    (Some implementations count ``window_size`` keys *before* the query, ``window_size + 1`` in all;
    that is not this convention.)

    Args: q ``[N, Hq, D]``, k ``[N, Hkv, D]``, v ``[N, Hkv, Dv]`` (query head h reads kv head
    ``h // (Hq / Hkv)``), cu_seqlens int ``[B + 1]``, window_size >= 1, scale (default
    ``1/sqrt(D)``).

    Returns ``(o [N, Hq, Dv], lse [N, Hq])`` float64; every query sees at least itself, so lse
    is finite.  Differentiable with respect to q, k, v.
    """
    n, hq, _ = _check_qkv(q, k, v)
    check_int("window_size", window_size, 1)
    _check_scale(scale)
    bounds = seq_bounds(cu_seqlens, n)
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else float(scale)
    q64, k64, v64 = q.double(), k.double(), v.double()
    outs = [q64.new_zeros(0, hq, v.shape[2])]  # keeps torch.cat happy when N = 0
    lses = [q64.new_zeros(0, hq)]
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        o, lse = _swa_sequence(q64[s0:s1], k64[s0:s1], v64[s0:s1], window_size, scale)
        outs += o
        lses += lse
    return torch.cat(outs), torch.cat(lses)


# --------------------------------------------------------------------------- gates


def gates_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    per_head: bool = True,
) -> torch.Tensor:
    """Gate values ``sigmoid(x @ weight.T + bias)`` in float64.

    x ``[N, hidden]``.  per_head=True: weight ``[Hq * 3, hidden]``, output ``[N, Hq, 3]``; row
    ``h * 3 + b`` of weight gives head h's gate of branch ``BRANCHES[b]``.  per_head=False:
    weight ``[3, hidden]``, output ``[N, 3]`` (one gate per token and branch, shared by all heads).
    bias, optional, is ``[weight.shape[0]]``.  Differentiable with respect to x, weight, bias.
    """
    check_ndim("x", x, 2, "[N, hidden]")
    check_ndim("weight", weight, 2, "[Hq * 3, hidden]" if per_head else "[3, hidden]")
    rows, hidden = weight.shape
    if hidden != x.shape[1]:
        fail("weight", f"must have x's hidden={x.shape[1]} columns", f"shape {tuple(weight.shape)}")
    if per_head and (rows == 0 or rows % len(BRANCHES) != 0):
        fail("weight", "must have Hq * 3 rows (per_head=True)", f"shape {tuple(weight.shape)}")
    if not per_head and rows != len(BRANCHES):
        fail("weight", "must have 3 rows (per_head=False)", f"shape {tuple(weight.shape)}")
    logits = x.double() @ weight.double().T
    if bias is not None:
        check_ndim("bias", bias, 1, f"[{rows}]")
        if bias.shape[0] != rows:
            fail("bias", f"must have weight's {rows} rows", f"shape {tuple(bias.shape)}")
        logits = logits + bias.double()
    g = torch.sigmoid(logits)
    return g.reshape(x.shape[0], rows // len(BRANCHES), len(BRANCHES)) if per_head else g


def gate_combine_reference(
    o_cmp: torch.Tensor, o_slc: torch.Tensor, o_swa: torch.Tensor, gates: torch.Tensor
) -> torch.Tensor:
    """``g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa`` in float64.

    The branch outputs are ``[N, Hq, Dv]``; gates ``[N, Hq, 3]`` (per token and head) or ``[N, 3]``
    (per token, the same for every head), branches in :data:`BRANCHES` order.  Differentiable
    with respect to all four inputs.
    """
    check_ndim("o_cmp", o_cmp, 3, "[N, Hq, Dv]")
    _check_same_shape("o_slc", o_slc, o_cmp, "o_cmp")
    _check_same_shape("o_swa", o_swa, o_cmp, "o_cmp")
    n, hq, _ = o_cmp.shape
    _check_gates(gates, n, hq)
    g = gates.double()
    if g.dim() == 2:
        g = g[:, None, :]
    g = g[..., None]  # [N, Hq or 1, 3, 1]: broadcast over the head dim of v
    return g[:, :, 0] * o_cmp.double() + g[:, :, 1] * o_slc.double() + g[:, :, 2] * o_swa.double()


# --------------------------------------------------------------------------- the whole mix


def nsa_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    kernel_size: int,
    stride: int,
    block_size: int,
    topk: int,
    init_blocks: int,
    local_blocks: int,
    window_size: int,
    compression: str = "mean",
    compression_params: dict | None = None,
    scale: float | None = None,
    return_parts: bool = False,
):
    """Float64 Native Sparse Attention: the three branches and their gated sum.

    1. k, v are compressed (:func:`compress_reference`, kind ``compression``, its tensors in
       ``compression_params``: ``weight`` for "weighted"; ``proj_k``, ``proj_v`` and optional
       ``pos_emb`` for "linear").
    2. cmp attention of q over the compressed keys (:func:`cmp_attention_reference`).
    3. Block selection from cmp's probabilities (:func:`select_blocks_reference`).  The
       selection is integer-valued: it is computed from detached probabilities and no gradient
       flows through it (nor through the scores that produced it).
    4. slc attention over the selected blocks (:func:`fsagen.reference.slc_reference`).
    5. swa attention (:func:`swa_reference`).
    6. ``o = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa`` (:func:`gate_combine_reference`).

    All branches share ``scale`` (default ``1/sqrt(D)``).  Args as in those functions: q
    ``[N, Hq, D]``, k ``[N, Hkv, D]``, v ``[N, Hkv, Dv]``, gates ``[N, Hq, 3]`` or ``[N, 3]``.

    Returns o ``[N, Hq, Dv]`` float64, differentiable with respect to q, k, v, gates and the
    compression parameters.  With ``return_parts=True`` returns ``(o, parts)``; parts holds
    ``o_cmp``, ``o_slc``, ``o_swa`` ``[N, Hq, Dv]``, ``lse_cmp``, ``lse_slc``, ``lse_swa``
    ``[N, Hq]`` and ``topk_idx`` int32 ``[Hkv, N, topk]``.
    """
    # Checks that the branch oracles would only reach after the expensive work, done up front.
    n, hq, hkv = _check_qkv(q, k, v)
    _check_gates(gates, n, hq)
    check_int("window_size", window_size, 1)
    _check_scale(scale)
    kwargs = _compression_kwargs(compression, compression_params)

    k_cmp, v_cmp, cu_cmp = compress_reference(k, v, cu_seqlens, kernel_size, stride, compression, **kwargs)
    o_cmp, lse_cmp, probs = cmp_attention_reference(q, k_cmp, v_cmp, cu_seqlens, cu_cmp, kernel_size, stride, scale)
    topk_idx = select_blocks_reference(
        [p.detach() for p in probs], cu_seqlens, hkv, kernel_size, stride, block_size, topk, init_blocks, local_blocks
    )
    o_slc, lse_slc = slc_reference(q, k, v, topk_idx, cu_seqlens, block_size, scale)
    o_swa, lse_swa = swa_reference(q, k, v, cu_seqlens, window_size, scale)
    o = gate_combine_reference(o_cmp, o_slc, o_swa, gates)
    if not return_parts:
        return o
    parts = {
        "o_cmp": o_cmp,
        "o_slc": o_slc,
        "o_swa": o_swa,
        "lse_cmp": lse_cmp,
        "lse_slc": lse_slc,
        "lse_swa": lse_swa,
        "topk_idx": topk_idx,
    }
    return o, parts
