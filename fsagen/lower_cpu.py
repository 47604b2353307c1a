"""Compile PrimFuncs with TileLang's C backend (target kind "c") and call them on CPU tensors.

TileLang 0.1.15 builds a "c" target only through its cython execution backend (the tvm_ffi
backend cannot compile C device code, and its "llvm" target needs a TVM built with LLVM, which the
wheel is not). That backend's compiled library exports a plain C function

    int32_t call(<buffer>* A, ..., <scalar> alpha, ..., int32_t N, ...)

taking the PrimFunc's buffers as data pointers and its scalars by value, in parameter order,
followed by the symbolic dimensions (``T.dynamic``) the kernel reads, in the order TileLang chose.
``compile_programs`` records that order (the "abi", parsed from the wrapper's signature) in the
stage's metadata and copies the library into the artifact; ``load_function`` calls it with ctypes
after checking every tensor (device, dtype, rank, contiguity, static dims, and that each symbolic
dimension has one value), so an artifact loads without TileLang or a compiler.
"""
from __future__ import annotations

import ctypes
import re
import shutil
import time
from pathlib import Path

EXECUTION_BACKEND = "cython"
# gcc -O1: the kernels' serial loops run several times faster than at TileLang's default -O0, for
# about a second more compile time per stage.
COMPILE_FLAGS = ["-O1"]

_CALL = re.compile(r"int32_t\s+call\s*\(([^)]*)\)")
# PrimFunc dtype -> ctypes type of a scalar parameter
_SCALARS = {"int32": ctypes.c_int32, "int64": ctypes.c_int64, "float32": ctypes.c_float,
            "float64": ctypes.c_double}
# torch dtypes a tensor parameter accepts: bfloat16 travels as its uint16 bits (kernels/target.py)
_TENSOR_DTYPES = {
    "uint16": ("bfloat16", "uint16"), "float16": ("float16",), "float32": ("float32",),
    "int32": ("int32",), "int64": ("int64",), "uint8": ("uint8",), "int8": ("int8",),
}


def call_abi(host_source: str, params: list[dict]) -> list[dict]:
    """The arguments of the library's ``call``: ``{"param": i}`` for the i-th PrimFunc parameter,
    ``{"dim": name, "param": i, "axis": a}`` for a symbolic dimension read from tensor i."""
    match = _CALL.search(host_source)
    if match is None:
        raise RuntimeError("TileLang's C wrapper has no `int32_t call(...)` function")
    by_name = {p["name"]: i for i, p in enumerate(params)}
    abi = []
    for arg in filter(None, (a.strip() for a in match.group(1).split(","))):
        name = re.split(r"[\s*]+", arg)[-1]
        if name in by_name:
            abi.append({"param": by_name[name]})
            continue
        carrier = next(((i, axis) for i, p in enumerate(params) if p["kind"] == "tensor"
                        for axis, dim in enumerate(p["shape"]) if dim == name), None)
        if carrier is None:
            raise RuntimeError(f"C wrapper argument {arg!r} is neither a parameter nor a tensor dimension")
        abi.append({"dim": name, "param": carrier[0], "axis": carrier[1]})
    return abi


def compile_stage(func, target: dict, pass_configs: dict, dest: Path, stage: str) -> dict:
    """Compile one stage into dest/<stage>.so (+ <stage>.c, the kernel's C source); its meta."""
    import tilelang

    from fsagen.lower import _param_info

    params = _param_info(func)  # before compiling: a compile may mutate the PrimFunc
    start = time.perf_counter()
    kernel = tilelang.compile(func, out_idx=None, target=target, execution_backend=EXECUTION_BACKEND,
                              pass_configs=pass_configs or None, compile_flags=COMPILE_FLAGS)
    library, source = f"{stage}.so", f"{stage}.c"
    shutil.copyfile(kernel.adapter.libpath, dest / library)
    (dest / source).write_text(kernel.get_kernel_source())
    return {
        "library": library, "source": source, "entry": "call", "params": params,
        "abi": call_abi(kernel.get_host_source(), params),
        "pass_configs": {str(k): v for k, v in pass_configs.items()},
        "compile_seconds": round(time.perf_counter() - start, 3),
    }


class CPUFunction:
    """A compiled C stage: ``fn(*args)`` with the PrimFunc's parameters in order (CPU tensors,
    python ints and floats). Raises ValueError naming the parameter on a mismatch."""

    def __init__(self, library: Path, entry: str, params: list[dict], abi: list[dict]):
        self.library = Path(library)
        self.params = params
        self.abi = abi
        lib = ctypes.CDLL(str(self.library))
        if hasattr(lib, "init"):
            lib.init()
        self._lib = lib  # keeps the library loaded
        self._fn = getattr(lib, entry)
        self._fn.restype = ctypes.c_int32
        self._fn.argtypes = [self._ctype(a) for a in abi]

    def _ctype(self, arg: dict):
        if "dim" in arg:
            return ctypes.c_int32
        param = self.params[arg["param"]]
        return ctypes.c_void_p if param["kind"] == "tensor" else _SCALARS[param["dtype"]]

    def _check(self, args) -> dict:
        """Validate the arguments; returns {symbolic dimension: value}."""
        if len(args) != len(self.params):
            raise ValueError(f"{self.library.name}: expected {len(self.params)} arguments "
                             f"({[p['name'] for p in self.params]}), got {len(args)}")
        dims: dict[str, tuple[int, str]] = {}
        for value, param in zip(args, self.params):
            name = param["name"]
            if param["kind"] != "tensor":
                continue
            accepted = _TENSOR_DTYPES.get(param["dtype"], (param["dtype"],))
            if str(value.dtype).removeprefix("torch.") not in accepted:
                raise ValueError(f"{self.library.name}: {name} must have dtype {' or '.join(accepted)}, got {value.dtype}")
            if value.device.type != "cpu":
                raise ValueError(f"{self.library.name}: {name} must be a CPU tensor, got device {value.device}")
            if value.dim() != len(param["shape"]):
                raise ValueError(f"{self.library.name}: {name} must have {len(param['shape'])} dims, got {tuple(value.shape)}")
            if not value.is_contiguous():
                raise ValueError(f"{self.library.name}: {name} must be contiguous")
            for axis, dim in enumerate(param["shape"]):
                size = int(value.shape[axis])
                if dim.isdigit():
                    if size != int(dim):
                        raise ValueError(f"{self.library.name}: {name}.shape[{axis}] must be {dim}, got {size}")
                elif dim.isidentifier():
                    seen = dims.setdefault(dim, (size, name))
                    if seen[0] != size:
                        raise ValueError(f"{self.library.name}: {name}.shape[{axis}]={size} but "
                                         f"{seen[1]} gives {dim}={seen[0]}")
        return {dim: size for dim, (size, _) in dims.items()}

    def __call__(self, *args):
        dims = self._check(args)
        call_args = []
        for arg in self.abi:
            if "dim" in arg:
                call_args.append(dims[arg["dim"]])
                continue
            value, param = args[arg["param"]], self.params[arg["param"]]
            call_args.append(value.data_ptr() if param["kind"] == "tensor" else value)
        status = self._fn(*call_args)
        if status != 0:
            raise RuntimeError(f"{self.library.name}: kernel returned status {status}")


def load_function(library: Path, entry: str, params: list[dict], abi: list[dict]) -> CPUFunction:
    return CPUFunction(library, entry, params, abi)


def is_cpu_target(target: dict) -> bool:
    from fsagen.kernels.target import CPU_TARGET_KINDS

    return target.get("kind") in CPU_TARGET_KINDS
