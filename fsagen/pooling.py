"""Dispatch glue of compression's pooling kernels (programs: kernels/compress.py).

Inputs are validated and contiguous (``fsagen.compression`` does that). Nothing here reads a
tensor's values on the host: the number of compressed tokens ``Nc`` is an int argument (it sizes
the outputs) and every tile table has a static length (``fsagen.tile_index.seq_tiles``), so the
launches are capturable in a CUDA graph. CPU tensors run the same programs through the ``cpu``
schedule (TileLang's C backend, ``schedules/CPU.md``).

``weight`` is float32 ``[Hkv, kernel_size]`` (``1 / kernel_size`` everywhere for mean pooling).
Memory besides the outputs: the tile tables and, for the weights' gradient, a float32 partial
sum ``[2, tiles, Hkv, kernel_size]`` (tiles ~ Nc * stride / rows).
"""
import torch

from .glue import alloc, kernel_spec, plan_and_kernel
from .tile_index import seq_tiles


def _plan(phase, k, kernel_size, stride):
    # compression has no query heads: its spec has G = 1 (k stands in for q); the schedule is k's
    # device's (a CPU tensor: the cpu schedule)
    return plan_and_kernel(kernel_spec("comp", phase, k, k, kernel_size=kernel_size, stride=stride), device=k.device)


def _cmp_tiles(plan, cu_cmp, nc, stride):
    return seq_tiles(cu_cmp, nc, plan.knob("rows") // stride)


def forward(k, v, weight, cu, cu_cmp, nc, kernel_size, stride):
    """(k_cmp ``[Nc, Hkv, D]``, v_cmp ``[Nc, Hkv, D]``) in k's dtype."""
    kern, plan = _plan("fwd", k, kernel_size, stride)
    k_cmp = alloc((nc,) + tuple(k.shape[1:]), k.dtype, k.device)
    v_cmp = alloc((nc,) + tuple(v.shape[1:]), v.dtype, v.device)
    if nc == 0:
        return k_cmp, v_cmp
    tiles = _cmp_tiles(plan, cu_cmp, nc, stride)
    kern["comp_fwd"](k, v, weight, tiles, cu, cu_cmp, k_cmp, v_cmp)
    return k_cmp, v_cmp


def backward(dk_cmp, dv_cmp, k, v, weight, cu, cu_cmp, kernel_size, stride, weight_grad):
    """(dk, dv, dweight): dk/dv by raw-row tiles (each row written once, 0 where no window covers
    it); dweight float32 ``[Hkv, kernel_size]``, zero unless ``weight_grad``."""
    kern, plan = _plan("bwd", k, kernel_size, stride)
    n, hkv = k.shape[:2]
    nc = dk_cmp.shape[0]
    dk = alloc(k.shape, k.dtype, k.device)
    dv = alloc(v.shape, v.dtype, v.device)
    dweight = torch.zeros((hkv, kernel_size), dtype=torch.float32, device=k.device)
    if n == 0 or nc == 0:
        return dk.zero_(), dv.zero_(), dweight
    raw_tiles = seq_tiles(cu, n, plan.knob("rows"))
    kern["comp_bwd_dx"](dk_cmp, dv_cmp, weight, raw_tiles, cu, cu_cmp, dk, dv)
    if weight_grad:
        tiles = _cmp_tiles(plan, cu_cmp, nc, stride)
        part = torch.zeros((2, tiles.shape[0], hkv, kernel_size), dtype=torch.float32, device=k.device)
        kern["comp_bwd_dw"](k, v, dk_cmp, dv_cmp, tiles, cu, cu_cmp, part)
        dweight = part.sum(dim=(0, 1))
    return dk, dv, dweight
