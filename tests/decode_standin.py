"""A float64 stand-in for ``fsagen.decode.nsa_decode``, and a call log of the real one.

Where the prefill glue is replaced by its float64 stubs (shapes the CPU kernels do not take), tests
install this function as ``fsagen.decode.nsa_decode`` (fixture ``standin_decode``). It has the kernel's contract: the gated
NSA output of the query rows (a sequence's newest cached token, its last n for a sequence listed n times), from the cache's contents alone (raw rows
from the pages, compressed tokens from the compressed store), computed by
:func:`fsagen.reference_decode.nsa_decode_reference` and returned in the gates' dtype. Because it reads
only what the cache holds, a layer that wrote the cache wrongly gets the wrong answer.
"""
import pytest
import torch

from fsagen.reference_decode import nsa_decode_reference


def nsa_decode_standin(q, cache, seqs, gates, *, block_size, topk, init_blocks, local_blocks, window_size,
                       scale=None, return_parts=False):
    outs, parts = [], []
    for b, s in enumerate(seqs):  # a sequence listed n times: its last n tokens, in order
        k, v = cache.raw(s)
        k_cmp, v_cmp = cache.compressed(s)
        pos = torch.tensor([cache.lengths[s] - 1 - list(seqs[b + 1:]).count(s)], device=q.device)
        o, p = nsa_decode_reference(q[b:b + 1], k, v, k_cmp, v_cmp, pos, gates[b:b + 1], kernel_size=cache.kernel_size,
                                    stride=cache.stride, block_size=block_size, topk=topk, init_blocks=init_blocks,
                                    local_blocks=local_blocks, window_size=window_size, scale=scale,
                                    return_parts=True)
        outs.append(o)
        parts.append(p)
    o = torch.cat(outs).to(gates.dtype)
    if not return_parts:
        return o
    return o, {"topk_idx": torch.cat([p["topk_idx"] for p in parts], dim=1)}


def _log_calls(monkeypatch, fn):
    import fsagen.decode

    calls = []

    def logged(q, cache, seqs, gates, **kw):
        calls.append(list(seqs))
        return fn(q, cache, seqs, gates, **kw)

    monkeypatch.setattr(fsagen.decode, "nsa_decode", logged)
    return calls


@pytest.fixture
def standin_decode(monkeypatch):
    """``fsagen.decode.nsa_decode`` replaced by the float64 stand-in (for shapes the CPU kernels do
    not take, e.g. with the reference stubs of the prefill glue); returns its call log."""
    return _log_calls(monkeypatch, nsa_decode_standin)


@pytest.fixture
def decode_log(monkeypatch):
    """The real ``fsagen.decode.nsa_decode`` (the decode kernels, on CPU tensors through the cpu
    schedule), its calls logged; returns the log."""
    import fsagen.decode

    return _log_calls(monkeypatch, fsagen.decode.nsa_decode)
