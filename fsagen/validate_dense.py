"""Input validation of the cmp, swa and selection ops: every error names the argument and the rule.

Same three tiers as :mod:`fsagen.validate` (metadata always; schedule support when the arch is
known; values of ``cu_seqlens`` / ``cu_seqlens_cmp`` only when ``check_values`` is true and the
call is eager, since reading them needs a host sync).
"""

from __future__ import annotations

import numbers

import torch

from fsagen.validate import (SUPPORTED_DTYPES, check_cu_seqlens, check_plans, check_scale, check_tensor, fail,
                             index_checks_possible)

__all__ = ["check_int", "check_cmp_inputs", "check_swa_inputs", "check_select_inputs",
           "expected_cu_seqlens_cmp"]


def check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        fail(TypeError, name, "must be an int", type(value).__name__)
    if value < minimum:
        fail(ValueError, name, f"must be >= {minimum}", value)


def _check_kernel_stride(kernel_size, stride) -> None:
    check_int("kernel_size", kernel_size, 1)
    check_int("stride", stride, 1)
    if kernel_size % stride:
        fail(ValueError, "kernel_size", f"must be a multiple of stride={stride}", kernel_size)


def _check_qkv(q, k, v, k_name: str, v_name: str, same_tokens: bool) -> None:
    """q ``[N, Hq, D]``; k/v ``[Nk, Hkv, D]`` in q's dtype and device, Hkv dividing Hq."""
    for name, t in (("q", q), (k_name, k), (v_name, v)):
        check_tensor(name, t)
    if q.dtype not in SUPPORTED_DTYPES:
        fail(TypeError, "q", "dtype must be torch.bfloat16 or torch.float16", q.dtype)
    for name, t in ((k_name, k), (v_name, v)):
        if t.dtype != q.dtype:
            fail(TypeError, name, f"dtype must equal q's dtype {q.dtype}", t.dtype)
        if t.device != q.device:
            fail(ValueError, name, f"must be on q's device {q.device}", t.device)
    for name, t, layout in (("q", q, "[N, Hq, D]"), (k_name, k, "[Nk, Hkv, D]"), (v_name, v, "[Nk, Hkv, Dv]")):
        if t.dim() != 3:
            fail(ValueError, name, f"must be 3-D {layout}", f"shape {tuple(t.shape)}")
    n, hq, d = q.shape
    nk, hkv, dk = k.shape
    if same_tokens and nk != n:
        fail(ValueError, k_name, f"must have N={n} tokens like q (dim 0)", f"shape {tuple(k.shape)}")
    if hkv == 0 or hq % hkv:
        fail(ValueError, k_name, f"number of kv heads must divide q's Hq={hq}", f"Hkv={hkv}")
    if dk != d:
        fail(ValueError, k_name, f"head dim must equal q's D={d}", f"shape {tuple(k.shape)}")
    if tuple(v.shape[:2]) != (nk, hkv):
        fail(ValueError, v_name, f"must be [{nk}, {hkv}, Dv] like {k_name}", f"shape {tuple(v.shape)}")
    if v.shape[2] != d:
        fail(ValueError, v_name, f"head dim Dv must equal D={d} (the kernels use one head dim)", f"Dv={v.shape[2]}")


def _check_offsets(name: str, cu, device, batch_of=None) -> None:
    check_tensor(name, cu)
    if cu.dtype != torch.int32:
        fail(TypeError, name, "dtype must be torch.int32", cu.dtype)
    if cu.device != device:
        fail(ValueError, name, f"must be on q's device {device}", cu.device)
    if cu.dim() != 1 or cu.shape[0] < 2:
        fail(ValueError, name, "must be 1-D with B + 1 >= 2 offsets", f"shape {tuple(cu.shape)}")
    if batch_of is not None and cu.shape[0] != batch_of.shape[0]:
        fail(ValueError, name, f"must have as many offsets as cu_seqlens ({batch_of.shape[0]})", cu.shape[0])


