"""The gated sum of NSA's three branches: ``o = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa``.

:func:`gate_sum` checks its inputs and runs either

* **the kernels** (``fsagen/kernels/gate.py`` behind ``fsagen::gate_sum``, ``fsagen.ops_gate``):
  when the outputs and the gates share one dtype, bf16 or fp16, on a CUDA device or the CPU (the
  ``cpu`` schedule), with a head dim the device's schedule covers. One pass over memory each way:
  the forward reads the three outputs and writes o; the backward reads dO and the three outputs
  and writes their gradients. The sum is formed in float32 and rounded once.
* **torch** otherwise (e.g. float32 gates, which make a float32 sum): the same formula in the
  gates' dtype, as elementwise torch ops.

The functions below ``gate_sum`` are the kernels' dispatch glue (inputs already checked and
contiguous); they read no value on the host, so the launches are capturable in a CUDA graph.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fsagen.errors import ScheduleError, UnsupportedSpec
from fsagen.validate import check_tensor, fail

KERNEL_DTYPES = (torch.bfloat16, torch.float16)
BRANCH_NAMES = ("o_cmp", "o_slc", "o_swa")


def gate_sum(o_cmp: Tensor, o_slc: Tensor, o_swa: Tensor, gates: Tensor) -> Tensor:
    """``o [N, Hq, D] = sum_b gates[..., b] * o_b`` in the gates' dtype.

    o_cmp, o_slc, o_swa: ``[N, Hq, D]``, one floating dtype, on one device. gates: ``[N, Hq, 3]``
    (per token and head) or ``[N, 3]`` (per token), floating, same device, branches in the order
    cmp, slc, swa. Differentiable with respect to all four. Non-contiguous inputs are copied.
    """
    _check(o_cmp, o_slc, o_swa, gates)
    if _kernel_runs(o_cmp, gates):
        from fsagen import ops_gate  # noqa: F401  (registers torch.ops.fsagen.gate_sum)

        return torch.ops.fsagen.gate_sum(o_cmp.contiguous(), o_slc.contiguous(), o_swa.contiguous(),
                                         gates.contiguous())
    g = (gates if gates.dim() == 3 else gates[:, None, :]).unsqueeze(-1)  # [N, Hq or 1, 3, 1]
    dt = gates.dtype
    return g[:, :, 0] * o_cmp.to(dt) + g[:, :, 1] * o_slc.to(dt) + g[:, :, 2] * o_swa.to(dt)


def _check(o_cmp, o_slc, o_swa, gates) -> None:
    for name, t in zip(BRANCH_NAMES, (o_cmp, o_slc, o_swa)):
        check_tensor(name, t)
        if not t.dtype.is_floating_point:
            fail(TypeError, name, "dtype must be floating point", t.dtype)
        if t.dim() != 3:
            fail(ValueError, name, "must be 3-D [N, Hq, D]", f"shape {tuple(t.shape)}")
        if t.shape != o_cmp.shape:
            fail(ValueError, name, f"shape must equal o_cmp's {tuple(o_cmp.shape)}", f"shape {tuple(t.shape)}")
        if t.dtype != o_cmp.dtype:
            fail(TypeError, name, f"dtype must equal o_cmp's {o_cmp.dtype}", t.dtype)
        if t.device != o_cmp.device:
            fail(ValueError, name, f"must be on o_cmp's device {o_cmp.device}", t.device)
    check_gates(gates, o_cmp, "o_cmp")


def check_gates(gates, like: Tensor, like_name: str) -> None:
    """``gates``: floating ``[N, Hq, 3]`` or ``[N, 3]`` on the device of ``like`` ``[N, Hq, ...]``
    (named ``like_name`` in the errors)."""
    check_tensor("gates", gates)
    if not gates.dtype.is_floating_point:
        fail(TypeError, "gates", "dtype must be floating point", gates.dtype)
    if gates.device != like.device:
        fail(ValueError, "gates", f"must be on {like_name}'s device {like.device}", gates.device)
    n, hq = like.shape[:2]
    if tuple(gates.shape) not in ((n, hq, 3), (n, 3)):
        fail(ValueError, "gates", f"shape must be [N={n}, Hq={hq}, 3] or [N={n}, 3]", f"shape {tuple(gates.shape)}")


def _kernel_runs(o_cmp, gates) -> bool:
    device = o_cmp.device
    if device.type not in ("cuda", "cpu") or o_cmp.dtype not in KERNEL_DTYPES or gates.dtype != o_cmp.dtype:
        return False
    index = 0 if device.type == "cpu" else device.index if device.index is not None else torch.cuda.current_device()
    return _kernels_cover(device.type, index, o_cmp.dtype, o_cmp.shape[2])


@torch.compiler.assume_constant_result  # decided at trace time under torch.compile, not traced
def _kernels_cover(device_type: str, device_index: int, dtype: torch.dtype, head_dim: int) -> bool:
    from fsagen.schedule import detect_arch
    from fsagen.validate import _plan_of as plan_of  # the schedule's plan, memoised
    from fsagen.validate import dtype_name

    arch = detect_arch(torch.device(device_type, device_index))
    try:
        for phase in ("fwd", "bwd"):
            plan_of(arch, _spec(phase, head_dim, dtype_name(dtype)))
    except (UnsupportedSpec, ScheduleError):  # no kernel for this head dim, or no schedule for this GPU
        return False
    return True


def _spec(phase: str, head_dim: int, dtype: str):
    from fsagen.spec import KernelSpec

    return KernelSpec("gate", phase, G=1, D=head_dim, block_size=0, topk=0, dtype=dtype)


def _kernel(phase, o_cmp):
    from fsagen.glue import plan_and_kernel
    from fsagen.validate import dtype_name

    kern, _ = plan_and_kernel(_spec(phase, o_cmp.shape[2], dtype_name(o_cmp.dtype)), device=o_cmp.device)
    return kern


def _rows_per_gate(o_cmp, gates) -> int:
    return o_cmp.shape[1] if gates.dim() == 2 else 1


def forward(o_cmp, o_slc, o_swa, gates):
    """o ``[N, Hq, D]`` (the kernels' glue: checked, contiguous inputs of one bf16 / fp16 dtype)."""
    from fsagen.glue import alloc

    n, hq, d = o_cmp.shape
    o = alloc(o_cmp.shape, o_cmp.dtype, o_cmp.device)
    if n * hq == 0:
        return o
    _kernel("fwd", o_cmp)["gate_fwd"](o_cmp.view(-1, d), o_slc.view(-1, d), o_swa.view(-1, d), gates.view(-1, 3),
                                      o.view(-1, d), _rows_per_gate(o_cmp, gates))
    return o


def backward(do, o_cmp, o_slc, o_swa, gates):
    """(d_cmp, d_slc, d_swa, d_gates); the gates' gradient is reduced in float32 (over the heads
    of per-token gates) and returned in their dtype."""
    from fsagen.glue import alloc

    n, hq, d = o_cmp.shape
    grads = [alloc(o_cmp.shape, o_cmp.dtype, o_cmp.device) for _ in range(3)]
    dg = alloc((n * hq, 3), torch.float32, o_cmp.device)
    if n * hq == 0:
        return (*grads, torch.zeros_like(gates))
    _kernel("bwd", o_cmp)["gate_bwd"](do.view(-1, d), o_cmp.view(-1, d), o_slc.view(-1, d), o_swa.view(-1, d),
                                      gates.view(-1, 3), *(t.view(-1, d) for t in grads), dg,
                                      _rows_per_gate(o_cmp, gates))
    dg = dg.view(n, hq, 3)
    if gates.dim() == 2:
        dg = dg.sum(1)
    return (*grads, dg.to(gates.dtype))
