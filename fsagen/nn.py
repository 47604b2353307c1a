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

Inference with a KV cache (``forward(..., cache=layer.new_cache(...))``): a prefill into empty
slots, then decode steps of one token per sequence, or a few (:func:`fsagen.decode.nsa_decode`).  The cache
pools the compression windows completed during decode with :meth:`NativeSparseAttention._compress_windows`
from the unrotated k/v rows it keeps for them, so its compressed keys are the prefill's (same kind,
parameters and rotary).  A cached call reads the per-sequence token counts on the host
(``cu_seqlens`` or the mask), once.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from pathlib import Path

import torch
from torch import Tensor, nn

from fsagen.compression import COMPRESS_DTYPES, compress
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
                return_parts: bool = False, cache=None, cache_seqs=None):
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

        With ``cache`` (an :class:`fsagen.NSAKVCache` from :meth:`new_cache`), sequence b of the
        batch is the continuation of cache slot ``cache_seqs[b]`` (default: slot b); a call is

        * a prefill when every slot is empty: the path above, then the sequences' raw k/v (rotated,
          kernel dtype), their compressed k/v (as the prefill computed them) and the source rows
          for later windows (unrotated k/v) go into the cache in one append;
        * a decode step when some slot holds a prefix: every sequence brings one new token or
          several (speculative decoding's draft tokens, or a chunk of a prompt onto its cached
          prefix), its slot holding its prefix or empty: projections, rotary at the tokens'
          positions (the slot's cached length onwards), append (the cache pools the windows they
          complete with :meth:`_compress_windows`), :func:`fsagen.decode.nsa_decode` over the
          cache with one query row per token (each sees its own prefix), gates inside it,
          output projection. ``parts`` then holds ``positions`` (and nsa_decode's parts with
          ``return_parts``). A row costs a decode's reads: long chunks are better prefilled
          whole into an empty slot.

        Packed x without ``cu_seqlens`` is one sequence, or with
        ``cache_seqs`` of B > 1 slots, B sequences of one token each (x ``[B, hidden]``).  The cache
        is checked (its geometry against the layer's, the slots, room for the new rows, its block
        tables) before anything is written; a failed call leaves it unchanged.
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
        elif attention_mask is not None:
            fail(ValueError, "attention_mask", "is for padded x [B, T, hidden]; packed x [N, hidden] takes "
                                               "cu_seqlens", "a tensor")
        if cache is not None:
            return self._cached(x, cu_seqlens, attention_mask, cache, cache_seqs, return_parts)
        if cache_seqs is not None:
            fail(ValueError, "cache_seqs", "names cache slots: pass it with cache=", cache_seqs)
        if x.dim() == 3:
            return self._padded(x, attention_mask, return_parts)
        if cu_seqlens is None:
            cu_seqlens = torch.tensor([0, x.shape[0]], dtype=torch.int32, device=x.device)
        check_tensor("cu_seqlens", cu_seqlens)  # the rest of its checks: compression's (no host read here)
        if cu_seqlens.device != x.device:
            fail(ValueError, "cu_seqlens", f"must be on x's device {x.device}", cu_seqlens.device)
        out, parts = self._packed(x, cu_seqlens)
        return (out, parts) if return_parts else out

    def _project(self, x: Tensor):
        """(q, k, v, gates, compression dtype) of packed x: q ``[N, Hq, D]``, k, v ``[N, Hkv, D]`` in the
        projections' dtype, unrotated; gates ``[N, Hq, 3]`` or ``[N, 3]``."""
        spec, n = self.spec, x.shape[0]
        q = self.q_proj(x).view(n, spec.num_q_heads, spec.head_dim)
        k = self.k_proj(x).view(n, spec.num_kv_heads, spec.head_dim)
        v = self.v_proj(x).view(n, spec.num_kv_heads, spec.head_dim)
        g = torch.sigmoid(self.g_proj(x))
        gates = g.view(n, spec.num_q_heads, 3) if spec.gate == "per_head" else g
        work = q.dtype if q.dtype in COMPRESS_DTYPES else torch.float32  # compress takes bf16 / fp16 / fp32
        return q, k, v, gates, work

    def _compress_rotated(self, k: Tensor, v: Tensor, cu: Tensor, starts: Tensor | None = None):
        """(k_cmp, v_cmp, cu_cmp) of unrotated k, v in the compression dtype: the layer's compression
        kind and parameters, then rotary of each compressed key at its window start.  ``starts``
        (int64, every window's start position, in order) when known: no host read, and the windows
        are those of the spans in ``cu`` (the KV cache's hook, :meth:`_compress_windows`)."""
        spec, params = self.spec, dict(self.compression_params)
        if starts is None:
            k_cmp, v_cmp, cu_cmp = compress_kv(k, v, cu, spec.kernel_size, spec.stride, spec.compression, params)
        else:
            k_cmp, v_cmp, cu_cmp = compress(k, v, cu, spec.kernel_size, spec.stride, spec.compression, **params,
                                            num_compressed=starts.shape[0], check_values=False)
        if self.rope_theta is not None:
            if starts is None:
                starts = token_positions(cu_cmp, k_cmp.shape[0])[0] * spec.stride
            k_cmp = rotary(k_cmp, starts, self.rope_theta)
        return k_cmp, v_cmp, cu_cmp

    def _compress_windows(self, k: Tensor, v: Tensor, cu_seqlens: Tensor, starts: Tensor):
        """The KV cache's ``compress_fn`` (:meth:`new_cache`): compressed k, v of windows of unrotated
        source rows, exactly as the prefill computes them (:meth:`_compress_rotated`)."""
        return self._compress_rotated(k, v, cu_seqlens, starts)[:2]

    def _packed(self, x: Tensor, cu: Tensor, on_rows=None) -> tuple[Tensor, dict]:
        """Prefill of packed x; ``on_rows(k, v, k_cmp, v_cmp, k_src, v_src)``, when given, receives the
        rows a KV cache keeps (kernel dtype; ``k_src``, ``v_src`` unrotated in the compression dtype)
        after the attention ran."""
        spec, n = self.spec, x.shape[0]
        q, k, v, gates, work = self._project(x)
        k_src, v_src = k.to(work), v.to(work)
        k_cmp, v_cmp, cu_cmp = self._compress_rotated(k_src, v_src, cu)
        if self.rope_theta is not None:
            pos = token_positions(cu, n)[0]
            q, k = rotary(q, pos, self.rope_theta), rotary(k, pos, self.rope_theta)
        kd = self.kernel_dtype
        k, v, k_cmp, v_cmp = k.to(kd), v.to(kd), k_cmp.to(kd), v_cmp.to(kd)
        o, parts = nsa_attention_from_compressed(
            q.to(kd), k, v, k_cmp, v_cmp, gates, cu, cu_cmp,
            kernel_size=spec.kernel_size, stride=spec.stride, block_size=spec.block_size, topk=spec.topk,
            init_blocks=spec.init_blocks, local_blocks=spec.local_blocks, window_size=spec.window_size,
            return_parts=True, check_values=False)
        parts["cu_seqlens"] = cu
        if on_rows is not None:
            on_rows(k, v, k_cmp, v_cmp, k_src, v_src)
        return self.o_proj(o.reshape(n, spec.num_q_heads * spec.head_dim).to(q.dtype)), parts

    def _padded(self, x: Tensor, mask: Tensor | None, return_parts: bool):
        b, t, h = x.shape
        if mask is None:  # every token real: B sequences of T, no packing needed (and no host read)
            out, parts = self._packed(x.reshape(b * t, h), torch.arange(b + 1, dtype=torch.int32, device=x.device) * t)
            return (out.view(b, t, -1), parts) if return_parts else out.view(b, t, -1)
        cu, index = self._mask_packing(x, mask)
        out, parts = self._packed(x.reshape(b * t, h)[index], cu)
        return self._unpack(out, parts, index, x.shape, return_parts)

    def _mask_packing(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """:func:`_packing` of a checked ``attention_mask`` for padded x."""
        b, t, h = x.shape
        check_tensor("attention_mask", mask)
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            fail(TypeError, "attention_mask", "dtype must be torch.bool or an integer type (1 = real token, "
                                              "0 = padding)", mask.dtype)
        if tuple(mask.shape) != (b, t):
            fail(ValueError, "attention_mask", f"shape must be [B, T] = {[b, t]} like x's first dims",
                 f"shape {tuple(mask.shape)}")
        if mask.device != x.device:
            fail(ValueError, "attention_mask", f"must be on x's device {x.device}", mask.device)
        return _packing(mask)

    @staticmethod
    def _unpack(out: Tensor, parts: dict, index: Tensor, shape, return_parts: bool):
        """Packed rows back to padded ``[B, T, hidden]`` (padding 0)."""
        b, t, _ = shape
        full = out.new_zeros(b * t, out.shape[-1]).index_copy(0, index, out).view(b, t, -1)
        parts["packed_index"] = index
        return (full, parts) if return_parts else full

    # ----------------------------------------------------------------------- KV cache (inference)

    def new_cache(self, batch: int, max_len: int, *, page_size: int | None = None, num_pages: int | None = None,
                  device=None, source_dtype: torch.dtype = torch.float32):
        """An empty :class:`fsagen.NSAKVCache` for ``batch`` sequences of up to ``max_len`` tokens that
        this layer can fill and read (``forward(..., cache=...)``): its kv heads, head dim and
        compression windows, the kernel dtype, on the parameters' device (or ``device``).

        ``page_size``: rows per page, dividing ``block_size`` (decode reads a selected block as whole
        pages); default ``gcd(64, block_size)``.  ``num_pages``: default enough for every slot at
        ``max_len``.  The cache pools each compression window the way the prefill does: from the
        *unrotated* k/v rows in the compression dtype (kept in a per-slot ring of ``kernel_size`` rows
        in ``source_dtype``, float32 by default, which holds bf16 / fp16 / fp32 rows exactly), with
        this layer's compression kind and parameters (read when the window completes), then rotary
        at the window start: :meth:`_compress_windows`."""
        from fsagen.kv_cache import NSAKVCache

        spec = self.spec
        check_int("batch", batch, 1)
        check_int("max_len", max_len, 1)
        if page_size is None:
            page_size = math.gcd(64, spec.block_size)
        check_int("page_size", page_size, 1)
        if spec.block_size % page_size:
            fail(ValueError, "page_size", f"must divide block_size={spec.block_size} (decode reads a selected "
                                          "block as whole pages)", page_size)
        if num_pages is None:
            num_pages = batch * -(-max_len // page_size)
        device = self.q_proj.weight.device if device is None else device
        return NSAKVCache(batch, num_pages, page_size, max_len, spec.num_kv_heads, spec.head_dim, spec.head_dim,
                          kernel_size=spec.kernel_size, stride=spec.stride, dtype=self.kernel_dtype, device=device,
                          compress_fn=self._compress_windows, source_dtype=source_dtype)

    def _check_cache(self, cache) -> None:
        from fsagen.kv_cache import NSAKVCache

        if not isinstance(cache, NSAKVCache):
            fail(TypeError, "cache", "must be an fsagen.NSAKVCache (layer.new_cache(...))", type(cache).__name__)
        spec = self.spec
        want = {"num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim, "v_head_dim": spec.head_dim,
                "kernel_size": spec.kernel_size, "stride": spec.stride, "dtype": self.kernel_dtype,
                "device": self.q_proj.weight.device}
        for name, value in want.items():
            if getattr(cache, name) != value:
                fail(ValueError, "cache", f"{name} must be {value}, the layer's (build it with layer.new_cache)",
                     getattr(cache, name))
        if spec.block_size % cache.page_size:
            fail(ValueError, "cache", f"page_size must divide block_size={spec.block_size} (decode reads a "
                                      "selected block as whole pages)", cache.page_size)
        hook = cache.compress_fn
        if getattr(hook, "__self__", None) is not self or \
                getattr(hook, "__func__", None) is not NativeSparseAttention._compress_windows or \
                cache.source_dtype is None:
            fail(ValueError, "cache", "must pool its windows from this layer's unrotated keys with this layer's "
                                      "compression and rotary: build it with this layer's new_cache()",
                 "a cache built otherwise")

    def _cached(self, x: Tensor, cu: Tensor | None, mask: Tensor | None, cache, cache_seqs, return_parts: bool):
        """forward with a KV cache: checks, then a prefill or a decode step (see forward)."""
        self._check_cache(cache)
        index = None
        if x.dim() == 3:
            b, t, h = x.shape
            if mask is None:
                cu = torch.arange(b + 1, dtype=torch.int32, device=x.device) * t
            else:
                cu, index = self._mask_packing(x, mask)
            xp = x.reshape(b * t, h) if index is None else x.reshape(b * t, h)[index]
            counts = [t] * b if mask is None else torch.diff(cu).tolist()
        else:
            xp = x
            if cu is None:
                n, b = x.shape[0], 1 if cache_seqs is None else len(cache_seqs)
                if b != 1 and n != b:
                    fail(ValueError, "x", f"without cu_seqlens is one sequence, or one token for each of the "
                                          f"{b} cache_seqs", f"{n} rows")
                counts = [n] if b == 1 else [1] * b
                cu = torch.arange(b + 1, dtype=torch.int32, device=x.device) * (n // b)
            else:
                counts = _host_counts(cu, x)
        seqs = _cache_slots(cache, cache_seqs, len(counts))
        held = [cache.lengths[s] for s in seqs]
        decode = any(held)
        if decode and not all(counts):
            i = counts.index(0)
            fail(ValueError, "cache", f"a decode step brings every sequence at least one token; slot {seqs[i]} gets 0",
                 f"counts {counts} onto lengths {held}")
        cache.check_append(seqs, counts)
        if decode:
            out, parts = self._decode(xp, cache, seqs, counts, return_parts)
        else:
            def write(k, v, k_cmp, v_cmp, k_src, v_src):
                cache.append(seqs, k, v, counts, source=(k_src, v_src), compressed=(k_cmp, v_cmp))

            out, parts = self._packed(xp, cu, on_rows=write)
        if x.dim() == 3:
            if index is None:
                return (out.view(x.shape[0], x.shape[1], -1), parts) if return_parts else \
                    out.view(x.shape[0], x.shape[1], -1)
            return self._unpack(out, parts, index, x.shape, return_parts)
        return (out, parts) if return_parts else out

    def _decode(self, x: Tensor, cache, seqs: list[int], counts: list[int], return_parts: bool) -> tuple[Tensor, dict]:
        """``counts[i]`` new tokens of slot ``seqs[i]`` (x ``[sum(counts), hidden]``, packed in that
        order) through the cache: appended, then decoded as query rows that each see their own
        prefix (``nsa_decode`` rows; at most ``DECODE_ROWS`` per launch)."""
        from fsagen import decode

        spec = self.spec
        q, k, v, gates, work = self._project(x)
        pos = torch.tensor([cache.lengths[s] + t for s, c in zip(seqs, counts) for t in range(c)], dtype=torch.int64,
                           device=x.device)
        k_src, v_src = k.to(work), v.to(work)
        if self.rope_theta is not None:
            q, k = rotary(q, pos, self.rope_theta), rotary(k, pos, self.rope_theta)
        kd = self.kernel_dtype
        cache.append(seqs, k.to(kd), v.to(kd), counts, source=(k_src, v_src))
        rows = [s for s, c in zip(seqs, counts) for _ in range(c)]
        outs, chunks = [], []
        for r0 in range(0, len(rows), DECODE_ROWS):
            r1 = r0 + DECODE_ROWS
            res = decode.nsa_decode(q[r0:r1].to(kd), cache, rows[r0:r1], gates[r0:r1], block_size=spec.block_size,
                                    topk=spec.topk, init_blocks=spec.init_blocks, local_blocks=spec.local_blocks,
                                    window_size=spec.window_size, return_parts=return_parts)
            o, part = res if return_parts else (res, {})
            outs.append(o)
            chunks.append(part)
        o = torch.cat(outs) if len(outs) > 1 else outs[0]
        parts = {name: torch.cat([c[name] for c in chunks], dim=1 if name == "topk_idx" else 0)
                 for name in chunks[0]} if len(chunks) > 1 else chunks[0]
        parts = dict(parts, positions=pos)
        return self.o_proj(o.reshape(len(rows), spec.num_q_heads * spec.head_dim).to(q.dtype)), parts


# Query rows per nsa_decode launch on the layer's cache path (its score buffer is rows x Hq x the
# cache's compressed capacity in float32): a long chunk onto a prefix is decoded in pieces.
DECODE_ROWS = 256


def _host_counts(cu: Tensor, x: Tensor) -> list[int]:
    """Tokens per sequence of packed x, read from ``cu_seqlens`` on the host (checked)."""
    check_tensor("cu_seqlens", cu)
    if cu.device != x.device:
        fail(ValueError, "cu_seqlens", f"must be on x's device {x.device}", cu.device)
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.shape[0] < 2:
        fail(ValueError, "cu_seqlens", "must be int32 [B + 1] with B >= 1", f"{cu.dtype} {tuple(cu.shape)}")
    offsets = cu.tolist()
    if offsets[0] != 0 or offsets[-1] != x.shape[0] or any(b < a for a, b in zip(offsets, offsets[1:])):
        fail(ValueError, "cu_seqlens", f"must run non-decreasing from 0 to N={x.shape[0]}", offsets)
    return [b - a for a, b in zip(offsets, offsets[1:])]


def _cache_slots(cache, cache_seqs, batch: int) -> list[int]:
    """The cache slots of the batch's sequences (checked: ints in range, distinct, one per sequence)."""
    seqs = list(range(batch)) if cache_seqs is None else cache_seqs
    if isinstance(seqs, Tensor):
        seqs = seqs.tolist()
    if not isinstance(seqs, (list, tuple, range)) or len(seqs) != batch:
        fail(ValueError, "cache_seqs", f"must list one cache slot per sequence of the batch ({batch})", seqs)
    seqs = [cache._slot(s) for s in seqs]  # IndexError out of range
    if len(set(seqs)) != len(seqs):
        fail(ValueError, "cache_seqs", "must not repeat a slot", seqs)
    return seqs


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
