"""Block -> queries index for the KV-outer (FSA order) slc programs, built on the GPU.

Everything here is a fixed sequence of torch ops whose output *shapes* depend only on input
shapes, never on input values: no host synchronisation, so a whole slc forward + backward can be
captured in a CUDA graph. Sizes that depend on the data (how many queries chose a block) are
bounded instead: the work-item table has a static upper-bound length and unused rows are empty
items (``begin == end``) that the kernels skip.

Layout of the index for kv heads ``[h_lo, h_hi)``:

* entries: every valid (kv head, query token, slot) triple of ``topk_idx``, sorted by
  (kv head, query chunk, global block) with queries ascending inside a block (stable sort).
  ``ent_q`` holds the query token, ``ent_k`` the slot (position in the query's top-k row).
* items ``[NI, 4]`` int32: (kv head, first token of the KV block, entry begin, entry end). Each
  item covers at most ``entries_per_item`` entries of one (kv head, query chunk, block).

Query chunks (``query_chunk`` tokens, 0 = one chunk): CTAs run roughly in item order, so with one
chunk the CTAs in flight serve a run of blocks whose queries span the whole sequence, and the
float32 adds into o (or dq) land all over an accumulator far larger than L2 (512 MiB per kv head
at N = 65536, G = 16). Cutting the queries into chunks whose accumulator rows fit L2 keeps those
adds in L2, at the cost of loading each KV block once per chunk instead of once.
"""
import os
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .seqlens_cache import SEQLENS_CACHE, same_tensor, tensor_fingerprint


@dataclass(frozen=True)
class TokenLayout:
    """Per-token facts of a packed varlen batch, derived once per call from cu_seqlens."""

    tok_start: torch.Tensor  # int32 [N]: packed index of the token's sequence start
    tok_block_base: torch.Tensor  # int64 [N]: global index of block 0 of the token's sequence
    tok_pos: torch.Tensor  # int64 [N]: position inside its sequence
    block_first_tok: torch.Tensor  # int64 [NB]: first packed token of each global block
    num_blocks_bound: int  # NB: static bound on the number of blocks over all sequences


