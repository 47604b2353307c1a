"""Float64 oracle of the whole :class:`fsagen.NativeSparseAttention` layer, for tests.

:func:`nsa_layer_reference` recomputes a layer's output from its parameters in float64 with the
branch oracles.  It cannot call :func:`fsagen.reference_nsa.nsa_attention_reference` as a whole:
that one compresses the keys it is given, while the layer compresses the *unrotated* keys and then
rotates each compressed key by its window start (``i * stride``), so the oracle is built from the
individual reference functions (compression, cmp attention, selection, slc, swa, gates, gated sum),
with rotary in between.  The rotary embedding here is written independently of the module's (as a
complex multiplication), so a layout mistake in either shows.

Everything is plain autograd in float64: gradients with respect to x and to the module's
parameters come out of ``torch.autograd.grad`` (``.double()`` of a float32 parameter is
differentiable; for float64 leaves pass a ``copy.deepcopy(module).double()``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fsagen.reference import slc_reference
from fsagen.reference_cmp import cmp_attention_reference, compress_reference, select_blocks_reference
from fsagen.reference_common import check_ndim, fail, seq_bounds
from fsagen.reference_nsa import gate_combine_reference, gates_reference, swa_reference

__all__ = ["nsa_layer_reference", "rotary_reference", "sequence_positions"]


def sequence_positions(cu_seqlens: torch.Tensor, n: int, step: int = 1) -> torch.Tensor:
    """int64 ``[n]``: ``step`` times each packed token's position within its own sequence."""
    bounds = seq_bounds(cu_seqlens, n)
    pos = [i * step for s0, s1 in zip(bounds[:-1], bounds[1:]) for i in range(s1 - s0)]
    return torch.tensor(pos, dtype=torch.int64, device=cu_seqlens.device)


def rotary_reference(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Float64 rotary embedding of ``x [M, H, D]``: features ``(i, i + D/2)`` form the complex number
    ``x_i + 1j * x_{i + D/2}``, multiplied by ``exp(1j * position * theta ** (-2i / D))``."""
    x = x.double()
    half = x.shape[-1] // 2
    freq = torch.tensor([theta ** (-2.0 * i / x.shape[-1]) for i in range(half)], dtype=torch.float64,
                        device=x.device)
    angle = positions.double()[:, None, None] * freq
    turned = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([turned.real, turned.imag], dim=-1)


def _linear(layer, x64: torch.Tensor) -> torch.Tensor:
    bias = None if layer.bias is None else layer.bias.double()
    return F.linear(x64, layer.weight.double(), bias)


def nsa_layer_reference(module, x: torch.Tensor, cu_seqlens: torch.Tensor, *, topk_idx: torch.Tensor | None = None,
                        return_parts: bool = False):
    """Float64 output ``[N, hidden]`` of ``module`` (a NativeSparseAttention) on packed ``x [N, hidden]``.

    Same steps as the module: projections; compression of the unrotated k, v; rotary (when the
    module has ``rope_theta``) of q and k at their positions within their sequence and of the
    compressed keys at their window starts; cmp attention; selection from cmp's probabilities
    (detached, no gradient); slc; swa; gates ``sigmoid(x Wg + bg)``; gated sum; output projection.
    One scale, ``1/sqrt(head_dim)``.

    ``topk_idx`` (int32 ``[Hkv, N, topk]``), when given, replaces the reference's own selection
    (e.g. the kernel's, from the module's ``return_parts``): near-ties in the block scores may
    legitimately select differently in float64, and with the same selection everything else is
    compared exactly.

    With ``return_parts=True`` returns ``(out, parts)``: ``o_cmp``, ``o_slc``, ``o_swa``, ``lse_*``,
    ``topk_idx`` (the one used) and ``gates``.
    """
    check_ndim("x", x, 2, "[N, hidden]")
    spec = module.spec
    n, hq, hkv, d = x.shape[0], spec.num_q_heads, spec.num_kv_heads, spec.head_dim
    if x.shape[1] != module.hidden_size:
        fail("x", f"must be [N, hidden_size={module.hidden_size}]", f"shape {tuple(x.shape)}")
    x64 = x.double()
    q = _linear(module.q_proj, x64).view(n, hq, d)
    k = _linear(module.k_proj, x64).view(n, hkv, d)
    v = _linear(module.v_proj, x64).view(n, hkv, d)
    params = {name: p.double() for name, p in module.compression_params.items()}
    ks, stride = spec.kernel_size, spec.stride
    k_cmp, v_cmp, cu_cmp = compress_reference(k, v, cu_seqlens, ks, stride, spec.compression, **params)
    if module.rope_theta is not None:
        pos = sequence_positions(cu_seqlens, n)
        q, k = rotary_reference(q, pos, module.rope_theta), rotary_reference(k, pos, module.rope_theta)
        starts = sequence_positions(cu_cmp.to(cu_seqlens.device), k_cmp.shape[0], step=stride)
        k_cmp = rotary_reference(k_cmp, starts, module.rope_theta)
    parts = {}
    parts["o_cmp"], parts["lse_cmp"], probs = cmp_attention_reference(q, k_cmp, v_cmp, cu_seqlens, cu_cmp, ks, stride)
    if topk_idx is None:
        topk_idx = select_blocks_reference([p.detach() for p in probs], cu_seqlens, hkv, ks, stride, spec.block_size,
                                           spec.topk, spec.init_blocks, spec.local_blocks)
    parts["topk_idx"] = topk_idx
    parts["o_slc"], parts["lse_slc"] = slc_reference(q, k, v, topk_idx, cu_seqlens, spec.block_size)
    parts["o_swa"], parts["lse_swa"] = swa_reference(q, k, v, cu_seqlens, spec.window_size)
    parts["gates"] = gates_reference(x64, module.g_proj.weight, module.g_proj.bias,
                                     per_head=spec.gate == "per_head")
    o = gate_combine_reference(parts["o_cmp"], parts["o_slc"], parts["o_swa"], parts["gates"])
    out = _linear(module.o_proj, o.reshape(n, hq * d))
    return (out, parts) if return_parts else out
