"""Helpers shared by the float64 references: argument checks whose errors name the argument
(``"<arg>: <rule>, got <value>"``), and masked softmax attention over a visibility matrix."""
from __future__ import annotations

import math
import numbers

import torch

__all__ = ["fail", "check_int", "check_ndim", "check_shape", "seq_bounds", "masked_softmax_attention"]


def fail(arg: str, rule: str, got) -> None:
    raise ValueError(f"{arg}: {rule}, got {got}")


def check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        fail(name, "must be an int", type(value).__name__)
    if value < minimum:
        fail(name, f"must be >= {minimum}", value)


def check_ndim(name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        fail(name, "must be a torch.Tensor", type(t).__name__)
    if t.dim() != ndim:
        fail(name, f"must be {ndim}-D {layout}", f"shape {tuple(t.shape)}")


def check_shape(name: str, t, shape: tuple[int, ...], layout: str) -> None:
    check_ndim(name, t, len(shape), layout)
    if tuple(t.shape) != shape:
        fail(name, f"shape must be {layout} = {list(shape)}", f"shape {tuple(t.shape)}")


def seq_bounds(cu_seqlens, n: int | None, name: str = "cu_seqlens") -> list[int]:
    """The offsets of ``cu_seqlens`` as python ints, checked: 1-D, from 0, non-decreasing, to n
    (any end when n is None)."""
    check_ndim(name, cu_seqlens, 1, "[B + 1]")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
        fail(name, "must be an integer tensor", cu_seqlens.dtype)
    b = [int(x) for x in cu_seqlens.tolist()]
    if len(b) < 2:
        fail(name, "must hold B + 1 >= 2 offsets", b)
    if b[0] != 0:
        fail(name, "must start at 0", b)
    if any(y < x for x, y in zip(b[:-1], b[1:])):
        fail(name, "must be non-decreasing", b)
    if n is not None and b[-1] != n:
        fail(name, f"must end at the number of packed tokens {n}", b)
    return b


def _finite_row_max(s: torch.Tensor) -> torch.Tensor:
    """Max over the last dim (kept), 0 for rows that are empty or all ``-inf``."""
    if s.shape[-1] == 0:  # a sequence without compressed tokens; amax refuses empty dims
        return s.new_zeros(s.shape[:-1] + (1,))
    mx = s.amax(dim=-1, keepdim=True)
    return torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))


def masked_softmax_attention(q, k, v, visible, scale):
    """q ``[L, Hq, D]``, k ``[Lc, Hkv, D]``, v ``[Lc, Hkv, Dv]``, visible ``[L, Lc]``.

    Returns o ``[L, Hq, Dv]``, lse ``[L, Hq]``, p ``[Hq, L, Lc]``.  Rows that see nothing give
    o = 0, lse = -inf, p = 0 and zero (not NaN) gradients: the max used for stability is made
    finite there, so no ``-inf - -inf`` ever enters the graph.
    """
    g = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(g, dim=1)
    vv = v.repeat_interleave(g, dim=1)
    s = torch.einsum("thd,ihd->hti", q, kk) * scale
    s = s.masked_fill(~visible, -math.inf)
    mx = _finite_row_max(s.detach())
    e = torch.exp(s - mx)
    denom = e.sum(dim=-1, keepdim=True)
    seen = denom > 0
    denom_safe = torch.where(seen, denom, torch.ones_like(denom))
    p = e / denom_safe
    lse = torch.where(seen, torch.log(denom_safe) + mx, torch.full_like(mx, -math.inf)).squeeze(-1)
    o = torch.einsum("hti,ihd->thd", p, vv)
    return o, lse.transpose(0, 1), p