def token_sequence(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Index of the sequence each packed token belongs to, int64 ``[N]`` (empty sequences skipped)."""
    cu = cu_seqlens.to(torch.int64)
    tok = torch.arange(num_tokens, device=cu.device, dtype=torch.int64)
    return torch.searchsorted(cu, tok, right=True) - 1


def token_positions(cu_seqlens: torch.Tensor, num_tokens: int | None = None):
    """(position within its sequence, sequence length) of every packed token, int64 ``[N]``.

    ``num_tokens`` None reads it from ``cu_seqlens[-1]`` (a host sync)."""
    cu = cu_seqlens.to(torch.int64)
    n = int(cu[-1]) if num_tokens is None else num_tokens
    seq = token_sequence(cu, n)
    return torch.arange(n, device=cu.device) - cu[seq], (cu[1:] - cu[:-1])[seq]


def token_layout(cu_seqlens: torch.Tensor, num_tokens: int, block_size: int) -> TokenLayout:
    """The layout of a packed batch, built once per ``cu_seqlens`` tensor (``fsagen.seqlens_cache``)."""
    return SEQLENS_CACHE.get(cu_seqlens, ("token_layout", num_tokens, block_size),
                             lambda: _build_token_layout(cu_seqlens, num_tokens, block_size))


def _build_token_layout(cu_seqlens: torch.Tensor, num_tokens: int, block_size: int) -> TokenLayout:
    cu = cu_seqlens.to(torch.int64)
    batch = cu.numel() - 1
    dev = cu.device
    tok = torch.arange(num_tokens, device=dev, dtype=torch.int64)
    seq = token_sequence(cu, num_tokens)
    seq_start = cu[seq]
    lens = cu[1:] - cu[:-1]
    blocks_per_seq = (lens + block_size - 1) // block_size
    seq_block_base = torch.cumsum(blocks_per_seq, 0) - blocks_per_seq
    nb = num_tokens // block_size + batch  # >= sum(ceil(L_i / bs))
    gblk = torch.arange(nb, device=dev, dtype=torch.int64)
    blk_seq = (torch.searchsorted(seq_block_base, gblk, right=True) - 1).clamp_(0, max(batch - 1, 0))
    block_first_tok = cu[blk_seq] + (gblk - seq_block_base[blk_seq]) * block_size
    return TokenLayout(
        tok_start=seq_start.to(torch.int32),
        tok_block_base=seq_block_base[seq],
        tok_pos=tok - seq_start,
        block_first_tok=block_first_tok,
        num_blocks_bound=nb,
    )


@dataclass(frozen=True)
class BlockIndex:
    items: torch.Tensor  # int32 [NI, 4]
    ent_q: torch.Tensor  # int32 [NE]
    ent_k: torch.Tensor  # int32 [NE]


def valid_selection(topk_idx: torch.Tensor, layout: TokenLayout, block_size: int) -> torch.Tensor:
    """Entries that take part: not -1 padding and not a block after the query's own."""
    own_block = (layout.tok_pos // block_size).to(topk_idx.dtype)[None, :, None]
    return (topk_idx >= 0) & (topk_idx <= own_block)


def _index_sizes(hc: int, n: int, topk: int, nb: int, entries_per_item: int, query_chunk: int):
    """(chunk, n_chunks, n_keys, max_items) of an index; refuses sizes that overflow int32."""
    chunk = query_chunk if 0 < query_chunk < n else max(n, 1)
    n_chunks = -(-n // chunk) if n else 1
    n_keys = hc * n_chunks * nb
    if n_keys >= 2**31 - 1:
        raise ValueError(f"slc block index: {hc} kv heads x {n_chunks} query chunks x {nb} blocks "
                         f"overflow int32 sort keys; raise the chunk size (query_chunk={query_chunk})")
    if hc * n * topk >= 2**31:
        raise ValueError(f"slc block index: {hc} kv heads x {n} tokens x topk {topk} entries overflow int32")
    return chunk, n_chunks, n_keys, (hc * n * topk) // entries_per_item + n_keys


def build_block_index(topk_idx: torch.Tensor, layout: TokenLayout, block_size: int, h_lo: int,
                      entries_per_item: int, query_chunk: int = 0, stages: dict | None = None) -> BlockIndex:
    """Index of kv heads ``[h_lo, h_lo + topk_idx.shape[0])``; ``topk_idx`` is that slice.

    ``query_chunk`` > 0 groups the entries by chunks of that many query tokens first (module doc).
    ``stages``: the plan's loaded stages; their ``index_*`` programs (``fsagen/kernels/block_index.py``)
    do the steps around the sort in four launches. None: the same steps as torch ops
    (``build_block_index_torch``, equal element for element)."""
    if stages is None:
        return build_block_index_torch(topk_idx, layout, block_size, h_lo, entries_per_item, query_chunk)
    hc, n, topk = topk_idx.shape
    dev = topk_idx.device
    nb = layout.num_blocks_bound
    chunk, n_chunks, n_keys, max_items = _index_sizes(hc, n, topk, nb, entries_per_item, query_chunk)
    i32 = dict(dtype=torch.int32, device=dev)
    key = torch.empty(hc * n * topk, **i32)
    stages["index_keys"](topk_idx.contiguous(), layout.tok_pos, layout.tok_block_base, key, block_size, chunk,
                         n_chunks, nb)
    sorted_key, perm = torch.sort(key, stable=True)
    ent_q, ent_k = torch.empty_like(key), torch.empty_like(key)
    stages["index_entries"](perm, ent_q, ent_k, n, topk)
    bounds, items_per_key = torch.empty(n_keys + 1, **i32), torch.empty(n_keys, **i32)
    stages["index_bounds"](sorted_key, bounds, items_per_key, entries_per_item)
    items_end = torch.cumsum(items_per_key, 0, dtype=torch.int32)
    items = torch.empty((max_items, 4), **i32)
    stages["index_items"](items_end, bounds, layout.block_first_tok, items, h_lo, n_chunks, entries_per_item)
    return BlockIndex(items=items, ent_q=ent_q, ent_k=ent_k)


def build_block_index_torch(topk_idx: torch.Tensor, layout: TokenLayout, block_size: int, h_lo: int,
                            entries_per_item: int, query_chunk: int = 0) -> BlockIndex:
    """``build_block_index`` as torch ops (~60 launches): the oracle of the kernels' version, and
    the path of callers without loaded stages."""
    hc, n, topk = topk_idx.shape
    dev = topk_idx.device
    nb = layout.num_blocks_bound
    chunk, n_chunks, n_keys, max_items = _index_sizes(hc, n, topk, nb, entries_per_item, query_chunk)
    valid = valid_selection(topk_idx, layout, block_size)
    # Everything per entry (hc * n * topk of them) is int32, and the per-(head, token) part of the key
    # is formed first on the small [hc, n, 1] grid: the passes over the entries are few and narrow.
    head = torch.arange(hc, device=dev, dtype=torch.int64)[:, None, None]
    tok_chunk = (torch.arange(n, device=dev, dtype=torch.int64) // chunk)[None, :, None]
    key_base = ((head * n_chunks + tok_chunk) * nb + layout.tok_block_base[None, :, None]).to(torch.int32)
    # int32 keys: the radix sort does half the passes of int64
    key = (key_base + topk_idx).masked_fill_(~valid, n_keys).flatten()
    sorted_key, perm = torch.sort(key, stable=True)
    ent_k = perm.to(torch.int32)
    ent_q = torch.div(ent_k, topk, rounding_mode="floor").remainder_(n)
    ent_k.remainder_(topk)

    bounds = torch.searchsorted(sorted_key, torch.arange(n_keys + 1, device=dev, dtype=torch.int32))
    count = bounds[1:] - bounds[:-1]
    items_per_key = (count + entries_per_item - 1) // entries_per_item
    items_end = torch.cumsum(items_per_key, 0)
    item = torch.arange(max_items, device=dev, dtype=torch.int64)
    owner = torch.searchsorted(items_end, item, right=True)
    live = owner < n_keys
    owner = owner.clamp_(max=n_keys - 1)
    local = item - (items_end[owner] - items_per_key[owner])
    begin = bounds[owner] + local * entries_per_item
    end = torch.minimum(begin + entries_per_item, bounds[owner + 1])
    begin = torch.where(live, begin, 0)
    end = torch.where(live, end, 0)
    items = torch.stack(
        [h_lo + owner // (n_chunks * nb), layout.block_first_tok[owner % nb], begin, end], dim=1
    ).to(torch.int32)
    return BlockIndex(items=items.contiguous(), ent_q=ent_q, ent_k=ent_k)


def keep_forward_index() -> bool:
    """Whether kv-outer forwards keep their block index for the backward (``FSAGEN_KEEP_INDEX``,
    default 1)."""
    value = os.environ.get("FSAGEN_KEEP_INDEX", "1")
    if value not in ("0", "1"):
        raise ValueError(f"FSAGEN_KEEP_INDEX must be 0 or 1, got {value!r}")
    return value == "1"


class ForwardIndexStash:
    """Block indices of kv-outer forwards, kept for the backward of the same call.

    The backward needs the block index the forward built (same ``topk_idx``, ``cu_seqlens``,
    block size, entries per item, query chunks and kv-head chunks); rebuilding it is a sort of
    N * Hkv * topk keys and a dozen passes over them. An entry is keyed by the forward's lse
    *storage*: autograd hands the backward a new tensor object for a saved output, but the same
    storage, and the storage's Python object lives exactly as long as that memory (so the entry
    goes when the lse does: nothing grows). A lookup also checks that ``topk_idx`` and
    ``cu_seqlens`` are the forward's own tensors, unmodified (their storage, offset, shape, strides
    and version counter), so an index is never used for other values; any mismatch rebuilds.

    Memory: the index (about 4 bytes per (query, kv head, slot)) lives as long as the forward's lse,
    so a deep model keeps one per layer between its forward and backward (16 MiB a layer at
    N = 65536, Hkv = 4, topk = 16). ``FSAGEN_KEEP_INDEX=0`` trades that memory back for the
    backward's rebuild. Inference mode stashes nothing."""

    def __init__(self):
        self._by_lse = WeakIdKeyDictionary()

    def put(self, lse: torch.Tensor, topk_idx: torch.Tensor, cu_seqlens: torch.Tensor, block_size: int,
            indices: dict) -> None:
        """``indices``: {(h_lo, h_hi, entries_per_item, query_chunk): BlockIndex}."""
        if torch.is_inference_mode_enabled() or lse.device.type == "meta" or not keep_forward_index():
            return
        self._by_lse[lse.untyped_storage()] = (tensor_fingerprint(topk_idx), tensor_fingerprint(cu_seqlens),
                                               block_size, dict(indices))

    def get(self, lse: torch.Tensor, topk_idx: torch.Tensor, cu_seqlens: torch.Tensor, block_size: int) -> dict:
        """The indices of the forward that produced ``lse`` if it ran on these very inputs, else {}."""
        entry = self._by_lse.get(lse.untyped_storage())
        if entry is None:
            return {}
        topk_fp, cu_fp, bs, indices = entry
        if bs != block_size or not same_tensor(topk_fp, topk_idx) or not same_tensor(cu_fp, cu_seqlens):
            return {}
        return indices

    def __len__(self) -> int:
        return len(self._by_lse)
