"""``NativeSparseAttention``: the NSA attention layer as a ``torch.nn.Module``.

Per packed token t of hidden state ``x[t]``:

1. ``q = x Wq``, ``k = x Wk``, ``v = x Wv`` (``[Hq, D]``, ``[Hkv, D]``, ``[Hkv, D]``; bias optional);
2. compression of the *unrotated* k and v (:func:`fsagen.compress`; mean, or learned "weighted" /
   "linear" parameters held here);
3. rotary embedding (optional, ``rope_theta``; None = off), by position within the token's own
   sequence (positions restart at 0 at every ``cu_seqlens`` boundary): q and the raw k of slc and
   swa are rotated by their position t; the *compressed* keys are rotated by the position of their
   window start, ``i * stride`` for compressed token i.  Rotation does not commute with pooling
   (a mean of keys rotated by different angles is not a rotated key), so the layer pools first and
   then gives each compressed key one position, as NSA does.  v is never rotated;
4. the three branches and their gated sum (:func:`fsagen.nsa.nsa_attention_from_compressed`), with
   gates ``sigmoid(x Wg + bg)``: per (token, head) ``[N, Hq, 3]`` for ``gate = "per_head"``, per
   token ``[N, 3]`` for ``"per_token"``; branch order cmp, slc, swa;
5. ``out = o Wo`` (bias optional).

Dtypes: the projections, compression, rotary and gates run in the parameters' dtype (or autocast's);
q, k, v and the compressed keys are cast to the spec's kernel dtype (``NSASpec.dtype``, bf16 by
default) for the attention kernels; the gated sum comes back in the gates' dtype and the output in
the projections' dtype.  Keep float32 parameters (the default) for training; under autocast the
projections run in bf16.

Host synchronisation: compression reads the number of compressed tokens on the host (the op's
documented sync); padded input (``attention_mask``) adds one more, reading the number of real tokens
(with the mask checks) to size the packed batch.  Nothing else reads device values.

Meta / fake tensors: everything works shape-only (see :mod:`fsagen.nsa`); the output shape is exact.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from pathlib import Path

import torch
from torch import Tensor, nn

from fsagen.compression import COMPRESS_DTYPES
from fsagen.errors import SpecError, UnsupportedSpec
from fsagen.nsa import compress_kv, nsa_attention_from_compressed, shapes_only
from fsagen.reference_cmp import COMPRESS_OPTIONAL, COMPRESS_REQUIRED, compress_param_shapes
from fsagen.slc_index import token_positions, token_sequence
from fsagen.spec import NSASpec, read_toml
from fsagen.validate import check_tensor, fail
from fsagen.validate_dense import check_int

__all__ = ["NativeSparseAttention", "load_nsa_spec", "rotary"]

KERNEL_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(NSASpec))
_SPEC_REQUIRED = tuple(f.name for f in dataclasses.fields(NSASpec) if f.default is dataclasses.MISSING)


# --------------------------------------------------------------------------- spec


def load_nsa_spec(path: str | Path) -> NSASpec:
    """The NSASpec of the ``[nsa]`` table of a TOML file (its keys: NSASpec fields only).

    Raises ``SpecError`` naming the file, and the field where one is wrong."""
    path = Path(path)
    table = read_toml(path, error=SpecError).get("nsa")
    if not isinstance(table, dict):
        raise SpecError(f"{path}: needs an [nsa] table of NSASpec fields {list(_SPEC_FIELDS)}")
    unknown = sorted(set(table) - set(_SPEC_FIELDS))
    missing = [name for name in _SPEC_REQUIRED if name not in table]
    if unknown or missing:
        raise SpecError(f"{path}: [nsa]: unknown field(s) {unknown}, missing field(s) {missing}; NSASpec fields "
                        f"are {list(_SPEC_FIELDS)}")
    try:
        return NSASpec(**table)
    except SpecError as exc:
        raise SpecError(f"{path}: [nsa]: {exc}") from None


def _make_spec(spec, hidden_size: int, fields: dict) -> NSASpec:
    if spec is not None:
        if not isinstance(spec, NSASpec):
            fail(TypeError, "spec", "must be an NSASpec, or None with its fields as keywords", type(spec).__name__)
        if fields:
            fail(TypeError, sorted(fields)[0], "cannot be given together with spec (it is an NSASpec field)", "both")
        return spec
    unknown = sorted(set(fields) - set(_SPEC_FIELDS))
    if unknown:
        fail(TypeError, unknown[0], f"is neither an argument of NativeSparseAttention nor an NSASpec field "
                                    f"{list(_SPEC_FIELDS)}", "it")
    if isinstance(fields.get("dtype"), torch.dtype):
        fail(TypeError, "dtype", "is NSASpec's kernel dtype name ('bfloat16' / 'float16'); the parameters' dtype "
                                 "is param_dtype", fields["dtype"])
    fields = dict(fields)
    if "head_dim" not in fields and "num_q_heads" in fields:
        check_int("num_q_heads", fields["num_q_heads"], 1)
        if hidden_size % fields["num_q_heads"]:
            fail(ValueError, "hidden_size", f"must be a multiple of num_q_heads={fields['num_q_heads']} when "
                                            "head_dim is not given", hidden_size)
        fields["head_dim"] = hidden_size // fields["num_q_heads"]
    for name in _SPEC_REQUIRED:
        if name not in fields:
            fail(TypeError, name, "is required (an NSASpec field without a default), or pass spec=", "nothing")
    return NSASpec(**fields)


# --------------------------------------------------------------------------- rotary


def rotary(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotary embedding of ``x [M, H, D]`` (D even) at integer ``positions [M]``, computed in float32
    and returned in x's dtype: feature pair ``(i, i + D/2)`` turns by ``positions * theta**(-2i/D)``
    (the "rotate half" layout of GPT-NeoX / Llama)."""
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angle = positions.to(torch.float32)[:, None, None] * inv_freq  # [M, 1, D/2]
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


