"""fsagen: a generator of TileLang sparse-attention kernels (Native Sparse Attention).

Importing this package must stay cheap and must never need a GPU: the heavy modules (torch ops,
TileLang) are imported lazily by the modules that use them.
"""
__version__ = "0.1.0"


def __getattr__(name):
    # The public op lives in fsagen.ops (imports torch); load it on first use only.
    if name == "selected_attention":
        from fsagen import ops

        return ops.selected_attention
    raise AttributeError(f"module 'fsagen' has no attribute {name!r}")
