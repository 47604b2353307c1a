"""A tiny TileLang program standing in for the real kernels in infrastructure tests.

`build_programs(spec, plan, target)` has the signature of fsagen.kernels.build_programs; select it with
FSAGEN_PROGRAMS=fixture_programs:build_programs (tests/ on sys.path).
"""


def axpy(block: int = 128, threads: int = 128):
    """C[i] = A[i] + alpha * B[i] for any N (one compiled kernel for every length)."""
    import tilelang.language as T

    N = T.dynamic("N")

    @T.prim_func
    def axpy_kernel(A: T.Tensor((N,), "float32"), B: T.Tensor((N,), "float32"),
                    C: T.Tensor((N,), "float32"), alpha: T.float32):
        with T.Kernel(T.ceildiv(N, block), threads=threads) as bx:
            for i in T.Parallel(block):
                if bx * block + i < N:
                    C[bx * block + i] = A[bx * block + i] + alpha * B[bx * block + i]

    return axpy_kernel


def build_programs(spec, plan, target=None):
    return {"main": axpy()}


def reverse_blocks(block: int = 128, threads: int = 128):
    """B = A with each block of ``block`` elements reversed, through shared memory (a stage that
    has dynamic shared memory: ``block`` * 4 bytes)."""
    import tilelang.language as T

    N = T.dynamic("N")

    @T.prim_func
    def reverse_kernel(A: T.Tensor((N,), "float32"), B: T.Tensor((N,), "float32")):
        with T.Kernel(T.ceildiv(N, block), threads=threads) as bx:
            buf = T.alloc_shared((block,), "float32")
            for i in T.Parallel(block):
                buf[i] = T.if_then_else(bx * block + i < N, A[bx * block + i], 0)
            for i in T.Parallel(block):
                if bx * block + i < N:
                    B[bx * block + i] = buf[block - 1 - i]

    return reverse_kernel
