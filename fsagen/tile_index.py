"""Tile tables of packed varlen sequences, built on the GPU without host synchronisation.

A tile table lists ``(sequence, first position)`` pairs: sequence s of length ``L_s`` is cut into
``ceil(L_s / tile)`` tiles starting at positions ``0, tile, 2*tile, ...``. The table has a static
length, ``n_rows // tile + batch`` (an upper bound on the number of tiles), so its shape depends only
on input shapes; unused rows hold sequence ``-1`` and the kernels skip them.

A table depends on ``cu_seqlens`` and its arguments only, so it is built once per ``cu_seqlens``
tensor (``fsagen.seqlens_cache``).
"""
import torch

from .seqlens_cache import SEQLENS_CACHE


def seq_tiles(cu_seqlens: torch.Tensor, n_rows: int, tile: int, longest_first: bool = True) -> torch.Tensor:
    """int32 ``[n_rows // tile + batch, 2]``: (sequence, first position) of every tile.

    ``longest_first`` lists the tiles of each sequence from its end: with causal-like masks
    the last tiles of a sequence have the most keys, and launching them first balances the grid.
    """
    return SEQLENS_CACHE.get(cu_seqlens, ("seq_tiles", n_rows, tile, longest_first),
                             lambda: _build_seq_tiles(cu_seqlens, n_rows, tile, longest_first))


def _build_seq_tiles(cu_seqlens: torch.Tensor, n_rows: int, tile: int, longest_first: bool) -> torch.Tensor:
    cu = cu_seqlens.to(torch.int64)
    batch = cu.numel() - 1
    lens = cu[1:] - cu[:-1]
    per_seq = (lens + tile - 1) // tile
    ends = torch.cumsum(per_seq, 0)
    starts = ends - per_seq
    bound = n_rows // tile + batch
    i = torch.arange(bound, device=cu.device, dtype=torch.int64)
    seq = torch.searchsorted(ends, i, right=True).clamp_(max=max(batch - 1, 0))
    valid = i < ends[-1] if batch > 0 else torch.zeros_like(i, dtype=torch.bool)
    k = i - starts[seq]
    if longest_first:
        k = per_seq[seq] - 1 - k
    table = torch.stack([torch.where(valid, seq, -1), torch.where(valid, k * tile, 0)], dim=1)
    return table.to(torch.int32).contiguous()
