"""fsagen: a generator of TileLang sparse-attention kernels (Native Sparse Attention).

Importing this package must stay cheap and must never need a GPU: the heavy modules (torch ops,
TileLang) are imported lazily by the modules that use them.
"""
__version__ = "0.1.0"

# public name -> module that defines it (loaded on first use)
_PUBLIC = {
    "selected_attention": "fsagen.ops",
    "compressed_attention": "fsagen.ops_dense",
    "sliding_window_attention": "fsagen.ops_dense",
    "select_blocks": "fsagen.ops_dense",
    "compress": "fsagen.compression",
    "nsa_attention": "fsagen.nsa",
    "NativeSparseAttention": "fsagen.nn",
    "NSASpec": "fsagen.spec",
    "NSAKVCache": "fsagen.kv_cache",
}


def __getattr__(name):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'fsagen' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_PUBLIC))