def expected_cu_seqlens_cmp(cu_seqlens: torch.Tensor, kernel_size: int, stride: int) -> torch.Tensor:
    """int32 offsets of the compressed sequences: ``Lc = (L - ks) // s + 1`` (0 if ``L < ks``)."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    lc = torch.where(lens >= kernel_size, (lens - kernel_size) // stride + 1, 0)
    return torch.cat([lc.new_zeros(1), torch.cumsum(lc, 0)]).to(torch.int32)


def _check_cmp_offsets_values(cu_seqlens, cu_seqlens_cmp, nc, kernel_size, stride) -> None:
    want = expected_cu_seqlens_cmp(cu_seqlens, kernel_size, stride)
    if not torch.equal(want, cu_seqlens_cmp):
        fail(ValueError, "cu_seqlens_cmp",
             f"must be the compressed offsets of cu_seqlens for kernel_size={kernel_size}, stride={stride} "
             f"({want.tolist()})", cu_seqlens_cmp.tolist())
    if int(want[-1]) != nc:
        fail(ValueError, "k_cmp", f"must have cu_seqlens_cmp[-1]={int(want[-1])} rows", nc)


def _specs(branch, q, k, phases, **fields):
    from fsagen.glue import kernel_spec

    return [kernel_spec(branch, phase, q, k, **fields) for phase in phases]


def check_cmp_inputs(q, k_cmp, v_cmp, cu_seqlens, cu_seqlens_cmp, kernel_size, stride, scale, *,
                     check_values=True, arch=None, phases=("fwd",)) -> None:
    _check_qkv(q, k_cmp, v_cmp, "k_cmp", "v_cmp", same_tokens=False)
    _check_offsets("cu_seqlens", cu_seqlens, q.device)
    _check_offsets("cu_seqlens_cmp", cu_seqlens_cmp, q.device, batch_of=cu_seqlens)
    _check_kernel_stride(kernel_size, stride)
    check_scale(scale)
    check_plans(q.device, _specs("cmp", q, k_cmp, phases), arch)
    if check_values and index_checks_possible(q, k_cmp, v_cmp, cu_seqlens, cu_seqlens_cmp):
        check_cu_seqlens(cu_seqlens, q.shape[0])
        _check_cmp_offsets_values(cu_seqlens, cu_seqlens_cmp, k_cmp.shape[0], kernel_size, stride)


def check_swa_inputs(q, k, v, cu_seqlens, window_size, scale, *, check_values=True, arch=None,
                     phases=("fwd",)) -> None:
    _check_qkv(q, k, v, "k", "v", same_tokens=True)
    _check_offsets("cu_seqlens", cu_seqlens, q.device)
    check_int("window_size", window_size, 1)
    check_scale(scale)
    check_plans(q.device, _specs("swa", q, k, phases), arch)
    if check_values and index_checks_possible(q, k, v, cu_seqlens):
        check_cu_seqlens(cu_seqlens, q.shape[0])


def check_select_inputs(q, k_cmp, lse_cmp, cu_seqlens, cu_seqlens_cmp, kernel_size, stride, block_size,
                        topk, init_blocks, local_blocks, scale, *, check_values=True, arch=None) -> None:
    _check_qkv(q, k_cmp, k_cmp, "k_cmp", "k_cmp", same_tokens=False)
    check_tensor("lse_cmp", lse_cmp)
    if lse_cmp.dtype != torch.float32:
        fail(TypeError, "lse_cmp", "dtype must be torch.float32 (compressed_attention's lse)", lse_cmp.dtype)
    if lse_cmp.device != q.device:
        fail(ValueError, "lse_cmp", f"must be on q's device {q.device}", lse_cmp.device)
    if tuple(lse_cmp.shape) != tuple(q.shape[:2]):
        fail(ValueError, "lse_cmp", f"shape must be [N, Hq] = {list(q.shape[:2])}", f"shape {tuple(lse_cmp.shape)}")
    _check_offsets("cu_seqlens", cu_seqlens, q.device)
    _check_offsets("cu_seqlens_cmp", cu_seqlens_cmp, q.device, batch_of=cu_seqlens)
    _check_kernel_stride(kernel_size, stride)
    check_int("block_size", block_size, 1)
    if block_size % stride:
        fail(ValueError, "block_size", f"must be a multiple of stride={stride}", block_size)
    check_int("topk", topk, 1)
    check_int("init_blocks", init_blocks, 0)
    check_int("local_blocks", local_blocks, 0)
    if topk < init_blocks + local_blocks:
        fail(ValueError, "topk", f"must be >= init_blocks + local_blocks = {init_blocks + local_blocks}", topk)
    check_scale(scale)
    check_plans(q.device, _specs("sel", q, k_cmp, ("fwd",), block_size=block_size, topk=topk,
                                 kernel_size=kernel_size, stride=stride), arch)
    if check_values and index_checks_possible(q, k_cmp, lse_cmp, cu_seqlens, cu_seqlens_cmp):
        check_cu_seqlens(cu_seqlens, q.shape[0])
        _check_cmp_offsets_values(cu_seqlens, cu_seqlens_cmp, k_cmp.shape[0], kernel_size, stride)
