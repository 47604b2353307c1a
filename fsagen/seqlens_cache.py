"""Tables derived from ``cu_seqlens`` alone, kept while that very tensor lives unmodified.

Every kernel launch of a layer needs some table of the packed batch's layout: tile tables
(``tile_index.seq_tiles``), the slc token layout (``slc_index.token_layout``), the compressed
offsets (``compression.compress``). Each is up to ~20 small
torch ops, and a layer's forward + backward built ~15 of them from the same ``cu_seqlens``; at
short sequences those host launches, not the GPU, set the pace. A model passes the same
``cu_seqlens`` tensor to every layer, so the tables are built once per tensor here.

An entry is keyed by the tensor's storage (weakly: it goes when the storage does) and checked
against the tensor's offset, shape, strides and version counter (every in-place write bumps it),
so a table is never used for other values; a kept table that is a tensor is also checked for
writes of its own (``compress`` hands its ``cu_seqlens_cmp`` to the caller). Nothing is cached
where that cannot be checked or where a cached tensor would be unsafe: inference tensors and
inference mode (no version counter), meta tensors, while ``torch.compile`` traces, and during
CUDA-graph capture (a table allocated in the graph's pool holds its values only during replays,
and a graph must own the tables it reads, since an entry dies with its ``cu_seqlens``).

CUDA tables are kept per stream: one made on stream A and read by kernels on stream B could be
freed (when its ``cu_seqlens`` dies) and handed to a new allocation on A while B still reads it.

Writes that bypass torch (through a numpy view of the same memory, a raw pointer) move no version
counter and are not seen: after such a write pass a new tensor, or call ``SEQLENS_CACHE.clear()``.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch.utils.weak import WeakIdKeyDictionary


def tensor_place(t: torch.Tensor) -> tuple:
    """Where a tensor sits in its storage, and the version counter that every in-place write bumps."""
    return t.storage_offset(), tuple(t.shape), tuple(t.stride()), t._version


def tensor_fingerprint(t: torch.Tensor) -> tuple:
    """What identifies a tensor's values without reading them: its storage (weakly: a dead storage
    matches nothing) and its ``tensor_place`` in it."""
    return weakref.ref(t.untyped_storage()), tensor_place(t)


def same_tensor(fingerprint: tuple, t: torch.Tensor) -> bool:
    storage, place = fingerprint
    return storage() is t.untyped_storage() and place == tensor_place(t)


def cacheable(cu_seqlens: torch.Tensor) -> bool:
    """Whether tables of ``cu_seqlens`` may be kept and reused now (module doc)."""
    if torch.compiler.is_compiling():  # first: dynamo cannot trace the inference-mode queries
        return False
    if cu_seqlens.device.type == "meta" or cu_seqlens.is_inference() or torch.is_inference_mode_enabled():
        return False
    return not (cu_seqlens.is_cuda and torch.cuda.is_current_stream_capturing())


def _unchanged(kept: tuple) -> bool:
    """A kept tensor that its users may hold (``compress`` returns its ``cu_seqlens_cmp``) must not
    have been written since: its version counter says."""
    value, version = kept
    return version is None or value._version == version


class SeqlensCache:
    """``get(cu_seqlens, key, build)``: ``build()``'s table for this ``cu_seqlens`` tensor and
    ``key`` (the table's kind and its other arguments), built once while the tensor lives
    unmodified."""

    def __init__(self):
        self._by_storage = WeakIdKeyDictionary()

    def get(self, cu_seqlens: torch.Tensor, key: tuple, build: Callable[[], object]):
        if not cacheable(cu_seqlens):
            return build()
        storage = cu_seqlens.untyped_storage()
        place = tensor_place(cu_seqlens)
        entry = self._by_storage.get(storage)
        if entry is None or entry[0] != place:  # new tensor, or written in place: start over
            entry = (place, {})
            self._by_storage[storage] = entry
        tables = entry[1]
        if cu_seqlens.is_cuda:  # a table is reused on the stream that made it only (module doc)
            key = (*key, torch.cuda.current_stream(cu_seqlens.device).stream_id)
        kept = tables.get(key)
        if kept is None or not _unchanged(kept):
            value = build()
            kept = tables[key] = (value, value._version if isinstance(value, torch.Tensor) else None)
        return kept[0]

    def clear(self) -> None:
        self._by_storage = WeakIdKeyDictionary()

    def __len__(self) -> int:
        return sum(len(entry[1]) for entry in self._by_storage.values())


SEQLENS_CACHE = SeqlensCache()