# --------------------------------------------------------------------------- the module


class NativeSparseAttention(nn.Module):
    """Native Sparse Attention layer over packed or padded batches (see the module docstring).

    Args:
        spec: an :class:`fsagen.spec.NSASpec`; or None and its fields as keywords
            (``num_q_heads``, ``num_kv_heads``, ``head_dim`` (default ``hidden_size //
            num_q_heads``), ``block_size``, ``topk``, ``kernel_size``, ``stride``, ``window_size``,
            ``init_blocks``, ``local_blocks``, ``compression``, ``gate``, ``dtype``).
        hidden_size: width of the layer's input and output.
        bias: biases of the q/k/v/o projections (the gate projection always has one).
        rope_theta: rotary base (e.g. 10000.0); None: no rotary embedding.
        device, param_dtype: of the parameters (``param_dtype`` because ``dtype`` is the spec's
            kernel dtype name).

    Parameters: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (``nn.Linear``), ``g_proj``
    (``Linear(hidden, Hq*3)`` per head, row ``h*3 + b`` = head h, branch b; ``Linear(hidden, 3)``
    per token), and ``compression_params`` (``nn.ParameterDict``, the keyword arguments of
    :func:`fsagen.compress`): ``weight [Hkv, kernel_size]`` = 1/kernel_size for "weighted";
    ``proj_k``, ``proj_v`` ``[Hkv, kernel_size*D, D]`` starting as mean pooling and
    ``pos_emb [Hkv, kernel_size, D]`` = 0 for "linear"; none for "mean".

    The kernels need ``v_head_dim == head_dim`` for now.
    """

    def __init__(self, spec: NSASpec | None = None, *, hidden_size: int, bias: bool = False,
                 rope_theta: float | None = None, device=None, param_dtype: torch.dtype | None = None,
                 **spec_fields):
        super().__init__()
        check_int("hidden_size", hidden_size, 1)
        spec = _make_spec(spec, hidden_size, spec_fields)
        if spec.v_head_dim not in (None, spec.head_dim):
            raise UnsupportedSpec(f"v_head_dim: the kernels need v_head_dim == head_dim={spec.head_dim} for now, "
                                  f"got {spec.v_head_dim}")
        if not isinstance(bias, bool):
            fail(TypeError, "bias", "must be a bool", type(bias).__name__)
        if rope_theta is not None:
            if isinstance(rope_theta, bool) or not isinstance(rope_theta, numbers.Real):
                fail(TypeError, "rope_theta", "must be a positive float or None (no rotary)", type(rope_theta).__name__)
            if not (math.isfinite(rope_theta) and rope_theta > 0):
                fail(ValueError, "rope_theta", "must be a positive finite float or None (no rotary)", rope_theta)
            if spec.head_dim % 2:
                fail(ValueError, "head_dim", "must be even for the rotary embedding (rope_theta given)", spec.head_dim)
            rope_theta = float(rope_theta)
        if param_dtype is not None and not (isinstance(param_dtype, torch.dtype) and param_dtype.is_floating_point):
            fail(TypeError, "param_dtype", "must be a floating torch.dtype (e.g. torch.float32) or None", param_dtype)
        self.spec, self.hidden_size, self.rope_theta = spec, int(hidden_size), rope_theta
        self.kernel_dtype = KERNEL_DTYPES[spec.dtype]
        hq, hkv, d = spec.num_q_heads, spec.num_kv_heads, spec.head_dim
        fk = {"device": device, "dtype": param_dtype}
        self.q_proj = nn.Linear(hidden_size, hq * d, bias=bias, **fk)
        self.k_proj = nn.Linear(hidden_size, hkv * d, bias=bias, **fk)
        self.v_proj = nn.Linear(hidden_size, hkv * d, bias=bias, **fk)
        self.o_proj = nn.Linear(hq * d, hidden_size, bias=bias, **fk)
        self.g_proj = nn.Linear(hidden_size, 3 * hq if spec.gate == "per_head" else 3, bias=True, **fk)
        shapes = compress_param_shapes(hkv, spec.kernel_size, d, d)
        names = COMPRESS_REQUIRED[spec.compression] + COMPRESS_OPTIONAL[spec.compression]
        self.compression_params = nn.ParameterDict(
            {name: nn.Parameter(torch.empty(shapes[name][0], **fk)) for name in names})
        self.reset_compression_parameters()

    @classmethod
    def from_spec_file(cls, path: str | Path, *, hidden_size: int, **kwargs) -> "NativeSparseAttention":
        """A layer from the ``[nsa]`` table of a TOML file (:func:`load_nsa_spec`); ``kwargs`` are
        the other constructor arguments (bias, rope_theta, device, param_dtype)."""
        return cls(load_nsa_spec(path), hidden_size=hidden_size, **kwargs)

    def reset_compression_parameters(self) -> None:
        """weight = 1/kernel_size; proj_k / proj_v = mean pooling; pos_emb = 0."""
        ks, d = self.spec.kernel_size, self.spec.head_dim
        with torch.no_grad():
            for name, p in self.compression_params.items():
                if name == "weight":
                    p.fill_(1.0 / ks)
                elif name == "pos_emb":
                    p.zero_()
                else:  # row j*D + e of the flattened window (position j, feature e) feeds output e
                    eye = torch.eye(d, device=p.device, dtype=p.dtype)
                    p.copy_((eye.repeat(ks, 1) / ks).expand_as(p))

    def reset_parameters(self) -> None:
        for layer in (self.q_proj, self.k_proj, self.v_proj, self.o_proj, self.g_proj):
            layer.reset_parameters()
        self.reset_compression_parameters()

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, rope_theta={self.rope_theta}, spec={self.spec}"

    # ----------------------------------------------------------------------- forward

    def forward(self, x: Tensor, cu_seqlens: Tensor | None = None, *, attention_mask: Tensor | None = None,
                return_parts: bool = False):
        """The layer's output, in the projections' dtype.

        * packed: ``x [N, hidden]`` and ``cu_seqlens`` int32 ``[B + 1]`` on x's device (None: one
          sequence of N tokens); returns ``[N, hidden]``.
        * padded: ``x [B, T, hidden]`` and ``attention_mask`` ``[B, T]``, bool or integer 0/1
          (True / 1 = real token; None: all real).  Each row's real tokens must be contiguous
          (right padding; left padding works too).  The real tokens are packed into a varlen batch,
          run, and scattered back; padded positions return 0.  Returns ``[B, T, hidden]``.

        ``return_parts=True`` returns ``(out, parts)``: the parts of :func:`fsagen.nsa_attention`
        (in the packed layout of the real tokens) plus ``cu_seqlens`` (the packed offsets) and, for
        padded input, ``packed_index`` (int64 ``[N]``: the flat index ``b*T + t`` of each packed
        token).
        """
        check_tensor("x", x)
        if not x.dtype.is_floating_point:
            fail(TypeError, "x", "dtype must be floating point", x.dtype)
        if x.dim() not in (2, 3) or x.shape[-1] != self.hidden_size:
            fail(ValueError, "x", f"must be [N, hidden_size={self.hidden_size}] (packed, with cu_seqlens) or "
                                  f"[B, T, hidden_size={self.hidden_size}] (padded, with attention_mask)",
                 f"shape {tuple(x.shape)}")
        weight = self.q_proj.weight
        autocast = x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)
        if x.dtype != weight.dtype and not autocast:
            fail(TypeError, "x", f"dtype must equal the parameters' dtype {weight.dtype} (or run under autocast)",
                 x.dtype)
        if x.device != weight.device:
            fail(ValueError, "x", f"must be on the parameters' device {weight.device}", x.device)
        if x.dim() == 3:
            if cu_seqlens is not None:
                fail(ValueError, "cu_seqlens", "is for packed x [N, hidden]; padded x [B, T, hidden] takes "
                                               "attention_mask", "a tensor")
            return self._padded(x, attention_mask, return_parts)
        if attention_mask is not None:
            fail(ValueError, "attention_mask", "is for padded x [B, T, hidden]; packed x [N, hidden] takes "
                                               "cu_seqlens", "a tensor")
        if cu_seqlens is None:
            cu_seqlens = torch.tensor([0, x.shape[0]], dtype=torch.int32, device=x.device)
        check_tensor("cu_seqlens", cu_seqlens)  # the rest of its checks: compression's (no host read here)
        if cu_seqlens.device != x.device:
            fail(ValueError, "cu_seqlens", f"must be on x's device {x.device}", cu_seqlens.device)
        out, parts = self._packed(x, cu_seqlens)
        return (out, parts) if return_parts else out

    def _packed(self, x: Tensor, cu: Tensor) -> tuple[Tensor, dict]:
        spec, n = self.spec, x.shape[0]
        hq, hkv, d = spec.num_q_heads, spec.num_kv_heads, spec.head_dim
        q = self.q_proj(x).view(n, hq, d)
        k = self.k_proj(x).view(n, hkv, d)
        v = self.v_proj(x).view(n, hkv, d)
        act = q.dtype
        work = act if act in COMPRESS_DTYPES else torch.float32  # compress takes bf16 / fp16 / fp32
        k_cmp, v_cmp, cu_cmp = compress_kv(k.to(work), v.to(work), cu, spec.kernel_size, spec.stride,
                                           spec.compression, dict(self.compression_params))
        if self.rope_theta is not None:
            pos = token_positions(cu, n)[0]
            q, k = rotary(q, pos, self.rope_theta), rotary(k, pos, self.rope_theta)
            window_start = token_positions(cu_cmp, k_cmp.shape[0])[0] * spec.stride
            k_cmp = rotary(k_cmp, window_start, self.rope_theta)
        g = torch.sigmoid(self.g_proj(x))
        gates = g.view(n, hq, 3) if spec.gate == "per_head" else g
        kd = self.kernel_dtype
        o, parts = nsa_attention_from_compressed(
            q.to(kd), k.to(kd), v.to(kd), k_cmp.to(kd), v_cmp.to(kd), gates, cu, cu_cmp,
            kernel_size=spec.kernel_size, stride=spec.stride, block_size=spec.block_size, topk=spec.topk,
            init_blocks=spec.init_blocks, local_blocks=spec.local_blocks, window_size=spec.window_size,
            return_parts=True, check_values=False)
        parts["cu_seqlens"] = cu
        return self.o_proj(o.reshape(n, hq * d).to(act)), parts

    def _padded(self, x: Tensor, mask: Tensor | None, return_parts: bool):
        b, t, h = x.shape
        if mask is None:  # every token real: B sequences of T, no packing needed (and no host read)
            out, parts = self._packed(x.reshape(b * t, h), torch.arange(b + 1, dtype=torch.int32, device=x.device) * t)
            return (out.view(b, t, -1), parts) if return_parts else out.view(b, t, -1)
        check_tensor("attention_mask", mask)
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            fail(TypeError, "attention_mask", "dtype must be torch.bool or an integer type (1 = real token, "
                                              "0 = padding)", mask.dtype)
        if tuple(mask.shape) != (b, t):
            fail(ValueError, "attention_mask", f"shape must be [B, T] = {[b, t]} like x's first dims",
                 f"shape {tuple(mask.shape)}")
        if mask.device != x.device:
            fail(ValueError, "attention_mask", f"must be on x's device {x.device}", mask.device)
        cu, index = _packing(mask)
        out, parts = self._packed(x.reshape(b * t, h)[index], cu)
        full = out.new_zeros(b * t, out.shape[-1]).index_copy(0, index, out).view(b, t, -1)
        parts["packed_index"] = index
        return (full, parts) if return_parts else full


