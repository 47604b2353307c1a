"""The KV cache of an NSA layer for a batch of sequences of different lengths.

Raw keys and values live in a *paged* pool (``[num_pages, page_size, Hkv, D]``, one block table of
page indices per sequence, as vLLM and FlashInfer lay theirs out), so sequences grow without
reserving their maximum length. Compressed keys and values (``1 / stride`` of the raw rows) are
kept per sequence slot, contiguous. A compressed token ``c`` pools raw positions
``[c*stride, c*stride + kernel_size)``: it is emitted as soon as its window is complete.

Where the pooled windows come from (the *compression source*):

* pages (the default): from the raw rows already in the pages. Right when the cached rows are
  what is pooled, e.g. no rotary embedding.
* source rows (``source_dtype`` given): from rows the caller hands to :meth:`NSAKVCache.append`
  beside the cached ones (``source=``), e.g. a layer's *unrotated* keys in its compression dtype,
  while the pages hold the rotated keys in the kernel dtype. A compressed token pools rows
  ``> length - kernel_size`` only, so the cache keeps a per-slot ring of the last ``kernel_size``
  source rows (``src_k``, ``src_v``: row p at ``p % kernel_size``) instead of whole sequences.

Either way the windows go to ``compress_fn`` in batches (one call per append), with the position
of every window start, so a hook can apply position-dependent transforms (rotary) the way the
layer's prefill does; or the caller passes the compressed tokens it computed (``compressed=``).

Bookkeeping (lengths, block tables, the free-page list) is kept on the host: appending reads no
device value. The block table and the lengths are mirrored on the cache's device
(``block_table_dev``, ``lengths_dev``, refreshed by every mutating call) for the decode kernels,
which so never need a host value of the cache: a decode step can be captured in a CUDA graph.
Every mutating call validates all of its inputs first and raises before touching anything, so a
failed call leaves the cache as it was.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# compress_fn(k, v, cu_seqlens, starts) -> (k_cmp, v_cmp): see NSAKVCache
CompressFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def mean_compress(kernel_size: int, stride: int) -> CompressFn:
    """Mean pooling (``fsagen.compress`` kind "mean") of the complete windows of packed spans
    (a :data:`CompressFn`; the window starts are not used)."""

    def pool(k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, starts: torch.Tensor):
        from fsagen.compression import compress

        k_cmp, v_cmp, _ = compress(k, v, cu_seqlens, kernel_size, stride, "mean", num_compressed=starts.shape[0],
                                   check_values=False)
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
        compress_fn: pools windows into compressed tokens (default mean pooling):
            ``compress_fn(k, v, cu_seqlens, starts) -> (k_cmp, v_cmp)`` with ``k [n, Hkv, D]``,
            ``v [n, Hkv, Dv]`` packed spans (int32 ``cu_seqlens [S + 1]``), each starting on a
            window boundary and holding exactly the rows of its complete windows, and int64
            ``starts [Nc]``: the position in its sequence of every window's first row, in output
            order (``Nc`` windows in all: their count needs no host read). Returns ``[Nc, Hkv, *]``
            (cast to ``dtype`` by the cache). Spans come from the pages, or with ``source_dtype``
            from the source rows, in the dtype the source rows of that append had.
            :meth:`fsagen.NativeSparseAttention.new_cache` gives the layer's own (its compression
            kind and parameters, then rotary at the window start).
        source_dtype: None: windows are pooled from the pages. A dtype: windows are pooled from the
            source rows every :meth:`append` must pass (``source=``), kept in a per-slot ring of the
            last ``kernel_size`` rows in this dtype (it must hold the source rows exactly: their
            dtype or a wider one).
    """

    def __init__(self, batch: int, num_pages: int, page_size: int, max_len: int, num_kv_heads: int,
                 head_dim: int, v_head_dim: int | None = None, *, kernel_size: int, stride: int,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                 compress_fn: CompressFn | None = None, source_dtype: torch.dtype | None = None):
        for name, value in (("batch", batch), ("num_pages", num_pages), ("page_size", page_size),
                            ("max_len", max_len), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                            ("kernel_size", kernel_size), ("stride", stride)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"NSAKVCache: {name} must be an int >= 1, got {value!r}")
        if kernel_size % stride:
            raise ValueError(f"NSAKVCache: kernel_size={kernel_size} must be a multiple of stride={stride}")
        if source_dtype is not None and not (isinstance(source_dtype, torch.dtype) and source_dtype.is_floating_point):
            raise TypeError(f"NSAKVCache: source_dtype must be a floating torch.dtype or None, got {source_dtype!r}")
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
        # the ring of the last kernel_size source rows per slot (row p at p % kernel_size)
        self.source_dtype = source_dtype
        if source_dtype is not None:
            self.src_k = torch.zeros(batch, kernel_size, num_kv_heads, head_dim, dtype=source_dtype, device=self.device)
            self.src_v = torch.zeros(batch, kernel_size, num_kv_heads, dv, dtype=source_dtype, device=self.device)

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
        self._check_tables(range(self.batch))
        self._sync_device()

    def _check_tables(self, seqs) -> None:
        """Raise unless the block-table entries of the rows sequences ``seqs`` hold lie in the pool."""
        seqs = list(seqs)
        if not seqs:
            return
        held = torch.tensor([-(-self.lengths[s] // self.page_size) for s in seqs])
        table = self.block_table[seqs]
        bad = (torch.arange(table.shape[1])[None, :] < held[:, None]) & ((table < 0) | (table >= self.num_pages))
        if bool(bad.any()):
            row = int(bad.any(1).nonzero()[0, 0])
            raise ValueError(f"NSAKVCache: block table of sequence {seqs[row]} points outside the pool "
                             f"[0, {self.num_pages}): {table[row][bad[row]].tolist()}")

    # ------------------------------------------------------------------ writes
    def check_append(self, seqs: Sequence[int], counts: Sequence[int]) -> tuple[list[int], list[int]]:
        """Raise (nothing changed) unless ``counts[i]`` rows fit onto sequence ``seqs[i]``: valid,
        distinct slots, ``max_len``, free pages, and block tables pointing inside the pool for the
        rows the slots hold. Returns ``(seqs, counts)`` as lists of ints."""
        seqs = [self._slot(s) for s in seqs]
        if len(set(seqs)) != len(seqs):
            raise ValueError(f"NSAKVCache.append: each sequence at most once per call, got {seqs}")
        counts = [int(c) for c in counts]
        if len(counts) != len(seqs) or any(c < 0 for c in counts):
            raise ValueError(f"NSAKVCache.append: counts must be one int >= 0 per sequence, got {counts}")
        new_pages = 0
        for s, c in zip(seqs, counts):
            if self.lengths[s] + c > self.max_len:
                raise ValueError(f"NSAKVCache.append: sequence {s} would hold {self.lengths[s] + c} rows, "
                                 f"over max_len={self.max_len}")
            new_pages += -(-(self.lengths[s] + c) // self.page_size) - -(-self.lengths[s] // self.page_size)
        if new_pages > self.free_pages:
            raise RuntimeError(f"NSAKVCache.append: needs {new_pages} free pages, {self.free_pages} left "
                               f"(pool of {self.num_pages} x {self.page_size} rows)")
        self._check_tables(seqs)
        return seqs, counts

    def append(self, seqs: Sequence[int], k_new: torch.Tensor, v_new: torch.Tensor,
               counts: Sequence[int], *, source: tuple[torch.Tensor, torch.Tensor] | None = None,
               compressed: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Append ``counts[i]`` new rows to sequence ``seqs[i]``; ``k_new``/``v_new`` hold them packed
        in that order (``[sum(counts), Hkv, *]``). The windows this completes are pooled at once.

        ``source``: ``(k_src, v_src)``, the same rows as the compression source (packed like
        ``k_new``; any dtype ``source_dtype`` holds exactly), required when the cache has a
        ``source_dtype`` and refused otherwise. ``compressed``: ``(k_cmp, v_cmp)``, the compressed
        tokens of exactly the windows this append completes, packed in ``seqs`` order, in the
        cache's dtype (e.g. a prefill that computed them already); ``compress_fn`` is then not
        called. Raises (cache unchanged) on a bad index, a repeated sequence, a shape/dtype/device
        mismatch, a sequence that would exceed ``max_len``, too few free pages, or a block table
        pointing outside the pool. Nothing written is tracked by autograd."""
        seqs, counts = self.check_append(seqs, counts)
        self._check_rows("k_new", k_new, self.head_dim)
        self._check_rows("v_new", v_new, self.v_head_dim)
        if k_new.shape[0] != sum(counts) or v_new.shape[0] != sum(counts):
            raise ValueError(f"NSAKVCache.append: k_new/v_new must hold sum(counts)={sum(counts)} rows, "
                             f"got {k_new.shape[0]} and {v_new.shape[0]}")
        self._check_source(source, sum(counts))
        windows = [(self.num_compressed(self.lengths[s]), self.num_compressed(self.lengths[s] + c))
                   for s, c in zip(seqs, counts)]
        if compressed is not None:
            total = sum(hi - lo for lo, hi in windows)
            for name, t, dim in (("compressed[0]", compressed[0], self.head_dim),
                                 ("compressed[1]", compressed[1], self.v_head_dim)):
                self._check_rows(name, t, dim)
                if t.shape[0] != total:
                    raise ValueError(f"NSAKVCache.append: {name} must hold the {total} compressed tokens this "
                                     f"append completes, got {t.shape[0]} rows")
        with torch.no_grad():
            spans = None
            if compressed is None and self.source_dtype is not None and any(c1 > c0 for c0, c1 in windows):
                spans = self._source_spans(seqs, counts, windows, source)  # read before the ring moves
            start = 0
            for s, c in zip(seqs, counts):
                self._write(s, k_new[start:start + c], v_new[start:start + c])
                start += c
            if self.source_dtype is not None:
                self._keep_source(seqs, counts, source)
            if compressed is None and any(c1 > c0 for c0, c1 in windows):
                if spans is None:  # pooled from the pages just written
                    spans = self._page_spans(seqs, windows)
                compressed = self._pool(spans, windows)
            if compressed is not None:
                self._store_compressed(seqs, windows, *compressed)
        self._sync_device()

    def _check_source(self, source, rows: int) -> None:
        if self.source_dtype is None:
            if source is not None:
                raise ValueError("NSAKVCache.append: source rows given, but this cache pools windows from its pages "
                                 "(construct it with source_dtype to pool from source rows)")
            return
        if source is None or not isinstance(source, (tuple, list)) or len(source) != 2:
            raise ValueError("NSAKVCache.append: this cache pools windows from source rows (source_dtype="
                             f"{self.source_dtype}): pass source=(k_src, v_src) beside the cached rows")
        for name, t, dim in (("source[0]", source[0], self.head_dim), ("source[1]", source[1], self.v_head_dim)):
            if not isinstance(t, torch.Tensor) or t.ndim != 3 or tuple(t.shape) != (rows, self.num_kv_heads, dim):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"NSAKVCache.append: {name} must be [{rows}, {self.num_kv_heads}, {dim}] like the "
                                 f"cached rows, got {got}")
            if not t.dtype.is_floating_point or torch.promote_types(t.dtype, self.source_dtype) != self.source_dtype:
                raise ValueError(f"NSAKVCache.append: {name} dtype {t.dtype} is not held exactly by the cache's "
                                 f"source_dtype {self.source_dtype}")
            if t.device != self.device:
                raise ValueError(f"NSAKVCache.append: {name} must be on {self.device}, got {t.device}")
        if source[0].dtype != source[1].dtype:
            raise ValueError(f"NSAKVCache.append: source k and v must share a dtype, got {source[0].dtype} and "
                             f"{source[1].dtype}")

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

    # ------------------------------------------------------------------ compression
    def _window_rows(self, windows) -> list[tuple[int, int]]:
        """Raw rows ``[lo, hi)`` pooled by compressed tokens ``[c0, c1)`` of each sequence."""
        return [(c0 * self.stride, (c1 - 1) * self.stride + self.kernel_size) if c1 > c0 else (0, 0)
                for c0, c1 in windows]

    def _source_spans(self, seqs, counts, windows, source):
        """(k, v) spans of the source rows of the new windows, in the source rows' dtype: the rows
        before the append from the ring, the others from ``source``. Call before ``_keep_source``."""
        ks, hkv = self.kernel_size, self.num_kv_heads
        idx, first = [], 0
        for s, c, (lo, hi) in zip(seqs, counts, self._window_rows(windows)):
            old = self.lengths[s]
            pos = torch.arange(lo, hi)
            ring = s * ks + pos % ks  # rows before the append: lo > old - ks, so still in the ring
            idx.append(torch.where(pos < old, ring, self.batch * ks + first + pos - old))
            first += c
        idx = torch.cat(idx).to(self.device)
        out = []
        for ring, rows in ((self.src_k, source[0]), (self.src_v, source[1])):
            pool = torch.cat([ring.view(-1, hkv, ring.shape[-1]), rows.to(self.source_dtype)])
            out.append(pool[idx].to(rows.dtype))
        return out

    def _keep_source(self, seqs, counts, source) -> None:
        """Keep the last ``kernel_size`` source rows of each sequence in its ring (lengths updated)."""
        ks, dst, src, first = self.kernel_size, [], [], 0
        for s, c in zip(seqs, counts):
            new_len = self.lengths[s]
            keep = torch.arange(max(new_len - c, new_len - ks), new_len)  # positions of rows kept
            dst.append(s * ks + keep % ks)
            src.append(first + keep - (new_len - c))
            first += c
        if not dst:
            return
        dst, src = torch.cat(dst).to(self.device), torch.cat(src).to(self.device)
        for ring, rows in ((self.src_k, source[0]), (self.src_v, source[1])):
            ring.view(-1, self.num_kv_heads, ring.shape[-1])[dst] = rows[src].to(self.source_dtype)

    def _page_spans(self, seqs, windows):
        """(k, v) spans of the new windows read from the pages (after the writes)."""
        parts = [self.raw(s, lo, hi) for s, (lo, hi) in zip(seqs, self._window_rows(windows)) if hi > lo]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _pool(self, spans, windows):
        """``compress_fn`` over every span with new windows, in one call."""
        lens = [hi - lo for lo, hi in self._window_rows(windows) if hi > lo]
        starts = [torch.arange(c0, c1) * self.stride for c0, c1 in windows if c1 > c0]
        cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(self.device)
        k_c, v_c = self.compress_fn(spans[0], spans[1], cu, torch.cat(starts).to(self.device))
        n = sum(c1 - c0 for c0, c1 in windows)
        if tuple(k_c.shape) != (n, self.num_kv_heads, self.head_dim) or \
                tuple(v_c.shape) != (n, self.num_kv_heads, self.v_head_dim):
            raise RuntimeError(f"NSAKVCache: compress_fn returned {tuple(k_c.shape)} and {tuple(v_c.shape)} for {n} "
                               "windows")
        return k_c, v_c

    def _store_compressed(self, seqs, windows, k_c, v_c) -> None:
        seq_idx = [torch.full((c1 - c0,), s) for s, (c0, c1) in zip(seqs, windows) if c1 > c0]
        if not seq_idx:
            return
        tok_idx = torch.cat([torch.arange(c0, c1) for c0, c1 in windows if c1 > c0]).to(self.device)
        seq_idx = torch.cat(seq_idx).to(self.device)
        self.k_cmp[seq_idx, tok_idx] = k_c.to(self.dtype)
        self.v_cmp[seq_idx, tok_idx] = v_c.to(self.dtype)

    def set_pages(self, seq: int, pages: Sequence[int], length: int) -> None:
        """Adopt pages already filled by the caller (e.g. a prefill that wrote the pool itself)
        as sequence ``seq`` of ``length`` rows, and compress its windows. Raises, cache unchanged,
        if a page lies outside the pool, is used by another sequence, or is too few for ``length``."""
        seq = self._slot(seq)
        if self.source_dtype is not None:
            raise ValueError(f"NSAKVCache.set_pages: this cache pools windows from source rows (source_dtype="
                             f"{self.source_dtype}), which pages do not hold: fill it with append(..., source=...)")
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
        windows = [(0, self.num_compressed(length))]
        if windows[0][1]:
            with torch.no_grad():
                self._store_compressed([seq], windows, *self._pool(self._page_spans([seq], windows), windows))
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
