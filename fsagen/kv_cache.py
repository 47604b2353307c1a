"""The KV cache of an NSA layer for a batch of sequences of different lengths.

Raw keys and values live in a *paged* pool (``[num_pages, page_size, Hkv, D]``, one block table of
page indices per sequence, as vLLM and FlashInfer lay theirs out), so sequences grow without
reserving their maximum length. Compressed keys and values (``1 / stride`` of the raw rows) are
kept per sequence slot, contiguous. A compressed token ``c`` pools raw positions
``[c*stride, c*stride + kernel_size)``: it is emitted as soon as its window is complete, from the
raw rows already in the pages, so the only state a sequence needs besides its pages is its
length.

Bookkeeping (lengths, block tables, the free-page list) is kept on the host: appending reads no
device value. The block table and the lengths are mirrored on the cache's device
(``block_table_dev``, ``lengths_dev``, refreshed by every mutating call) for the decode kernels,
which so never need a host value of the cache: a decode step can be captured in a CUDA graph. Every mutating call validates all of its inputs first and raises before touching
anything, so a failed call leaves the cache as it was.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

CompressFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def mean_compress(kernel_size: int, stride: int) -> CompressFn:
    """Mean pooling (``fsagen.compress`` kind "mean") of complete windows ``[span, Hkv, D]``."""

    def pool(k_span: torch.Tensor, v_span: torch.Tensor):
        from fsagen.compression import compress

        cu = torch.tensor([0, k_span.shape[0]], dtype=torch.int32, device=k_span.device)
        k_cmp, v_cmp, _ = compress(k_span, v_span, cu, kernel_size, stride, "mean")
        return k_cmp, v_cmp

    return pool


class NSAKVCache:
    """Paged raw k/v plus compressed k/v for ``batch`` sequence slots.

    Args:
        batch: sequence slots (a slot is addressed by its index in every call).
        num_pages, page_size: the raw pool; a sequence of length L holds ``ceil(L / page_size)`` pages.
        max_len: the longest a sequence may grow (sizes the block tables and the compressed store).
        num_kv_heads, head_dim, v_head_dim: k ``[.., Hkv, D]``, v ``[.., Hkv, Dv]`` (Dv defaults to D).
        kernel_size, stride: the compression windows (``kernel_size % stride == 0``).
        compress_fn: pools complete windows ``k, v [span, Hkv, *]`` into their compressed tokens;
            default mean pooling. Give the layer's own (weighted, linear) to match its prefill.
    """

    def __init__(self, batch: int, num_pages: int, page_size: int, max_len: int, num_kv_heads: int,
                 head_dim: int, v_head_dim: int | None = None, *, kernel_size: int, stride: int,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                 compress_fn: CompressFn | None = None):
        for name, value in (("batch", batch), ("num_pages", num_pages), ("page_size", page_size),
                            ("max_len", max_len), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                            ("kernel_size", kernel_size), ("stride", stride)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"NSAKVCache: {name} must be an int >= 1, got {value!r}")
        if kernel_size % stride:
            raise ValueError(f"NSAKVCache: kernel_size={kernel_size} must be a multiple of stride={stride}")
        dv = head_dim if v_head_dim is None else v_head_dim
        self.batch, self.page_size, self.max_len = batch, page_size, max_len
        self.kernel_size, self.stride = kernel_size, stride
        self.num_kv_heads, self.head_dim, self.v_head_dim = num_kv_heads, head_dim, dv
        self.dtype = dtype
        self.k_pages = torch.zeros(num_pages, page_size, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.device = self.k_pages.device  # "cuda" resolved to its index, as tensors report theirs
        self.v_pages = torch.zeros(num_pages, page_size, num_kv_heads, dv, dtype=dtype, device=self.device)
        self.max_pages_per_seq = -(-max_len // page_size)
        self.block_table = torch.full((batch, self.max_pages_per_seq), -1, dtype=torch.int32)
        # the compressed store is read as pages of page_size rows too (decode attention's pool)
        self.max_cmp = -(-self.num_compressed(max_len) // page_size) * page_size
        self.k_cmp = torch.zeros(batch, self.max_cmp, num_kv_heads, head_dim, dtype=dtype, device=self.device)
        self.v_cmp = torch.zeros(batch, self.max_cmp, num_kv_heads, dv, dtype=dtype, device=self.device)
        self.lengths = [0] * batch
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out the lowest page first
        self.compress_fn = compress_fn or mean_compress(kernel_size, stride)
        # device mirrors of the bookkeeping (updated in place: captured graphs keep reading them)
        self.block_table_dev = torch.full_like(self.block_table, -1, device=self.device)
        self.lengths_dev = torch.zeros(batch, dtype=torch.int32, device=self.device)
        self._seq_index: dict[tuple, torch.Tensor] = {}

    # ------------------------------------------------------------------ sizes
    @property
    def num_pages(self) -> int:
        return self.k_pages.shape[0]

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def num_compressed(self, length: int) -> int:
        """Compressed tokens of a sequence of ``length`` raw rows (0 before the first full window)."""
        return 0 if length < self.kernel_size else (length - self.kernel_size) // self.stride + 1

    def num_compressed_dev(self, lengths: torch.Tensor) -> torch.Tensor:
        """``num_compressed`` of a tensor of lengths, on its device (no host read)."""
        return torch.where(lengths >= self.kernel_size, (lengths - self.kernel_size) // self.stride + 1, 0)

    def seq_index(self, seqs: Sequence[int]) -> torch.Tensor:
        """Slots ``seqs`` as an int64 tensor on the cache's device, memoised per list (so a decode
        step replayed from a CUDA graph creates no host tensor)."""
        key = tuple(self._slot(s) for s in seqs)
        if key not in self._seq_index:
            self._seq_index[key] = torch.tensor(key, dtype=torch.int64).to(self.device)
        return self._seq_index[key]

    def _sync_device(self) -> None:
        """Refresh the device mirrors of the block table and the lengths (in place)."""
        self.block_table_dev.copy_(self.block_table)
        self.lengths_dev.copy_(torch.tensor(self.lengths, dtype=torch.int32))

    def pages_of(self, seq: int) -> list[int]:
        row = self.block_table[self._slot(seq)]
        return [int(p) for p in row[: -(-self.lengths[seq] // self.page_size)]]

    # ------------------------------------------------------------------ checks
    def _slot(self, seq) -> int:
        if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < self.batch:
            raise IndexError(f"NSAKVCache: sequence index {seq!r} out of range [0, {self.batch})")
        return seq

    def _check_rows(self, name: str, t: torch.Tensor, dim: int) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"NSAKVCache: {name} must be a tensor, got {type(t).__name__}")
        if t.ndim != 3 or tuple(t.shape[1:]) != (self.num_kv_heads, dim):
            raise ValueError(f"NSAKVCache: {name} must be [rows, {self.num_kv_heads}, {dim}], got {tuple(t.shape)}")
        if t.dtype != self.dtype or t.device != self.device:
            raise ValueError(f"NSAKVCache: {name} must be {self.dtype} on {self.device}, got {t.dtype} on {t.device}")

    def check(self) -> None:
        """Validate the block tables against the pool and the lengths (after ``set_pages``)."""
        for seq in range(self.batch):
            need = -(-self.lengths[seq] // self.page_size)
            pages = self.block_table[seq, :need].tolist()
            bad = [p for p in pages if not 0 <= p < self.num_pages]
            if bad:
                raise ValueError(f"NSAKVCache: block table of sequence {seq} points outside the pool "
                                 f"[0, {self.num_pages}): {bad}")
        self._sync_device()

    # ------------------------------------------------------------------ writes
    def append(self, seqs: Sequence[int], k_new: torch.Tensor, v_new: torch.Tensor,
               counts: Sequence[int]) -> None:
        """Append ``counts[i]`` new rows to sequence ``seqs[i]``; ``k_new``/``v_new`` hold them packed
        in that order (``[sum(counts), Hkv, *]``). Completed compression windows are pooled at once.
        Raises (cache unchanged) on a bad index, a repeated sequence, a shape/dtype/device mismatch,
        a sequence that would exceed ``max_len``, or too few free pages."""
        seqs, counts = [self._slot(s) for s in seqs], [int(c) for c in counts]
        if len(set(seqs)) != len(seqs):
            raise ValueError(f"NSAKVCache.append: each sequence at most once per call, got {seqs}")
        if len(counts) != len(seqs) or any(c < 0 for c in counts):
            raise ValueError(f"NSAKVCache.append: counts must be one int >= 0 per sequence, got {counts}")
        self._check_rows("k_new", k_new, self.head_dim)
        self._check_rows("v_new", v_new, self.v_head_dim)
        if k_new.shape[0] != sum(counts) or v_new.shape[0] != sum(counts):
            raise ValueError(f"NSAKVCache.append: k_new/v_new must hold sum(counts)={sum(counts)} rows, "
                             f"got {k_new.shape[0]} and {v_new.shape[0]}")
        new_pages = 0
        for s, c in zip(seqs, counts):
            if self.lengths[s] + c > self.max_len:
                raise ValueError(f"NSAKVCache.append: sequence {s} would hold {self.lengths[s] + c} rows, "
                                 f"over max_len={self.max_len}")
            new_pages += -(-(self.lengths[s] + c) // self.page_size) - -(-self.lengths[s] // self.page_size)
        if new_pages > self.free_pages:
            raise RuntimeError(f"NSAKVCache.append: needs {new_pages} free pages, {self.free_pages} left "
                               f"(pool of {self.num_pages} x {self.page_size} rows)")
        start = 0
        for s, c in zip(seqs, counts):
            self._write(s, k_new[start:start + c], v_new[start:start + c])
            start += c
        self._sync_device()

    def _write(self, seq: int, k_rows: torch.Tensor, v_rows: torch.Tensor) -> None:
        old, c = self.lengths[seq], k_rows.shape[0]
        for page_no in range(-(-old // self.page_size), -(-(old + c) // self.page_size)):
            self.block_table[seq, page_no] = self._free.pop()
        pos = torch.arange(old, old + c)
        pages = self.block_table[seq, pos // self.page_size].long().to(self.device)
        offs = (pos % self.page_size).to(self.device)
        self.k_pages[pages, offs] = k_rows
        self.v_pages[pages, offs] = v_rows
        self.lengths[seq] = old + c
        lc_old, lc_new = self.num_compressed(old), self.num_compressed(old + c)
        if lc_new > lc_old:
            lo, hi = lc_old * self.stride, (lc_new - 1) * self.stride + self.kernel_size
            k_span, v_span = self.raw(seq, lo, hi)
            k_c, v_c = self.compress_fn(k_span, v_span)
            self.k_cmp[seq, lc_old:lc_new] = k_c.to(self.dtype)
            self.v_cmp[seq, lc_old:lc_new] = v_c.to(self.dtype)

    def set_pages(self, seq: int, pages: Sequence[int], length: int) -> None:
        """Adopt pages already filled by the caller (e.g. a prefill that wrote the pool itself)
        as sequence ``seq`` of ``length`` rows, and compress its windows. Raises, cache unchanged,
        if a page lies outside the pool, is used by another sequence, or is too few for ``length``."""
        seq = self._slot(seq)
        pages = [int(p) for p in pages]
        if not 0 <= length <= self.max_len or len(pages) != -(-length // self.page_size):
            raise ValueError(f"NSAKVCache.set_pages: {length} rows need {-(-length // self.page_size)} pages "
                             f"(max_len {self.max_len}), got {len(pages)}")
        bad = [p for p in pages if not 0 <= p < self.num_pages]
        if bad:
            raise ValueError(f"NSAKVCache.set_pages: pages outside the pool [0, {self.num_pages}): {bad}")
        owned = set(pages) - set(self._free) - set(self.pages_of(seq))
        if owned or len(set(pages)) != len(pages):
            raise ValueError(f"NSAKVCache.set_pages: pages in use elsewhere or repeated: {sorted(owned) or pages}")
        self.release(seq)
        self._free = [p for p in self._free if p not in set(pages)]
        self.block_table[seq, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
        self.lengths[seq] = length
        lc = self.num_compressed(length)
        if lc:
            k_span, v_span = self.raw(seq, 0, (lc - 1) * self.stride + self.kernel_size)
            k_c, v_c = self.compress_fn(k_span, v_span)
            self.k_cmp[seq, :lc], self.v_cmp[seq, :lc] = k_c.to(self.dtype), v_c.to(self.dtype)
        self._sync_device()

    def release(self, seq: int) -> None:
        """Empty sequence ``seq``: its pages go back to the pool."""
        seq = self._slot(seq)
        self._free.extend(reversed(self.pages_of(seq)))
        self.block_table[seq] = -1
        self.lengths[seq] = 0
        self._sync_device()

    # ------------------------------------------------------------------ reads
    def raw(self, seq: int, lo: int = 0, hi: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``[lo, hi)`` of sequence ``seq``'s raw k and v, gathered contiguous."""
        seq = self._slot(seq)
        hi = self.lengths[seq] if hi is None else hi
        if not 0 <= lo <= hi <= self.lengths[seq]:
            raise IndexError(f"NSAKVCache.raw: rows [{lo}, {hi}) outside sequence {seq} of {self.lengths[seq]} rows")
        pos = torch.arange(lo, hi)
        pages = self.block_table[seq, pos // self.page_size].long().to(self.device)
        offs = (pos % self.page_size).to(self.device)
        return self.k_pages[pages, offs], self.v_pages[pages, offs]

    def compressed_pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The compressed store as a page pool ``[batch * max_cmp / page_size, page_size, Hkv, *]``:
        sequence s's compressed token i is row ``i % page_size`` of page ``s * (max_cmp / page_size)
        + i // page_size``."""
        shape = (-1, self.page_size, self.num_kv_heads)
        return self.k_cmp.view(*shape, self.head_dim), self.v_cmp.view(*shape, self.v_head_dim)

    def compressed(self, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence ``seq``'s compressed k and v ``[Lc, Hkv, *]`` (views)."""
        seq = self._slot(seq)
        lc = self.num_compressed(self.lengths[seq])
        return self.k_cmp[seq, :lc], self.v_cmp[seq, :lc]