def _packing(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(cu_seqlens int32 ``[B + 1]``, index int64 ``[N]``) packing the real tokens of ``mask [B, T]``:
    packed token p is flat token ``index[p] = b*T + t``.  One host sync reads N and the checks
    (0/1 values, one run of real tokens per row); shape-only tensors give every token instead."""
    b, t = mask.shape
    real = mask if mask.dtype == torch.bool else mask != 0
    if shapes_only(mask):
        cu = torch.arange(b + 1, device=mask.device, dtype=torch.int32) * t
        return cu, torch.arange(b * t, device=mask.device)
    lens = real.sum(1)
    runs = real[:, :1].sum(1) + (real[:, 1:] & ~real[:, :-1]).sum(1)
    non_binary = ((mask != 0) & (mask != 1)).any()
    total, split, bad_value = torch.stack([lens.sum(), (runs > 1).any().long(), non_binary.long()]).tolist()
    if bad_value:
        fail(ValueError, "attention_mask", "values must be 0 (padding) or 1 (real token)",
             sorted(set(mask.unique().tolist()))[:8])
    if split:
        row = int(torch.nonzero(runs > 1)[0, 0])
        fail(ValueError, "attention_mask", "each row's real tokens must be contiguous (right padding)",
             f"row {row} with {int(runs[row])} runs")
    cu = torch.cat([lens.new_zeros(1), lens.cumsum(0)]).to(torch.int32)
    seq = token_sequence(cu, total)
    first = real.int().argmax(1)  # the row's first real token (argmax returns the first max)
    pos = torch.arange(total, device=mask.device) - cu.long()[seq]
    return cu, seq * t + first[seq] + pos
